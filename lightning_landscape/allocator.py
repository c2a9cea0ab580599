"""Keep the C allocator's memory from one forward pass to the next during an analysis (glibc only).

An analysis runs hundreds of forward passes of the same shapes. glibc hands the activation
memory of each pass back to the operating system when it is freed (blocks above its mmap
threshold are unmapped, a free top of the heap above its trim threshold is trimmed), and the
next pass takes it back page by page: on the digits CNN, 3,000-6,500 minor page faults and a
third of the CPU time of every grid point.

glibc raises both thresholds by itself when a program frees a large block it had mapped (its
"dynamic mmap threshold"): the mmap threshold becomes that block's size and the trim threshold
twice that. :func:`retained_memory` frees one 31 MiB block once per process, the state any
process reaches after freeing a tensor that size, so blocks up to 31 MiB come from the heap and
up to 62 MiB of it stay mapped between passes. It calls no ``mallopt``: that would switch the
dynamic thresholds off for the rest of the process, and glibc offers no way to read them back.
When the outermost analysis ends, ``malloc_trim(0)`` hands the memory kept back to the system.

Blocks above 32 MiB (glibc's largest mmap threshold) are still mapped and unmapped every pass.
Set ``LIGHTNING_LANDSCAPE_RETAIN_MEMORY=0`` to leave the allocator alone; other C libraries
(macOS, musl, Windows) are left alone always.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: The block freed once: below glibc's 32 MiB ceiling for a dynamic threshold, with room for its header.
RAISE_BYTES = 31 << 20
ENV = "LIGHTNING_LANDSCAPE_RETAIN_MEMORY"

_lock = threading.Lock()
_depth = 0
_raised = False


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, with the three calls typed; ``None`` otherwise."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  # only glibc has it
    except (OSError, AttributeError):
        return None
    libc.malloc.restype = ctypes.c_void_p  # the default int return would cut a 64-bit pointer
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def active() -> bool:
    """Whether :func:`retained_memory` changes anything here: glibc, and not switched off by the user.

    Example:
        >>> isinstance(active(), bool)
        True
    """
    return _glibc() is not None and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def retained_memory() -> Iterator[None]:
    """Keep freed activation memory mapped for the block; give it back when the outermost block ends.

    Nested blocks (an engine inside a callback's analysis) share the outermost one. A no-op
    where :func:`active` is false. See the module docstring for what it does to glibc.

    Example:
        >>> import torch
        >>> with retained_memory():
        ...     y = torch.ones(1 << 20).sum()
        >>> float(y)
        1048576.0
    """
    global _depth, _raised
    if not active():
        yield
        return
    libc = _glibc()
    assert libc is not None
    with _lock:
        _depth += 1
        if not _raised:
            # glibc maps a block this large, and raises its thresholds when the block is freed.
            block = libc.malloc(RAISE_BYTES)
            if block:
                libc.free(block)
            _raised = True
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.malloc_trim(0)
