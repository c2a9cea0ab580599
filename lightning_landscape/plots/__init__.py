"""Figures: pure functions from a result to a matplotlib ``Figure``, one module per result kind."""

from lightning_landscape.plots._figure import axis_labels, contour_levels, masked, new_figure
from lightning_landscape.plots.hessian import plot_density, plot_eigenvalues, plot_ratio_map
from lightning_landscape.plots.landscape import (
    landscape_figures,
    plot_contour,
    plot_curve,
    plot_heatmap,
    plot_surface_3d,
    plotly_surface,
)
from lightning_landscape.plots.trajectory import pca_axis_labels, plot_path

__all__ = [
    "axis_labels",
    "contour_levels",
    "landscape_figures",
    "masked",
    "new_figure",
    "pca_axis_labels",
    "plot_contour",
    "plot_curve",
    "plot_density",
    "plot_eigenvalues",
    "plot_heatmap",
    "plot_path",
    "plot_ratio_map",
    "plot_surface_3d",
    "plotly_surface",
]
