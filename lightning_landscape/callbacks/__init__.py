"""Lightning callbacks: thin wrappers that pick the moment, the data and the loss."""

from lightning_landscape.callbacks.connect import ModeConnectivity
from lightning_landscape.callbacks.hessian import HessianSpectrum
from lightning_landscape.callbacks.loss_surface import LossSurface
from lightning_landscape.callbacks.sharpness import Sharpness
from lightning_landscape.callbacks.swa import SWAComparison
from lightning_landscape.callbacks.trajectory import TrajectoryPCA

__all__ = ["HessianSpectrum", "LossSurface", "ModeConnectivity", "SWAComparison", "Sharpness", "TrajectoryPCA"]
