"""Result containers (one per analysis) and the one ``.npz`` format they share."""

from lightning_landscape.results.curve import CurveResult
from lightning_landscape.results.hessian import HessianReport, SpectralDensity
from lightning_landscape.results.landscape import Landscape
from lightning_landscape.results.npz import load_npz, save_npz
from lightning_landscape.results.pca import PCAResult
from lightning_landscape.results.sharpness import SharpnessReport

__all__ = [
    "CurveResult",
    "HessianReport",
    "Landscape",
    "PCAResult",
    "SharpnessReport",
    "SpectralDensity",
    "load_npz",
    "save_npz",
]
