"""Figures: pure functions from a result to a matplotlib ``Figure``, one module per result kind."""

from lightning_landscape.plots._figure import axis_labels, contour_levels, masked, new_figure
from lightning_landscape.plots.curves import plot_connection, plot_curve_plane
from lightning_landscape.plots.hessian import plot_density, plot_eigenvalues, plot_ratio_map
from lightning_landscape.plots.interpolation import plot_interpolation
from lightning_landscape.plots.landscape import (
    landscape_figures,
    plot_contour,
    plot_curve,
    plot_heatmap,
    plot_surface_3d,
    plotly_surface,
)
from lightning_landscape.plots.sharpness import plot_basin_radii
from lightning_landscape.plots.swa import plot_swa_directions, plot_swa_line
from lightning_landscape.plots.trajectory import pca_axis_labels, plot_path

__all__ = [
    "axis_labels",
    "contour_levels",
    "landscape_figures",
    "masked",
    "new_figure",
    "pca_axis_labels",
    "plot_basin_radii",
    "plot_connection",
    "plot_contour",
    "plot_curve",
    "plot_curve_plane",
    "plot_density",
    "plot_eigenvalues",
    "plot_heatmap",
    "plot_interpolation",
    "plot_path",
    "plot_ratio_map",
    "plot_surface_3d",
    "plot_swa_directions",
    "plot_swa_line",
    "plotly_surface",
]
