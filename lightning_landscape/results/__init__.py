"""Result containers (one per analysis) and the one ``.npz`` format they share."""

from lightning_landscape.results.landscape import Landscape
from lightning_landscape.results.npz import load_npz, save_npz

__all__ = ["Landscape", "load_npz", "save_npz"]
