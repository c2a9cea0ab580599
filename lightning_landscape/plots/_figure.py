"""What every figure shares: a pyplot-free Figure, masking of non-finite values, axis labels, contour levels.

No pyplot state is touched: every figure is a ``matplotlib.figure.Figure`` with
an Agg canvas, so plotting works in headless training jobs and threads and never
leaks windows. Non-finite values are masked, not drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_landscape.results import Landscape


def new_figure(figsize: tuple[float, float] = (5.5, 4.5), **kwargs: Any) -> Figure:
    """A Figure with its own Agg canvas (no pyplot state).

    Example:
        >>> new_figure().get_size_inches().tolist()
        [5.5, 4.5]
    """
    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def masked(values: np.ndarray, log_scale: bool = False) -> np.ma.MaskedArray:
    """``values`` with non-finite entries (and, on a log scale, entries <= 0) masked.

    Example:
        >>> masked(np.array([1.0, np.nan, 0.0]), log_scale=True).mask.tolist()
        [False, True, True]
    """
    values = np.asarray(values, dtype=np.float64)
    invalid = ~np.isfinite(values)
    if log_scale:
        invalid |= values <= 0
    return np.ma.masked_array(values, mask=invalid)


def axis_labels(landscape: Landscape) -> tuple[str, str]:
    """The x and y labels of a landscape's figures (its ``axis_labels`` metadata, else by kind).

    Example:
        >>> axis_labels(Landscape(coords=[np.arange(2.0)], values={"loss": np.ones(2)}))[0]
        'α (direction 1)'
    """
    labels = landscape.metadata.get("axis_labels")
    if labels:
        return tuple(labels) + ("",) * (2 - len(labels))  # type: ignore[return-value]
    if landscape.metadata.get("kind") == "interpolation":
        return "α (start → end)", ""
    return "α (direction 1)", "β (direction 2)"


def check_dims(landscape: Landscape, dims: int, what: str) -> None:
    """Raise ``ValueError`` unless ``landscape`` has ``dims`` axes (``what`` names the figure)."""
    if landscape.dims != dims:
        raise ValueError(f"`landscape` has {landscape.dims} dimension(s); {what} needs a {dims}-D landscape.")


def contour_levels(values: np.ma.MaskedArray, levels: int) -> np.ndarray | int:
    """``levels`` contour levels over the finite values: log-spaced when all are > 0.

    Example:
        >>> contour_levels(masked(np.array([1.0, 100.0])), 3).tolist()
        [1.0, 10.0, 100.0]
    """
    if values.count() == 0:
        return levels
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.array([lo, lo + max(abs(lo), 1.0) * 1e-6])
    # Losses grow fast away from a minimum: log-spaced levels keep detail in the basin,
    # which is what the reader looks at. Linear spacing only where values reach zero or below.
    return np.geomspace(lo, hi, levels) if lo > 0 else np.linspace(lo, hi, levels)
