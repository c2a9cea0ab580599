"""Where a snapshot store's rows live: preallocated blocks in CPU memory or ``.npy`` files on disk.

:class:`SnapshotBlocks` grows by whole blocks (never rewriting old ones), moves
every block to disk once when a memory budget is outgrown, writes and reads rows,
reopens the files of a checkpointed store, and removes the temporary directory
it made. :class:`~lightning_landscape.trajectory.SnapshotStore` builds on it.

A snapshot is copied on the training thread, once, straight from the parameters
into its destination: a memory row (pre-faulted ahead of use on the writer
thread) or a reused buffer that the writer thread then writes to its file. On a
GPU the copy goes to a pinned buffer on a side stream, and the writer thread
waits for it; the training thread never does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lightning_landscape.trajectory._npy import (
    NUMPY_DTYPES,
    TORCH_DTYPES,
    Block,
    BlockReader,
    BlockWriter,
    create_npy,
    fill_row,
    page_pieces,
    prefault,
    read_npy_header,
    row_copy,
)
from lightning_landscape.trajectory.checks import SnapshotChangedError
from lightning_landscape.trajectory.worker import NO_ROW, BufferRing, RowWorker, Task

# Target size of one preallocated block (memory tensor or .npy file): large enough that a long
# trajectory of a small model needs few files, small enough that a spare block costs little.
BLOCK_BYTES = 64 * 2**20
# At most this many rows per block, so a tiny model does not preallocate room for thousands of snapshots.
MAX_BLOCK_ROWS = 1024
# Memory rows are pre-faulted this far (at least two rows) ahead of the snapshot count: enough that the
# next snapshot's row is always ready, little enough that spare rows cost little.
PREFAULT_BYTES = 16 * 2**20
# ...in background tasks of at most this size (or one small row): a copy queued meanwhile waits for one
# piece at most, not for every row queued before it. Fresh pages cost 1.3-11 us each in this VM while
# training runs, so a 4 MiB piece held a copy up to 12 ms and snapshots of 1M weights at every step cost
# +47 % of training; 256 KiB gave +10 % (1 MiB +16 %, 64 KiB +20 %: more tasks, more GIL hand-overs).
PREFAULT_PIECE_BYTES = 256 * 2**10
# After a spill, each new disk row is queued behind at most this many of the old rows: the spill drains
# in the background, a few rows per snapshot, instead of stalling the next snapshot behind all of them.
SPILL_PER_WRITE = 2


class SnapshotBlocks:
    """The rows of P values in ``dtype_name``, held in preallocated blocks in memory or on disk.

    Args:
        num_params: P, the length of every row.
        dtype_name: the storage dtype (``"float32"``, ``"float16"`` or ``"bfloat16"``).
        storage: ``"memory"`` or ``"disk"``, where new blocks go.
        directory: the directory of the block files; ``None`` makes a temporary one
            when first needed, removed by :meth:`close` or at interpreter exit.
        block_rows: rows per block; ``None`` picks about 64 MiB, at most 1024 rows.
        prefix: the file-name prefix; ``None`` draws a unique one.
        max_pending: row buffers in flight to the writer thread (disk rows, device copies);
            a write waits while all of them are.

    Example:
        >>> blocks = SnapshotBlocks(2, "float32", "memory", block_rows=2)
        >>> blocks.reserve(3, count=0)
        >>> blocks.write_row(2, [torch.tensor([1.0, 2.0])])
        >>> out = torch.empty(1, 2)
        >>> blocks.flush()
        >>> with blocks.reader() as reader:
        ...     reader.read_rows(2, 3, 0, 2, out)
        >>> blocks.capacity, out.tolist()
        (4, [[1.0, 2.0]])
    """

    def __init__(
        self,
        num_params: int,
        dtype_name: str,
        storage: str,
        directory: Path | None = None,
        block_rows: int | None = None,
        prefix: str | None = None,
        max_pending: int = 2,
    ) -> None:
        self.num_params = num_params
        self.dtype_name = dtype_name
        self.torch_dtype = TORCH_DTYPES[dtype_name]
        self.itemsize = NUMPY_DTYPES[dtype_name].itemsize
        self.storage = storage
        self.directory = directory
        self.block_rows = block_rows or max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (num_params * self.itemsize)))
        self.prefix = prefix or f"snapshots-{uuid.uuid4().hex[:8]}"
        self.max_pending = max_pending
        self.blocks: list[Block] = []
        self.capacity = 0
        self._owns_dir = False
        self._finalizer: Any = None
        self._worker = RowWorker()
        # The worker's thread must not outlive the store: stopped (after its queue) when the store goes.
        self._stop_worker = weakref.finalize(self, self._worker.stop)
        self._writer = BlockWriter()  # used by the worker only, which writes the rows in order
        self._staging = BufferRing(self._new_row, max_pending, self._worker, prepare=prefault)
        self._pinned: BufferRing | None = None  # pinned host rows for copies from a CUDA device
        self._stream: Any = None  # the side CUDA stream of those copies
        self._fence: tuple[Any, torch.device] | None = None  # a device copy the training stream still has to wait for
        self._tickets = 0  # deferred CPU copies submitted...
        self._copied = 0  # ...the last one finished...
        # ...and the one a fence still has to wait for: (ticket, row, tensors, their versions when queued)
        self._deferred: tuple[int, int, Sequence[torch.Tensor], list[int]] | None = None
        self._faulted = 0  # memory rows [0, _faulted) are pre-faulted...
        self._fault_asked = 0  # ...and [_faulted, _fault_asked) are queued for it...
        self._claimed = 0  # ...except rows below this, which a copy has been queued for (their pages fault then)
        self._spill: deque[tuple[int, torch.Tensor]] = deque()  # memory rows still to write to disk

    @property
    def files(self) -> list[Path]:
        """The ``.npy`` files in use, in row order (empty in memory)."""
        return [b.path for b in self.blocks if b.path is not None]

    def ensure_dir(self) -> Path:
        """The directory of the block files, making a temporary one (removed at close) if none was given."""
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="lightning_landscape-snapshots-"))
            self._owns_dir = True
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        return self.directory

    def _new_row(self) -> torch.Tensor:
        return torch.empty(self.num_params, dtype=self.torch_dtype)

    # ---- room for rows

    def reserve(self, rows: int, count: int, budget_rows: int | None = None) -> None:
        """Make room for ``rows`` rows, adding blocks.

        In memory, past ``budget_rows`` rows (``None``: no limit) every block moves to disk
        (the first ``count`` rows are in use) and later blocks are files.
        """
        while self.capacity < rows:
            if self.storage == "disk":
                self._add_disk_block()
                continue
            if budget_rows is not None and rows > budget_rows:
                self.spill_to_disk(count)
                continue
            new_rows = self.block_rows if budget_rows is None else min(self.block_rows, budget_rows - self.capacity)
            self.blocks.append(Block(new_rows, tensor=torch.empty((new_rows, self.num_params), dtype=self.torch_dtype)))
            self.capacity += new_rows

    def prefault_ahead(self, count: int, budget_rows: int | None = None) -> None:
        """Have the worker pre-fault the memory rows the next snapshots take (16 MiB, at most a block, past ``count``).

        At least two rows, in chunks: nothing is queued while more than half of that is still ready, so a small model's
        snapshots do not each wake the worker. Big rows are faulted two ahead: faulting fresh pages
        can take longer than a training step (in a VM whose host backs them lazily, 20 MB took
        6-70 ms here), and a snapshot whose row is not ready waits for it. The work is queued as
        background tasks of 256 KiB at most, which a snapshot's copy or write overtakes.
        Blocks are added for them within ``budget_rows``, never past it (that would spill).
        """
        if self.storage != "memory":
            return
        row_bytes = self.num_params * self.itemsize
        ahead = max(2, min(PREFAULT_BYTES // row_bytes, self.block_rows))  # a block ahead at most
        target = count + ahead
        if budget_rows is not None:
            target = min(target, budget_rows)
        if self._fault_asked > count + ahead // 2 or self._fault_asked >= target:
            return
        if target > self.capacity:
            self.reserve(target, count, budget_rows)
        per_task = max(1, PREFAULT_PIECE_BYTES // row_bytes)  # rows per task, or one row in pieces
        start = 0
        for block in self.blocks:
            end = start + block.rows  # this block holds rows [start, end)
            while start <= self._fault_asked < min(target, end):
                lo = self._fault_asked
                hi = min(target, lo + per_task, end)
                self._queue_prefault(lo, hi, block.tensor[lo - start : hi - start])  # type: ignore[index]
                self._fault_asked = hi
            start = end

    def _queue_prefault(self, lo: int, hi: int, rows: torch.Tensor) -> None:
        """Queue the pre-faulting of rows ``lo`` to ``hi`` (``rows``) as background tasks; a single row in pieces."""
        if hi - lo > 1:
            tasks = [partial(self._prefault_rows, lo, rows)]
        else:
            tasks = [partial(self._prefault_piece, lo, views) for views in page_pieces(rows[0], PREFAULT_PIECE_BYTES)]
        items: list[tuple[int, Task, Task | None]] = [(NO_ROW, task, None) for task in tasks]
        items[-1] = (NO_ROW, tasks[-1], partial(self._faulted_to, hi))
        self._worker.submit_all(items, background=True)

    def _prefault_rows(self, first: int, rows: torch.Tensor) -> None:
        """Worker: pre-fault ``rows`` (rows ``first``, ``first + 1``, ... or a piece of one) but rows a copy claimed."""
        skip = self._claimed - first  # read now: set by the training thread before it queues the copy
        if skip < rows.shape[0]:
            prefault(rows[max(0, skip) :])

    def _prefault_piece(self, row: int, views: list[torch.Tensor]) -> None:
        """Worker: zero ``views`` (a piece of row ``row``'s pages) in one torch call, unless a copy claimed the row."""
        if self._claimed <= row:  # read now: set by the training thread before it queues the copy
            torch._foreach_zero_(views)

    def _faulted_to(self, row: int) -> None:
        self._faulted = row  # worker thread; waiters are woken when the task ends

    def _add_disk_block(self) -> None:
        directory = self.ensure_dir()
        path = directory / f"{self.prefix}-{len(self.blocks):05d}.npy"
        try:
            offset = create_npy(path, NUMPY_DTYPES[self.dtype_name], (self.block_rows, self.num_params))
        except OSError as err:
            raise ValueError(
                f"`snapshot_dir`={str(directory)!r}: cannot create {path.name} ({err}); "
                "expected a writable directory with free space."
            ) from err
        self.blocks.append(Block(self.block_rows, path=path, offset=offset))
        self.capacity += self.block_rows

    def spill_to_disk(self, count: int) -> None:
        """Move the first ``count`` rows, held in memory, to disk files, once; later rows go to disk.

        The worker writes them in the background, a few ahead of each new row (all at :meth:`flush`);
        each memory block is freed once its rows are written.
        """
        old = self.blocks
        self.blocks, self.capacity, self.storage = [], 0, "disk"
        while self.capacity < count:
            self._add_disk_block()
        row = 0
        for block in old:
            for r in range(min(block.rows, count - row)):
                self._spill.append((row, block.tensor[r]))  # type: ignore[index]
                row += 1

    def _drain_spill(self, rows: int | None = None) -> None:
        """Queue up to ``rows`` (``None``: all) of the spilled memory rows for writing."""
        while self._spill and (rows is None or rows > 0):
            row, tensor = self._spill.popleft()
            index, target_row = self._locate(row)
            self._worker.submit(row, partial(self._writer.write, index, self.blocks[index], target_row, tensor))
            rows = None if rows is None else rows - 1

    def _locate(self, i: int) -> tuple[int, int]:
        """(block index, row within the block) of row ``i``."""
        for index, block in enumerate(self.blocks):
            if i < block.rows:
                return index, i
            i -= block.rows
        raise IndexError(i)

    # ---- writing rows

    def write_row(self, i: int, tensors: Sequence[torch.Tensor], *, defer: bool = False) -> None:
        """Row ``i`` = ``tensors`` (detached, each flattened, in order; P values), rounded to the storage dtype.

        CPU tensors are copied straight into a memory row or into a reused buffer that the worker then
        writes to the row's file. Tensors on one CUDA device go through :meth:`_write_from_device`;
        ``defer`` leaves its :meth:`fence` to the caller.
        """
        device = tensors[0].device
        if device.type == "cuda" and torch.cuda.is_available() and all(t.device == device for t in tensors):
            with torch.no_grad():
                self._write_from_device(i, tensors, defer)
            return
        self.fence()  # one copy in flight at a time
        index, row = self._locate(i)
        block = self.blocks[index]
        if block.tensor is not None:
            # Pre-faulting writes zeros: from here on it leaves this row alone.
            self._claimed = max(self._claimed, i + 1)
            if defer:  # may run before the row's pre-faulting, which then skips it
                self._copy_later(i, block.tensor[row], tensors)
                return
            if self._faulted <= i < self._fault_asked:
                self._worker.wait(until=lambda: self._faulted > i)  # normally long done
            fill_row(block.tensor[row], tensors)
            return
        buf = self._staging.acquire()  # waits while max_pending rows are in flight: back-pressure
        try:
            if defer:
                self._copy_later(i, buf, tensors)
            else:
                fill_row(buf, tensors)
        except BaseException:
            self._staging.release(buf)
            raise
        self._drain_spill(SPILL_PER_WRITE)
        self._worker.submit(i, partial(self._writer.write, index, block, row, buf), partial(self._staging.release, buf))

    def _copy_later(self, i: int, row: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Have the worker copy the CPU ``tensors`` into ``row`` (snapshot ``i``) while training goes on.

        :meth:`fence` waits for it; the caller calls that before anything changes the tensors.
        Their version counters are read now and again at the fence: a change in between (an
        in-place write the fence did not hold back) fails the snapshot with
        :class:`SnapshotChangedError` instead of storing a mix of two steps. The copy is built
        here, so the worker runs one torch call and no Python around it.
        """
        self._tickets += 1
        ticket = self._tickets
        self._deferred = (ticket, i, tensors, [t._version for t in tensors])
        # The fence's waiter is woken when the task ends; a failed copy ends the wait too.
        self._worker.submit(i, row_copy(row, tensors), partial(setattr, self, "_copied", ticket))

    def _fence_deferred(self) -> None:
        """Wait for the deferred CPU copy; fail its snapshot if one of its tensors changed in place since queued."""
        if self._deferred is None:
            return
        (ticket, i, tensors, versions), self._deferred = self._deferred, None
        self._worker.wait(until=lambda: self._copied >= ticket)
        changed = [n for n, (t, v) in enumerate(zip(tensors, versions)) if t._version != v]
        if changed:
            self._worker.fail(
                i,
                SnapshotChangedError(
                    f"snapshot {i}: {len(changed)} of its {len(tensors)} tensors (the first at index {changed[0]}) "
                    "were changed in place while the snapshot was being copied"
                ),
            )

    def _write_from_device(self, i: int, tensors: Sequence[torch.Tensor], defer: bool) -> None:
        """Copy the CUDA ``tensors`` to a pinned row on a side stream; the worker lands it as row ``i``.

        The side stream first waits for the current (training) stream, so the copy sees every kernel
        queued before it (the optimizer step). :meth:`fence` makes the training stream wait for the
        copy before it changes the tensors; neither the host nor the training stream is synchronized.
        """
        device = tensors[0].device
        self.fence()
        if self._pinned is None:
            self._stream = torch.cuda.Stream(device)
            pinned = partial(torch.empty, self.num_params, dtype=self.torch_dtype, pin_memory=True)
            self._pinned = BufferRing(pinned, self.max_pending, self._worker)  # pinned memory comes faulted in
        buf = self._pinned.acquire()
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for t in tensors:
                t.record_stream(self._stream)  # a caller freeing t: its memory is not reused before the copy
            # Converted on the device (half the bytes over the bus), into memory of the side stream.
            fill_row(buf, [t.to(self.torch_dtype) for t in tensors], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._fence = (event, device)
        if not defer:
            self.fence()
        index, row = self._locate(i)
        block = self.blocks[index]
        if block.tensor is not None:
            self._claimed = max(self._claimed, i + 1)  # as in write_row: landing may overtake the pre-faulting
            land = partial(_land_in_memory, event, block.tensor[row], buf)
        else:
            land = partial(_land_on_disk, event, self._writer, index, block, row, buf)
            self._drain_spill(SPILL_PER_WRITE)
        self._worker.submit(i, land, partial(self._pinned.release, buf))

    def fence(self) -> None:
        """Wait for the last deferred copy: a CPU copy on the host, a device copy on the device's current stream.

        A CPU copy that failed (or was skipped after an earlier failure) ends the wait too; its
        error comes from :meth:`take_error`.
        """
        self._fence_deferred()
        if self._fence is not None:
            event, device = self._fence
            torch.cuda.current_stream(device).wait_event(event)
            self._fence = None

    def flush(self) -> None:
        """Wait for the worker, then free the row buffers: every row written so far is in its block."""
        self.fence()
        self._drain_spill()
        self._worker.wait()
        self._writer.close()  # the worker is idle: nobody writes to the file now
        self._staging.clear()
        if self._pinned is not None:
            self._pinned.clear()

    def take_error(self) -> tuple[int, BaseException] | None:
        """``(first row not stored, error)`` of a failed background task (once the queue has run out), or ``None``."""
        failure = self._worker.take_error()
        if failure is not None:
            self._spill.clear()  # rows past the failure: not stored, and later appends take their places
        return failure

    @property
    def failed(self) -> bool:
        """Whether a background task failed and :meth:`take_error` has not collected it yet."""
        return self._worker.failed

    # ---- reading, reopening, closing

    def reader(self) -> BlockReader:
        """A reader of these blocks (a context manager that closes the files it opened); :meth:`flush` first."""
        return BlockReader(self.blocks, self.dtype_name, self.num_params)

    def reopen(self, files: Iterable[str | Path], count: int) -> None:
        """Take over the block files ``files`` (of a checkpointed store holding ``count`` rows), on disk.

        Raises:
            ValueError: naming ``state_dict['files']`` if a file is missing, not writable,
                not of this dtype and width, or the files hold fewer than ``count`` rows.
        """
        self.storage = "disk"
        np_dtype = NUMPY_DTYPES[self.dtype_name]
        for file in files:
            path = Path(file)
            try:
                shape, dtype, fortran, offset = read_npy_header(path)
                if not os.access(path, os.W_OK):
                    raise OSError("not writable")
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"`state_dict['files']` entry {str(path)!r} cannot be opened ({err}); "
                    "expected the store's .npy file."
                ) from err
            if dtype != np_dtype or fortran or len(shape) != 2 or shape[1] != self.num_params:
                raise ValueError(
                    f"`state_dict['files']` entry {str(path)!r} holds {dtype} of shape {shape}; "
                    f"expected {np_dtype} of shape (rows, {self.num_params})."
                )
            self.blocks.append(Block(int(shape[0]), path=path, offset=offset))
            self.capacity += int(shape[0])
        if self.capacity < count:
            raise ValueError(
                f"`state_dict['files']` hold {self.capacity} rows; expected at least the recorded {count} snapshots."
            )
        if self.blocks and self.directory is None:
            self.directory = self.blocks[0].path.parent  # type: ignore[union-attr]

    def close(self, *, delete: bool = False) -> None:
        """Release the blocks (after :meth:`flush`) and end the worker.

        Files are removed when ``delete`` or the directory is its own.
        """
        self.flush()
        self._stop_worker()
        paths = self.files
        self.blocks, self.capacity, self._pinned, self._stream = [], 0, None, None
        if self._owns_dir and self._finalizer is not None:
            self._finalizer()  # removes the temporary directory
        elif delete:
            for p in paths:
                p.unlink(missing_ok=True)


def _land_in_memory(event: Any, row: torch.Tensor, buf: torch.Tensor) -> None:
    """Worker: once the device copy into the pinned ``buf`` is done, copy it into the memory ``row``."""
    event.synchronize()
    row.copy_(buf)


def _land_on_disk(event: Any, writer: BlockWriter, index: int, block: Block, row: int, buf: torch.Tensor) -> None:
    """Worker: once the device copy into the pinned ``buf`` is done, write it as ``row`` of file block ``index``."""
    event.synchronize()
    writer.write(index, block, row, buf)
