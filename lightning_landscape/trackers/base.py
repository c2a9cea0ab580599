"""What a tracker receives, and the protocol every tracker implements."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from matplotlib.figure import Figure


@dataclass
class Publication:
    """One analysis' output, ready for every tracker.

    Attributes:
        prefix: the key prefix (the callback's ``name``): keys are ``<prefix>/<name>``.
        step: the trainer's global step.
        scalars: summary numbers (``center_loss``, ``lambda_max``, ...).
        figures: matplotlib figures by name.
        files: the files already written (``"npz"`` and one PNG per figure).
        artifact_type: the W&B artifact type of the ``.npz`` files.
        plotly_figure: an interactive figure for W&B (or ``None``).
        tables: ``name -> (columns, rows)``.

    Example:
        >>> pub = Publication("loss_surface", step=3, scalars={"center_loss": 0.5})
        >>> pub.named_scalars()
        {'loss_surface/center_loss': 0.5}
    """

    prefix: str
    step: int
    scalars: Mapping[str, float] = field(default_factory=dict)
    figures: Mapping[str, Figure] = field(default_factory=dict)
    files: Mapping[str, Path] = field(default_factory=dict)
    artifact_type: str = "landscape"
    plotly_figure: Any = None
    tables: Mapping[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)

    def key(self, name: str) -> str:
        """``<prefix>/<name>``."""
        return f"{self.prefix}/{name}"

    def named_scalars(self) -> dict[str, float]:
        """The scalars under their full keys, as floats."""
        return {self.key(k): float(v) for k, v in self.scalars.items()}


@runtime_checkable
class Tracker(Protocol):
    """Sends a :class:`Publication` to one experiment tracker (one Lightning logger).

    A tracker only writes: it never calls a collective, so callers run it on global rank zero.
    Errors propagate: a broken logger is the caller's to report, never silently skipped.

    Example:
        >>> class Printer:
        ...     def publish(self, pub: Publication) -> None:
        ...         print(pub.named_scalars())
        >>> isinstance(Printer(), Tracker)
        True
    """

    def publish(self, pub: Publication) -> None:
        """Send ``pub`` to the tracker."""
        ...
