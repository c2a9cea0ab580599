"""Training a curve's bends: minimize E_{t~U(0,1)} L(φ_θ(t)) (Garipov et al., 2018).

Each step draws one t from the fit's own generator, puts φ_θ(t) into the model
through ``torch.func.functional_call`` (so the weights stay a function of the bends
and autograd reaches them), and takes an optimizer step on the bends with the loss
of one batch. The forward runs in train mode, as in the paper: BatchNorm normalizes
with the batch's statistics (and updates the running ones, which the guard puts back)
and dropout is on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lightning_landscape._validation import (
    check_callable,
    check_choice,
    check_nonnegative_float,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from lightning_landscape.connect.curves import Curve, check_curve
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce, cache_batches, model_device
from lightning_landscape.errors import LandscapeWarning
from lightning_landscape.hessian.check import resolve_batch_loss
from lightning_landscape.progress import track
from lightning_landscape.state import preserved_state

#: The accepted optimizers of the bends.
OPTIMIZERS = ("sgd", "adam")


def check_fit_options(
    *,
    curve: Any,
    num_bends: Any,
    epochs: Any,
    optimizer: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    seed: Any,
    num_batches: Any,
    on_step: Any,
) -> None:
    """Check every fit option (``ValueError`` naming the argument, the value and what is accepted).

    Example:
        >>> check_fit_options(curve="bezier", num_bends=1, epochs=0, optimizer="sgd", lr=0.1, momentum=0.9,
        ...                   weight_decay=0.0, seed=0, num_batches=None, on_step=None)
        Traceback (most recent call last):
            ...
        ValueError: `epochs`=0 is not valid; expected an integer >= 1.
    """
    check_curve(curve, num_bends)
    check_positive_int("epochs", epochs)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_positive_float("lr", lr)
    check_nonnegative_float("momentum", momentum)
    check_nonnegative_float("weight_decay", weight_decay)
    check_seed("seed", seed)
    check_positive_int("num_batches", num_batches, allow_none=True)
    check_callable("on_step", on_step, "on_step(step: int, loss: float) -> None")


class _BatchLossCall(nn.Module):
    """The batch loss as a module holding ``model``, so ``functional_call`` can swap its weights.

    ``functional_call`` calls a module's ``forward``; wrapping lets any ``forward_fn``
    (which may call the model however it likes) run on the substituted weights.
    """

    def __init__(self, model: nn.Module, batch_loss: BatchLoss) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self.batch_loss(self.model, batch)[0]


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> Any:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def _seed_dropout(seed: int, device: torch.device) -> None:
    # Dropout draws from the global RNG (it takes no generator): seeding it inside the guard makes a
    # fit reproducible from `seed` alone, and the guard restores the global state afterwards.
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def fit_curve(
    model: nn.Module,
    start: Any,
    end: Any,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batch_loss: BatchLoss | None = None,
    curve: str = "bezier",
    num_bends: int = 1,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_batches: int | None = None,
    progress: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
    reduce: Reduce | None = None,
) -> Curve:
    """Train the bends of a curve from ``start`` to ``end`` so that the loss stays low all along it.

    Minimizes E_{t~U(0,1)} L(φ_θ(t)): every step draws t ~ U(0, 1) from a ``torch.Generator``
    seeded with ``seed`` (never the global RNG), evaluates one batch at φ_θ(t) in train mode
    (BatchNorm on batch statistics, dropout on, as in Garipov et al. 2018) and steps the
    optimizer on the bends only; the end points stay fixed. The bends start on the straight
    line. ``model`` supplies the architecture and is left exactly as it was (BatchNorm
    running statistics included); its frozen parameters and buffers are not on the curve
    and keep ``model``'s own values.

    Args:
        model: a module with the architecture of both end points.
        start, end: the end points w₁ and w₂: state dicts or modules of that architecture.
        data: an iterable of batches, read once and cached on the model's device; every epoch
            visits the cached batches in a new order drawn from the fit's generator.
        loss_fn, forward_fn: as in :func:`~lightning_landscape.loss_surface`.
        batch_loss: instead of ``loss_fn``, a :data:`~lightning_landscape.data.BatchLoss` (e.g. a
            LightningModule's own step, as the callbacks build it).
        curve: ``"bezier"`` or ``"polychain"``.
        num_bends: the number of trainable bends (>= 1).
        epochs: passes over the cached batches; one step per batch.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (``momentum`` unused).
        lr, momentum, weight_decay: the optimizer's settings.
        seed: seeds the draws of t, the batch order and dropout.
        num_batches: use at most this many batches of ``data``.
        progress: a bar (True; None on a terminal), log lines (None off a terminal), nothing (False).
        on_step: ``on_step(step, loss)`` after each step, with the step's batch loss.
        reduce: under ``torch.distributed``, a function summing a tensor over all processes (each
            passing its own shard of ``data``, the same number of batches): every step averages the
            bends' gradients and the loss over the processes, as DDP does, so every process takes
            the same steps and ends with the same curve. The draws of t are the same everywhere.

    Returns:
        the fitted :class:`Curve`; ``history`` holds the loss of every step, ``settings`` the options.

    Raises:
        ValueError: for a bad option or end points of another architecture, before the data is read.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> curve = fit_curve(model, a, b, data, loss_fn=nn.functional.mse_loss, epochs=3, progress=False)
        >>> len(curve.history), curve.num_bends
        (3, 1)
    """
    check_fit_options(
        curve=curve,
        num_bends=num_bends,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        num_batches=num_batches,
        on_step=on_step,
    )
    loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    fitted = Curve.between(model, start, end, curve=curve, num_bends=num_bends)
    batches = cache_batches(data, model_device(model), num_batches)
    opt = _make_optimizer(optimizer, fitted.parameters(), float(lr), float(momentum), float(weight_decay))
    runner = _BatchLossCall(model, loss)
    sync = None if reduce is None else _StepAverage(reduce, len(batches), model_device(model))
    fitted.history = _train_bends(runner, fitted, batches, opt, int(epochs), int(seed), progress, on_step, sync)
    _warn_if_diverged(fitted.history, lr)
    fitted.settings = {
        "curve": fitted.kind,
        "num_bends": fitted.num_bends,
        "epochs": int(epochs),
        "optimizer": optimizer,
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "seed": int(seed),
        "steps_per_epoch": len(batches),
    }
    return fitted


def _train_bends(
    runner: _BatchLossCall,
    curve: Curve,
    batches: list[Any],
    opt: Any,
    epochs: int,
    seed: int,
    progress: bool | None,
    on_step: Callable[[int, float], None] | None,
    sync: _StepAverage | None = None,
) -> list[float]:
    """The fit's loop, inside the model's guard; returns the loss of every step."""
    model = runner.model
    generator = torch.Generator().manual_seed(seed)
    losses: list[torch.Tensor] = []
    with preserved_state(model):
        _seed_dropout(seed, model_device(model))
        model.train()
        order = (int(i) for _ in range(epochs) for i in torch.randperm(len(batches), generator=generator))
        steps = track(
            order,
            epochs * len(batches),
            description="curve fit",
            progress=progress,
            unit_cost="1 forward and backward pass",
        )
        for step, index in enumerate(steps):
            t = float(torch.rand((), generator=generator, dtype=torch.float64))
            # The model's own parameters are never written: the curve's weights replace them for this call only.
            weights = {f"model.{n}": w for n, w in curve.weights(t).items()}
            loss = functional_call(runner, weights, (batches[index],))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync is not None:
                loss = sync(curve.parameters(), loss)
            opt.step()
            losses.append(loss.detach())
            if on_step is not None:
                on_step(step, float(losses[-1]))
    for p in curve.parameters():
        p.grad = None
    return torch.stack(losses).double().cpu().tolist()


class _StepAverage:
    """The bends' gradients and the step's loss averaged over the processes: one all-reduce per step."""

    def __init__(self, reduce: Reduce, num_batches: int, device: torch.device) -> None:
        self.reduce = reduce
        # Every process must take the same number of steps, or one waits forever in a collective:
        # the sum of n and of n² tell every process alike whether all n are equal.
        n = float(num_batches)
        total, squares, world = reduce(torch.tensor([n, n * n, 1.0], dtype=torch.float64, device=device)).tolist()
        if squares * world != total * total:
            raise ValueError(
                f"the processes hold different numbers of batches ({num_batches} here, {total / world:g} on "
                "average); expected the same number on every process (a DistributedSampler gives it)."
            )
        self.world = world

    def __call__(self, params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        # Bends that do not shape φ(t) (a polychain's other segments) have no gradient; t is the same on
        # every process, so the same ones are missing everywhere and the flat vectors line up.
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        flat = self.reduce(flat) / self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[-1]


def _warn_if_diverged(history: list[float], lr: float) -> None:
    bad = [i for i, value in enumerate(history) if not math.isfinite(value)]
    if bad:
        warnings.warn(
            f"the curve fit's loss was not finite from step {bad[0]} on ({len(bad)} of {len(history)} steps); "
            f"the bends are not usable. Lower `lr`={lr!r}.",
            LandscapeWarning,
            stacklevel=3,
        )
