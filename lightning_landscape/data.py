"""Data and loss: batches cached once on the model's device, counted in samples, and the loss of a batch.

A surface evaluates the same data at hundreds of points; iterating a DataLoader
(workers, collation, host-to-device copies) at every point would dominate the
cost, so the batches are materialised on the device once and reused.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_landscape.state import preserved_rng

#: ``forward_fn(model, batch) -> (outputs, targets)``
ForwardFn = Callable[[nn.Module, Any], tuple[Any, Any]]
#: ``loss_fn(outputs, targets) -> Tensor``: the mean loss of one batch.
LossFn = Callable[[Any, Any], torch.Tensor]
#: ``batch_loss(model, batch) -> (mean_loss, num_samples, outputs, targets)``; outputs may be None.
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int, Any, Any]]
#: ``reduce(sums) -> sums``: sums a float64 tensor over processes (identity on one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside ``batch`` (nested tuples, lists, dicts) to ``device``.

    Non-tensor leaves are kept as they are.

    Example:
        >>> batch = {"x": torch.zeros(2), "pair": (torch.ones(1), "label")}
        >>> moved = move_to_device(batch, torch.device("cpu"))
        >>> moved["x"].device, moved["pair"][1]
        (device(type='cpu'), 'label')
    """
    # lightning_utilities (Lightning's own collection walker, no Lightning import) handles
    # dicts, namedtuples, dataclasses and nested sequences the way Lightning moves batches.
    return apply_to_collection(batch, torch.Tensor, lambda t: t.to(device, non_blocking=True))


def cache_batches(data: Iterable[Any], device: torch.device | str, num_batches: int | None = None) -> list[Any]:
    """Materialise (at most ``num_batches`` of) ``data`` on ``device``.

    Raises:
        ValueError: if ``data`` yields no batch.

    Example:
        >>> batches = cache_batches([(torch.zeros(4, 2), torch.zeros(4))], "cpu")
        >>> len(batches), batches[0][0].shape
        (1, torch.Size([4, 2]))
    """
    device = torch.device(device)
    # Reading the data must not advance any RNG the training uses (see preserved_rng).
    with preserved_rng(loader_generators(data)):
        iterator = iter(data)
        if num_batches is not None:
            iterator = itertools.islice(iterator, num_batches)
        batches = [move_to_device(batch, device) for batch in iterator]
    if not batches:
        raise ValueError(f"`data`={data!r} yielded no batch; expected an iterable of at least one batch.")
    return batches


def loader_generators(data: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects that iterating ``data`` may advance: a DataLoader's own
    ``generator``, its sampler's and its batch sampler's (and their inner sampler's).

    Example:
        >>> g = torch.Generator()
        >>> loader = torch.utils.data.DataLoader(list(range(4)), shuffle=True, generator=g)
        >>> any(x is g for x in loader_generators(loader))
        True
    """
    found = []
    for holder in (data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None)):
        for obj in (holder, getattr(holder, "sampler", None)):
            generator = getattr(obj, "generator", None)
            if isinstance(generator, torch.Generator):
                found.append(generator)
    return found


def count_samples(*candidates: Any) -> int:
    """Number of samples in the first tensor found in ``candidates`` (its leading dimension).

    Raises:
        ValueError: if no candidate holds a tensor.

    Example:
        >>> count_samples(None, {"x": torch.zeros(5, 3)})
        5
        >>> count_samples(torch.tensor(2.0))  # a 0-dim tensor is one sample
        1
    """
    for candidate in candidates:
        tensor = _first_tensor(candidate)
        if tensor is not None:
            return int(tensor.shape[0]) if tensor.ndim > 0 else 1
    raise ValueError("cannot count the samples of a batch that holds no tensor; pass a `forward_fn` returning tensors.")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    found: list[torch.Tensor] = []
    apply_to_collection(obj, torch.Tensor, found.append)
    return found[0] if found else None


def default_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """The default ``forward_fn``: a batch is ``(inputs, targets)``; outputs are ``model(inputs)``.

    Example:
        >>> outputs, targets = default_forward(nn.Linear(2, 1), (torch.zeros(4, 2), torch.ones(4, 1)))
        >>> outputs.shape, targets.shape
        (torch.Size([4, 1]), torch.Size([4, 1]))
    """
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError(
            f"a batch of type {type(batch).__name__} is not an (inputs, targets) pair; "
            "pass `forward_fn(model, batch) -> (outputs, targets)` to say how to evaluate it."
        )
    inputs, targets = batch[0], batch[1]
    return model(inputs), targets


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters).

    Example:
        >>> model_device(nn.Linear(2, 1)), model_device(nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_batch_loss(loss_fn: LossFn, forward_fn: ForwardFn | None = None) -> BatchLoss:
    """Build a :data:`BatchLoss` from a ``loss_fn(outputs, targets)`` and an optional ``forward_fn``.

    Example:
        >>> batch_loss = make_batch_loss(nn.functional.mse_loss, lambda model, batch: (model(batch["x"]), batch["y"]))
        >>> loss, n, outputs, targets = batch_loss(nn.Identity(), {"x": torch.ones(4, 1), "y": torch.zeros(4, 1)})
        >>> loss.item(), n
        (1.0, 4)
    """
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn`={loss_fn!r} is not callable; expected loss_fn(outputs, targets) -> Tensor.")
    forward = forward_fn or default_forward

    def batch_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, Any, Any]:
        outputs, targets = forward(model, batch)
        return loss_fn(outputs, targets), count_samples(targets, outputs), outputs, targets

    return batch_loss
