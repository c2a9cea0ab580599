"""What every figure shares: a pyplot-free Figure, masking of non-finite values, axis labels, contour levels.

No pyplot state is touched: every figure is a ``matplotlib.figure.Figure`` with
an Agg canvas, so plotting works in headless training jobs and threads and never
leaks windows. Non-finite values are masked, not drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

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


def contour_levels(
    values: np.ma.MaskedArray, levels: int, vmin: float | None = None, vmax: float | None = None
) -> np.ndarray | int:
    """``levels`` contour levels over the finite values (or over [``vmin``, ``vmax``] where given):
    log-spaced when all are > 0.

    Example:
        >>> contour_levels(masked(np.array([1.0, 100.0])), 3).tolist()
        [1.0, 10.0, 100.0]
        >>> contour_levels(masked(np.array([1.0, 2.0])), 3, vmax=100.0).tolist()
        [1.0, 10.0, 100.0]
    """
    if values.count() == 0 and (vmin is None or vmax is None):
        return levels
    lo = float(values.min()) if vmin is None else float(vmin)
    hi = float(values.max()) if vmax is None else float(vmax)
    if lo == hi:
        return np.array([lo, lo + max(abs(lo), 1.0) * 1e-6])
    # Losses grow fast away from a minimum: log-spaced levels keep detail in the basin,
    # which is what the reader looks at. Linear spacing only where values reach zero or below.
    return np.geomspace(lo, hi, levels) if lo > 0 else np.linspace(lo, hi, levels)


#: ``log_scale=None`` draws on a log scale when the positive values span more than this many decades.
AUTO_LOG_DECADES = 2.0
#: Contour lines drawn with a printed value: enough to read the basin, few enough not to crowd it.
MAX_CONTOUR_LABELS = 6
#: Ticks per axis of a 3-D plot: more run into each other at the usual figure sizes.
MAX_3D_TICKS = 4


def color_norm(log_scale: bool, vmin: float | None = None, vmax: float | None = None) -> Normalize:
    """The colour scale of a 2-D figure: logarithmic or linear, fixed to ``vmin``/``vmax`` where given
    (the data's own range otherwise), so several figures can share one scale.

    Example:
        >>> norm = color_norm(True, vmin=0.1, vmax=10.0)
        >>> type(norm).__name__, norm.vmin, norm.vmax
        ('LogNorm', 0.1, 10.0)
    """
    return LogNorm(vmin=vmin, vmax=vmax) if log_scale else Normalize(vmin=vmin, vmax=vmax)


def resolve_log_scale(values: np.ndarray, log_scale: bool | None) -> bool:
    """``log_scale``, or for ``None`` whether the finite values are all > 0 and span > 2 decades.

    Example:
        >>> resolve_log_scale(np.array([0.01, 5.0]), None), resolve_log_scale(np.array([1.0, 5.0]), None)
        (True, False)
    """
    if log_scale is not None:
        return bool(log_scale)
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0 or finite.min() <= 0:
        return False
    return bool(np.log10(finite.max() / finite.min()) > AUTO_LOG_DECADES)


def distinct_labels(values: Sequence[float], min_digits: int = 2, max_digits: int = 10) -> list[str]:
    """Format ``values`` with the fewest significant digits (at least ``min_digits``) that make
    neighbouring labels differ, so no two adjacent ticks or contour labels read the same.

    Example:
        >>> distinct_labels([2.221, 2.224, 3.0])
        ['2.221', '2.224', '3']
        >>> distinct_labels([0.001, 0.002, 100.0])
        ['0.001', '0.002', '100']
    """
    values = [float(x) for x in values]
    for digits in range(min_digits, max_digits + 1):
        labels = [_significant(x, digits) for x in values]
        if all(a != b for a, b in zip(labels, labels[1:])):
            return labels
    return [_significant(x, max_digits) for x in values]


def _significant(x: float, digits: int) -> str:
    # "100", not "1e+02": in the range people read without exponents, keep every integer digit.
    if x != 0 and math.isfinite(x) and 1e-3 <= abs(x) < 1e5:
        digits = max(digits, int(math.floor(math.log10(abs(x)))) + 1)
    return f"{x:.{digits}g}"


class DistinctFormatter(Formatter):
    """A tick formatter whose labels are never equal for two different ticks (see :func:`distinct_labels`).

    Example:
        >>> fmt = DistinctFormatter()
        >>> fmt.format_ticks([0.001, 0.0015, 0.002])
        ['0.001', '0.0015', '0.002']
    """

    def __init__(self) -> None:
        self._labels: dict[float, str] = {}

    def set_locs(self, locs: Sequence[float]) -> None:
        super().set_locs(locs)
        self._labels = dict(zip(map(float, locs), distinct_labels(list(locs))))

    def __call__(self, x: float, pos: int | None = None) -> str:
        return self._labels.get(float(x), f"{x:.3g}")


#: Ticks per axis of a 2-D plot: a narrow axis (beside a colour bar) fits about this many labels.
MAX_2D_TICKS = 6


def limit_ticks(ax: Any) -> None:
    """At most :data:`MAX_2D_TICKS` ticks on the x and y axes of a 2-D plot."""
    ax.xaxis.set_major_locator(MaxNLocator(MAX_2D_TICKS))
    ax.yaxis.set_major_locator(MaxNLocator(MAX_2D_TICKS))


def thin_3d_ticks(ax: Any) -> None:
    """At most :data:`MAX_3D_TICKS` ticks per axis of a 3-D plot, labelled distinctly."""
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(MAX_3D_TICKS))
        axis.set_major_formatter(DistinctFormatter())
