"""Argument checks of the snapshot store, two of them shared with the ``TrajectoryPCA`` callback.

Every message names the argument, the value received and what is accepted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape._validation import check_choice, check_nonnegative_float, check_writable_dir
from lightning_landscape.trajectory._npy import DTYPES, TORCH_DTYPES

STORAGES: tuple[str, ...] = ("auto", "memory", "disk")
# The keys SnapshotStore.from_state_dict needs (a state dict also records its format, directory and prefix).
STATE_KEYS = (
    "num_params",
    "dtype",
    "storage",
    "requested_storage",
    "max_memory_mb",
    "block_rows",
    "files",
    "count",
    "steps",
    "epochs",
)


def check_max_memory_mb(value: Any) -> float:
    """``max_memory_mb`` as a float; ``ValueError`` naming it unless it is a finite number >= 0.

    Example:
        >>> check_max_memory_mb(256)
        256.0
    """
    return check_nonnegative_float("max_memory_mb", value, unit=" (MiB); use storage='memory' for no limit")


def check_snapshot_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check a file can be written there; ``ValueError`` naming ``snapshot_dir`` if not.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     check_snapshot_dir(Path(tmp) / "snapshots" / "run1").name
        ...     sorted(p.name for p in Path(tmp).rglob("*"))  # created, and the write probe is gone
        'run1'
        ['run1', 'snapshots']
    """
    return check_writable_dir("snapshot_dir", path)


def normalize_dtype(dtype: Any) -> str:
    """The storage dtype name of ``dtype`` (a name or a torch dtype); ``ValueError`` naming ``dtype`` if unsupported.

    Example:
        >>> normalize_dtype(torch.bfloat16)
        'bfloat16'
    """
    if isinstance(dtype, torch.dtype):
        for name, td in TORCH_DTYPES.items():
            if td == dtype:
                return name
    return check_choice("dtype", dtype, DTYPES)


def check_integer(name: str, value: Any) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer (not a bool).

    Example:
        >>> check_integer("step", 3)
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}`={value!r} is not valid; expected an integer.")


def check_state_dict(state_dict: Any) -> int:
    """The snapshot count of a :meth:`SnapshotStore.state_dict`, after checking its keys and lists.

    Example:
        >>> check_state_dict(dict.fromkeys(STATE_KEYS, []) | {"count": 0})
        0
    """
    if not isinstance(state_dict, Mapping) or any(k not in state_dict for k in STATE_KEYS):
        got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise ValueError(
            f"`state_dict` has keys {got}; expected the output of SnapshotStore.state_dict() "
            f"with keys {list(STATE_KEYS)}."
        )
    count = int(state_dict["count"])
    steps, epochs = len(state_dict["steps"]), len(state_dict["epochs"])
    if steps != count or epochs != count:
        raise ValueError(
            f"`state_dict` records {count} snapshots but {steps} steps and {epochs} epochs; expected equal counts."
        )
    return count


def check_column_buffer(out: Any, dtype: torch.dtype, size: int) -> torch.Tensor:
    """``out`` if it can hold ``size`` values of ``dtype`` (a contiguous 1-D tensor), a new buffer if ``None``.

    Example:
        >>> check_column_buffer(None, torch.float64, 6).shape
        torch.Size([6])
    """
    if out is None:
        return torch.empty(size, dtype=dtype)
    if (
        isinstance(out, torch.Tensor)
        and out.dtype == dtype
        and out.dim() == 1
        and out.is_contiguous()
        and out.numel() >= size
    ):
        return out
    got = f"a {tuple(out.shape)} {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
    raise ValueError(f"`out` is {got}; expected a contiguous 1-D {dtype} CPU tensor of at least {size} elements.")


def check_prefix(prefix: Any) -> None:
    """``ValueError`` naming ``prefix`` unless it is ``None`` or a non-empty file-name prefix without separators.

    Example:
        >>> check_prefix("run1")
    """
    if prefix is not None and (not isinstance(prefix, str) or not prefix or os.sep in prefix or "/" in prefix):
        raise ValueError(
            f"`prefix`={prefix!r} is not valid; expected a non-empty file-name prefix without path separators."
        )


def check_snapshot_vector(vec: Any, num_params: int) -> None:
    """``ValueError`` naming ``vec`` unless it is a 1-D floating tensor of ``num_params`` elements.

    Example:
        >>> check_snapshot_vector(torch.zeros(3), 3)
    """
    if isinstance(vec, torch.Tensor) and vec.is_floating_point() and vec.dim() == 1 and vec.numel() == num_params:
        return
    got = f"shape {tuple(vec.shape)} and dtype {vec.dtype}" if isinstance(vec, torch.Tensor) else type(vec).__name__
    raise ValueError(f"`vec` has {got}; expected a 1-D floating tensor of {num_params} elements (`num_params`).")


def check_stop(stop: Any, count: int) -> int:
    """``stop`` as an int in [0, ``count``] (``None``: ``count``), else ``ValueError`` naming it.

    Example:
        >>> check_stop(None, 4), check_stop(2, 4)
        (4, 2)
    """
    if stop is None:
        return count
    if isinstance(stop, bool) or not isinstance(stop, (int, np.integer)) or not 0 <= stop <= count:
        raise ValueError(f"`stop`={stop!r} is not valid; expected an integer in [0, {count}].")
    return int(stop)
