"""TensorBoard: figures and scalars in the logger's event files."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.loggers import TensorBoardLogger

from lightning_landscape.trackers.base import Publication


class TensorBoardTracker:
    """Publishes figures and scalars to a TensorBoardLogger (subclasses too) via ``add_figure``/``add_scalar``.

    Example:
        >>> TensorBoardTracker.accepts(object())
        False
    """

    def __init__(self, logger: TensorBoardLogger) -> None:
        self.logger = logger

    @staticmethod
    def accepts(logger: Any) -> bool:
        """Whether ``logger`` is a TensorBoardLogger (subclasses included)."""
        return isinstance(logger, TensorBoardLogger)

    def publish(self, pub: Publication) -> None:
        """Write the figures and scalars at ``pub.step`` and flush."""
        writer = self.logger.experiment
        for key, fig in pub.figures.items():
            writer.add_figure(pub.key(key), fig, global_step=pub.step, close=False)
        for key, value in pub.named_scalars().items():
            writer.add_scalar(key, value, global_step=pub.step)
        writer.flush()
