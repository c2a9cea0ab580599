"""Snapshot blocks and their positioned file I/O.

A block is a preallocated ``(rows, P)`` array of snapshots: a CPU tensor in
memory, or an ``.npy`` file on disk. This module holds the storage dtypes, the
:class:`Block` record, zero-copy conversions between torch and numpy (bfloat16
as its uint16 bit pattern), creating ``.npy`` files and reading their headers,
the unbuffered readers and writers that move rows in and out of them
without a memory map, and the background thread (:class:`RowWorker`) and
reusable row buffers (:class:`BufferRing`) that keep that work off the
training thread.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The storage dtypes of a snapshot store.
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its bit patterns are stored as uint16 and reinterpreted on the torch side.
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
# A reader keeps at most this many block files open (a big model has one snapshot per file), to stay
# far below the process's open-file limit.
MAX_OPEN_FILES = 64


@dataclass
class Block:
    """One preallocated block of snapshot rows: a CPU tensor in memory, or an ``.npy`` file on disk.

    File blocks are written and read with plain positioned file I/O, never through a
    memory map: mapped pages would count in the process's resident set (dirty ones
    until written back), so a long disk trajectory would grow the process by the size
    of the block being filled. Written data sits in the OS page cache, which the
    kernel reclaims as it needs.

    Example:
        >>> block = Block(2, tensor=torch.zeros(2, 3))
        >>> block.rows, block.path is None
        (2, True)
    """

    rows: int
    tensor: torch.Tensor | None = None  # (rows, P) in the storage dtype, memory blocks only
    path: Path | None = None  # file blocks only
    offset: int = 0  # byte offset of row 0 in the file (after the .npy header)


def torch_view(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A zero-copy torch view of a numpy array holding ``dtype_name`` values (bfloat16 as uint16 bits).

    Example:
        >>> bits = numpy_bits(torch.tensor([1.5], dtype=torch.bfloat16))
        >>> torch_view(bits, "bfloat16").tolist()
        [1.5]
    """
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a numpy array (bfloat16 as its int16 bit pattern).

    Example:
        >>> numpy_bits(torch.tensor([1.0], dtype=torch.bfloat16)).tolist()  # 0x3f80
        [16256]
    """
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Create ``path`` as a zero-filled (sparse) ``.npy`` file of ``shape``; returns the data's byte offset.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     offset = create_npy(Path(tmp) / "b.npy", np.dtype(np.float32), (2, 3))
        ...     shape, dtype, fortran, data_offset = read_npy_header(Path(tmp) / "b.npy")
        >>> shape, str(dtype), fortran, data_offset == offset
        ((2, 3), 'float32', False, True)
    """
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        offset = f.tell()
        f.truncate(offset + shape[0] * shape[1] * dtype.itemsize)
    return offset


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, fortran order and data offset of an ``.npy`` file, reading only its header.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     np.save(Path(tmp) / "a.npy", np.zeros((4, 2), dtype=np.float16))
        ...     read_npy_header(Path(tmp) / "a.npy")[:3]
        ((4, 2), dtype('float16'), False)
    """
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return shape, dtype, fortran, f.tell()


def io_exact(f: Any, view: memoryview, offset: int, write: bool, path: Path) -> None:
    """Write (or read into) all of ``view`` at byte ``offset`` of the unbuffered file ``f``.

    Raises ``OSError`` naming ``path`` when the file ends (or the disk fills) before all of it moved.

    Example:
        >>> import io
        >>> out = bytearray(2)
        >>> io_exact(io.BytesIO(b"abcd"), memoryview(out), 1, False, Path("f.npy"))
        >>> bytes(out)
        b'bc'
    """
    done = 0
    f.seek(offset)
    while done < view.nbytes:
        got = f.write(view[done:]) if write else f.readinto(view[done:])
        if not got:
            what = "write to" if write else "read from"
            raise OSError(
                f"{path}: could not {what} the snapshot file ({done} of {view.nbytes} bytes at offset {offset})."
            )
        done += got


class BlockWriter:
    """Writes rows into file blocks, keeping open only the file of the block being filled.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = Path(tmp) / "b.npy"
        ...     block = Block(2, path=path, offset=create_npy(path, np.dtype(np.float32), (2, 3)))
        ...     writer = BlockWriter()
        ...     writer.write(0, block, 1, torch.ones(3))
        ...     writer.close()
        ...     np.load(path).tolist()
        [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self) -> None:
        self._open: tuple[int, Any] | None = None  # (block index, open file) of the block being filled

    def write(self, index: int, block: Block, row: int, vec: torch.Tensor) -> None:
        """Write the contiguous CPU tensor ``vec`` (in the storage dtype) as row ``row`` of file block ``index``."""
        if self._open is None or self._open[0] != index:
            self.close()
            self._open = (index, open(block.path, "r+b", buffering=0))  # type: ignore[arg-type]
        data = memoryview(numpy_bits(vec)).cast("B")
        io_exact(self._open[1], data, block.offset + row * data.nbytes, True, block.path)  # type: ignore[arg-type]
        if row == block.rows - 1:
            self.close()  # a full block is not written again

    def close(self) -> None:
        """Close the open file, if any."""
        if self._open is not None:
            self._open[1].close()
            self._open = None


class BlockReader:
    """Copies rectangles of a list of blocks into tensors; file blocks are read with unbuffered file reads.

    Reading through a memory map would leave every touched page mapped into the
    process, so the resident set would grow to the size of the store; plain reads
    go through the page cache without mapping it. At most :data:`MAX_OPEN_FILES`
    files stay open, the least recently used closed first.

    Example:
        >>> blocks = [Block(1, tensor=torch.tensor([[1.0, 2.0]])), Block(1, tensor=torch.tensor([[3.0, 4.0]]))]
        >>> out = torch.empty(2, 1)
        >>> with BlockReader(blocks, "float32", 2) as reader:
        ...     reader.read_rows(0, 2, 1, 2, out)
        >>> out.tolist()
        [[2.0], [4.0]]
    """

    def __init__(self, blocks: Sequence[Block], dtype_name: str, num_params: int) -> None:
        self._blocks = blocks
        self._dtype_name = dtype_name
        self._torch_dtype = TORCH_DTYPES[dtype_name]
        self._itemsize = NUMPY_DTYPES[dtype_name].itemsize
        self._num_params = num_params
        self._files: OrderedDict[int, Any] = OrderedDict()  # open block files, least recently used first
        self._staging: np.ndarray | None = None

    def __enter__(self) -> BlockReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def read_rows(self, start: int, stop: int, a: int, b: int, out: torch.Tensor) -> None:
        """``out[:] = X[start:stop, a:b]``, the snapshots' columns ``a:b``, across the blocks that hold them."""
        first = 0
        for index, block in enumerate(self._blocks):
            lo, hi = max(start, first), min(stop, first + block.rows)
            if lo < hi:
                self.copy(index, lo - first, hi - first, a, b, out[lo - start : hi - start])
            first += block.rows

    def copy(self, index: int, r0: int, r1: int, a: int, b: int, out: torch.Tensor) -> None:
        """``out[:] = block[r0:r1, a:b]`` of block ``index``, converting to ``out``'s dtype."""
        block = self._blocks[index]
        if block.tensor is not None:
            out.copy_(block.tensor[r0:r1, a:b])
            return
        shape = (r1 - r0, b - a)
        direct = out.dtype == self._torch_dtype and out.is_contiguous()
        target = numpy_bits(out) if direct else self._staging_view(shape)
        f = self._file(index, block)
        item, num_params = self._itemsize, self._num_params
        if a == 0 and b == num_params:  # whole rows: one contiguous range
            offset = block.offset + r0 * num_params * item
            io_exact(f, memoryview(target.reshape(-1)).cast("B"), offset, False, block.path)  # type: ignore[arg-type]
        else:
            for i in range(shape[0]):
                offset = block.offset + ((r0 + i) * num_params + a) * item
                io_exact(f, memoryview(target[i]).cast("B"), offset, False, block.path)  # type: ignore[arg-type]
        if not direct:
            out.copy_(torch_view(target, self._dtype_name))

    def _staging_view(self, shape: tuple[int, int]) -> np.ndarray:
        """A reused storage-dtype array of ``shape``, for reads that need converting."""
        size = shape[0] * shape[1]
        if self._staging is None or self._staging.size < size:
            self._staging = np.empty(size, dtype=NUMPY_DTYPES[self._dtype_name])
        return self._staging[:size].reshape(shape)

    def _file(self, index: int, block: Block) -> Any:
        """The open file of block ``index``, opening it (and closing the least recently used) if needed."""
        f = self._files.get(index)
        if f is not None:
            self._files.move_to_end(index)
            return f
        if len(self._files) >= MAX_OPEN_FILES:
            self._files.popitem(last=False)[1].close()
        f = self._files[index] = open(block.path, "rb", buffering=0)  # type: ignore[arg-type]
        return f


#: ``madvise`` advice that faults a range in writable without touching it (Linux >= 5.14).
MADV_POPULATE_WRITE = 23
#: Bytes faulted in per ``madvise`` call (a multiple of the page size).
POPULATE_BYTES = 256 << 10


@functools.lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` on Linux, typed; ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_populate_ok = True  # cleared once the kernel refuses MADV_POPULATE_WRITE (before 5.14)


def prefault(tensor: torch.Tensor) -> None:
    """Fault in every memory page of the contiguous CPU tensor ``tensor``, ahead of the first write to it.

    The first write to a fresh page costs a page fault, which on a 40 MB row takes longer than
    copying the row itself; done here, ahead of use and on the writer thread, the training
    thread's copy into the row then takes none. On Linux >= 5.14 ``madvise(MADV_POPULATE_WRITE)``
    faults the range in, 256 KiB per call (about a quarter faster than a write per page, and the
    values are left as they are); elsewhere one element per page is written (zero). Each call holds
    the process's memory-map lock: in one call, a 20 MB row held it for 60 ms here, and every
    mmap/munmap of the training thread (a large tensor's allocation or free) waited for it.

    Example:
        >>> row = torch.ones(2048)
        >>> prefault(row)
        >>> row.shape
        torch.Size([2048])
    """
    global _populate_ok
    nbytes = tensor.numel() * tensor.element_size()
    madvise = _madvise()
    if nbytes and _populate_ok and madvise is not None:
        start, end = tensor.data_ptr() & ~(mmap.PAGESIZE - 1), tensor.data_ptr() + nbytes  # first page: mapped
        # In pieces: the call holds the process's memory-map lock, which the training thread's own
        # mmap/munmap (every large tensor it allocates or frees) has to wait for.
        while start < end and madvise(start, min(POPULATE_BYTES, end - start), MADV_POPULATE_WRITE) == 0:
            start += POPULATE_BYTES
        if start >= end:
            return
        _populate_ok = ctypes.get_errno() != errno.EINVAL  # unknown advice: this kernel has none
    flat = tensor.view(-1)
    flat[:: max(1, mmap.PAGESIZE // flat.element_size())].zero_()


def fill_row(row: torch.Tensor, tensors: Sequence[torch.Tensor], *, non_blocking: bool = False) -> None:
    """Copy ``tensors`` (each flattened, in order) straight into the 1-D ``row``, converting to its dtype.

    Contiguous tensors of the row's dtype go in one ``torch.cat(..., out=row)``, which writes the
    row itself (no flat intermediate): one call instead of one per tensor, which at 5k weights was
    most of a snapshot's time. Others take one ``copy_`` per tensor, which also rounds to a 16-bit
    row in the same pass, once per value (cat's converting path is 7x slower: 16 ms at 10M
    weights against 2.2 ms); so do device-to-host copies.

    Example:
        >>> row = torch.empty(5, dtype=torch.float16)
        >>> fill_row(row, [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t(), torch.tensor(0.1)])
        >>> row.tolist()
        [1.0, 3.0, 2.0, 4.0, 0.0999755859375]
    """
    with torch.no_grad():  # parameters: no graph, and no per-tensor detach
        if not non_blocking and all(t.dtype == row.dtype and t.is_contiguous() for t in tensors):
            torch.cat([t.view(-1) for t in tensors], out=row)
            return
        a = 0
        for t in tensors:
            n = t.numel()
            row[a : a + n].view(t.shape).copy_(t, non_blocking=non_blocking)
            a += n


#: A unit of the writer thread's work.
Task = Callable[[], None]
#: The row of a task whose failure loses no snapshot (pre-faulting): past any real row.
NO_ROW = 2**62


class RowWorker:
    """One background thread running tasks in submission order: pre-faulting rows, file writes, device copies.

    A thread cannot raise into the training thread, so a task that raises records its error with
    its row; the tasks after it are skipped (their cleanups still run, so buffers come back) until
    :meth:`take_error` hands the error over, together with the first row not stored.

    Example:
        >>> worker, out = RowWorker(), []
        >>> worker.submit(0, lambda: out.append("written"))
        >>> worker.submit(1, lambda: 1 / 0)
        >>> worker.submit(2, lambda: out.append("skipped"))
        >>> worker.wait()
        >>> row, err = worker.take_error()
        >>> worker.stop()
        >>> out, row, type(err).__name__
        (['written'], 1, 'ZeroDivisionError')
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[tuple[int, Task, Task | None] | None] = queue.SimpleQueue()
        self._cv = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._error_row = 0
        self._thread: threading.Thread | None = None

    @property
    def failed(self) -> bool:
        """Whether a task failed since the last :meth:`take_error`."""
        return self._error is not None

    @property
    def alive(self) -> bool:
        """Whether the thread runs (it starts with the first task)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, row: int, task: Task, cleanup: Task | None = None) -> None:
        """Run ``task`` (about snapshot ``row``) after the tasks submitted before, then ``cleanup`` in any case."""
        with self._cv:
            self._pending += 1
        if not self.alive:
            self._thread = threading.Thread(target=self._run, name="lightning_landscape-snapshots", daemon=True)
            self._thread.start()
        self._tasks.put((row, task, cleanup))

    def _run(self) -> None:
        while (item := self._tasks.get()) is not None:
            row, task, cleanup = item
            try:
                if self._error is None:
                    task()
                else:
                    self._error_row = min(self._error_row, row)  # skipped: not stored either
            except BaseException as err:  # any failure must reach the training thread, which sees no other way
                self._error, self._error_row = err, row
            finally:
                try:
                    if cleanup is not None:
                        cleanup()
                finally:
                    # Drop the task before waiting for the next: it holds a one-snapshot buffer.
                    item = task = cleanup = None  # type: ignore[assignment]
                    with self._cv:
                        self._pending -= 1
                        self._cv.notify_all()

    def wait(self, until: Callable[[], bool] | None = None) -> None:
        """Wait until every submitted task has run (or, with ``until``, until it returns true or nothing is left)."""
        with self._cv:
            while self._pending and not (until is not None and until()):
                self._cv.wait()

    def take_error(self) -> tuple[int, BaseException] | None:
        """``(first row not stored, error)`` of a failed task, once the queue has run out, or ``None``."""
        if self._error is None:
            return None
        self.wait()
        with self._cv:
            err, self._error = self._error, None
            return self._error_row, err  # type: ignore[return-value]

    def stop(self) -> None:
        """Run what is queued, then end the thread (a later :meth:`submit` starts a new one)."""
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()
            self._thread = None


class BufferRing:
    """Up to ``size`` reusable one-snapshot row buffers, handed out in turn: what bounds the writer's queue.

    :meth:`acquire` waits while every buffer is in flight, so a disk slower than the snapshots
    slows the appends (back-pressure) instead of queueing copies without bound. Buffers are made
    at the first :meth:`acquire` (pre-faulted on the worker thread unless ``fresh_is_faulted``, as
    pinned memory is) and dropped by :meth:`clear`.

    Example:
        >>> worker = RowWorker()
        >>> ring = BufferRing(lambda: torch.empty(3), 2, worker)
        >>> a, b = ring.acquire(), ring.acquire()
        >>> ring.release(a)
        >>> ring.acquire() is a
        True
        >>> worker.stop()
    """

    def __init__(
        self, make: Callable[[], torch.Tensor], size: int, worker: RowWorker, *, fresh_is_faulted: bool = False
    ) -> None:
        self._make = make
        self.size = size
        self._worker = worker
        self._fresh_is_faulted = fresh_is_faulted
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._made = 0

    def acquire(self) -> torch.Tensor:
        """A free buffer, waiting for one while all are in flight."""
        if self._made == 0:
            for _ in range(self.size):
                buf = self._make()
                self._made += 1
                if self._fresh_is_faulted:
                    self._free.put(buf)
                else:  # free once pre-faulted
                    self._worker.submit(NO_ROW, lambda b=buf: prefault(b), lambda b=buf: self._free.put(b))
        while True:
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                if not self._worker.alive:  # nothing would ever come back
                    raise RuntimeError("the snapshot writer thread has stopped with every buffer in flight") from None

    def release(self, buf: torch.Tensor) -> None:
        """Hand ``buf`` back."""
        self._free.put(buf)

    def clear(self) -> None:
        """Drop the buffers (all must be back: call after the worker's :meth:`RowWorker.wait`)."""
        while not self._free.empty():
            self._free.get()
        self._made = 0
