"""Lightning callbacks: thin wrappers that pick the moment, the data and the loss."""

from lightning_landscape.callbacks.loss_surface import LossSurface

__all__ = ["LossSurface"]
