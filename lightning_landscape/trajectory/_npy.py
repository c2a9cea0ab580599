"""Snapshot blocks and their positioned file I/O.

A block is a preallocated ``(rows, P)`` array of snapshots: a CPU tensor in
memory, or an ``.npy`` file on disk. This module holds the storage dtypes, the
:class:`Block` record, zero-copy conversions between torch and numpy (bfloat16
as its uint16 bit pattern), creating ``.npy`` files and reading their headers,
the unbuffered readers and writers that move rows in and out of them
without a memory map, and the two row operations of a snapshot: faulting a
fresh row in ahead of use (:func:`prefault`, :func:`page_pieces`) and copying the parameters into it
(:func:`fill_row`).
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
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


def prefault(tensor: torch.Tensor) -> None:
    """Fault in every memory page of the contiguous CPU tensor ``tensor`` ahead of use, writing one zero per page.

    The first write to a fresh page costs a page fault, which on a 40 MB row takes longer than
    copying the row itself; done here, ahead of use and on the writer thread, the training
    thread's copy into the row then takes none. One strided write in one call: its faults take
    the kernel's per-VMA locks only, and the thread takes the GIL back once (the views of
    :func:`page_pieces`, in one piece). Faulting with
    ``madvise(MADV_POPULATE_WRITE)`` instead (256 KiB per call) held the process's memory-map
    lock, which the training thread's own mmap/munmap wait for, and took the GIL back after every
    call; on the 1M-weight MLP it cost the training thread more than these writes (see README).

    Example:
        >>> row = torch.ones(2048)
        >>> prefault(row)
        >>> int((row == 0).sum())  # one element per 4 KiB page, and the last
        3
    """
    flat = tensor.view(-1)
    if flat.numel():
        (views,) = page_pieces(flat, flat.numel() * flat.element_size() + mmap.PAGESIZE)  # all of it, one piece
        torch._foreach_zero_(views)


def page_pieces(row: torch.Tensor, piece_bytes: int) -> list[list[torch.Tensor]]:
    """Views of the contiguous 1-D ``row`` whose zeroing faults all its pages in: one element per page, and the last.

    In pieces of at most ``piece_bytes`` of pages, each a list of views that one
    ``torch._foreach_zero_`` call zeroes (as :func:`prefault` does for the whole row). Made by the
    caller: the writer thread then runs one torch call per piece, and each torch call it makes
    from Python hands the GIL back and forth with the training thread.

    Example:
        >>> row = torch.ones(3000)  # 12,000 bytes: three or four pages
        >>> for views in page_pieces(row, 8192):
        ...     _ = torch._foreach_zero_(views)
        >>> int((row == 0).sum()) in (3, 4), float(row[-1])
        (True, 0.0)
    """
    pages = row[:: max(1, mmap.PAGESIZE // row.element_size())]
    pieces = [[piece] for piece in pages.split(max(1, piece_bytes // mmap.PAGESIZE))]
    pieces[-1].append(row[-1:])  # the last page, where the row does not start on a page boundary
    return pieces


def row_copy(row: torch.Tensor, tensors: Sequence[torch.Tensor], *, non_blocking: bool = False) -> Callable[[], Any]:
    """The copy of ``tensors`` (each flattened, in order) into the 1-D ``row``, converting to its dtype, as one call.

    Built by the caller and run now (:func:`fill_row`) or on the writer thread, which then runs
    no Python of its own around the copy: every stretch of Python it runs takes the GIL from the
    training thread. Contiguous tensors go in one call that writes the row itself (no flat
    intermediate): ``torch.cat(..., out=row)`` in the row's dtype, else ``torch._foreach_copy_``
    into views of the row, which rounds to a 16-bit row in the same pass, once per value (cat's
    converting path is 7x slower: 16 ms at 10M weights against 2.2 ms; one ``copy_`` per tensor
    from Python took a third longer at 1M). Non-contiguous tensors and device-to-host copies take
    one ``copy_`` per tensor. The tensors are detached views: the copy records no graph.

    Example:
        >>> row = torch.empty(3, dtype=torch.float16)
        >>> copy = row_copy(row, [torch.tensor([1.0, 2.0]), torch.tensor([0.1])])
        >>> _ = copy()
        >>> row.tolist()
        [1.0, 2.0, 0.0999755859375]
    """
    if not non_blocking and all(t.is_contiguous() for t in tensors):
        flat = [t.detach().view(-1) for t in tensors]
        if all(t.dtype == row.dtype for t in flat):
            return partial(torch.cat, flat, out=row)
        return partial(torch._foreach_copy_, list(row.split([t.numel() for t in flat])), flat)
    return partial(_copy_each, row, [t.detach() for t in tensors], non_blocking)


def _copy_each(row: torch.Tensor, tensors: Sequence[torch.Tensor], non_blocking: bool) -> None:
    a = 0
    for t in tensors:
        n = t.numel()
        row[a : a + n].view(t.shape).copy_(t, non_blocking=non_blocking)
        a += n


def fill_row(row: torch.Tensor, tensors: Sequence[torch.Tensor], *, non_blocking: bool = False) -> None:
    """Copy ``tensors`` (each flattened, in order) into the 1-D ``row`` now: :func:`row_copy`, run.

    Example:
        >>> row = torch.empty(5, dtype=torch.float16)
        >>> fill_row(row, [torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t(), torch.tensor(0.1)])
        >>> row.tolist()
        [1.0, 3.0, 2.0, 4.0, 0.0999755859375]
    """
    row_copy(row, tensors, non_blocking=non_blocking)()
