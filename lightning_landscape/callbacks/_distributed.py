"""The analyses under DDP: collectives that never leave a rank waiting, shards counted once, and
results handed back to the main process of ``ddp_spawn``/``ddp_fork``.

Every collective an analysis makes goes through :class:`Collectives`, on every rank, in the same
order. A rank whose own work fails (the user's loss raising, out of memory) must not leave the
others waiting in their next collective forever, so each collective is preceded by a one-number
health check (an all-reduce of "how many ranks failed"): the failing rank contributes 1 there
(:meth:`Collectives.fail`) and then raises its own error; the others see the count, collect its
message and raise :class:`PeerFailure` with it. Every rank then takes the same ``on_error`` branch.
The check costs one scalar all-reduce per collective (tens of microseconds on gloo, against a
grid point's forward passes).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DistributedSampler

from lightning_landscape.data import count_samples
from lightning_landscape.results import CurveResult, HessianReport, Landscape, PCAResult, SharpnessReport


class PeerFailure(RuntimeError):
    """Raised on every rank whose analysis was fine when another rank's analysis failed.

    Example:
        >>> str(PeerFailure("rank 1: ValueError: boom"))
        'rank 1: ValueError: boom'
    """


class Collectives:
    """The collectives of one analysis on ``trainer.strategy``, each behind a health check.

    On one process every method is the identity (no check, no cost).

    Example:
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False)
        >>> comm = Collectives(trainer)
        >>> comm.reduce(torch.ones(2)).tolist(), comm.broadcast("rank zero's"), comm.distributed
        ([1.0, 1.0], "rank zero's", False)
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.strategy = trainer.strategy
        self.distributed = trainer.world_size > 1

    def check(self, failed: BaseException | None = None) -> None:
        """The health check: raise :class:`PeerFailure` on every healthy rank if any rank failed.

        ``failed`` is this rank's own error (see :meth:`fail`); its message reaches the others.
        """
        if not self.distributed:
            return
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.strategy.root_device)
        if float(self._sum(flag)) == 0:
            return
        # Only on the way out: every rank gathers every rank's message (None for the healthy ones).
        message = None if failed is None else f"{type(failed).__name__}: {failed}"
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        if failed is None:
            first = next(r for r, m in enumerate(messages) if m is not None)
            raise PeerFailure(f"the analysis failed on rank {first}: {messages[first]}")

    def fail(self, err: BaseException) -> None:
        """Tell the other ranks that this rank's analysis failed (once; then re-raise ``err``)."""
        if self.distributed and not isinstance(err, PeerFailure):
            self.check(failed=err)

    def reduce(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum ``sums`` over all ranks, after the health check."""
        if not self.distributed:
            return sums
        self.check()
        return self._sum(sums)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # torch.distributed.all_reduce itself: the strategy's reduce adds a barrier before every
        # all-reduce, which doubled the cost of a grid point's collectives (benchmarks/distributed.py).
        if not dist.is_available() or not dist.is_initialized():
            return self.strategy.reduce(tensor, reduce_op="sum")
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Global rank zero's ``obj`` on every rank, after the health check."""
        if not self.distributed:
            return obj
        self.check()
        return self.strategy.broadcast(obj, src=0)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable, e.g. CPU batches), in rank order, after the health check."""
        if not self.distributed:
            return [obj]
        self.check()
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum_array(self, values: np.ndarray) -> np.ndarray:
        """``values`` summed over all ranks (float64), after the health check."""
        if not self.distributed:
            return values
        tensor = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64), device=self.strategy.root_device)
        return self.reduce(tensor).cpu().numpy()

    def same_on_every_rank(self, name: str, tensors: Sequence[torch.Tensor]) -> None:
        """Raise ``RuntimeError`` unless ``tensors`` (e.g. the directions) are identical on every rank.

        One all-reduce of a checksum: the float64 sum and sum of squares, compared with rank zero's.
        """
        if not self.distributed:
            return
        flat = [t.detach().to(torch.float64).reshape(-1) for t in tensors]
        local = torch.stack([sum(f.sum() for f in flat), sum((f * f).sum() for f in flat)]).cpu()
        theirs = self.broadcast(local)
        differs = torch.tensor([float(not torch.equal(local, theirs))], device=self.strategy.root_device)
        if float(self.reduce(differs)) > 0:
            raise RuntimeError(
                f"the {name} differ between ranks (checksums {local.tolist()} here, {theirs.tolist()} on rank 0); "
                "they must be generated from the same seed on every rank."
            )


def _distributed_sampler(loader: Any) -> DistributedSampler | None:
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, DistributedSampler) else None


def padded_tail(loader: Any) -> int:
    """How many samples at the end of this rank's shard are DistributedSampler padding.

    ``DistributedSampler(drop_last=False)`` repeats the first indices so every rank gets
    ``ceil(N / world)`` samples: rank ``r``'s shard holds positions ``r, r + world, ...`` of a
    list whose positions ``>= N`` are the repeats, so its last sample is padding exactly when
    ``(num_samples - 1) * world + r >= N``.

    Example:
        >>> loader = torch.utils.data.DataLoader(range(5), sampler=DistributedSampler(range(5), 2, rank=1))
        >>> padded_tail(loader), padded_tail(torch.utils.data.DataLoader(range(5)))
        (1, 0)
    """
    sampler = _distributed_sampler(loader)
    if sampler is None or sampler.drop_last:
        return 0
    real = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]
    return sampler.num_samples - real


def drop_padding(batches: list[Any], loader: Any) -> list[Any]:
    """``batches`` (read from ``loader`` in order) without the DistributedSampler padding of this rank's shard.

    The analyses drop the padding from the cached batches, so no sample is evaluated twice,
    rather than building loaders of their own: the fit's loader, its workers, collate function
    and the precision conversion stay as they are. Every tensor whose leading dimension is the
    batch size is cut; batches that stop before the padding (``num_batches`` smaller than the
    shard) are returned as they are.

    Example:
        >>> sampler = DistributedSampler(range(5), 2, rank=1, shuffle=False)  # positions 1, 3 and 5 -> index 0
        >>> loader = torch.utils.data.DataLoader(range(5), batch_size=2, sampler=sampler)
        >>> [b.tolist() for b in loader], [b.tolist() for b in drop_padding(list(loader), loader)]
        ([[1, 3], [0]], [[1, 3]])
    """
    pad = padded_tail(loader)
    if pad == 0:
        return batches
    keep = _distributed_sampler(loader).num_samples - pad  # type: ignore[union-attr]
    sizes = [count_samples(b) for b in batches]
    if sum(sizes) <= keep:
        return batches
    out, seen = [], 0
    for batch, size in zip(batches, sizes):
        take = min(size, keep - seen)
        if take <= 0:
            break
        out.append(batch if take == size else _head(batch, size, take))
        seen += take
    return out


def _head(batch: Any, size: int, take: int) -> Any:
    return apply_to_collection(batch, torch.Tensor, lambda t: t[:take] if t.ndim and t.shape[0] == size else t)


# --- results of ddp_spawn / ddp_fork back in the main process ---------------------------------

_HANDOFF_ROOT = Path(tempfile.gettempdir()) / "lightning_landscape-handoff"


def new_handoff() -> Path:
    """A fresh folder name (not created) through which spawned rank zero hands results to this process.

    Registered for removal when this (the main) process exits; spawned children inherit the
    name with the pickled callback, not the registration.

    Example:
        >>> new_handoff().parent.name
        'lightning_landscape-handoff'
    """
    path = _HANDOFF_ROOT / uuid.uuid4().hex
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


_RESULT_KINDS: dict[str, Any] = {
    "Landscape": Landscape,
    "PCAResult": PCAResult,
    "HessianReport": HessianReport,
    "SharpnessReport": SharpnessReport,
    "CurveResult": CurveResult,
}
_MANIFEST = "manifest.json"


def hand_off(folder: Path, results: Mapping[str, Any], files: Mapping[str, Path]) -> None:
    """Write ``results`` (each with its own ``save``, no pickle) and the paths ``files`` to ``folder``.

    Called on global rank zero of a spawned run, whose objects die with it; the main process
    reads them back with :func:`take_over`.

    Example:
        >>> folder = new_handoff()
        >>> hand_off(folder, {"landscape": None}, {"npz": Path("surface.npz")})
        >>> take_over(folder, "files"), take_over(folder, "landscape")
        ({'npz': PosixPath('surface.npz')}, None)
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    manifest: dict[str, Any] = {"files": {k: str(p) for k, p in files.items()}, "results": {}}
    for name, value in results.items():
        if value is not None:
            value.save(folder / f"{name}.npz")
            manifest["results"][name] = type(value).__name__
    tmp = folder / f"{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(folder / _MANIFEST)  # written last and atomically: a manifest names only complete files


def take_over(folder: Path | None, name: str) -> Any:
    """The result ``name`` (or ``"files"``) that spawned rank zero handed off in ``folder``, else ``None``."""
    manifest_path = None if folder is None else folder / _MANIFEST
    if manifest_path is None or not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if name == "files":
        return {k: Path(p) for k, p in manifest["files"].items()}
    kind = manifest["results"].get(name)
    return None if kind is None else _RESULT_KINDS[kind].load(folder / f"{name}.npz")  # type: ignore[operator]


class HandedOff:
    """An attribute holding a result; in the main process of ``ddp_spawn``/``ddp_fork``, where it
    was never set, it reads what spawned rank zero handed off (see :func:`hand_off`).

    Example:
        >>> class Holder:
        ...     handoff = None
        ...     result = HandedOff()
        >>> h = Holder(); h.result = 3
        >>> h.result
        3
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__.get(self.name)
        if value is None or (self.name == "files" and not value):
            handed = take_over(getattr(obj, "handoff", None), self.name)
            if handed is not None:
                obj.__dict__[self.name] = value = handed
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value
