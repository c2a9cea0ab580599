"""Loss-landscape analysis for PyTorch and PyTorch Lightning.

Filter-normalized loss surfaces (Li et al., NeurIPS 2018), linear interpolation
(Goodfellow et al., 2015), and the figures that show them.
"""

from lightning_landscape._versions import package_version as _package_version
from lightning_landscape.callbacks import LossSurface
from lightning_landscape.directions import random_direction
from lightning_landscape.plots import (
    landscape_figures,
    plot_contour,
    plot_curve,
    plot_heatmap,
    plot_surface_3d,
    plotly_surface,
)
from lightning_landscape.results import Landscape
from lightning_landscape.state import ModelState, preserved_state
from lightning_landscape.surface import GridEvaluator, interpolate, loss_surface, make_batch_loss

__version__ = _package_version()

__all__ = [
    "GridEvaluator",
    "Landscape",
    "LossSurface",
    "ModelState",
    "interpolate",
    "landscape_figures",
    "loss_surface",
    "make_batch_loss",
    "plot_contour",
    "plot_curve",
    "plot_heatmap",
    "plot_surface_3d",
    "plotly_surface",
    "preserved_state",
    "random_direction",
]
