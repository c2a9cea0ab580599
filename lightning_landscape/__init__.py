"""Loss-landscape analysis for PyTorch and PyTorch Lightning.

Filter-normalized loss surfaces (Li et al., NeurIPS 2018), linear interpolation
(Goodfellow et al., 2015), optimization trajectories on their PCA plane, and the
figures that show them; Hessian checks (λmax, λmin, |λmin/λmax|, trace, density). The
functional core imports no Lightning; the callbacks
(``LossSurface``, ``TrajectoryPCA``, ``HessianSpectrum``) load it on first use.
"""

from typing import Any

from lightning_landscape._versions import package_version as _package_version
from lightning_landscape.directions import random_direction
from lightning_landscape.errors import ConvergenceWarning, LandscapeWarning
from lightning_landscape.hessian import HessianOperator, HessianReport, SpectralDensity, hessian_check, ratio_map
from lightning_landscape.plots import (
    landscape_figures,
    plot_contour,
    plot_curve,
    plot_density,
    plot_eigenvalues,
    plot_heatmap,
    plot_ratio_map,
    plot_surface_3d,
    plotly_surface,
)
from lightning_landscape.results import Landscape
from lightning_landscape.state import ModelState, preserved_state
from lightning_landscape.surface import GridEvaluator, interpolate, loss_surface, make_batch_loss
from lightning_landscape.trajectory import PCAResult, SnapshotStore, TooFewSnapshotsError, trajectory_pca

__version__ = _package_version()

_CALLBACKS = {"HessianSpectrum", "LossSurface", "TrajectoryPCA"}


def __getattr__(name: str) -> Any:
    # Callbacks import pytorch_lightning; load them only when asked for.
    if name in _CALLBACKS:
        from lightning_landscape import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")


__all__ = [
    "ConvergenceWarning",
    "GridEvaluator",
    "HessianOperator",
    "HessianReport",
    "HessianSpectrum",
    "Landscape",
    "LandscapeWarning",
    "LossSurface",
    "ModelState",
    "PCAResult",
    "SnapshotStore",
    "SpectralDensity",
    "TooFewSnapshotsError",
    "TrajectoryPCA",
    "hessian_check",
    "interpolate",
    "landscape_figures",
    "loss_surface",
    "make_batch_loss",
    "plot_contour",
    "plot_density",
    "plot_eigenvalues",
    "plot_ratio_map",
    "plot_curve",
    "plot_heatmap",
    "plot_surface_3d",
    "plotly_surface",
    "preserved_state",
    "random_direction",
    "ratio_map",
    "trajectory_pca",
]
