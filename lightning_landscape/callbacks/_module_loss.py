"""The loss of a LightningModule on one batch, and its outputs for metrics, from one forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_landscape.data import BatchLoss, count_samples, default_forward

#: ``loss_fn(module, batch) -> Tensor``: the batch-mean loss of a LightningModule.
ModuleLossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


def loss_from_output(output: Any, source: str) -> tuple[torch.Tensor, Any, Any]:
    """``(loss, outputs, targets)`` from what a step returned: a tensor or a dict with ``"loss"``.

    Example:
        >>> loss_from_output({"loss": torch.tensor(1.0)}, "training_step")[0].item()
        1.0
    """
    if torch.is_tensor(output):
        return output, None, None
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"], output.get("outputs"), output.get("targets")
    raise MisconfigurationException(
        f"{source} returned {type(output).__name__}; expected a loss tensor or a dict with a 'loss' entry."
    )


def module_batch_loss(
    pl_module: pl.LightningModule, loss_fn: ModuleLossFn | None, want_outputs: bool
) -> tuple[BatchLoss, str]:
    """The loss every callback uses, and the name of its source, in this order: ``loss_fn(module, batch)``;
    the module's ``landscape_step(batch)``; its ``training_step(batch, batch_idx)``.

    Each may return a tensor or a dict with ``"loss"`` (and optionally ``"outputs"`` and
    ``"targets"`` for metrics). When metrics need outputs the step did not return, they are
    the outputs of the module's own ``forward`` call inside the step, caught by a forward
    hook, with the batch's second element as targets: one forward pass gives loss and
    outputs. Only a step that never calls ``module(...)`` (e.g. it calls a submodule) costs
    a second forward, ``module(inputs)`` on an ``(inputs, targets)`` batch.

    Example:
        >>> class Tiny(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 3)
        ...     def forward(self, x):
        ...         return self.layer(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        >>> batch_loss, source = module_batch_loss(Tiny(), None, want_outputs=True)
        >>> loss, n, outputs, targets = batch_loss(Tiny(), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> source, n, tuple(outputs.shape)
        ('training_step', 4, (4, 3))
    """
    if loss_fn is not None:
        source, step = "loss_fn", lambda module, batch: loss_fn(module, batch)
    elif callable(getattr(pl_module, "landscape_step", None)):
        source, step = "landscape_step", lambda module, batch: module.landscape_step(batch)
    else:
        # batch_idx is 0: the analysis is not a training step, and the index only feeds logging there.
        source, step = "training_step", lambda module, batch: module.training_step(batch, 0)

    def batch_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int, Any, Any]:
        if not want_outputs:
            loss, _, targets = loss_from_output(step(model, batch), source)
            return loss, count_samples(targets, batch), None, targets
        seen: list[Any] = []
        handle = model.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            loss, outputs, targets = loss_from_output(step(model, batch), source)
        finally:
            handle.remove()
        if outputs is None:
            pair = isinstance(batch, (list, tuple)) and len(batch) >= 2
            if seen and pair:
                outputs, targets = seen[-1], batch[1]
            else:
                outputs, targets = default_forward(model, batch)
        return loss, count_samples(targets, batch), outputs, targets

    return batch_loss, source
