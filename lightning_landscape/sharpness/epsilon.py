"""ε-sharpness (Keskar et al., ICLR 2017): the largest relative rise of the loss in a small box around the weights.

``100 · (max_{δ ∈ C_ε} L(θ + δ) − L(θ)) / (1 + L(θ))``, with the box ``C_ε`` either in the full
weight space, ``|δ_i| <= ε (|θ_i| + 1)``, or in a random subspace ``δ = A y`` of dimension p
(A an n × p matrix of standard Gaussian entries, drawn from a seeded ``torch.Generator``), with
``|y_j| <= ε (|(A⁺θ)_j| + 1)`` and A⁺ the pseudo-inverse (``A⁺θ`` by least squares, never a
dense inverse). The paper maximizes with L-BFGS-B; here a few steps of projected sign-gradient
ascent (the box's own steepest-ascent direction, as in PGD attacks): ``z ← clip(z + η·w·sign(∇_z L),
−w, w)`` with ``w`` the box half-widths, from a uniform random start in the box, keeping the best
loss seen (δ = 0 included, so the value is never negative). The ascent finds a local maximum: the
value is a lower bound of the true ε-sharpness, exact for a convex loss whose gradient keeps its
signs over the box.

The loss is the sample-weighted mean over the given batches, in eval mode (BatchNorm running
statistics, no dropout), its gradient by autograd through the model; under DDP ``reduce`` sums
``[Σ n_b ∇L_b, Σ n_b L_b, Σ n_b]`` over the processes, so every rank takes the same steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_landscape._validation import check_positive_float, check_positive_int, check_seed
from lightning_landscape.data import BatchLoss, Reduce
from lightning_landscape.params import trainable_parameters
from lightning_landscape.progress import track
from lightning_landscape.state import preserved_state

#: The step as a fraction of the box half-width when ``step_size=None``: 2.5 / steps, so the steps
#: together can cross the box 1.25 times (the rule of Madry et al. 2018 for PGD).
STEP_REACH = 2.5


class EpsilonSharpness(NamedTuple):
    """What :func:`epsilon_sharpness` found.

    Attributes:
        value: the ε-sharpness, ``100 · (max_loss − loss) / (1 + loss)``.
        loss: L(θ), the loss at the weights.
        max_loss: the largest loss seen in the box (``loss`` itself when nothing was larger).
        losses: the loss at each iterate of the ascent (the start point first).
        step_size: the step as a fraction of the box half-width.

    Example:
        >>> EpsilonSharpness(1.0, 0.5, 0.515, np.array([0.51, 0.515]), 0.125).value
        1.0
    """

    value: float
    loss: float
    max_loss: float
    losses: np.ndarray
    step_size: float


def check_epsilon_args(epsilon: Any, steps: Any, step_size: Any, subspace_dim: Any, seed: Any) -> tuple:
    """The checked ``(epsilon, steps, step_size, subspace_dim, seed)``; ``ValueError`` naming the bad one.

    ``step_size=None`` becomes ``2.5 / steps`` (see :data:`STEP_REACH`).

    Example:
        >>> check_epsilon_args(1e-3, 20, None, None, 0)
        (0.001, 20, 0.125, None, 0)
        >>> check_epsilon_args(0, 20, None, None, 0)
        Traceback (most recent call last):
            ...
        ValueError: `epsilon`=0 is not valid; expected a finite number > 0.
    """
    epsilon = check_positive_float("epsilon", epsilon)
    steps = check_positive_int("steps", steps)
    step_size = STEP_REACH / steps if step_size is None else check_positive_float("step_size", step_size)
    subspace_dim = check_positive_int("subspace_dim", subspace_dim, allow_none=True)
    return epsilon, steps, step_size, subspace_dim, check_seed("seed", seed)


def _stream_seeds(seed: int) -> tuple[int, int]:
    """Two independent torch seeds from ``seed``: the subspace matrix's and the start point's."""
    a, b = np.random.SeedSequence(int(seed)).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1  # torch seeds must fit in an int64


def random_subspace(num_params: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """The ``num_params × dim`` matrix A of standard Gaussian entries spanning the random subspace.

    Drawn on the CPU in float32 from a ``torch.Generator`` seeded from ``seed`` (never the global
    RNG), so the same seed gives the same subspace on every device and process; it is the matrix
    :func:`epsilon_sharpness` uses with the same ``seed`` and ``subspace_dim``.

    Example:
        >>> a = random_subspace(5, 2, seed=3)
        >>> a.shape, torch.equal(a, random_subspace(5, 2, seed=3))
        (torch.Size([5, 2]), True)
    """
    generator = torch.Generator(device="cpu").manual_seed(_stream_seeds(seed)[0])
    return torch.randn((num_params, dim), generator=generator, dtype=torch.float32)


def _autograd_ready(batches: Sequence[Any]) -> list[Any]:
    # Batches cached under inference_mode are inference tensors, which autograd cannot save for backward.
    with torch.inference_mode(False):
        return [apply_to_collection(b, torch.Tensor, lambda t: t.clone() if t.is_inference() else t) for b in batches]


def mean_loss_and_grad(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    batches: Sequence[Any],
    batch_loss: BatchLoss,
    reduce: Reduce | None = None,
    *,
    grad: bool = True,
) -> tuple[float, torch.Tensor | None]:
    """The sample-weighted mean loss over ``batches`` and (``grad=True``) its flat float64 gradient.

    Uses the model as it is (set its mode first). The per-process sums ``[Σ n_b ∇L_b, Σ n_b L_b,
    Σ n_b]`` go through ``reduce`` before the one division, so under DDP every rank gets the
    gradient of the mean over all ranks' samples. ``.grad`` is never touched.

    Example:
        >>> from lightning_landscape.data import make_batch_loss
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.fill_(2.0)
        >>> batches = [(torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1))]
        >>> loss, g = mean_loss_and_grad(model, [model.weight], batches, make_batch_loss(nn.functional.mse_loss))
        >>> loss, g.tolist()  # mean of (2x)², gradient mean of 2·(2x)·x
        (20.0, [20.0])
    """
    sizes = [p.numel() for p in params]
    size = sum(sizes) if grad else 0
    device = params[0].device
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        sums = torch.zeros(size + 2, dtype=torch.float64, device=device)
        for batch in batches:
            loss, n, _, _ = batch_loss(model, batch)
            if grad and loss.requires_grad:
                offset = 0
                for g, numel in zip(torch.autograd.grad(loss, params, allow_unused=True), sizes):
                    if g is not None:
                        sums[offset : offset + numel] += g.reshape(-1).to(torch.float64) * n
                    offset += numel
            sums[size] += loss.detach().to(torch.float64) * n
            sums[size + 1] += n
    if reduce is not None:
        sums = reduce(sums)
    count = float(sums[size + 1])
    if count <= 0:
        raise ValueError("the batches hold no samples; expected at least one sample to take the loss over.")
    loss_value = float(sums[size]) / count
    return loss_value, (sums[:size] / count if grad else None)


class FlatWeights:
    """Writes θ + δ (δ a flat float64 vector) into the parameters; :meth:`reset` puts θ back bit for bit.

    θ + δ is formed in float64 and rounded once to each parameter's dtype, so a tiny δ is not lost
    to float32 rounding of an accumulated sum.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> params = trainable_parameters(model)
        >>> w = FlatWeights(params, {"weight": torch.tensor([[1.0, 2.0]])})
        >>> w.set(torch.tensor([0.5, 0.0], dtype=torch.float64)); model.weight.tolist()
        [[1.5, 2.0]]
        >>> w.reset(); model.weight.tolist()
        [[1.0, 2.0]]
    """

    def __init__(self, params: Mapping[str, torch.Tensor], center: Mapping[str, torch.Tensor]) -> None:
        self.targets = list(params.values())
        self.center = [center[name] for name in params]
        self.flat = torch.cat([c.detach().reshape(-1).to(torch.float64) for c in self.center])
        self.sizes = [p.numel() for p in self.targets]

    def set(self, delta: torch.Tensor) -> None:
        """Put θ + ``delta`` into the parameters."""
        point = self.flat + delta.to(self.flat)
        with torch.no_grad():
            for p, chunk in zip(self.targets, torch.split(point, self.sizes)):
                p.copy_(chunk.view(p.shape))

    def reset(self) -> None:
        """Put θ back, exactly."""
        with torch.no_grad():
            torch._foreach_copy_(self.targets, self.center)


def _box(
    flat: torch.Tensor, epsilon: float, subspace_dim: int | None, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The subspace matrix (None in the full space) and the half-widths of the box on its coordinates."""
    if subspace_dim is None:
        return None, epsilon * (flat.abs() + 1.0)
    basis = random_subspace(flat.numel(), subspace_dim, seed=seed).to(flat.device)
    # A⁺θ is the least-squares solution of A c = θ (QR-based LAPACK, no dense pseudo-inverse).
    coords = torch.linalg.lstsq(basis, flat.to(basis.dtype).unsqueeze(1)).solution.squeeze(1)
    return basis, epsilon * (coords.to(torch.float64).abs() + 1.0)


def epsilon_sharpness(
    model: nn.Module,
    batches: Sequence[Any],
    batch_loss: BatchLoss,
    *,
    epsilon: float = 1e-3,
    steps: int = 20,
    step_size: float | None = None,
    subspace_dim: int | None = None,
    seed: int = 0,
    reduce: Reduce | None = None,
    progress: bool | None = False,
) -> EpsilonSharpness:
    """ε-sharpness of the loss at the model's weights, by projected sign-gradient ascent in the box.

    See the module docstring for the definition. Each step costs one gradient pass over ``batches``
    (``steps`` + 2 passes in all: the centre, the steps, the last iterate). The model is left exactly
    as it was.

    Args:
        model: the network; its trainable parameters are perturbed.
        batches: the batches of the loss (already on the model's device).
        batch_loss: see :data:`~lightning_landscape.data.BatchLoss`.
        epsilon: the box size (> 0), relative to ``|θ_i| + 1``.
        steps: gradient steps of the ascent (>= 1).
        step_size: the step as a fraction of the box half-width (default ``2.5 / steps``).
        subspace_dim: the dimension p of the random subspace (at most the number of weights);
            ``None``: the full weight space. A costs ``4 · n · p`` bytes on the model's device.
        seed: seeds the subspace and the random start (``torch.Generator``, not the global RNG).
        reduce: sums the per-process float64 sums across processes (None on one process).
        progress: a progress bar / log lines / nothing (see :func:`~lightning_landscape.progress.track`).

    Raises:
        ValueError: for a bad argument (naming it), or a non-finite loss at the weights.

    Example:
        >>> class Quadratic(nn.Module):  # L(x) = ½ Σ x_i², so the box's worst vertex is known
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.x = nn.Parameter(torch.tensor([1.0, -2.0]))
        ...     def forward(self):
        ...         return 0.5 * (self.x**2).sum()
        >>> batch_loss = lambda model, batch: (model(), 1, None, None)
        >>> result = epsilon_sharpness(Quadratic(), [None], batch_loss, epsilon=0.1)
        >>> worst = 0.5 * ((1 + 0.1 * 2) ** 2 + (2 + 0.1 * 3) ** 2)  # δ_i = ε(|x_i| + 1) sign(x_i)
        >>> round(result.value, 4) == round(100 * (worst - 2.5) / 3.5, 4)
        True
    """
    epsilon, steps, step_size, subspace_dim, seed = check_epsilon_args(epsilon, steps, step_size, subspace_dim, seed)
    params = trainable_parameters(model)
    num_params = sum(p.numel() for p in params.values())
    if subspace_dim is not None and subspace_dim > num_params:
        raise ValueError(
            f"`subspace_dim`={subspace_dim} is larger than the model's {num_params} trainable parameters; "
            f"expected an integer from 1 to {num_params}, or None for the full space."
        )
    batches = _autograd_ready(batches)
    with preserved_state(model) as state:
        model.eval()
        weights = FlatWeights(params, state.parameters)
        tensors = list(params.values())
        loss, _ = mean_loss_and_grad(model, tensors, batches, batch_loss, reduce, grad=False)
        if not math.isfinite(loss):
            raise ValueError(f"the loss at the model's weights is {loss}; ε-sharpness needs a finite loss.")
        basis, width = _box(weights.flat, epsilon, subspace_dim, seed)
        generator = torch.Generator(device="cpu").manual_seed(_stream_seeds(seed)[1])
        start = torch.rand(width.shape, generator=generator, dtype=torch.float64).to(width.device)
        z = (2.0 * start - 1.0) * width
        losses = _ascend(
            model, weights, tensors, batches, batch_loss, reduce, z, width, basis, step_size, steps, progress
        )
        weights.reset()
    max_loss = max([loss, *[v for v in losses if not math.isnan(v)]])
    value = 100.0 * (max_loss - loss) / (1.0 + loss)
    return EpsilonSharpness(value, loss, max_loss, np.asarray(losses, dtype=np.float64), step_size)


def _ascend(
    model: nn.Module,
    weights: FlatWeights,
    tensors: list[torch.Tensor],
    batches: list[Any],
    batch_loss: BatchLoss,
    reduce: Reduce | None,
    z: torch.Tensor,
    width: torch.Tensor,
    basis: torch.Tensor | None,
    step_size: float,
    steps: int,
    progress: bool | None,
) -> list[float]:
    """The projected sign-gradient ascent; the loss at every iterate (the last one without a gradient)."""
    losses: list[float] = []
    cost = f"{len(batches)} gradient pass(es)"
    for step in track(range(steps + 1), steps + 1, description="ε-sharpness", progress=progress, unit_cost=cost):
        last = step == steps
        weights.set(z if basis is None else _apply(basis, z))
        value, grad = mean_loss_and_grad(model, tensors, batches, batch_loss, reduce, grad=not last)
        losses.append(value)
        if last or not math.isfinite(value) or not bool(torch.isfinite(grad).all()):  # type: ignore[arg-type]
            break  # an infinite or NaN loss has no ascent direction; what was seen stands
        direction = grad if basis is None else (grad.to(basis.dtype) @ basis).to(torch.float64)
        z = torch.minimum(torch.maximum(z + step_size * width * torch.sign(direction), -width), width)
    return losses


def _apply(basis: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # A stays in float32 (a float64 copy would double its memory): δ = A y to float32 accuracy is
    # plenty for a perturbation, and θ + δ is still formed in float64.
    return (basis @ z.to(basis.dtype)).to(torch.float64)
