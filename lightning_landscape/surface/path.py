"""Loss along a path between two weight sets: linear interpolation (Goodfellow et al. 2015)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import as_coordinate_array
from lightning_landscape.checkpoints import WeightSource, read_state_dict
from lightning_landscape.data import ForwardFn, LossFn, Reduce, make_batch_loss, model_device
from lightning_landscape.results import Landscape
from lightning_landscape.state import preserved_state
from lightning_landscape.surface.evaluator import GridEvaluator


def interpolation_from_evaluator(
    model: nn.Module,
    evaluator: GridEvaluator,
    start: WeightSource,
    end: WeightSource,
    alphas: Any,
    *,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> Landscape:
    """:func:`interpolate` with a ready :class:`GridEvaluator`.

    Example:
        >>> a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(a.weight), nn.init.ones_(b.weight)
        >>> ev = GridEvaluator([(torch.ones(2, 1), torch.zeros(2, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> interpolation_from_evaluator(a, ev, a, b, [0.0, 0.5, 1.0], progress=False).loss.tolist()
        [0.0, 0.25, 1.0]
    """
    alphas = as_coordinate_array("alphas", alphas)
    start_sd, end_sd = read_state_dict(start, "start"), read_state_dict(end, "end")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = [n for n, t in tensors.items() if t.is_floating_point()]
    for label, sd in (("start", start_sd), ("end", end_sd)):
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"`{label}` lacks the entries {missing[:5]}; expected a state dict of the same model.")
        for n in names:
            if tuple(sd[n].shape) != tuple(tensors[n].shape):
                raise ValueError(
                    f"`{label}[{n!r}]` has shape {tuple(sd[n].shape)}; expected {tuple(tensors[n].shape)}."
                )
    targets = [tensors[n] for n in names]
    starts = [start_sd[n].detach().to(tensors[n]) for n in names]
    ends = [end_sd[n].detach().to(tensors[n]) for n in names]
    meta = {"kind": "interpolation", "bn": evaluator.bn, **_versions.collect(), **(metadata or {})}
    landscape = Landscape.empty([alphas], evaluator.metrics, meta)

    def set_point(idx: tuple[int, ...]) -> None:
        # torch.lerp is exact at both ends, so α = 0 and α = 1 reproduce the two models bit for bit.
        with torch.no_grad():
            for t, s, e in zip(targets, starts, ends):
                torch.lerp(s, e, float(alphas[idx[0]]), out=t)

    with preserved_state(model):
        return evaluator.run(model, landscape, set_point, progress=progress, description="interpolation")


def interpolate(
    model: nn.Module,
    start: WeightSource,
    end: WeightSource,
    alphas: Any,
    data: Iterable[Any],
    *,
    loss_fn: LossFn,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    num_batches: int | None = None,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    bn: str = "eval",
    reduce: Reduce | None = None,
) -> Landscape:
    """Loss along θ(α) = (1−α)·θ_start + α·θ_end (Goodfellow et al. 2015).

    Every floating-point parameter and buffer (BatchNorm running statistics too)
    is interpolated, so α = 0 and α = 1 give exactly the two models' own losses;
    α may leave [0, 1]. ``model`` supplies the architecture and is left as it was.

    Args:
        model: a module with the architecture of both end points.
        start, end: state dicts or modules of that architecture, or paths of Lightning ``.ckpt``
            files or saved state dicts (see :func:`~lightning_landscape.interpolate_runs` for two
            runs with train and val data).
        alphas: 1-D array of interpolation coefficients.
        data, loss_fn, metrics, forward_fn, num_batches, progress, metadata, bn: as in
            :func:`loss_surface`. Interpolated BatchNorm statistics are not those of the
            interpolated weights: ``bn="recompute"`` recomputes them at every α.
        reduce: under ``torch.distributed``, a function summing a tensor over all processes, each
            passing its own shard of the data: the values are those of all shards together (see
            :class:`~lightning_landscape.GridEvaluator`).

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> ls = interpolate(a, a, b, np.linspace(0, 1, 3), data, loss_fn=nn.functional.mse_loss)
        >>> ls.coords[0].tolist()
        [0.0, 0.5, 1.0]
    """
    as_coordinate_array("alphas", alphas)  # checked before the data is read
    evaluator = GridEvaluator(
        data,
        make_batch_loss(loss_fn, forward_fn),
        metrics=metrics,
        device=model_device(model),
        num_batches=num_batches,
        bn=bn,
        reduce=reduce,
    )
    return interpolation_from_evaluator(model, evaluator, start, end, alphas, progress=progress, metadata=metadata)
