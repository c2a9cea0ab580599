"""Interrupted surfaces resume: partial results saved atomically as they grow, and found again.

A grid of thousands of points may be stopped half way (an exception, Ctrl-C, the SIGTERM a
cluster scheduler sends). The evaluated points are written to the result's ``.npz`` (temporary
file + rename, so a crash mid-write never leaves a corrupt file) every :data:`SAVE_EVERY_S`
seconds and on the way out, marked ``partial``, with a fingerprint of everything that decides
the values (weights θ*, directions, grid, data, loss source). Running the same analysis again
with the same fingerprint evaluates only the missing points; every point is computed from θ*
alone, so the result is bit for bit that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from lightning_landscape.results import Landscape

log = logging.getLogger("lightning_landscape")
#: Longest stretch of work an interruption can lose.
SAVE_EVERY_S = 30.0


class Terminated(BaseException):
    """Raised inside an analysis when the process receives SIGTERM, so the partial result is saved
    and every guard restores the model before the process ends (a BaseException, like
    KeyboardInterrupt: ``on_error="warn"`` does not swallow it)."""


def digest(value: Any) -> str:
    """A SHA-256 of ``value``: the bytes, shapes and dtypes of the tensors in it (nested lists,
    tuples, dicts, batches), and the ``repr`` of everything else.

    Example:
        >>> digest([torch.ones(2), {"grid": [0, 1]}]) == digest([torch.ones(2), {"grid": [0, 1]}])
        True
        >>> digest(torch.ones(2)) == digest(torch.ones(2, dtype=torch.float64))
        False
    """
    sha = hashlib.sha256()

    def add(t: torch.Tensor) -> str:
        sha.update(str((tuple(t.shape), str(t.dtype))).encode())
        sha.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return "<tensor>"

    rest = apply_to_collection(value, torch.Tensor, add)
    sha.update(repr(rest).encode())
    return sha.hexdigest()


def fingerprint(parts: Mapping[str, Any]) -> dict[str, str]:
    """One :func:`digest` per named part (``weights``, ``directions``, ``data``, ``settings``), so a
    mismatch can say which part changed.

    Example:
        >>> sorted(fingerprint({"weights": [torch.ones(2)], "settings": {"grid": [0, 1]}}))
        ['settings', 'weights']
    """
    return {name: digest(value) for name, value in parts.items()}


def load_partial(
    path: str | os.PathLike, expected: Mapping[str, str], coords: Sequence[np.ndarray]
) -> Landscape | None:
    """The partial result at ``path`` if it was made with the fingerprint ``expected`` on ``coords``,
    else ``None``, with a log line naming what differs.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        found = Landscape.load(path)
    except ValueError as err:
        log.warning("lightning_landscape: starting over: %s", err)
        return None
    stored = found.metadata.get("fingerprint") or {}
    changed = sorted(k for k in expected if stored.get(k) != expected[k]) if isinstance(stored, dict) else ["all"]
    if found.shape != tuple(len(c) for c in coords) or not all(
        np.array_equal(a, b) for a, b in zip(found.coords, coords)
    ):
        changed.append("grid")
    if changed:
        log.warning("lightning_landscape: %s holds a surface with other %s; starting over.", path, ", ".join(changed))
        return None
    done = int(found.evaluated.sum())  # type: ignore[union-attr]
    log.info("lightning_landscape: resuming %s: %d of %d points already evaluated", path, done, found.loss.size)
    return found


class PartialSaver:
    """Saves a growing landscape to ``path`` at most every :data:`SAVE_EVERY_S` seconds, and at once
    on :meth:`final`; a no-op without a path."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.last = time.monotonic()

    def __call__(self, landscape: Landscape, *, force: bool = False) -> None:
        if self.path is None or not (force or time.monotonic() - self.last >= SAVE_EVERY_S):
            return
        landscape.metadata["partial"] = not landscape.complete
        landscape.save(self.path)
        self.last = time.monotonic()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the block (main thread only), then restore the handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"received signal {signum} (SIGTERM) during a landscape analysis")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def checkpointed(
    run: Callable[[Callable[[Landscape], None]], Landscape], saver: PartialSaver, ls: Landscape
) -> Landscape:
    """Run ``run(on_point)`` with partial saves along the way and on any way out, SIGTERM included."""
    try:
        with sigterm_raises():
            return run(saver)
    finally:
        if not ls.complete:
            saver(ls, force=True)
