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
#: The ``dtype`` choices of a store: a storage dtype, or ``"auto"`` (see :func:`resolve_dtype`).
DTYPE_CHOICES: tuple[str, ...] = ("auto", *DTYPES)
#: ``dtype="auto"`` stores float16 from this many parameters, float32 below. Measured with
#: ``python benchmarks/trajectory.py --parts dtype`` (digits CNNs of 5k, 1M and 10M weights, SGD at
#: lr 0.05 and 0.005, snapshots every step and every epoch): float16 storage changes the
#: explained-variance ratios of PC1 and PC2 by at most 1.6e-5 (bfloat16: up to 8.2e-4), against
#: the 1e-3 allowed. Below the threshold a float32 snapshot is under 2 MB and costs little anyway.
AUTO_FLOAT16_PARAMS = 500_000
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


class SnapshotChangedError(RuntimeError):
    """A deferred snapshot's tensors were changed in place while it was being copied; it was not stored.

    Raised (like a failed disk write) by the store call after the copy, with the store rolled back
    to the snapshots before it. ``SnapshotStore.append(..., defer=True)`` copies on the writer
    thread until the next :meth:`~lightning_landscape.trajectory.SnapshotStore.fence`; an in-place
    change before that fence (seen through the tensors' version counters) would store a mix of
    two steps, so the snapshot fails instead.

    Example:
        >>> isinstance(SnapshotChangedError("snapshot 3: ..."), RuntimeError)
        True
    """


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


def resolve_dtype(dtype: Any, num_params: int) -> str:
    """The storage dtype name of ``dtype``; ``"auto"``: float32 below :data:`AUTO_FLOAT16_PARAMS` weights, else float16.

    float16 rather than bfloat16: 3 more mantissa bits (8x smaller rounding) for weights within
    its range (|w| <= 65504, far beyond trained weights). ``ValueError`` naming ``dtype`` if unsupported.

    Example:
        >>> resolve_dtype("auto", 5_000), resolve_dtype("auto", 10_000_000), resolve_dtype(torch.bfloat16, 9)
        ('float32', 'float16', 'bfloat16')
    """
    if isinstance(dtype, str) and dtype == "auto":
        return "float32" if num_params < AUTO_FLOAT16_PARAMS else "float16"
    if isinstance(dtype, torch.dtype):
        return normalize_dtype(dtype)
    return check_choice("dtype", dtype, DTYPE_CHOICES)


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


def check_snapshot_tensors(vec: Any, num_params: int) -> list[torch.Tensor]:
    """``vec`` as a list of tensors: a 1-D floating tensor of ``num_params`` elements, or a list/tuple of
    floating tensors of ``num_params`` elements together (the parameters); else ``ValueError`` naming ``vec``.

    Example:
        >>> [t.shape for t in check_snapshot_tensors([torch.zeros(2, 2), torch.zeros(1)], 5)]
        [torch.Size([2, 2]), torch.Size([1])]
    """
    if isinstance(vec, torch.Tensor):
        if vec.is_floating_point() and vec.dim() == 1 and vec.numel() == num_params:
            return [vec]
        got = f"shape {tuple(vec.shape)} and dtype {vec.dtype}"
    elif isinstance(vec, (list, tuple)) and vec:
        total, ok = 0, True
        for t in vec:  # one pass: this runs at every snapshot
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                ok = False
                break
            total += t.numel()
        if ok and total == num_params:
            return list(vec)
        kinds = sorted({str(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in vec})
        numel = sum(t.numel() for t in vec if isinstance(t, torch.Tensor))
        got = f"{len(vec)} tensors of {numel} elements and dtypes {kinds}"
    else:
        got = type(vec).__name__
    raise ValueError(
        f"`vec` has {got}; expected a 1-D floating tensor of {num_params} elements (`num_params`), "
        "or a list of floating tensors of that many elements together."
    )


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
