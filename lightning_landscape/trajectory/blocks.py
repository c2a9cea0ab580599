"""Where a snapshot store's rows live: preallocated blocks in CPU memory or ``.npy`` files on disk.

:class:`SnapshotBlocks` grows by whole blocks (never rewriting old ones), moves
every block to disk once when a memory budget is outgrown, writes and reads rows,
reopens the files of a checkpointed store, and removes the temporary directory
it made. :class:`~lightning_landscape.trajectory.SnapshotStore` builds on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable
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
    read_npy_header,
)

# Target size of one preallocated block (memory tensor or .npy file): large enough that a long
# trajectory of a small model needs few files, small enough that a spare block costs little.
BLOCK_BYTES = 64 * 2**20
# At most this many rows per block, so a tiny model does not preallocate room for thousands of snapshots.
MAX_BLOCK_ROWS = 1024


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

    Example:
        >>> blocks = SnapshotBlocks(2, "float32", "memory", block_rows=2)
        >>> blocks.reserve(3, count=0)
        >>> blocks.write(2, torch.tensor([1.0, 2.0]))
        >>> out = torch.empty(1, 2)
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
    ) -> None:
        self.num_params = num_params
        self.dtype_name = dtype_name
        self.torch_dtype = TORCH_DTYPES[dtype_name]
        self.itemsize = NUMPY_DTYPES[dtype_name].itemsize
        self.storage = storage
        self.directory = directory
        self.block_rows = block_rows or max(1, min(MAX_BLOCK_ROWS, BLOCK_BYTES // (num_params * self.itemsize)))
        self.prefix = prefix or f"snapshots-{uuid.uuid4().hex[:8]}"
        self.blocks: list[Block] = []
        self.capacity = 0
        self._owns_dir = False
        self._finalizer: Any = None
        self._writer = BlockWriter()
        self._cast: torch.Tensor | None = None  # one reused row for converting to a 16-bit storage dtype
        self._staging: torch.Tensor | None = None  # one pinned host row for copies from a CUDA device
        self._pending: tuple[int, Any] | None = None  # (row, CUDA event) of a copy still in flight

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

    def reserve(self, rows: int, count: int, budget_rows: int | None = None) -> None:
        """Make room for ``rows`` rows, adding blocks.

        In memory, past ``budget_rows`` rows (``None``: no limit) every block moves to disk
        (the first ``count`` rows are in use) and later blocks are files.
        """
        while self.capacity < rows:
            if self.storage == "disk":
                self._add_disk_block()
                continue
            new_rows = self.block_rows
            if budget_rows is not None:
                new_rows = min(new_rows, budget_rows - self.capacity)
                if new_rows < 1 or self.capacity + new_rows < rows:
                    self.spill_to_disk(count)
                    continue
            self.blocks.append(Block(new_rows, tensor=torch.empty((new_rows, self.num_params), dtype=self.torch_dtype)))
            self.capacity += new_rows

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
        """Move the first ``count`` rows, held in memory, to disk files, once; later rows go to disk."""
        old = self.blocks
        self.blocks, self.capacity, self.storage = [], 0, "disk"
        while self.capacity < count:
            self._add_disk_block()
        row = 0
        for block in old:
            n = min(block.rows, count - row)
            for i in range(n):
                self.write(row + i, block.tensor[i])  # type: ignore[index]
            row += n

    def _locate(self, i: int) -> tuple[int, int]:
        """(block index, row within the block) of row ``i``."""
        for index, block in enumerate(self.blocks):
            if i < block.rows:
                return index, i
            i -= block.rows
        raise IndexError(i)

    def write(self, i: int, vec: torch.Tensor) -> None:
        """Store the CPU tensor ``vec`` (P values, any float dtype) as row ``i``, rounded to the storage dtype."""
        index, row = self._locate(i)
        block = self.blocks[index]
        if block.tensor is not None:
            block.tensor[row].copy_(vec)
            return
        if vec.dtype != self.torch_dtype or not vec.is_contiguous():
            if self._cast is None:
                self._cast = torch.empty(self.num_params, dtype=self.torch_dtype)
            vec = self._cast.copy_(vec)
        self._writer.write(index, block, row, vec)

    def write_from_device(self, i: int, vec: torch.Tensor) -> None:
        """Start a non-blocking copy of the CUDA vector ``vec`` to a pinned host row, landing as row ``i`` at flush.

        The copy is ordered on ``vec``'s current stream, so later work on that stream may change ``vec``.
        """
        self.flush()
        if self._staging is None:
            self._staging = torch.empty(self.num_params, dtype=self.torch_dtype, pin_memory=True)
        self._staging.copy_(vec.to(self.torch_dtype), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(vec.device))
        self._pending = (i, event)

    def flush(self) -> None:
        """Wait for a copy started by :meth:`write_from_device` and write its row."""
        if self._pending is not None:
            i, event = self._pending
            event.synchronize()
            self.write(i, self._staging)  # type: ignore[arg-type]
            self._pending = None

    def reader(self) -> BlockReader:
        """A reader of these blocks (a context manager that closes the files it opened)."""
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
        """Release the blocks (after :meth:`flush`); files are removed when ``delete`` or the directory is its own."""
        self.flush()
        self._writer.close()
        paths = self.files
        self.blocks, self.capacity, self._cast, self._staging = [], 0, None, None
        if self._owns_dir and self._finalizer is not None:
            self._finalizer()  # removes the temporary directory
        elif delete:
            for p in paths:
                p.unlink(missing_ok=True)
