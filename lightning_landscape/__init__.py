"""Loss-landscape analysis for PyTorch and PyTorch Lightning.

Filter-normalized loss surfaces (Li et al., NeurIPS 2018), linear interpolation
(Goodfellow et al., 2015), optimization trajectories on their PCA plane, and the
figures that show them; Hessian checks (λmax, λmin, |λmin/λmax|, trace, density) and
Hessian-eigenvector planes; the papers' comparisons: two runs on one line, mode-connecting
curves (Garipov et al. 2018), SWA vs SGD (Izmailov et al. 2018), ε-sharpness (Keskar et al.
2017) and basin volume (Huang et al. 2019). The functional core imports no Lightning; the
callbacks (``LossSurface``, ``TrajectoryPCA``, ``HessianSpectrum``, ``Sharpness``,
``SWAComparison``, ``ModeConnectivity``) load it on first use.
"""

from typing import Any

from lightning_landscape._versions import package_version as _package_version
from lightning_landscape.checkpoints import load_weights
from lightning_landscape.connect import Curve, connect, curve_plane, evaluate_curve, fit_curve
from lightning_landscape.directions import random_direction
from lightning_landscape.errors import ConvergenceWarning, LandscapeWarning
from lightning_landscape.hessian import (
    HessianOperator,
    HessianReport,
    SpectralDensity,
    hessian_check,
    hessian_directions,
    ratio_map,
)
from lightning_landscape.plots import (
    landscape_figures,
    plot_basin_radii,
    plot_connection,
    plot_contour,
    plot_curve,
    plot_curve_plane,
    plot_density,
    plot_eigenvalues,
    plot_heatmap,
    plot_interpolation,
    plot_ratio_map,
    plot_surface_3d,
    plot_swa_directions,
    plot_swa_line,
    plotly_surface,
)
from lightning_landscape.results import CurveResult, Landscape, SharpnessReport
from lightning_landscape.seeded import SeededDirection
from lightning_landscape.sharpness import sharpness
from lightning_landscape.state import ModelState, preserved_state
from lightning_landscape.surface import GridEvaluator, interpolate, interpolate_runs, loss_surface, make_batch_loss
from lightning_landscape.trajectory import PCAResult, SnapshotStore, TooFewSnapshotsError, trajectory_pca

__version__ = _package_version()

_CALLBACKS = {"HessianSpectrum", "LossSurface", "ModeConnectivity", "SWAComparison", "Sharpness", "TrajectoryPCA"}


def __getattr__(name: str) -> Any:
    # Callbacks import pytorch_lightning; load them only when asked for.
    if name in _CALLBACKS:
        from lightning_landscape import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")


__all__ = [
    "ConvergenceWarning",
    "Curve",
    "CurveResult",
    "GridEvaluator",
    "HessianOperator",
    "HessianReport",
    "HessianSpectrum",
    "Landscape",
    "LandscapeWarning",
    "LossSurface",
    "ModeConnectivity",
    "ModelState",
    "PCAResult",
    "SWAComparison",
    "SeededDirection",
    "Sharpness",
    "SharpnessReport",
    "SnapshotStore",
    "SpectralDensity",
    "TooFewSnapshotsError",
    "TrajectoryPCA",
    "connect",
    "curve_plane",
    "evaluate_curve",
    "fit_curve",
    "hessian_check",
    "hessian_directions",
    "interpolate",
    "interpolate_runs",
    "landscape_figures",
    "load_weights",
    "loss_surface",
    "make_batch_loss",
    "plot_basin_radii",
    "plot_connection",
    "plot_contour",
    "plot_curve",
    "plot_curve_plane",
    "plot_density",
    "plot_eigenvalues",
    "plot_heatmap",
    "plot_interpolation",
    "plot_ratio_map",
    "plot_surface_3d",
    "plot_swa_directions",
    "plot_swa_line",
    "plotly_surface",
    "preserved_state",
    "random_direction",
    "ratio_map",
    "sharpness",
    "trajectory_pca",
]
