"""Checks of the command line's own values (lists, ranges, formats, output folders), each failing with
a :class:`~lightning_landscape.cli._errors.CLIError` that names the flag, the value and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_landscape._validation import check_writable_dir
from lightning_landscape.cli._errors import CLIError
from lightning_landscape.metrics import METRIC_NAMES

#: The image formats matplotlib's Agg canvas writes.
FORMATS = tuple(sorted(FigureCanvasAgg(Figure()).get_supported_filetypes()))


def comma_list(flag: str, value: str | None) -> list[str]:
    """The non-empty, stripped entries of a comma-separated value (``[]`` for ``None``).

    Example:
        >>> comma_list("--labels", " small, large ")
        ['small', 'large']
    """
    if value is None:
        return []
    items = [item.strip() for item in str(value).split(",")]
    if not all(items):
        raise CLIError(f"{flag}={value!r} has an empty entry; expected comma-separated names, e.g. a,b.")
    return items


def parse_formats(value: str) -> list[str]:
    """The figure formats of ``--format`` (``png,pdf``), each one matplotlib writes.

    Example:
        >>> parse_formats("png,pdf")
        ['png', 'pdf']
    """
    formats = [f.lower().lstrip(".") for f in comma_list("--format", value)]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CLIError(f"--format={value!r} is not valid; accepted formats: {', '.join(FORMATS)}.")
    return list(dict.fromkeys(formats))


def parse_metrics(value: str | None) -> list[str]:
    """The metric names of ``--metrics`` (``accuracy``), each one of :data:`~lightning_landscape.metrics.METRIC_NAMES`.

    Example:
        >>> parse_metrics("accuracy"), parse_metrics(None)
        (['accuracy'], [])
    """
    names = comma_list("--metrics", value)
    bad = [n for n in names if n not in METRIC_NAMES]
    if bad:
        raise CLIError(f"--metrics={value!r} holds {bad[0]!r}; accepted names: {', '.join(METRIC_NAMES)}.")
    return list(dict.fromkeys(names))


def check_order(low_flag: str, low: float | None, high_flag: str, high: float | None) -> None:
    """Fail unless ``low < high`` (when both are given) and both are finite.

    Example:
        >>> check_order("--vmin", 2.0, "--vmax", 1.0)
        Traceback (most recent call last):
            ...
        lightning_landscape.cli._errors.CLIError: --vmin=2.0 is not below --vmax=1.0; expected --vmin < --vmax.
    """
    for flag, value in ((low_flag, low), (high_flag, high)):
        if value is not None and not math.isfinite(value):
            raise CLIError(f"{flag}={value!r} is not valid; expected a finite number.")
    if low is not None and high is not None and not low < high:
        raise CLIError(f"{low_flag}={low!r} is not below {high_flag}={high!r}; expected {low_flag} < {high_flag}.")


def check_int(flag: str, value: int | None, minimum: int = 1) -> int | None:
    """``value`` if it is ``None`` or an integer >= ``minimum``.

    Example:
        >>> check_int("--levels", 1, minimum=2)
        Traceback (most recent call last):
            ...
        lightning_landscape.cli._errors.CLIError: --levels=1 is not valid; expected an integer >= 2.
    """
    if value is not None and (isinstance(value, bool) or int(value) != value or value < minimum):
        raise CLIError(f"{flag}={value!r} is not valid; expected an integer >= {minimum}.")
    return value


def check_float(flag: str, value: float, *, positive: bool = True) -> float:
    """``value`` if it is finite (and > 0 with ``positive``; else >= 0).

    Example:
        >>> check_float("--lr", 0.0)
        Traceback (most recent call last):
            ...
        lightning_landscape.cli._errors.CLIError: --lr=0.0 is not valid; expected a finite number > 0.
    """
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise CLIError(f"{flag}={value!r} is not valid; expected a finite number {'>' if positive else '>='} 0.")
    return float(value)


def _snap(grid: np.ndarray, value: float) -> np.ndarray:
    """``grid`` with ``value`` in it: the nearest point moved onto it when within rounding, else inserted."""
    i = int(np.argmin(np.abs(grid - value)))
    span = float(grid[-1] - grid[0]) or 1.0
    if abs(grid[i] - value) <= 1e-9 * span:
        grid[i] = value
        return grid
    return np.sort(np.append(grid, value))


def parse_alphas(value: str) -> np.ndarray:
    """``--alphas lo,hi,n``: n evenly spaced α from lo to hi, with 0 and 1 (the two runs) exactly on the grid.

    The range must cover [0, 1]: the end points and the barrier between them are read off the grid.

    Example:
        >>> parse_alphas("-0.5,1.5,5").tolist()
        [-0.5, 0.0, 0.5, 1.0, 1.5]
        >>> parse_alphas("0,1,4").tolist()  # 0 and 1 are always evaluated
        [0.0, 0.3333333333333333, 0.6666666666666666, 1.0]
    """
    parts = comma_list("--alphas", value)
    try:
        lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise CLIError(f"--alphas={value!r} is not valid; expected lo,hi,n, e.g. -0.5,1.5,41.") from None
    check_order("--alphas lo", lo, "hi", hi)
    if n < 2:
        raise CLIError(f"--alphas={value!r} has n={n}; expected at least 2 points.")
    if lo > 0.0 or hi < 1.0:
        raise CLIError(f"--alphas={value!r} does not cover [0, 1]; expected lo <= 0 and hi >= 1 (the two runs).")
    grid = np.linspace(lo, hi, n)
    return _snap(_snap(grid, 0.0), 1.0)


def output_dir(value: str | Path, flag: str = "-o/--output") -> Path:
    """Check that ``value`` is a directory a file can be written to, before any work.

    The directories the check creates are removed again: a command that fails later leaves nothing behind,
    and the writers create the directory when they write.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     output_dir(Path(tmp) / "figures").name
        'figures'
    """
    try:
        return check_writable_dir(flag, value, keep=False)
    except ValueError as err:
        message = str(err).replace(f"`{flag}`", flag, 1)
        raise CLIError(message) from None


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """A short distinct name per input file: its stem, or ``<folder>_<stem>`` where stems repeat.

    Example:
        >>> unique_stems([Path("a/surface.npz"), Path("b/surface.npz"), Path("b/hessian.npz")])
        ['a_surface', 'b_surface', 'hessian']
    """
    stems = [p.stem for p in paths]
    out = []
    for path, stem in zip(paths, stems):
        out.append(f"{path.parent.name}_{stem}" if stems.count(stem) > 1 else stem)
    if len(set(out)) != len(out):  # the same file twice, or the same folder names: number them
        out = [f"{i}_{name}" for i, name in enumerate(out)]
    return out
