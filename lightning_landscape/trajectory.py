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
  memory budget, in memory-mapped ``.npy`` files on disk (float32, float16 or
  bfloat16), and can be checkpointed and resumed;
* :func:`trajectory_pca` computes the PCA by streaming the store twice, so the
  K x P matrix is never held in memory: once to accumulate the K x K Gram matrix
  G = M Mᵀ in float64, whose eigendecomposition gives the singular values and
  left singular vectors, and once to form the principal directions
  V_k = Mᵀ U_k / s_k;
* :func:`pca_directions` turns the components into direction dicts for the
  surface engine and :func:`path_range` picks plot bounds around the path.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape._validation import check_choice, check_positive_int, short_list

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
_CHUNK_BYTES = 64 * 2**20  # target size of one streamed float64 block in trajectory_pca
_STATE_FORMAT = "lightning_landscape.SnapshotStore/1"


# --------------------------------------------------------------------------------------------
# flat vectors <-> parameter dicts


def flatten_parameters(
    params: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
    *,
    device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """Concatenate the tensors ``params[name]`` for ``name`` in ``names`` into one 1-D float32 vector.

    Args:
        params: tensors keyed by name (a model's trainable parameters, a direction).
        names: the names to take, in this order; ``None`` takes every key of
            ``params`` in its order.
        device: where the vector lives; ``"cpu"`` (the default) gives a CPU
            vector, ``None`` keeps it on the parameters' device (concatenating on
            a GPU and then handing the vector to :meth:`SnapshotStore.append`
            lets the store copy it to the host asynchronously).

    Returns:
        a new 1-D float32 tensor (never a view of ``params``) of length
        Σ numel, detached from autograd.

    Raises:
        ValueError: if a name is missing from ``params`` or an entry is not a tensor.

    Example:
        >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.float64)}
        >>> flatten_parameters(params).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        >>> flatten_parameters(params, ["b"]).dtype
        torch.float32
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` is a {type(params).__name__}; expected a dict of tensors keyed by parameter name.")
    names = list(params) if names is None else list(names)
    if not names:
        raise ValueError("`names` is empty; expected at least one parameter name.")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"`names` holds {short_list(missing)}, not found in `params`; expected names from {short_list(list(params))}.")
    tensors = []
    for n in names:
        t = params[n]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`params[{n!r}]` is a {type(t).__name__}; expected a tensor.")
        tensors.append(t.detach().reshape(-1))
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # parameters spread over devices: gather them on the target (CPU by default)
        target = torch.device("cpu") if device is None else torch.device(device)
        tensors = [t.to(target) for t in tensors]
    flat = torch.cat([t.to(torch.float32) for t in tensors])  # cat always allocates: never a view of params
    return flat if device is None else flat.to(device)


def unflatten_vector(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector into tensors shaped, typed and placed like ``like``, keyed like ``like``.

    The inverse of :func:`flatten_parameters` with ``names=list(like)``: the
    vector is read in the key order of ``like``. The returned tensors never share
    memory with ``vec``.

    Raises:
        ValueError: if ``vec`` is not a tensor or its length is not Σ numel of ``like``.

    Example:
        >>> like = {"w": torch.zeros(2, 2), "b": torch.zeros(1, dtype=torch.float64)}
        >>> parts = unflatten_vector(torch.arange(5.0), like)
        >>> parts["w"].tolist(), parts["b"].dtype
        ([[0.0, 1.0], [2.0, 3.0]], torch.float64)
    """
    if not isinstance(like, Mapping) or not like:
        raise ValueError(f"`like`={type(like).__name__} is not valid; expected a non-empty dict of tensors keyed by parameter name.")
    if not isinstance(vec, torch.Tensor):
        raise ValueError(f"`vec` is a {type(vec).__name__}; expected a 1-D tensor.")
    total = sum(int(t.numel()) for t in like.values())
    if vec.numel() != total:
        raise ValueError(f"`vec` has {vec.numel()} elements; expected {total}, the total size of the tensors in `like`.")
    flat = vec.detach().reshape(-1)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in like.items():
        n = int(t.numel())
        out[name] = flat[offset : offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype, copy=True)
        offset += n
    return out


# --------------------------------------------------------------------------------------------
# snapshot storage


@dataclass
class _Block:
    """One preallocated block of snapshot rows: a CPU tensor, or a tensor viewing a memory-mapped .npy file."""

    tensor: torch.Tensor  # (rows, P) in the storage dtype
    array: np.ndarray | None = None  # the memmap behind ``tensor`` in disk mode
    path: Path | None = None

    @property
    def rows(self) -> int:
        return int(self.tensor.shape[0])

    def release(self) -> None:
        """Write a file block's dirty pages and drop them from this process's resident set.

        Called when a file block is full: its pages stay in the file (and the OS
        page cache) but no longer count as memory the process holds, so a disk
        store costs about one block of resident memory however long it grows.
        A no-op for memory blocks.
        """
        if not isinstance(self.array, np.memmap):
            return
        self.array.flush()
        handle = getattr(self.array, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                handle.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # closed or unsupported mapping: releasing is only an optimization
                pass


def _torch_view(array: np.ndarray, dtype_name: str) -> torch.Tensor:
    """A zero-copy torch view of a (memory-mapped) numpy array holding ``dtype_name`` values."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def check_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check a file can be written there; ``ValueError`` naming ``snapshot_dir`` if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"`snapshot_dir`={str(path)!r} cannot be written ({err}); expected a writable directory.") from err


def _normalize_dtype(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        for name, td in _TORCH_DTYPES.items():
            if td == dtype:
                return name
    return check_choice("dtype", dtype, DTYPES)


class SnapshotStore:
    """K snapshots of a P-dimensional flat parameter vector, in CPU memory or memory-mapped on disk.

    Snapshots live in preallocated blocks of ``block_rows`` rows; a full store
    grows by adding a block, never by rewriting old ones. In memory a block is a
    CPU tensor; on disk it is one ``.npy`` file (``{prefix}-00000.npy``, ...)
    opened with :func:`numpy.lib.format.open_memmap`. A file's rows past the
    snapshot count are unused (zeros; sparse on most file systems).

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
        if (
            isinstance(max_memory_mb, bool)
            or not isinstance(max_memory_mb, (int, float, np.number))
            or not math.isfinite(max_memory_mb)
            or max_memory_mb < 0
        ):
            raise ValueError(f"`max_memory_mb`={max_memory_mb!r} is not valid; expected a finite number >= 0 (MiB).")
        block_rows = check_positive_int("block_rows", block_rows, allow_none=True)
        if prefix is not None and (not isinstance(prefix, str) or not prefix or os.sep in prefix or "/" in prefix):
            raise ValueError(f"`prefix`={prefix!r} is not valid; expected a non-empty file-name prefix without path separators.")
        directory = None if snapshot_dir is None else Path(snapshot_dir)
        if directory is not None and storage != "memory":
            check_writable_dir(directory)
        self._setup(num_params, dtype_name, storage, float(max_memory_mb), directory, block_rows, prefix)
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
        if not isinstance(vec, torch.Tensor) or not vec.is_floating_point() or vec.dim() != 1 or vec.numel() != self._num_params:
            got = f"shape {tuple(vec.shape)} and dtype {vec.dtype}" if isinstance(vec, torch.Tensor) else type(vec).__name__
            raise ValueError(f"`vec` has {got}; expected a 1-D floating tensor of {self._num_params} elements (`num_params`).")
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
        """Finish an in-flight device copy and write memory-mapped blocks to disk.

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> store.append(torch.zeros(2), step=0, epoch=0)
            >>> store.flush()
        """
        self._flush_pending()
        for block in self._blocks:
            if isinstance(block.array, np.memmap):
                block.array.flush()

    def _flush_pending(self) -> None:
        if self._pending is not None:
            row, event = self._pending
            event.synchronize()
            self._write(row, self._staging)  # type: ignore[arg-type]
            self._pending = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SnapshotStore is closed; create a new one or resume with SnapshotStore.from_state_dict.")

    def _write(self, i: int, vec: torch.Tensor) -> None:
        for block in self._blocks:
            if i < block.rows:
                block.tensor[i].copy_(vec)
                if i == block.rows - 1:
                    block.release()  # a full file block is not written again: keep it out of the resident set
                return
            i -= block.rows
        raise IndexError(i)

    def _row(self, i: int) -> torch.Tensor:
        for block in self._blocks:
            if i < block.rows:
                return block.tensor[i]
            i -= block.rows
        raise IndexError(i)

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
            self._blocks.append(_Block(torch.empty((new_rows, self._num_params), dtype=self._torch_dtype)))
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
            array = np.lib.format.open_memmap(
                path, mode="w+", dtype=_NUMPY_DTYPES[self._dtype_name], shape=(self._block_rows, self._num_params)
            )
        except OSError as err:
            raise ValueError(
                f"`snapshot_dir`={str(directory)!r}: cannot create {path.name} ({err}); "
                "expected a writable directory with free space."
            ) from err
        self._blocks.append(_Block(_torch_view(array, self._dtype_name), array, path))
        self._capacity += self._block_rows

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
        return self._row(int(i) % self._count).to(torch.float32, copy=True)

    def iter_chunks(self, rows: int | None = None, *, stop: int | None = None) -> Iterator[torch.Tensor]:
        """Stream the snapshots in order as float32 tensors of shape ``(<= rows, P)``.

        Disk blocks are read with positioned reads rather than through the
        memory map, so streaming a store larger than memory keeps the process's
        resident set at about one chunk.

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
        offsets = np.cumsum([0] + [b.rows for b in self._blocks])
        with _BlockReader(self) as reader:
            for start in range(0, stop, rows):
                end = min(stop, start + rows)
                out = torch.empty((end - start, self._num_params), dtype=torch.float32)
                for index, (block, first) in enumerate(zip(self._blocks, offsets)):
                    lo, hi = max(start, int(first)), min(end, int(first) + block.rows)
                    if lo < hi:
                        reader.copy(index, lo - int(first), hi - int(first), 0, self._num_params, out[lo - start : hi - start])
                yield out

    def iter_column_blocks(
        self, cols: int, *, stop: int | None = None, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Stream the K x P matrix of snapshots by column blocks: ``(a, b, X[:stop, a:b])``.

        Each block holds ``cols`` consecutive parameter coordinates of every
        snapshot, converted to ``dtype``. Every stored byte is read once, in
        contiguous runs of ``cols`` values per snapshot; disk blocks are read
        with positioned reads (not through the memory map), so the resident set
        stays at about one column block however large the store is.

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
        self._flush_pending()
        with _BlockReader(self) as reader:
            for a in range(0, self._num_params, cols):
                b = min(self._num_params, a + cols)
                out = torch.empty((stop, b - a), dtype=dtype)
                row = 0
                for index, block in enumerate(self._blocks):
                    n = min(block.rows, stop - row)
                    if n <= 0:
                        break
                    reader.copy(index, 0, n, a, b, out[row : row + n])
                    row += n
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

        Disk snapshots are memory-mapped again from the recorded files; snapshots
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
        keys = ("num_params", "dtype", "storage", "requested_storage", "max_memory_mb", "block_rows", "files", "count", "steps", "epochs")
        if not isinstance(state_dict, Mapping) or any(k not in state_dict for k in keys):
            got = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"`state_dict` has keys {got}; expected the output of SnapshotStore.state_dict() with keys {list(keys)}.")
        sd = state_dict
        count = int(sd["count"])
        if len(sd["steps"]) != count or len(sd["epochs"]) != count:
            raise ValueError(f"`state_dict` records {count} snapshots but {len(sd['steps'])} steps and {len(sd['epochs'])} epochs; expected equal counts.")
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
                array = np.load(path, mmap_mode="r+", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"`state_dict['files']` entry {str(path)!r} cannot be opened ({err}); expected the store's .npy file.") from err
            if array.dtype != np_dtype or array.ndim != 2 or array.shape[1] != store._num_params:
                raise ValueError(
                    f"`state_dict['files']` entry {str(path)!r} holds {array.dtype} of shape {array.shape}; "
                    f"expected {np_dtype} of shape (rows, {store._num_params})."
                )
            store._blocks.append(_Block(_torch_view(array, store._dtype_name), array, path))
            store._capacity += array.shape[0]
        if store._capacity < count:
            raise ValueError(f"`state_dict['files']` hold {store._capacity} rows; expected at least the recorded {count} snapshots.")
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
        paths = self.files
        for block in self._blocks:
            if isinstance(block.array, np.memmap):
                block.array.flush()
        self._blocks, self._capacity, self._staging = [], 0, None
        self._closed = True
        if self._owns_dir and self._finalizer is not None:
            self._finalizer()  # removes the temporary directory
        elif delete:
            for p in paths:
                p.unlink(missing_ok=True)


class _BlockReader:
    """Copies rectangles of a store's blocks into tensors; file blocks are read with ``os.preadv``.

    Reading through the memory map would leave every touched page (and, with
    large page-cache folios, its neighbours) mapped into the process, so the
    resident set would grow to the size of the store. Positioned reads go through
    the page cache without mapping it. Without ``os.preadv`` (Windows) the memory
    map is read and its pages released afterwards.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store
        self._fds: dict[int, int] = {}
        self._staging: np.ndarray | None = None
        self._use_pread = hasattr(os, "preadv")

    def __enter__(self) -> _BlockReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if not self._use_pread:
            for block in self._store._blocks:
                block.release()

    def copy(self, index: int, r0: int, r1: int, a: int, b: int, out: torch.Tensor) -> None:
        """``out[:] = block[r0:r1, a:b]``, converting to ``out``'s dtype."""
        block = self._store._blocks[index]
        if block.path is None or not isinstance(block.array, np.memmap) or not self._use_pread:
            out.copy_(block.tensor[r0:r1, a:b])
            return
        store = self._store
        shape = (r1 - r0, b - a)
        direct = out.dtype == store._torch_dtype and store._dtype_name != "bfloat16" and out.is_contiguous()
        if direct:
            target = out.numpy()
        else:
            if self._staging is None or self._staging.size < shape[0] * shape[1]:
                self._staging = np.empty(shape[0] * shape[1], dtype=_NUMPY_DTYPES[store._dtype_name])
            target = self._staging[: shape[0] * shape[1]].reshape(shape)
        fd = self._fds.get(index)
        if fd is None:
            fd = self._fds[index] = os.open(block.path, os.O_RDONLY)
        item, num_params = store._itemsize, store._num_params
        base = int(block.array.offset)
        if a == 0 and b == num_params:  # whole rows: one contiguous range
            self._pread(fd, target.reshape(-1), base + r0 * num_params * item, block.path)
        else:
            for i in range(shape[0]):
                self._pread(fd, target[i], base + ((r0 + i) * num_params + a) * item, block.path)
        if not direct:
            out.copy_(_torch_view(target, store._dtype_name))

    @staticmethod
    def _pread(fd: int, dest: np.ndarray, offset: int, path: Path) -> None:
        view = memoryview(dest).cast("B")
        done = 0
        while done < view.nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{path}: the snapshot file ends early (read {done} of {view.nbytes} bytes at offset {offset}).")
            done += got


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


def _gram_schmidt(vectors: torch.Tensor, start: int, stop: int) -> None:
    """Orthonormalize rows ``start:stop`` of ``vectors`` in place, in order, against all earlier rows (twice)."""
    for k in range(start, stop):
        v = vectors[k]
        for _ in range(2):
            if k:
                v -= vectors[:k].T @ (vectors[:k] @ v)
        norm = torch.linalg.vector_norm(v)
        if norm > 0:
            v /= norm


def trajectory_pca(
    store: SnapshotStore,
    final: torch.Tensor,
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
    M V_k = s_k U_k (plus the mean row's projection when centering). Memory is
    O(n² + n·chunk_size + n_components·P); the n x P matrix is never formed.

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
        final: θ_n, a tensor of P elements (flattened like the snapshots).
        n_components: how many principal directions to keep.
        center: subtract the mean row of M before the SVD.
        chunk_size: parameters per streamed column block; ``None`` picks about
            64 MiB of float64 per block.
        final_step, final_epoch: the step and epoch reported for the final path
            point when it is not the store's last snapshot.

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
    if not isinstance(final, torch.Tensor) or not final.is_floating_point() or final.numel() != num_params:
        got = f"{final.numel()} elements of {final.dtype}" if isinstance(final, torch.Tensor) else type(final).__name__
        raise ValueError(f"`final` has {got}; expected a floating tensor of {num_params} elements (the store's `num_params`).")
    if n_components > num_params:
        raise ValueError(f"`n_components`={n_components} is not valid; expected at most {num_params}, the number of parameters.")
    count = len(store)
    if count < MIN_SNAPSHOTS:
        raise TooFewSnapshotsError(count)

    final_flat = final.detach().reshape(-1).cpu()  # subtracted per block in float64; no full float64 copy
    final_in_store = bool(torch.equal(store.get(-1), store.quantize(final)))
    n = count - 1 if final_in_store else count
    cols = chunk_size or max(1, min(num_params, _CHUNK_BYTES // (8 * n)))

    def centered_blocks() -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        for a, b, block in store.iter_column_blocks(cols, stop=n, dtype=torch.float64):
            block -= final_flat[a:b]
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

    # Pass 2: V_k = Mᵀ U_k / s_k, and the mean row's projections when centering.
    comps = torch.zeros((n_components, num_params), dtype=torch.float64)
    mean_proj = torch.zeros(n_components, dtype=torch.float64)
    mean_row = torch.zeros(num_params, dtype=torch.float64) if center and r < n_components else None
    if r:
        for a, b, block, mean in centered_blocks():
            comps[:r, a:b] = (block.T @ weights).T
            if mean is not None:
                mean_proj[:r] += comps[:r, a:b] @ mean
                if mean_row is not None:
                    mean_row[a:b] = mean
    elif mean_row is not None:
        for a, b, _, mean in centered_blocks():
            mean_row[a:b] = mean  # type: ignore[assignment]
    _gram_schmidt(comps, 0, r)  # restores exact orthonormality lost to rounding in small components
    generator = torch.Generator().manual_seed(int(seed))
    for k in range(r, n_components):  # past the rank: deterministic filler orthogonal to the others
        comps[k] = torch.randn(num_params, generator=generator, dtype=torch.float64)
        _gram_schmidt(comps, k, k + 1)
        if mean_row is not None:
            mean_proj[k] = comps[k] @ mean_row

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
        components=comps.to(torch.float32),
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
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.number)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"`margin`={margin!r} is not valid; expected a finite number >= 0.")
    try:
        points = np.asarray(path, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`path` is not valid ({err}); expected a 2-D array of finite coordinates (points x axes).") from err
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
