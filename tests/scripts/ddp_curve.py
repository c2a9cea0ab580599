"""Two CPU (gloo) processes fitting one curve, each on its half of the data, for tests/test_curves_ddp.py.

    python tests/scripts/ddp_curve.py OUT

Writes OUT/curves.pt from rank zero: the bends of a Bezier and of a two-bend polychain fitted with
``fit_curve(..., reduce=all-reduce sum)``, each rank's bends checked equal to rank zero's first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.nn import functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lightning_landscape.connect import fit_curve  # noqa: E402
from tests.curve_ddp_setup import CURVES, end_points, shard_batches  # noqa: E402


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def _rank(rank: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out / 'pg'}", rank=rank, world_size=2)
    try:
        model, a, b = end_points()
        fitted = {}
        for name, kwargs in CURVES.items():
            curve = fit_curve(
                model, a, b, shard_batches(rank), loss_fn=F.cross_entropy, progress=False, reduce=_sum, **kwargs
            )
            flat = torch.cat([p.detach().reshape(-1) for p in curve.parameters()])
            theirs = flat.clone()
            dist.broadcast(theirs, 0)
            assert torch.equal(flat, theirs), f"rank {rank}: the {name} bends differ from rank zero's"
            fitted[name] = {"bends": [p.detach().clone() for p in curve.parameters()], "history": curve.history}
        if rank == 0:
            torch.save(fitted, out / "curves.pt")
        # Neither rank tears its group down while the other may still be talking to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is on disk; skip the interpreter's teardown, where gloo's threads aborted a child
    # in CI ("terminate called without an active exception") after all the work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(_rank, args=(Path(sys.argv[1]),), nprocs=2, join=True)
