"""Any other logger (CSV, MLflow, Neptune, ...): the scalars through ``log_metrics``."""

from __future__ import annotations

from typing import Any

from lightning_landscape.trackers.base import Publication


class ScalarsTracker:
    """Publishes the scalars of a :class:`Publication` to any Lightning logger via ``log_metrics`` and ``save``.

    Example:
        >>> class PrintLogger:
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        ...     def save(self):
        ...         pass
        >>> ScalarsTracker(PrintLogger()).publish(Publication("surface", step=3, scalars={"center_loss": 0.5}))
        3 {'surface/center_loss': 0.5}
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    @staticmethod
    def accepts(logger: Any) -> bool:
        """Every logger with ``log_metrics``."""
        return callable(getattr(logger, "log_metrics", None))

    def publish(self, pub: Publication) -> None:
        """Log the scalars at ``pub.step`` and save the logger."""
        named = pub.named_scalars()
        if named:
            self.logger.log_metrics(named, step=pub.step)
            self.logger.save()
