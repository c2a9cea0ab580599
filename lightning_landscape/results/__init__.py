"""Result containers (one per analysis) and the one ``.npz`` format they share."""

from lightning_landscape.results.hessian import HessianReport, SpectralDensity
from lightning_landscape.results.landscape import Landscape
from lightning_landscape.results.npz import load_npz, save_npz
from lightning_landscape.results.pca import PCAResult

__all__ = ["HessianReport", "Landscape", "PCAResult", "SpectralDensity", "load_npz", "save_npz"]
