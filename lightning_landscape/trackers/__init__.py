"""The one tracker layer: results -> files, W&B, TensorBoard, and the scalars of any other logger.

Callbacks compute; trackers only write. Each Lightning logger gets the first tracker
in :data:`TRACKERS` that accepts it (by ``isinstance``, so subclasses count); a new
tracker (e.g. MLflow with artifacts) is one new module and one entry in that list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning_landscape.trackers.base import Publication, Tracker
from lightning_landscape.trackers.files import SavableResult, write_files
from lightning_landscape.trackers.scalars import ScalarsTracker
from lightning_landscape.trackers.tensorboard import TensorBoardTracker
from lightning_landscape.trackers.wandb import WandbTracker

#: Tried in order; the first whose ``accepts(logger)`` is true publishes to that logger.
TRACKERS: list[Any] = [WandbTracker, TensorBoardTracker, ScalarsTracker]


def trackers_for(loggers: Iterable[Any]) -> list[Tracker]:
    """One tracker per logger that any tracker accepts.

    Example:
        >>> from pytorch_lightning.loggers import CSVLogger
        >>> [type(t).__name__ for t in trackers_for([CSVLogger("logs")])]
        ['ScalarsTracker']
    """
    out: list[Tracker] = []
    for logger in loggers:
        for cls in TRACKERS:
            if cls.accepts(logger):
                out.append(cls(logger))
                break
    return out


def publish(loggers: Iterable[Any], pub: Publication) -> None:
    """Send ``pub`` to every logger. Run on global rank zero only; errors propagate.

    Example:
        >>> class PrintLogger:  # stands in for a CSV or MLflow logger
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        ...     def save(self):
        ...         pass
        >>> publish([PrintLogger()], Publication("surface", step=3, scalars={"center_loss": 0.5}))
        3 {'surface/center_loss': 0.5}
    """
    for tracker in trackers_for(loggers):
        tracker.publish(pub)


def publish_text(loggers: Iterable[Any], key: str, text: str, step: int) -> None:
    """Record ``text`` (e.g. an analysis' traceback) in every logger that keeps text.

    W&B: a one-cell table under ``key``; TensorBoard: ``add_text``; others keep no text.
    """
    for logger in loggers:
        if WandbTracker.accepts(logger):
            logger.log_text(key, columns=["text"], data=[[text]], step=step)
        elif TensorBoardTracker.accepts(logger):
            logger.experiment.add_text(key, f"<pre>{text}</pre>", global_step=step)
            logger.experiment.flush()


__all__ = [
    "TRACKERS",
    "Publication",
    "SavableResult",
    "ScalarsTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "publish",
    "publish_text",
    "trackers_for",
    "write_files",
]
