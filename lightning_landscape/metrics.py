"""Metrics by name: ``"accuracy"``, ``"mse"``, ``"mae"`` become torchmetrics objects sized from the model's outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: The metric names accepted wherever metrics are (callbacks, CLI, the functions).
METRIC_NAMES = ("accuracy", "mse", "mae")


def is_metric(obj: Any) -> bool:
    """Whether ``obj`` behaves like a torchmetrics ``Metric`` (update/compute/reset).

    Example:
        >>> import torchmetrics
        >>> is_metric(torchmetrics.MeanSquaredError()), is_metric("mse")
        (True, False)
    """
    return all(callable(getattr(obj, a, None)) for a in ("update", "compute", "reset"))


def check_metric_names(metrics: Sequence[Any] | None) -> list[Any]:
    """Validate ``metrics``: names from :data:`METRIC_NAMES` or torchmetrics objects.

    Example:
        >>> check_metric_names(["accuracy"])
        ['accuracy']
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    out = []
    for m in metrics or []:
        if isinstance(m, str):
            if m not in METRIC_NAMES:
                accepted = ", ".join(map(repr, METRIC_NAMES))
                raise ValueError(f"`metrics` holds {m!r}; accepted names: {accepted}, or torchmetrics objects.")
        elif not is_metric(m):
            raise ValueError(f"`metrics` holds {m!r}; expected metric names or torchmetrics.Metric objects.")
        out.append(m)
    return out


def metric_from_name(name: str, outputs: Any) -> Any:
    """The torchmetrics object for ``name``, sized from a sample of the model's ``outputs``.

    Example:
        >>> type(metric_from_name("accuracy", torch.zeros(4, 10))).__name__
        'MulticlassAccuracy'
    """
    import torchmetrics

    if name == "accuracy":
        if not torch.is_tensor(outputs) or not outputs.is_floating_point():
            raise ValueError(
                "metric 'accuracy' needs the model's outputs to be a float tensor of logits or probabilities; "
                "pass a torchmetrics object instead."
            )
        classes = int(outputs.shape[-1]) if outputs.ndim > 1 else 1
        if classes == 1:
            return torchmetrics.Accuracy(task="binary")
        return torchmetrics.Accuracy(task="multiclass", num_classes=classes)
    if name == "mse":
        return torchmetrics.MeanSquaredError()
    if name == "mae":
        return torchmetrics.MeanAbsoluteError()
    raise ValueError(f"`metrics` holds {name!r}; accepted names: {', '.join(map(repr, METRIC_NAMES))}.")
