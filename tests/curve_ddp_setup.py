"""The model, end points and data shards shared by tests/test_curves_ddp.py and tests/scripts/ddp_curve.py."""

from __future__ import annotations

import torch
from torch import nn

#: The fits both sides run: a Bezier with SGD and momentum, a two-bend polychain with Adam (whose
#: steps leave the bends of the other segment without a gradient).
CURVES = {
    "bezier": {"curve": "bezier", "num_bends": 1, "epochs": 3, "lr": 0.05, "momentum": 0.9, "seed": 3},
    "polychain": {"curve": "polychain", "num_bends": 2, "epochs": 2, "optimizer": "adam", "lr": 0.01, "seed": 4},
}
BATCH = 8


def end_points() -> tuple[nn.Module, nn.Module, nn.Module]:
    """An MLP without BatchNorm (batch statistics would differ between a shard and the union) and two end points."""

    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    return mlp(0), mlp(1), mlp(2)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)


def shard_batches(rank: int, world: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s samples (every ``world``-th, as a DistributedSampler without shuffling) in batches."""
    x, y = _data()
    xs, ys = x[rank::world], y[rank::world]
    return [(xs[i : i + BATCH], ys[i : i + BATCH]) for i in range(0, len(xs), BATCH)]


def union_batches(world: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch i of every rank together: what one process sees when the ranks' step i is one step."""
    shards = [shard_batches(r, world) for r in range(world)]
    return [(torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards])) for i in range(len(shards[0]))]
