"""Argument checks shared by the functional core and the callbacks.

Every message names the argument, the value received and what is accepted, so a
user can fix the call without reading the source.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def check_choice(name: str, value: Any, accepted: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``accepted``, else raise ``ValueError``."""
    accepted = tuple(accepted)
    if value not in accepted:
        raise ValueError(f"`{name}`={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}.")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (numpy's too), else raise ``ValueError`` (a string such as "no" is not one)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}`={value!r} is not valid; expected True or False.")
    return bool(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """Return ``value`` if it is an int >= 1 (or None when allowed), else raise ``ValueError``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"`{name}`={value!r} is not valid; expected an integer >= 1{extra}.")
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite number > 0, else raise ``ValueError``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{name}`={value!r} is not valid; expected a finite number > 0.")
    return float(value)


def as_coordinate_array(name: str, value: Any) -> np.ndarray:
    """Convert one axis of grid coordinates to a 1-D float64 array, checking it is non-empty and finite."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}`={value!r} is not valid; expected a 1-D array of finite numbers.") from err
    if array.ndim != 1:
        raise ValueError(f"`{name}` has shape {array.shape}; expected a 1-D array of finite numbers.")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty; expected at least one coordinate.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}`={array.tolist()!r} contains non-finite values; expected finite numbers.")
    return array


def short_list(items: Sequence[Any], limit: int = 5) -> str:
    """Render a list for an error message, eliding the middle of long ones."""
    items = list(items)
    if len(items) <= limit:
        return repr(items)
    return repr(items[:limit])[:-1] + f", ... ({len(items) - limit} more)]"


def as_direction_list(directions: Any) -> list[Mapping[str, Any]]:
    """One direction (a dict) or a list of 1 or 2, as a list.

    Example:
        >>> len(as_direction_list({"w": None}))
        1
    """
    if isinstance(directions, Mapping):
        return [directions]
    if isinstance(directions, Sequence) and not isinstance(directions, str):
        directions = list(directions)
        if not 1 <= len(directions) <= 2:
            raise ValueError(f"`directions` holds {len(directions)} directions; expected 1 or 2.")
        return directions
    raise ValueError(
        f"`directions` is a {type(directions).__name__}; expected one direction (a dict) or a list of 1 or 2."
    )


def as_grid_coords(coords: Any, dims: int) -> list[np.ndarray]:
    """Grid coordinates as one checked 1-D float64 array per axis (``dims`` axes).

    Example:
        >>> [c.tolist() for c in as_grid_coords([[0, 1]], 1)]
        [[0.0, 1.0]]
    """
    if isinstance(coords, np.ndarray) and coords.ndim == 1 and dims == 1:
        coords = [coords]
    if not isinstance(coords, (Sequence, np.ndarray)) or isinstance(coords, str) or len(coords) != dims:
        got = len(coords) if isinstance(coords, (Sequence, np.ndarray)) else type(coords).__name__
        raise ValueError(f"`coords` holds {got} axes; expected one 1-D array per direction ({dims}).")
    return [as_coordinate_array(f"coords[{i}]", c) for i, c in enumerate(coords)]


#: Seeds go to ``torch.Generator.manual_seed`` and ``numpy.random.SeedSequence``; the second
#: direction of a surface uses ``seed + 1``, so the largest seed leaves room for it in an int64.
MAX_SEED = 2**63 - 2


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is an int in [0, 2**63 - 2] (not a bool), else raise ``ValueError``.

    Example:
        >>> check_seed("seed", 7)
        7
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"`{name}`={value!r} is not valid; expected an integer from 0 to {MAX_SEED}.")
    return int(value)


def check_callable(name: str, value: Any, signature: str, *, allow_none: bool = True) -> Any:
    """Return ``value`` if it is callable (or None when allowed), else raise ``ValueError``.

    Example:
        >>> check_callable("loss_fn", None, "loss_fn(outputs, targets) -> Tensor") is None
        True
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        raise ValueError(f"`{name}`={value!r} is not callable; expected {signature}.")
    return value


def check_nonnegative_float(name: str, value: Any, *, unit: str = "") -> float:
    """Return ``value`` as float if it is a finite number >= 0, else raise ``ValueError``.

    Example:
        >>> check_nonnegative_float("max_memory_mb", 256)
        256.0
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"`{name}`={value!r} is not valid; expected a finite number >= 0{unit}.")
    return float(value)


def check_writable_dir(name: str, path: str | os.PathLike, *, keep: bool = True) -> Path:
    """Create ``path`` if needed and check a file can be written there (by writing and deleting one).

    Raises ``ValueError`` naming ``name`` when the directory cannot be created or written
    (a path under a file, read-only, full). With ``keep=False`` the directories this check
    created are removed again, so checking early leaves nothing behind.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     check_writable_dir("dirpath", Path(tmp) / "a" / "b").name
        ...     sorted(p.name for p in Path(tmp).rglob("*"))  # created, and the write probe is gone
        'b'
        ['a', 'b']
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-") as probe:
            probe.write(b"0")
            probe.flush()
    except OSError as err:
        raise ValueError(f"`{name}`={str(path)!r} cannot be written ({err}); expected a writable directory.") from err
    finally:
        if not keep:
            for directory in created:  # deepest first
                with contextlib.suppress(OSError):
                    directory.rmdir()
    return path


#: The largest grid an analysis accepts: a million points is already days of forward passes.
MAX_GRID_POINTS = 10**6


def check_resolution(name: str, value: Any, dims: int) -> int:
    """A grid resolution: an int >= 2 per axis (one point is no surface) with at most
    :data:`MAX_GRID_POINTS` points in all.

    Example:
        >>> check_resolution("resolution", 21, 2)
        21
    """
    check_positive_int(name, value)
    if value < 2:
        raise ValueError(f"`{name}`={value!r} is not valid; expected an integer >= 2: one point is no surface.")
    if int(value) ** dims > MAX_GRID_POINTS:
        most = int(MAX_GRID_POINTS ** (1 / dims) + 1e-9)
        raise ValueError(
            f"`{name}`={value!r} gives {int(value) ** dims:,} grid points in {dims}-D; expected at most "
            f"{MAX_GRID_POINTS:,} (resolution <= {most})."
        )
    return int(value)
