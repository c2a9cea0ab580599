"""BatchNorm statistics for evaluation points that were never trained at.

A point between or around trained weights (an interpolation, a curve, a plane)
has no running statistics of its own: evaluated with the stored ones (``bn="eval"``)
a BatchNorm network is judged with the wrong normalization. ``bn="recompute"``
resets them and recomputes them with one pass over the evaluation data at fixed
weights, as Garipov et al. (2018) and :func:`torch.optim.swa_utils.update_bn` do.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lightning_landscape.errors import LandscapeWarning

#: The accepted BatchNorm policies.
BN_POLICIES = ("eval", "recompute")


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics.

    Example:
        >>> len(batchnorm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))))
        1
    """
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics.

    Example:
        >>> has_batchnorm(nn.Linear(2, 2))
        False
    """
    return bool(batchnorm_layers(model))


def resolve_bn(model: nn.Module, bn: str) -> str:
    """The policy to use for ``model``: ``"recompute"`` on a model without BatchNorm warns and becomes ``"eval"``.

    Example:
        >>> resolve_bn(nn.Sequential(nn.BatchNorm1d(2)), "recompute")
        'recompute'
    """
    if bn == "recompute" and not has_batchnorm(model):
        warnings.warn(
            f"`bn`='recompute' has nothing to recompute: {type(model).__name__} has no BatchNorm layer with "
            "running statistics; evaluating as with bn='eval'.",
            LandscapeWarning,
            stacklevel=3,
        )
        return "eval"
    return bn


Forward = Callable[[nn.Module, Any], Any]
Reduce = Callable[[torch.Tensor], torch.Tensor]


def recompute_bn(model: nn.Module, batches: Iterable[Any], forward: Forward, *, reduce: Reduce | None = None) -> None:
    """Reset the BatchNorm running statistics of ``model`` and recompute them over ``batches``.

    One forward pass per batch at the current weights, without autograd, with only the
    BatchNorm layers in train mode (dropout stays off: the statistics are those of the
    network that is then evaluated) and ``momentum=None`` (a plain average over batches,
    as :func:`torch.optim.swa_utils.update_bn`). Modes and momenta are put back; the
    statistics are left recomputed (run it inside :func:`~lightning_landscape.preserved_state`
    to get the model's own back). ``reduce`` sums a tensor across processes: every
    process then holds the average over all processes' batches.

    Example:
        >>> bn = nn.BatchNorm1d(1)
        >>> recompute_bn(bn, [torch.tensor([[1.0], [3.0]])], lambda m, b: m(b))
        >>> bn.running_mean.tolist(), bn.running_var.tolist()
        ([2.0], [2.0])
    """
    layers = batchnorm_layers(model)
    if not layers:
        return
    saved = [(m, m.momentum, m.training) for m in layers]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
        if reduce is not None:
            _average_across_processes(layers, reduce)
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)


def _average_across_processes(layers: list[nn.modules.batchnorm._BatchNorm], reduce: Reduce) -> None:
    # With momentum=None each process holds the mean over its own batches; weight each by its batch count.
    device = layers[0].running_mean.device
    parts = []
    for m in layers:
        count = m.num_batches_tracked.to(device=device, dtype=torch.float64)
        parts += [m.running_mean.double().flatten() * count, m.running_var.double().flatten() * count, count.reshape(1)]
    total = reduce(torch.cat(parts))
    offset = 0
    for m in layers:
        size = m.running_mean.numel()
        mean, var = total[offset : offset + size], total[offset + size : offset + 2 * size]
        count = total[offset + 2 * size]
        offset += 2 * size + 1
        if count > 0:
            m.running_mean.copy_((mean / count).view_as(m.running_mean))
            m.running_var.copy_((var / count).view_as(m.running_var))
            m.num_batches_tracked.fill_(int(count.item()))
