"""SnapshotStore: the flat weight snapshots of a training run, in CPU memory or in ``.npy`` files."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape._validation import check_choice, check_positive_int
from lightning_landscape.trajectory.blocks import SnapshotBlocks
from lightning_landscape.trajectory.checks import (
    STORAGES,
    check_column_buffer,
    check_integer,
    check_max_memory_mb,
    check_prefix,
    check_snapshot_dir,
    check_snapshot_tensors,
    check_state_dict,
    check_stop,
    normalize_dtype,
    resolve_dtype,
)

_STATE_FORMAT = "lightning_landscape.SnapshotStore/1"


class SnapshotStore:
    """K snapshots of a P-dimensional flat parameter vector, in CPU memory or in ``.npy`` files on disk.

    Snapshots live in preallocated blocks of ``block_rows`` rows; a full store
    grows by adding a block, never by rewriting old ones. In memory a block is a
    CPU tensor; on disk it is one ``.npy`` file (``{prefix}-00000.npy``, ...),
    a (rows, P) array that ``numpy.load(path, mmap_mode="r")`` maps, written and
    read with positioned file I/O (no memory map, so the resident memory does
    not grow with the store). A file's rows past the snapshot count are unused.

    An append copies the snapshot once, straight into its destination: a memory
    row (pre-faulted ahead of use on a background thread) or one of
    ``max_pending`` reused buffers that the background thread writes to disk. An
    error in that thread is raised by the next :meth:`append`, :meth:`flush`,
    :meth:`check_errors` or :meth:`close`, with the store rolled back to the
    snapshots stored before it (count, steps, epochs).

    Args:
        num_params: P, the length of every snapshot.
        dtype: ``"auto"`` (default: float32 below 500,000 parameters, float16 from
            there, where it changes the explained variance by < 1e-3), ``"float32"``,
            ``"float16"`` or ``"bfloat16"`` (also the torch dtypes): the storage
            precision; the 16-bit types halve memory and disk. bfloat16 is stored in
            ``.npy`` files as its uint16 bit pattern. Reads always return float32.
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
        max_pending: snapshots in flight to the background writer (each holds a
            one-snapshot buffer); an append waits while all of them are.

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
        dtype: str | torch.dtype = "auto",
        storage: str = "auto",
        max_memory_mb: float = 1024.0,
        snapshot_dir: str | os.PathLike | None = None,
        block_rows: int | None = None,
        prefix: str | None = None,
        max_pending: int = 2,
    ) -> None:
        num_params = check_positive_int("num_params", num_params)  # type: ignore[assignment]
        dtype_name = resolve_dtype(dtype, num_params)
        check_choice("storage", storage, STORAGES)
        max_memory_mb = check_max_memory_mb(max_memory_mb)
        block_rows = check_positive_int("block_rows", block_rows, allow_none=True)
        check_prefix(prefix)
        max_pending = check_positive_int("max_pending", max_pending)  # type: ignore[assignment]
        directory = None if snapshot_dir is None else Path(snapshot_dir)
        if directory is not None and storage != "memory":
            check_snapshot_dir(directory)
        self._setup(num_params, dtype_name, storage, max_memory_mb, directory, block_rows, prefix, max_pending)
        if storage == "disk":
            self._blocks.ensure_dir()

    def _setup(
        self,
        num_params: int,
        dtype_name: str,
        storage: str,
        max_memory_mb: float,
        directory: Path | None,
        block_rows: int | None,
        prefix: str | None,
        max_pending: int = 2,
    ) -> None:
        self._num_params = num_params
        self._dtype_name = dtype_name
        self._requested_storage = storage
        self._max_memory_mb = max_memory_mb
        where = "disk" if storage == "disk" else "memory"
        self._blocks = SnapshotBlocks(num_params, dtype_name, where, directory, block_rows, prefix, max_pending)
        self._count = 0
        self._steps: list[int] = []
        self._epochs: list[int] = []
        self._closed = False

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
        return self._blocks.torch_dtype

    @property
    def storage(self) -> str:
        """Where the snapshots are now: ``"memory"`` or ``"disk"``."""
        return self._blocks.storage

    @property
    def snapshot_dir(self) -> Path | None:
        """The directory of the ``.npy`` files (``None`` until one is needed)."""
        return self._blocks.directory

    @property
    def files(self) -> list[Path]:
        """The ``.npy`` files in use, in snapshot order (empty in memory)."""
        return self._blocks.files

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
        return self._count * self._num_params * self._blocks.itemsize

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        where = f", snapshot_dir={str(self.snapshot_dir)!r}" if self.storage == "disk" else ""
        return (
            f"SnapshotStore(num_snapshots={self._count}, num_params={self._num_params}, "
            f"dtype={self._dtype_name!r}, storage={self.storage!r}{where})"
        )

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- writing

    def append(self, vec: torch.Tensor | Sequence[torch.Tensor], *, step: int, epoch: int, defer: bool = False) -> None:
        """Store one snapshot: a 1-D tensor of P values, or a list of tensors of P values together (the parameters).

        The values are copied once, straight into the store's row, rounded to the storage dtype
        on the way; the caller may change them once this returns or, with ``defer``, once
        :meth:`fence` has (``TrajectoryPCA`` calls it before each optimizer step, so the copy
        overlaps the forward and backward pass). Deferred CPU tensors are copied on the writer
        thread; one changed in place before the fence is not stored and the next store call raises
        :class:`~lightning_landscape.trajectory.SnapshotChangedError`. CUDA tensors go without
        blocking to a pinned host buffer on a side stream; the current stream waits for the copy
        (on the device) right away or, with ``defer``, at :meth:`fence`.

        Raises:
            ValueError: if ``vec`` is not floating tensors of P elements, or ``step``/``epoch`` are not integers.
            RuntimeError: if the store is closed.
            Exception: the error of a failed background write (see :meth:`check_errors`).

        Example:
            >>> store = SnapshotStore(3, dtype="float16", storage="memory")
            >>> store.append([torch.tensor([0.1, 2.0]), torch.tensor([3.0])], step=10, epoch=1)
            >>> store.get(0).tolist(), store.epochs
            ([0.0999755859375, 2.0, 3.0], [1])
        """
        self._check_open()
        tensors = check_snapshot_tensors(vec, self._num_params)
        check_integer("step", step)
        check_integer("epoch", epoch)
        self._blocks.fence()  # a deferred copy that failed (or whose tensors changed) is raised now, not later
        self.check_errors()
        row = self._count
        budget = self._budget_rows()
        self._blocks.reserve(row + 1, row, budget)
        self._blocks.prefault_ahead(row, budget)
        self._blocks.write_row(row, tensors, defer=defer)
        self._count = row + 1
        self._steps.append(int(step))
        self._epochs.append(int(epoch))
        self._blocks.prefault_ahead(row + 1, budget)

    def fence(self) -> None:
        """Wait for the last deferred copy (see :meth:`append`).

        CPU copies are waited for on the host, device ones on the current CUDA stream.

        Example:
            >>> SnapshotStore(2, storage="memory").fence()
        """
        self._blocks.fence()

    def check_errors(self) -> None:
        """Raise the error of a background write that failed, after rolling the store back to the snapshots before it.

        The failed snapshot and every later one leave the count, steps and epochs (their rows
        are reused by later appends); the error is the original one, raised once.

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> store.check_errors()  # nothing failed
        """
        failure = self._blocks.take_error() if self._blocks.failed else None
        if failure is None:
            return
        row, err = failure
        keep = min(row, self._count)
        del self._steps[keep:], self._epochs[keep:]
        self._count = keep
        if hasattr(err, "add_note"):
            err.add_note(f"(raised in the snapshot writer thread; the store keeps its first {keep} snapshots)")
        raise err

    def flush(self) -> None:
        """Finish the background writes and device copies: every snapshot so far is then readable (also from the files).

        Frees the write buffers until the next append; raises a failed write's error (:meth:`check_errors`).

        Example:
            >>> store = SnapshotStore(2, storage="memory")
            >>> store.append(torch.zeros(2), step=0, epoch=0)
            >>> store.flush()
        """
        self._blocks.flush()
        self.check_errors()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this SnapshotStore is closed; create a new one or resume with from_state_dict.")

    def _budget_rows(self) -> int | None:
        """The rows "auto" storage keeps in memory (``max_memory_mb``), ``None`` without a budget."""
        if self._requested_storage != "auto":
            return None
        return int(self._max_memory_mb * 2**20) // (self._num_params * self._blocks.itemsize)

    def move_to_disk(self) -> None:
        """Move the snapshots held in memory to ``.npy`` files in ``snapshot_dir``; later ones go there too.

        What an ``"auto"`` store does by itself once it outgrows ``max_memory_mb``. Call it
        to make the store resumable from :meth:`state_dict` earlier (``TrajectoryPCA`` does,
        before a checkpoint, when a ``snapshot_dir`` was given). A no-op on disk.

        Raises:
            ValueError: for a store created with ``storage="memory"``.
            RuntimeError: if the store is closed.

        Example:
            >>> store = SnapshotStore(2, storage="auto")
            >>> store.append(torch.ones(2), step=0, epoch=0)
            >>> store.move_to_disk()
            >>> store.storage, len(store.files), store.get(0).tolist()
            ('disk', 1, [1.0, 1.0])
            >>> store.close()
        """
        self._check_open()
        if self.storage == "disk":
            return
        if self._requested_storage == "memory":
            raise ValueError(
                "this store was created with `storage`='memory'; expected 'auto' or 'disk' to move it to disk."
            )
        self.flush()
        self._blocks.spill_to_disk(self._count)

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
        self.flush()
        i = int(i) % self._count
        out = torch.empty((1, self._num_params), dtype=torch.float32)
        with self._blocks.reader() as reader:
            reader.read_rows(i, i + 1, 0, self._num_params, out)
        return out[0]

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
        snapshot, converted to ``dtype``. Every stored byte is read once, with
        file reads on disk (no memory map: the resident set stays at about one
        column block). All blocks are views of one buffer: a block is
        overwritten by the next one (``clone()`` it to keep it). Pass ``out``
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
        cols = check_positive_int("cols", cols)  # type: ignore[assignment]
        stop = check_stop(stop, self._count)
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or not 0 <= start <= stop:
            raise ValueError(f"`start`={start!r} is not valid; expected an integer in [0, {stop}].")
        self.flush()
        buffer = check_column_buffer(out, dtype, (stop - start) * min(cols, self._num_params))
        with self._blocks.reader() as reader:
            for a in range(0, self._num_params, cols):
                b = min(self._num_params, a + cols)
                block = buffer[: (stop - start) * (b - a)].view(stop - start, b - a)
                reader.read_rows(start, stop, a, b, block)
                yield a, b, block

    def quantize(self, vec: torch.Tensor) -> torch.Tensor:
        """``vec`` rounded to the storage dtype, as a float32 CPU tensor (what :meth:`append` would store).

        Example:
            >>> SnapshotStore(1, dtype="bfloat16", storage="memory").quantize(torch.tensor([1.001])).item()
            1.0
        """
        return vec.detach().reshape(-1).to(self.torch_dtype).to(device="cpu", dtype=torch.float32)

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
            "storage": self.storage,
            "requested_storage": self._requested_storage,
            "max_memory_mb": self._max_memory_mb,
            "snapshot_dir": None if self.snapshot_dir is None else str(self.snapshot_dir),
            "prefix": self._blocks.prefix,
            "block_rows": self._blocks.block_rows,
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
            >>> store = SnapshotStore(2, storage="disk")
            >>> store.append(torch.ones(2), step=0, epoch=0)
            >>> again = SnapshotStore.from_state_dict(store.state_dict())
            >>> again.append(torch.zeros(2), step=1, epoch=0)
            >>> len(again), again.get(0).tolist()
            (2, [1.0, 1.0])
            >>> again.close(); store.close()
        """
        count = check_state_dict(state_dict)
        sd = state_dict
        directory = None if sd.get("snapshot_dir") is None else Path(sd["snapshot_dir"])
        store = cls.__new__(cls)
        store._setup(
            check_positive_int("state_dict['num_params']", sd["num_params"]),  # type: ignore[arg-type]
            normalize_dtype(sd["dtype"]),
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
                    "expected a disk store (storage='disk', or 'auto' with a snapshot_dir), "
                    "or pass strict=False to start empty."
                )
            if directory is not None and store._requested_storage != "memory":
                check_snapshot_dir(directory)
            return store
        check_choice("state_dict['storage']", sd["storage"], ("memory", "disk"))
        if directory is not None:
            check_snapshot_dir(directory)
        store._blocks.reopen(sd["files"], count)
        store._count = count
        store._steps = [int(s) for s in sd["steps"]]
        store._epochs = [int(e) for e in sd["epochs"]]
        return store

    def close(self, *, delete: bool = False) -> None:
        """Release the blocks. Files are removed when ``delete`` or when the store made its own temporary directory.

        Calling it twice is harmless; a failed background write's error is raised after the release.

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
        self._closed = True
        self._blocks.close(delete=delete)
        self.check_errors()
