"""Optimization trajectories and their PCA directions (Li et al., NeurIPS 2018, section 7).

Random directions capture almost none of a descent path, because two random
vectors in a high-dimensional space are nearly orthogonal. Li et al. instead
stack the snapshots θ_0, ..., θ_{n-1} of the trainable weights taken during
training, relative to the final weights θ_n,

    M = [θ_0 − θ_n; θ_1 − θ_n; ...; θ_{n−1} − θ_n]        (n rows, P columns),

and plot the loss on the plane through θ_n spanned by the top two right singular
vectors of M, with the path projected onto it.

This module is the Lightning-free core:

* :func:`flatten_parameters` / :func:`unflatten_vector` convert between a
  ``dict[str, Tensor]`` of parameters and one flat float32 vector;
* :class:`SnapshotStore` keeps the K flat snapshots in CPU memory or, past a
  memory budget, in ``.npy`` files on disk (float32, float16 or bfloat16; any
  of them opens with ``numpy.load(path, mmap_mode="r")``), and can be
  checkpointed and resumed;
* :func:`trajectory_pca` computes the PCA by streaming the store twice, so the
  K x P matrix is never held in memory: once to accumulate the K x K Gram matrix
  G = M Mᵀ in float64, whose eigendecomposition gives the singular values and
  left singular vectors, and once to form the principal directions
  V_k = Mᵀ U_k / s_k;
* :func:`pca_directions` turns the components into direction dicts for the
  surface engine and :func:`path_range` picks plot bounds around the path.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape._validation import check_choice, check_positive_int
from lightning_landscape.params import flatten_parameters, unflatten_vector

__all__ = [
    "PCAResult",
    "SnapshotStore",
    "TooFewSnapshotsError",
    "flatten_parameters",
    "pca_directions",
    "path_range",
    "trajectory_pca",
    "unflatten_vector",
]

STORAGES: tuple[str, ...] = ("auto", "memory", "disk")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
MIN_SNAPSHOTS = 3

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: its bit patterns are stored as uint16 and reinterpreted on the torch side.
_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
_BLOCK_BYTES = 64 * 2**20  # target size of one preallocated block (memory tensor or .npy file)
_MAX_BLOCK_ROWS = 1024
_CHUNK_BYTES = 64 * 2**20  # target size of one chunk streamed by SnapshotStore.iter_chunks
# trajectory_pca streams float64 column blocks of about an eighth of one float32 model copy (within
# these bounds), so that with its two float32 components it stays well under three model copies.
_PCA_BLOCK_BYTES = (2**20, 64 * 2**20)
_STATE_FORMAT = "lightning_landscape.SnapshotStore/1"
# A reader keeps at most this many block files open (a big model has one snapshot per file).
_MAX_OPEN_FILES = 64


# --------------------------------------------------------------------------------------------
# snapshot storage


@dataclass
class _Block:
    """One preallocated block of snapshot rows: a CPU tensor in memory, or an ``.npy`` file on disk.

    File blocks are written and read with plain positioned file I/O, never through a
    memory map: mapped pages would count in the process's resident set (dirty ones
    until written back), so a long disk trajectory would grow the process by the size
    of the block being filled. Written data sits in the OS page cache, which the
    kernel reclaims as it needs.
    """

    rows: int
    tensor: torch.Tensor | None = None  # (rows, P) in the storage dtype, memory blocks only
    path: Path | None = None  # file blocks only
    offset: int = 0  # byte offset of row 0 in the file (after the .npy header)


def _torch_view(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A zero-copy torch view of a numpy array holding ``dtype_name`` values (bfloat16 as uint16 bits)."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _numpy_bits(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a numpy array (bfloat16 as its int16 bit pattern)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def _create_npy(path: Path, dtype: np.dtype, shape: tuple[int, int]) -> int:
    """Create ``path`` as a zero-filled (sparse) ``.npy`` file of ``shape``; returns the data's byte offset."""
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_2_0(f, header)
        offset = f.tell()
        f.truncate(offset + shape[0] * shape[1] * dtype.itemsize)
    return offset


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, fortran order and data offset of an ``.npy`` file, reading only its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        return shape, dtype, fortran, f.tell()


def _io_exact(f: Any, view: memoryview, offset: int, write: bool, path: Path) -> None:
    """Write (or read into) all of ``view`` at byte ``offset`` of the unbuffered file ``f``."""
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


def check_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check a file can be written there; ``ValueError`` naming ``snapshot_dir`` if not.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     check_writable_dir(Path(tmp) / "snapshots" / "run1")
        ...     sorted(p.name for p in Path(tmp).rglob("*"))  # created, and the write probe is gone
        ['run1', 'snapshots']
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ValueError(
            f"`snapshot_dir`={str(path)!r} cannot be written ({err}); expected a writable directory."
        ) from err


def check_max_memory_mb(value: Any) -> float:
    """``max_memory_mb`` as a float; ``ValueError`` naming it unless it is a finite number >= 0.

    Example:
        >>> check_max_memory_mb(256)
        256.0
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.number))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(
            f"`max_memory_mb`={value!r} is not valid; expected a finite number >= 0 (MiB); use storage='memory' for no limit."
        )
    return float(value)


def _normalize_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        for name, td in _TORCH_DTYPES.items():
            if td == dtype:
                return name
    return check_choice("dtype", dtype, DTYPES)


class SnapshotStore:
    """K snapshots of a P-dimensional flat parameter vector, in CPU memory or in ``.npy`` files on disk.

    Snapshots live in preallocated blocks of ``block_rows`` rows; a full store
    grows by adding a block, never by rewriting old ones. In memory a block is a
    CPU tensor; on disk it is one ``.npy`` file (``{prefix}-00000.npy``, ...),
    a (rows, P) array that ``numpy.load(path, mmap_mode="r")`` maps. The store
    itself writes and reads the files with positioned file I/O rather than a
    memory map, so its resident memory stays at one snapshot however many it
    holds. A file's rows past the snapshot count are unused (zeros; sparse on
    most file systems).

    Args:
        num_params: P, the length of every snapshot.
        dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (also the
            torch dtypes): the storage precision; the 16-bit types halve memory and
            disk. bfloat16 is stored in ``.npy`` files as its uint16 bit pattern.
            Reads always return float32.
        storage: ``"memory"`` keeps everything in CPU memory; ``"disk"`` writes
            every snapshot to ``snapshot_dir``; ``"auto"`` (default) keeps them in
            memory while K·P·bytes fits ``max_memory_mb`` and then moves all of them
            to disk once, continuing there.
        max_memory_mb: the memory budget of ``"auto"`` (MiB, >= 0).
        snapshot_dir: directory of the ``.npy`` files. It is created and checked
            for writing at construction (for ``"disk"`` and ``"auto"``). ``None``
            uses a fresh temporary directory, created when first needed and removed
            by :meth:`close` or at interpreter exit; give a directory to resume in
            another process.
        block_rows: snapshots per block (per file on disk); ``None`` picks about
            64 MiB per block, at most 1024 rows.
        prefix: the file-name prefix; ``None`` draws a unique one, so several
            stores can share a directory. Existing files of the same name are
            overwritten.

    Raises:
        ValueError: on an invalid argument, or a ``snapshot_dir`` that cannot be
            created or written.

    Example:
        >>> store = SnapshotStore(3, storage="memory")
        >>> for step in range(4):
        ...     store.append(torch.full((3,), float(step)), step=step, epoch=0)
        >>> len(store), store.steps, store.get(-1).tolist()
        (4, [0, 1, 2, 3], [3.0, 3.0, 3.0])
    """

    def __init__(
        self,
        num_params: int,
        *,
        dtype: str | torch.dtype = "float32",
        storage: str = "auto",
        max_memory_mb: float = 1024.0,
        snapshot_dir: str | os.PathLike | None = None,
        block_rows: int | None = None,
        prefix: str | None = None,
    ) -> None:
        num_params = check_positive_int("num_params", num_params)
        dtype_name = _normalize_dtype(dtype)
        check_choice("storage", storage, STORAGES)
        max_memory_mb = check_max_memory_mb(max_memory_mb)
        block_rows = check_positive_int("block_rows", block_rows, allow_none=True)
        if prefix is not None and (not isinstance(prefix, str) or not prefix or os.sep in prefix or "/" in prefix):
            raise ValueError(
                f"`prefix`={prefix!r} is not valid; expected a non-empty file-name prefix without path separators."
            )
        directory = None if snapshot_dir is None else Path(snapshot_dir)
        if directory is not None and storage != "memory":
            check_writable_dir(directory)
        self._setup(num_params, dtype_name, storage, max_memory_mb, directory, block_rows, prefix)
        if storage == "disk":
            self._ensure_dir()

    def _setup(
        self,
        num_params: int,
        dtype_name: str,
        storage: str,
        max_memory_mb: float,
        directory: Path | None,
        block_rows: int | None,
        prefix: str | None,
    ) -> None:
        self._num_params = num_params
        self._dtype_name = dtype_name
        self._torch_dtype = _TORCH_DTYPES[dtype_name]
        self._itemsize = _NUMPY_DTYPES[dtype_name].itemsize
        self._requested_storage = storage
        self._storage = "disk" if storage == "disk" else "memory"
        self._max_memory_mb = max_memory_mb
        self._dir = directory
        self._owns_dir = False
        self._finalizer: Any = None
        row_bytes = num_params * self._itemsize
        self._block_rows = block_rows or max(1, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // row_bytes))
        self._prefix = prefix or f"snapshots-{uuid.uuid4().hex[:8]}"
        self._blocks: list[_Block] = []
        self._capacity = 0
        self._count = 0
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._staging: torch.Tensor | None = None
        self._pending: tuple[int, Any] | None = None  # (row, CUDA event) of a copy still in flight
        self._cast: torch.Tensor | None = None  # one reused row for converting to a 16-bit storage dtype
        self._writer: tuple[int, Any] | None = None  # (block index, open file) of the disk block being filled
        self._closed = False

    # ---- properties

    @property
    def num_params(self) -> int:
        """P, the length of every snapshot."""
        return self._num_params

    @property
    def dtype(self) -> str:
        """The storage dtype name: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
        return self._dtype_name

    @property
    def torch_dtype(self) -> torch.dtype:
        """The storage dtype as a torch dtype."""
        return self._torch_dtype

    @property
    def storage(self) -> str:
        """Where the snapshots are now: ``"memory"`` or ``"disk"``."""
        return self._storage

    @property
    def snapshot_dir(self) -> Path | None:
        """The directory of the ``.npy`` files (``None`` until one is needed)."""
        return self._dir

    @property
    def files(self) -> list[Path]:
        """The ``.npy`` files in use, in snapshot order (empty in memory)."""
        return [b.path for b in self._blocks if b.path is not None]

    @property
    def steps(self) -> list[int]:
        """The global step of each snapshot, in order."""
        return list(self._steps)

    @property
    def epochs(self) -> list[int]:
        """The epoch of each snapshot, in order."""
        return list(self._epochs)

    @property
    def nbytes(self) -> int:
        """Bytes taken by the stored snapshots (K·P·itemsize; preallocated spare rows not counted)."""
        return self._count * self._num_params * self._itemsize

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        where = f", snapshot_dir={str(self._dir)!r}" if self._storage == "disk" else ""
        return (
            f"SnapshotStore(num_snapshots={self._count}, num_params={self._num_params}, "
            f"dtype={self._dtype_name!r}, storage={self._storage!r}{where})"
        )

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- writing

    def append(self, vec: torch.Tensor, *, step: int, epoch: int) -> None:
        """Store one snapshot (a 1-D tensor of length P, any float dtype and device).

        The values are rounded to the storage dtype. A CUDA vector is converted on
        its device and copied without blocking into a pinned host buffer; the copy
        lands in the store at the next call that needs it (the next append, a read,
        :meth:`flush`), so training is not stalled by the transfer. The caller may
        change ``vec`` afterwards on the same CUDA stream.

        Raises:
            ValueError: if ``vec`` is not a floating tensor of P elements, or
                ``step``/``epoch`` are not integers.
            RuntimeError: if the store is closed.

        Example:
            >>> store = SnapshotStore(2, dtype="float16", storage="memory")
            >>> store.append(torch.tensor([0.1, 2.0]), step=10, epoch=1)
            >>> store.get(0).tolist(), store.epochs
            ([0.0999755859375, 2.0], [1])
        """
        self._check_open()
        if (
            not isinstance(vec, torch.Tensor)
            or not vec.is_floating_point()
            or vec.dim() != 1
            or vec.numel() != self._num_params
        ):
            got = (
                f"shape {tuple(vec.shape)} and dtype {vec.dtype}"
                if isinstance(vec, torch.Tensor)
                else type(vec).__name__
            )
            raise ValueError(
                f"`vec` has {got}; expected a 1-D floating tensor of {self._num_params} elements (`num_params`)."
            )
        for name, value in (("step", step), ("epoch", epoch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"`{name}`={value!r} is not valid; expected an integer.")
        self._flush_pending()
        row = self._count
        self._reserve(row + 1)
        vec = vec.detach()
        if vec.is_cuda and torch.cuda.is_available():
            if self._staging is None:
                self._staging = torch.empty(self._num_params, dtype=self._torch_dtype, pin_memory=True)
            self._staging.copy_(vec.to(self._torch_dtype), non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(vec.device))
            self._pending = (row, event)
        else:
            self._write(row, vec if vec.device.type == "cpu" else vec.cpu())
        self._count = row + 1
        self._steps.append(int(step))
        self._epochs.append(int(epoch))

    def flush(self) -> None:
        """Finish an in-flight device copy; every snapshot appended so far is then readable (also by another process).

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> store.append(torch.zeros(2), step=0, epoch=0)
            >>> store.flush()
        """
        self._flush_pending()

    def _flush_pending(self) -> None:
        if self._pending is not None:
            row, event = self._pending
            event.synchronize()
            self._write(row, self._staging)  # type: ignore[arg-type]
            self._pending = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(
                "this SnapshotStore is closed; create a new one or resume with SnapshotStore.from_state_dict."
            )

    def _locate(self, i: int) -> tuple[int, int]:
        """(block index, row within the block) of snapshot ``i``."""
        for index, block in enumerate(self._blocks):
            if i < block.rows:
                return index, i
            i -= block.rows
        raise IndexError(i)

    def _write(self, i: int, vec: torch.Tensor) -> None:
        index, row = self._locate(i)
        block = self._blocks[index]
        if block.tensor is not None:
            block.tensor[row].copy_(vec)
            return
        if vec.dtype != self._torch_dtype or not vec.is_contiguous():
            if self._cast is None:
                self._cast = torch.empty(self._num_params, dtype=self._torch_dtype)
            vec = self._cast.copy_(vec)
        if self._writer is None or self._writer[0] != index:
            self._close_writer()
            self._writer = (index, open(block.path, "r+b", buffering=0))  # type: ignore[arg-type]
        data = memoryview(_numpy_bits(vec)).cast("B")
        _io_exact(self._writer[1], data, block.offset + row * data.nbytes, True, block.path)  # type: ignore[arg-type]
        if row == block.rows - 1:
            self._close_writer()  # a full block is not written again

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer[1].close()
            self._writer = None

    def _reserve(self, rows: int) -> None:
        """Make room for ``rows`` snapshots, adding blocks (and spilling to disk in "auto")."""
        while self._capacity < rows:
            if self._storage == "disk":
                self._add_disk_block()
                continue
            new_rows = self._block_rows
            if self._requested_storage == "auto":
                budget_rows = int(self._max_memory_mb * 2**20) // (self._num_params * self._itemsize)
                new_rows = min(new_rows, budget_rows - self._capacity)
                if new_rows < 1 or self._capacity + new_rows < rows:
                    self._spill_to_disk()
                    continue
            self._blocks.append(
                _Block(new_rows, tensor=torch.empty((new_rows, self._num_params), dtype=self._torch_dtype))
            )
            self._capacity += new_rows

    def _ensure_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lightning_landscape-snapshots-"))
            self._owns_dir = True
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        return self._dir

    def _add_disk_block(self) -> None:
        directory = self._ensure_dir()
        path = directory / f"{self._prefix}-{len(self._blocks):05d}.npy"
        try:
            offset = _create_npy(path, _NUMPY_DTYPES[self._dtype_name], (self._block_rows, self._num_params))
        except OSError as err:
            raise ValueError(
                f"`snapshot_dir`={str(directory)!r}: cannot create {path.name} ({err}); "
                "expected a writable directory with free space."
            ) from err
        self._blocks.append(_Block(self._block_rows, path=path, offset=offset))
        self._capacity += self._block_rows

    def move_to_disk(self) -> None:
        """Move the snapshots held in memory to ``.npy`` files in ``snapshot_dir``; later ones go there too.

        What an ``"auto"`` store does by itself once it outgrows ``max_memory_mb``. Call it
        to make the store resumable from :meth:`state_dict` earlier (``TrajectoryPCA`` does,
        before a checkpoint, when a ``snapshot_dir`` was given). A no-op on disk.

        Raises:
            ValueError: for a store created with ``storage="memory"``.
            RuntimeError: if the store is closed.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     store = SnapshotStore(2, storage="auto", snapshot_dir=tmp)
            ...     store.append(torch.ones(2), step=0, epoch=0)
            ...     before = store.storage
            ...     store.move_to_disk()
            ...     print(before, store.storage, len(store.files), store.get(0).tolist())
            ...     store.close()
            memory disk 1 [1.0, 1.0]
        """
        self._check_open()
        if self._storage == "disk":
            return
        if self._requested_storage == "memory":
            raise ValueError(
                "this store was created with `storage`='memory'; expected 'auto' or 'disk' to move it to disk."
            )
        self._flush_pending()
        self._spill_to_disk()

    def _spill_to_disk(self) -> None:
        """Move every snapshot held in memory to disk files, once; later snapshots go to disk."""
        old = self._blocks
        self._blocks, self._capacity, self._storage = [], 0, "disk"
        while self._capacity < self._count:
            self._add_disk_block()
        row = 0
        for block in old:
            n = min(block.rows, self._count - row)
            for i in range(n):
                self._write(row + i, block.tensor[i])
            row += n

    # ---- reading

    def get(self, i: int) -> torch.Tensor:
        """Snapshot ``i`` (negative counts from the end) as a new 1-D float32 CPU tensor.

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> store.append(torch.tensor([1.0, 2.0]), step=0, epoch=0)
            >>> store.get(-1).tolist()
            [1.0, 2.0]
        """
        self._check_open()
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -self._count <= i < self._count:
            raise IndexError(f"`i`={i!r} is out of range for a store of {self._count} snapshots.")
        self._flush_pending()
        i = int(i) % self._count
        out = torch.empty((1, self._num_params), dtype=torch.float32)
        with _BlockReader(self) as reader:
            self._read_rows(reader, i, i + 1, 0, self._num_params, out)
        return out[0]

    def _read_rows(self, reader: _BlockReader, start: int, stop: int, a: int, b: int, out: torch.Tensor) -> None:
        """``out[:] = X[start:stop, a:b]``, the snapshots' columns ``a:b``, across the blocks that hold them."""
        first = 0
        for index, block in enumerate(self._blocks):
            lo, hi = max(start, first), min(stop, first + block.rows)
            if lo < hi:
                reader.copy(index, lo - first, hi - first, a, b, out[lo - start : hi - start])
            first += block.rows

    def iter_chunks(self, rows: int | None = None, *, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Stream the snapshots in order as float32 tensors of shape ``(<= rows, P)``.

        Disk blocks are read with file reads (no memory map), so streaming a
        store larger than memory keeps the process's resident set at about one chunk.

        Args:
            rows: snapshots per chunk; ``None`` picks about 64 MiB per chunk.
            stop: read only the first ``stop`` snapshots.

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> for k in range(5):
            ...     store.append(torch.full((2,), float(k)), step=k, epoch=0)
            >>> [tuple(c.shape) for c in store.iter_chunks(2)]
            [(2, 2), (2, 2), (1, 2)]
        """
        self._check_open()
        rows = check_positive_int("rows", rows, allow_none=True) or max(1, _CHUNK_BYTES // (4 * self._num_params))
        stop = self._checked_stop(stop)
        self._flush_pending()
        with _BlockReader(self) as reader:
            for start in range(0, stop, rows):
                end = min(stop, start + rows)
                out = torch.empty((end - start, self._num_params), dtype=torch.float32)
                self._read_rows(reader, start, end, 0, self._num_params, out)
                yield out

    def iter_column_blocks(
        self,
        cols: int,
        *,
        stop: int | None = None,
        start: int = 0,
        dtype: torch.dtype = torch.float32,
        out: torch.Tensor | None = None,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Stream the K x P matrix of snapshots by column blocks: ``(a, b, X[start:stop, a:b])``.

        Each block holds ``cols`` consecutive parameter coordinates of every
        snapshot, converted to ``dtype``. Every stored byte is read once, in
        contiguous runs of ``cols`` values per snapshot; disk blocks are read
        with file reads (no memory map), so the resident set stays at about one
        column block however large the store is. All blocks are views of one
        buffer: a block is overwritten by the next one (``clone()`` it to keep
        it), which spares the heap a fresh allocation per block. Pass ``out``
        (a contiguous 1-D tensor of ``dtype`` with at least
        ``(stop - start) * min(cols, P)`` elements) to reuse one buffer across
        calls too; reading in the storage dtype (:attr:`torch_dtype`) needs no
        conversion buffer at all.

        Example:
            >>> store = SnapshotStore(3, storage="memory")
            >>> for k in range(2):
            ...     store.append(torch.tensor([0.0, 1.0, 2.0]) + k, step=k, epoch=0)
            >>> [(a, b, blk.tolist()) for a, b, blk in store.iter_column_blocks(2)]
            [(0, 2, [[0.0, 1.0], [1.0, 2.0]]), (2, 3, [[2.0], [3.0]])]
        """
        self._check_open()
        cols = check_positive_int("cols", cols)
        stop = self._checked_stop(stop)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= stop:
            raise ValueError(f"`start`={start!r} is not valid; expected an integer in [0, {stop}].")
        self._flush_pending()
        size = (stop - start) * min(cols, self._num_params)
        if out is None:
            buffer = torch.empty(size, dtype=dtype)
        elif (
            isinstance(out, torch.Tensor)
            and out.dtype == dtype
            and out.dim() == 1
            and out.is_contiguous()
            and out.numel() >= size
        ):
            buffer = out
        else:
            got = f"a {tuple(out.shape)} {out.dtype} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"`out` is {got}; expected a contiguous 1-D {dtype} CPU tensor of at least {size} elements."
            )
        with _BlockReader(self) as reader:
            for a in range(0, self._num_params, cols):
                b = min(self._num_params, a + cols)
                out = buffer[: (stop - start) * (b - a)].view(stop - start, b - a)
                self._read_rows(reader, start, stop, a, b, out)
                yield a, b, out

    def _checked_stop(self, stop: int | None) -> int:
        if stop is None:
            return self._count
        if isinstance(stop, bool) or not isinstance(stop, (int, np.integer)) or not 0 <= stop <= self._count:
            raise ValueError(f"`stop`={stop!r} is not valid; expected an integer in [0, {self._count}].")
        return int(stop)

    def quantize(self, vec: torch.Tensor) -> torch.Tensor:
        """``vec`` rounded to the storage dtype, as a float32 CPU tensor (what :meth:`append` would store).

        Example:
            >>> SnapshotStore(1, dtype="bfloat16", storage="memory").quantize(torch.tensor([1.001])).item()
            1.0
        """
        return vec.detach().reshape(-1).to(self._torch_dtype).to(device="cpu", dtype=torch.float32)

    # ---- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Counters, dtype name, file paths and step/epoch lists, as plain Python values.

        Flushes the files first, so a checkpoint taken now can resume from them.
        Holds no tensors: it loads with ``torch.load(..., weights_only=True)``.
        Snapshots held in memory are not part of it (use ``storage="disk"`` to
        resume a trajectory).

        Example:
            >>> store = SnapshotStore(4, storage="memory")
            >>> store.append(torch.zeros(4), step=7, epoch=0)
            >>> sd = store.state_dict()
            >>> sd["count"], sd["steps"], sd["storage"], sd["files"]
            (1, [7], 'memory', [])
        """
        self._check_open()
        self.flush()
        return {
            "format": _STATE_FORMAT,
            "num_params": self._num_params,
            "dtype": self._dtype_name,
            "storage": self._storage,
            "requested_storage": self._requested_storage,
            "max_memory_mb": self._max_memory_mb,
            "snapshot_dir": None if self._dir is None else str(self._dir),
            "prefix": self._prefix,
            "block_rows": self._block_rows,
            "files": [str(p) for p in self.files],
            "count": self._count,
            "steps": list(self._steps),
            "epochs": list(self._epochs),
        }

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, strict: bool = True) -> SnapshotStore:
        """Reopen a store from :meth:`state_dict` to read it and continue appending.

        Disk snapshots are reopened from the recorded files; snapshots
        the files hold past the recorded count (written after the checkpoint) are
        overwritten by the next appends.

        Args:
            state_dict: the output of :meth:`state_dict`.
            strict: a state whose snapshots were held in memory cannot be
                restored; ``True`` raises, ``False`` returns an empty store with
                the same settings.

        Raises:
            ValueError: if ``state_dict`` is malformed, a file is missing or does
                not match, or (with ``strict``) memory snapshots would be lost.

        Example:
            >>> import tempfile
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     store = SnapshotStore(2, storage="disk", snapshot_dir=tmp)
            ...     store.append(torch.ones(2), step=0, epoch=0)
            ...     again = SnapshotStore.from_state_dict(store.state_dict())
            ...     again.append(torch.zeros(2), step=1, epoch=0)
            ...     print(len(again), again.get(0).tolist())
            ...     store.close(); again.close()
            2 [1.0, 1.0]
        """
        keys = (
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
        if not isinstance(state_dict, Mapping) or any(k not in state_dict for k in keys):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(
                f"`state_dict` has keys {got}; expected the output of SnapshotStore.state_dict() with keys {list(keys)}."
            )
        sd = state_dict
        count = int(sd["count"])
        if len(sd["steps"]) != count or len(sd["epochs"]) != count:
            raise ValueError(
                f"`state_dict` records {count} snapshots but {len(sd['steps'])} steps and {len(sd['epochs'])} epochs; expected equal counts."
            )
        directory = None if sd.get("snapshot_dir") is None else Path(sd["snapshot_dir"])
        store = cls.__new__(cls)
        store._setup(
            check_positive_int("state_dict['num_params']", sd["num_params"]),  # type: ignore[arg-type]
            _normalize_dtype(sd["dtype"]),
            check_choice("state_dict['requested_storage']", sd["requested_storage"], STORAGES),
            float(sd["max_memory_mb"]),
            directory,
            check_positive_int("state_dict['block_rows']", sd["block_rows"]),
            sd.get("prefix"),
        )
        if sd["storage"] == "memory":
            if count and strict:
                raise ValueError(
                    f"`state_dict` describes {count} snapshots held in memory, which a state dict does not carry; "
                    "expected a disk store (storage='disk', or 'auto' with a snapshot_dir), or pass strict=False to start empty."
                )
            if directory is not None and store._requested_storage != "memory":
                check_writable_dir(directory)
            return store
        check_choice("state_dict['storage']", sd["storage"], ("memory", "disk"))
        store._storage = "disk"
        if directory is not None:
            check_writable_dir(directory)
        np_dtype = _NUMPY_DTYPES[store._dtype_name]
        for file in sd["files"]:
            path = Path(file)
            try:
                shape, dtype, fortran, offset = _read_npy_header(path)
                if not os.access(path, os.W_OK):
                    raise OSError("not writable")
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"`state_dict['files']` entry {str(path)!r} cannot be opened ({err}); expected the store's .npy file."
                ) from err
            if dtype != np_dtype or fortran or len(shape) != 2 or shape[1] != store._num_params:
                raise ValueError(
                    f"`state_dict['files']` entry {str(path)!r} holds {dtype} of shape {shape}; "
                    f"expected {np_dtype} of shape (rows, {store._num_params})."
                )
            store._blocks.append(_Block(int(shape[0]), path=path, offset=offset))
            store._capacity += int(shape[0])
        if store._capacity < count:
            raise ValueError(
                f"`state_dict['files']` hold {store._capacity} rows; expected at least the recorded {count} snapshots."
            )
        if store._blocks and store._dir is None:
            store._dir = store._blocks[0].path.parent  # type: ignore[union-attr]
        store._count = count
        store._steps = [int(s) for s in sd["steps"]]
        store._epochs = [int(e) for e in sd["epochs"]]
        return store

    def close(self, *, delete: bool = False) -> None:
        """Release the blocks. Files are removed when ``delete`` or when the store made its own temporary directory.

        Calling it twice is harmless.

        Example:
            >>> store = SnapshotStore(2, storage="disk")
            >>> store.append(torch.zeros(2), step=0, epoch=0)
            >>> directory = store.snapshot_dir
            >>> store.close()
            >>> directory.exists()
            False
        """
        if self._closed:
            return
        if self._pending is not None:
            self._flush_pending()
        self._close_writer()
        paths = self.files
        self._blocks, self._capacity, self._staging, self._cast = [], 0, None, None
        self._closed = True
        if self._owns_dir and self._finalizer is not None:
            self._finalizer()  # removes the temporary directory
        elif delete:
            for p in paths:
                p.unlink(missing_ok=True)


class _BlockReader:
    """Copies rectangles of a store's blocks into tensors; file blocks are read with unbuffered file reads.

    Reading through a memory map would leave every touched page mapped into the
    process, so the resident set would grow to the size of the store; plain reads
    go through the page cache without mapping it.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store
        self._files: OrderedDict[int, Any] = OrderedDict()  # open block files, least recently used first
        self._staging: np.ndarray | None = None

    def __enter__(self) -> _BlockReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def copy(self, index: int, r0: int, r1: int, a: int, b: int, out: torch.Tensor) -> None:
        """``out[:] = block[r0:r1, a:b]``, converting to ``out``'s dtype."""
        store = self._store
        block = store._blocks[index]
        if block.tensor is not None:
            out.copy_(block.tensor[r0:r1, a:b])
            return
        shape = (r1 - r0, b - a)
        direct = out.dtype == store._torch_dtype and out.is_contiguous()
        if direct:
            target = _numpy_bits(out)
        else:
            if self._staging is None or self._staging.size < shape[0] * shape[1]:
                self._staging = np.empty(shape[0] * shape[1], dtype=_NUMPY_DTYPES[store._dtype_name])
            target = self._staging[: shape[0] * shape[1]].reshape(shape)
        f = self._files.get(index)
        if f is None:
            if len(self._files) >= _MAX_OPEN_FILES:  # stay far below the process's open-file limit
                self._files.popitem(last=False)[1].close()
            f = self._files[index] = open(block.path, "rb", buffering=0)  # type: ignore[arg-type]
        else:
            self._files.move_to_end(index)
        item, num_params = store._itemsize, store._num_params
        if a == 0 and b == num_params:  # whole rows: one contiguous range
            _io_exact(
                f, memoryview(target.reshape(-1)).cast("B"), block.offset + r0 * num_params * item, False, block.path
            )  # type: ignore[arg-type]
        else:
            for i in range(shape[0]):
                offset = block.offset + ((r0 + i) * num_params + a) * item
                _io_exact(f, memoryview(target[i]).cast("B"), offset, False, block.path)  # type: ignore[arg-type]
        if not direct:
            out.copy_(_torch_view(target, store._dtype_name))


# --------------------------------------------------------------------------------------------
# PCA


class TooFewSnapshotsError(ValueError):
    """Raised by :func:`trajectory_pca` when the store holds fewer than 3 snapshots.

    Attributes:
        count: the number of snapshots found.
        minimum: the number needed (3).

    Example:
        >>> err = TooFewSnapshotsError(2)
        >>> err.count, isinstance(err, ValueError)
        (2, True)
    """

    def __init__(self, count: int, minimum: int = MIN_SNAPSHOTS) -> None:
        self.count = count
        self.minimum = minimum
        super().__init__(
            f"`store` holds {count} snapshot(s); trajectory PCA needs at least {minimum}. "
            "Record snapshots more often (or train longer) before computing the PCA."
        )


@dataclass
class PCAResult:
    """The principal directions of a trajectory and the path projected onto them.

    Attributes:
        components: ``(n_components, P)`` float32 tensor with orthonormal rows, the
            right singular vectors V_k of M (of the centered M with ``centered``).
        singular_values: ``(n_components,)`` float64, s_k, in decreasing order;
            0 beyond the numerical rank.
        explained_variance_ratio: ``(n_components,)`` float64, s_k² / Σ_all s², the
            sum running over all singular values of M, not only the kept ones.
        path: ``(n + 1, n_components)`` float64: row i < n is the projection
            (θ_i − θ_final)·V_k of snapshot i used in M; the last row is the final
            point, exactly 0.
        steps: the global step of each path row (the final row takes the last
            snapshot's step when the store's last snapshot is the final one,
            else ``final_step``, -1 when unknown).
        epochs: the epoch of each path row, like ``steps``.
        centered: whether the row mean of M was subtracted before the SVD.
        rank: the numerical rank of the (centered) M.
        final_in_store: whether the store's last snapshot equalled ``final`` and
            was left out of M.

    Example:
        >>> r = PCAResult(torch.eye(2, 3), np.ones(2), np.full(2, 0.5), np.zeros((4, 2)), [0, 1, 2, 3], [0] * 4)
        >>> r.n_components, r.num_params
        (2, 3)
    """

    components: torch.Tensor
    singular_values: np.ndarray
    explained_variance_ratio: np.ndarray
    path: np.ndarray
    steps: list[int]
    epochs: list[int]
    centered: bool = False
    rank: int = 0
    final_in_store: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        """The number of components kept."""
        return int(self.components.shape[0])

    @property
    def num_params(self) -> int:
        """P, the length of each component."""
        return int(self.components.shape[1])


def _flat_slicer(final: Any, num_params: int) -> Any:
    """``final`` (a tensor of P elements, or tensors whose flattened concatenation has P) as ``part(a, b)``.

    ``part(a, b)`` returns elements ``a:b`` of the flat vector as a 1-D CPU tensor of the
    original dtype, gathering the pieces of a sequence without ever concatenating all of it.
    """
    if isinstance(final, torch.Tensor):
        if not final.is_floating_point() or final.numel() != num_params:
            raise ValueError(
                f"`final` has {final.numel()} elements of {final.dtype}; expected a floating tensor of "
                f"{num_params} elements (the store's `num_params`)."
            )
        flat = final.detach().reshape(-1)
        return lambda a, b: flat[a:b].cpu()
    tensors = list(final) if isinstance(final, Iterable) and not isinstance(final, (str, bytes, Mapping)) else None
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        raise ValueError(
            f"`final` is a {type(final).__name__}; expected a floating tensor of {num_params} elements or a "
            "non-empty list of floating tensors (the parameters, in snapshot order)."
        )
    pieces = [t.detach().reshape(-1) for t in tensors]
    offsets = np.cumsum([0] + [p.numel() for p in pieces])
    if offsets[-1] != num_params:
        raise ValueError(
            f"`final` holds {int(offsets[-1])} elements in all; expected {num_params} (the store's `num_params`)."
        )

    def part(a: int, b: int) -> torch.Tensor:
        first = int(np.searchsorted(offsets, a, side="right")) - 1
        out = []
        for i in range(first, len(pieces)):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            if lo >= b:
                break
            out.append(pieces[i][max(a, lo) - lo : min(b, hi) - lo].cpu())
        if len(out) == 1:
            return out[0]
        dtype = functools.reduce(torch.promote_types, (o.dtype for o in out))
        return torch.cat([o.to(dtype) for o in out])

    return part


def _orthonormalize_rows(vectors: torch.Tensor, cols: int) -> None:
    """Orthonormalize the rows of ``vectors`` (m x P, float32) in place, in order, by Cholesky QR done twice.

    Row k becomes a combination of rows 0..k, as in Gram–Schmidt. Products are
    accumulated in float64 over column blocks of ``cols``, so no float64 copy of a
    row is made.
    """
    m, num_params = vectors.shape
    for _ in range(2):  # twice: the second pass removes what float32 rounding left of the first's error
        gram = torch.zeros((m, m), dtype=torch.float64)
        for a in range(0, num_params, cols):
            block = vectors[:, a : a + cols].double()
            gram.addmm_(block, block.T)
        inverse = torch.linalg.inv(torch.linalg.cholesky(gram))
        for a in range(0, num_params, cols):
            vectors[:, a : a + cols] = inverse @ vectors[:, a : a + cols].double()


def trajectory_pca(
    store: SnapshotStore,
    final: torch.Tensor | Sequence[torch.Tensor],
    n_components: int = 2,
    *,
    center: bool = False,
    chunk_size: int | None = None,
    final_step: int | None = None,
    final_epoch: int | None = None,
    seed: int = 0,
) -> PCAResult:
    """PCA of the trajectory matrix M = [θ_0 − θ_n; ...; θ_{n−1} − θ_n] (Li et al. 2018, section 7).

    θ_n is ``final`` (the weights the surface is centred on) and θ_0, ..., θ_{n−1}
    are the store's snapshots. If the store's last snapshot equals ``final``
    (after rounding ``final`` to the storage dtype) it is θ_n itself: it is left
    out of M instead of adding a zero row, which would not change the SVD of the
    uncentered M anyway.

    By default M is decomposed exactly as written, with no centering, which is
    what ``numpy.linalg.svd(M)`` gives; ``center=True`` subtracts the mean row
    first, as ``sklearn.decomposition.PCA`` does. Either way the path holds the
    orthogonal projections (θ_i − θ_n)·V_k, so the final point is the origin of
    the plane θ_n + αV_1 + βV_2.

    The store is streamed twice by column blocks of ``chunk_size`` parameters,
    in float64: the first pass accumulates the n x n Gram matrix G = M Mᵀ, whose
    eigendecomposition G = U diag(s²) Uᵀ gives the singular values s and the
    left singular vectors U; the second forms V_k = Mᵀ U_k / s_k. The path is
    M V_k = s_k U_k (plus the mean row's projection when centering). The
    components are kept in float32 and re-orthonormalized (Cholesky QR, twice,
    accumulated in float64 block by block), so memory is
    O(n² + n·chunk_size) plus the n_components float32 vectors of the result:
    the n x P matrix, and any float64 vector of P numbers, is never formed.

    Degenerate trajectories: singular values below the numerical-rank tolerance
    (s_k² <= s_1² · n · 1e-12) count as 0. Components past the rank (also when
    ``n_components`` exceeds the number of rows) get zero singular value and
    explained variance, and are filled with deterministic unit vectors
    orthogonal to the others (drawn from ``seed``), so the rows stay orthonormal
    and nothing is NaN.

    Sign convention: each component is oriented so that the earliest path point
    with a non-negligible coordinate along it (|x| > 1e-6 · max |x|) has a
    positive coordinate; normally that is θ_0, so the start of training lies at
    positive coordinates. A component along which every point projects to 0 is
    oriented so that its largest-magnitude entry is positive.

    Args:
        store: the snapshots, at least 3.
        final: θ_n, a tensor of P elements (flattened like the snapshots), or
            the sequence of tensors whose flattened concatenation it is (e.g.
            the model's trainable parameters in snapshot order), which are read
            block by block without making a flat copy.
        n_components: how many principal directions to keep.
        center: subtract the mean row of M before the SVD.
        chunk_size: parameters per streamed column block; ``None`` picks float64
            blocks of about an eighth of one float32 copy of the weights (1 to 64 MiB).
        final_step, final_epoch: the step and epoch reported for the final path
            point when it is not the store's last snapshot.
        seed: seeds the filler directions past the trajectory's rank.

    Returns:
        a :class:`PCAResult`.

    Raises:
        TooFewSnapshotsError: if the store holds fewer than 3 snapshots.
        ValueError: on a ``final`` of the wrong size or another invalid argument.

    Example:
        >>> store = SnapshotStore(3, storage="memory")
        >>> for t in range(4):
        ...     store.append(torch.tensor([1.0, 2.0, 0.0]) * (3 - t), step=t, epoch=0)
        >>> result = trajectory_pca(store, torch.zeros(3))
        >>> result.final_in_store, result.explained_variance_ratio.round(6).tolist()
        (True, [1.0, 0.0])
        >>> result.path[:, 0].round(4).tolist()
        [6.7082, 4.4721, 2.2361, 0.0]
    """
    if not isinstance(store, SnapshotStore):
        raise ValueError(f"`store` is a {type(store).__name__}; expected a SnapshotStore.")
    n_components = check_positive_int("n_components", n_components)  # type: ignore[assignment]
    chunk_size = check_positive_int("chunk_size", chunk_size, allow_none=True)
    num_params = store.num_params
    final_part = _flat_slicer(final, num_params)
    if n_components > num_params:
        raise ValueError(
            f"`n_components`={n_components} is not valid; expected at most {num_params}, the number of parameters."
        )
    count = len(store)
    if count < MIN_SNAPSHOTS:
        raise TooFewSnapshotsError(count)

    low, high = _PCA_BLOCK_BYTES
    cols = chunk_size or max(1, min(num_params, max(low, min(high, num_params // 2)) // (8 * count)))
    # One buffer for the stored values and one for their float64 copies, allocated once for every
    # pass: a fresh block per step would leave the heap fragmented by freed blocks.
    raw = torch.empty(count * min(cols, num_params), dtype=store.torch_dtype)
    wide = torch.empty(raw.numel(), dtype=torch.float64)

    def blocks(start: int, stop: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        for a, b, block in store.iter_column_blocks(cols, start=start, stop=stop, dtype=raw.dtype, out=raw):
            yield a, b, wide[: block.numel()].view(block.shape).copy_(block)

    # Is the store's last snapshot θ_n itself (``final`` rounded to the storage dtype)? One row read.
    final_in_store = all(
        torch.equal(last[0], store.quantize(final_part(a, b)).double()) for a, b, last in blocks(count - 1, count)
    )
    n = count - 1 if final_in_store else count

    def centered_blocks() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        for a, b, block in blocks(0, n):
            block -= final_part(a, b)
            mean = None
            if center:
                mean = block.mean(dim=0)
                block -= mean
            yield a, b, block, mean

    # Pass 1: G = M Mᵀ (or of the centered M), in float64.
    gram = torch.zeros((n, n), dtype=torch.float64)
    for _, _, block, _ in centered_blocks():
        gram.addmm_(block, block.T)
    gram = (gram + gram.T) / 2
    total = float(torch.trace(gram))
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # decreasing
    tol = float(evals[0]) * n * 1e-12
    rank = int((evals > tol).sum()) if float(evals[0]) > 0 else 0
    r = min(rank, n_components)
    sing = torch.sqrt(evals[:r])
    left = evecs[:, :r]
    weights = left / sing  # n x r: V = Mᵀ U / s

    # Pass 2: V_k = Mᵀ U_k / s_k (computed in float64 per block, kept in float32), and the mean
    # row's projections when centering.
    comps = torch.zeros((n_components, num_params), dtype=torch.float32)
    mean_proj = torch.zeros(n_components, dtype=torch.float64)
    if r:
        for a, b, block, mean in centered_blocks():
            part = weights.T @ block
            comps[:r, a:b] = part
            if mean is not None:
                mean_proj[:r] += part @ mean
    # Past the rank: deterministic filler directions, orthogonal to the others after the QR below.
    generator = torch.Generator().manual_seed(int(seed))
    for k in range(r, n_components):
        comps[k].normal_(generator=generator)
    _orthonormalize_rows(comps, cols)  # exact orthonormality, lost to rounding in small components
    if center and r < n_components:  # the fillers' coordinate of every point is the mean row's projection
        for a, b, _, mean in centered_blocks():
            mean_proj[r:] += comps[r:, a:b].double() @ mean  # type: ignore[operator]

    path = np.zeros((n + 1, n_components), dtype=np.float64)
    path[:n, :r] = (left * sing).numpy()
    if center:
        path[:n] += mean_proj.numpy()
    for k in range(n_components):
        column = path[:n, k]
        scale = float(np.max(np.abs(column))) if n else 0.0
        if scale > 0:
            first = int(np.argmax(np.abs(column) > 1e-6 * scale))
            flip = column[first] < 0
        else:
            flip = float(comps[k, int(torch.argmax(comps[k].abs()))]) < 0
        if flip:
            comps[k].neg_()
            path[:n, k] *= -1
    path[n] = 0.0

    singular_values = np.zeros(n_components, dtype=np.float64)
    singular_values[:r] = sing.numpy()
    ratio = np.zeros(n_components, dtype=np.float64)
    if total > 0:
        ratio[:r] = evals[:r].numpy() / total

    steps, epochs = store.steps[:n], store.epochs[:n]
    if final_in_store:
        steps.append(store.steps[-1])
        epochs.append(store.epochs[-1])
    else:
        steps.append(-1 if final_step is None else int(final_step))
        epochs.append(-1 if final_epoch is None else int(final_epoch))
    return PCAResult(
        components=comps,
        singular_values=singular_values,
        explained_variance_ratio=ratio,
        path=path,
        steps=steps,
        epochs=epochs,
        centered=bool(center),
        rank=rank,
        final_in_store=final_in_store,
        metadata={"num_snapshots": count, "storage_dtype": store.dtype},
    )


def pca_directions(result: PCAResult, like: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The components of ``result`` as direction dicts shaped, typed and placed like ``like``.

    ``like`` must hold the tensors the snapshots were flattened from, in the
    same key order (usually the model's trainable parameters); the directions
    are unit vectors in the flat weight space and feed the surface engine as
    ``loss_surface(model, data, pca_directions(result, params), coords, ...)``,
    with coordinates on the scale of ``result.path``.

    Raises:
        ValueError: if the tensors in ``like`` do not add up to P elements.

    Example:
        >>> store = SnapshotStore(3, storage="memory")
        >>> for t in range(3):
        ...     store.append(torch.tensor([3.0 - t, 0.0, 0.0]), step=t, epoch=0)
        >>> result = trajectory_pca(store, torch.zeros(3), n_components=1)
        >>> (direction,) = pca_directions(result, {"w": torch.zeros(1, 2), "b": torch.zeros(1)})
        >>> direction["w"].abs().tolist(), direction["b"].shape
        ([[1.0, 0.0]], torch.Size([1]))
    """
    if not isinstance(result, PCAResult):
        raise ValueError(f"`result` is a {type(result).__name__}; expected a PCAResult from trajectory_pca.")
    return [unflatten_vector(component, like) for component in result.components]


def path_range(path: Any, margin: float = 0.25) -> list[np.ndarray]:
    """Per-axis bounds ``array([lo, hi])`` covering every point of ``path`` plus a relative margin.

    Each axis spans [min, max] of its path coordinates widened by ``margin`` times
    its extent on both sides. An axis of zero extent (all points equal along it)
    borrows the largest extent of the other axes (1.0 if every axis is flat) and
    is centred on its value, so the bounds are never degenerate.

    Args:
        path: ``(points, axes)`` array, e.g. :attr:`PCAResult.path`.
        margin: the fraction of the extent added on each side (>= 0).

    Raises:
        ValueError: on an empty or non-finite path or a negative margin.

    Example:
        >>> path = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
        >>> [b.tolist() for b in path_range(path, margin=0.5)]
        [[-1.0, 3.0], [-2.0, 2.0]]
    """
    if (
        isinstance(margin, bool)
        or not isinstance(margin, (int, float, np.number))
        or not math.isfinite(margin)
        or margin < 0
    ):
        raise ValueError(f"`margin`={margin!r} is not valid; expected a finite number >= 0.")
    try:
        points = np.asarray(path, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`path` is not valid ({err}); expected a 2-D array of finite coordinates (points x axes)."
        ) from err
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"`path` has shape {points.shape}; expected a non-empty 2-D array (points x axes).")
    if not np.all(np.isfinite(points)):
        raise ValueError("`path` contains non-finite coordinates; expected finite numbers.")
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = hi - lo
    fallback = float(extent.max()) if float(extent.max()) > 0 else 1.0
    bounds = []
    for axis in range(points.shape[1]):
        if extent[axis] > 0:
            pad = margin * extent[axis]
            bounds.append(np.array([lo[axis] - pad, hi[axis] + pad]))
        else:
            half = fallback * (0.5 + margin)
            bounds.append(np.array([lo[axis] - half, hi[axis] + half]))
    return bounds
