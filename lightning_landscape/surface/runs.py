"""Two runs compared on the line through their weights (Goodfellow et al. 2015), train and val together."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from torch import nn

from lightning_landscape._validation import as_coordinate_array
from lightning_landscape.checkpoints import WeightSource, load_weights
from lightning_landscape.data import ForwardFn, LossFn, Reduce, make_batch_loss, model_device
from lightning_landscape.results import Landscape
from lightning_landscape.surface.evaluator import GridEvaluator
from lightning_landscape.surface.path import interpolation_from_evaluator

#: The paper's range: both end points and half the distance beyond each.
DEFAULT_ALPHAS = np.linspace(-0.5, 1.5, 41)

#: The prefix of the validation values in the result.
VAL_PREFIX = "val_"


def interpolate_runs(
    model: nn.Module,
    start: WeightSource,
    end: WeightSource,
    data: Iterable[Any],
    *,
    loss_fn: LossFn,
    val_data: Iterable[Any] | None = None,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    alphas: Any = DEFAULT_ALPHAS,
    num_batches: int | None = None,
    bn: str = "eval",
    labels: tuple[str, str] = ("start", "end"),
    progress: bool | None = None,
    reduce: Reduce | None = None,
) -> Landscape:
    """Loss and metrics of two runs' weights and the line between and beyond them, on train and val data.

    ``start`` and ``end`` are Lightning ``.ckpt`` paths, files of saved state dicts, state dicts or
    modules of ``model``'s architecture (checked first: the first mismatched entry is named with
    both shapes). α = 0 is ``start``, α = 1 ``end`` (every floating-point tensor interpolated,
    BatchNorm statistics too, or recomputed at every α with ``bn="recompute"``, which BatchNorm
    networks need between two runs). The values on ``val_data`` are stored with the prefix ``val_``
    (``val_loss``, ``val_accuracy``; with ``bn="recompute"`` evaluated with the statistics recomputed
    from ``data``, the training data, as for the train values); draw them with
    :func:`~lightning_landscape.plot_interpolation`. Under ``torch.distributed`` each process passes
    its own shards of ``data`` and ``val_data`` and ``reduce`` (a sum over all processes, as for
    :class:`~lightning_landscape.GridEvaluator`); every process gets the values of all shards.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> ls = interpolate_runs(a, a, b, data, val_data=data, loss_fn=nn.functional.mse_loss, progress=False)
        >>> sorted(ls.values), ls.coords[0][[0, -1]].tolist()
        (['loss', 'val_loss'], [-0.5, 1.5])
    """
    alphas = as_coordinate_array("alphas", alphas)
    if not (isinstance(labels, (tuple, list)) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
        raise ValueError(f"`labels`={labels!r} is not valid; expected two strings, the names of the runs.")
    start_sd, end_sd = load_weights(model, start, "start"), load_weights(model, end, "end")
    meta = {"start_label": labels[0], "end_label": labels[1], "has_val": val_data is not None}
    batch_loss = make_batch_loss(loss_fn, forward_fn)
    device = model_device(model)
    sets = {"": data} if val_data is None else {"": data, VAL_PREFIX: val_data}
    result: Landscape | None = None
    train_batches = None
    for prefix, batches in sets.items():
        # The statistics of a point are those of the training data, also where val data is evaluated.
        evaluator = GridEvaluator(
            batches,
            batch_loss,
            metrics=metrics,
            device=device,
            num_batches=num_batches,
            bn=bn,
            bn_batches=train_batches,
            reduce=reduce,
        )
        train_batches = evaluator.batches if train_batches is None else train_batches
        line = interpolation_from_evaluator(
            model,
            evaluator,
            start_sd,
            end_sd,
            alphas,
            progress=progress,
            metadata=meta,
        )
        if result is None:
            result = line
        else:
            result.values.update({prefix + k: v for k, v in line.values.items()})
            result.metadata[f"{prefix}num_samples"] = line.metadata["num_samples"]
    return result  # type: ignore[return-value]
