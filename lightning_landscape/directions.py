"""Random directions in weight space, normalized as in Li et al. (NeurIPS 2018).

A direction is a ``dict[str, Tensor]`` keyed by the model's trainable parameter
names, with each tensor shaped like its parameter. Filter normalization rescales
every filter d_{i,j} of the direction to the norm of the matching filter of the
weights, ``d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||θ_{i,j}||``, so that plots of
differently scaled networks are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import torch
from torch import nn

from lightning_landscape._validation import check_choice, short_list
from lightning_landscape.params import trainable_parameters

Direction = dict[str, torch.Tensor]
Norm = Literal["filter", "layer", "model", "none"]
Ignore = Literal["biasbn", "none"]
NORMS: tuple[str, ...] = ("filter", "layer", "model", "none")
IGNORES: tuple[str, ...] = ("biasbn", "none")


def random_direction(
    model: nn.Module,
    *,
    norm: Norm = "filter",
    ignore: Ignore = "biasbn",
    seed: int = 0,
    orthogonal_to: Mapping[str, torch.Tensor] | None = None,
) -> Direction:
    """Draw a Gaussian direction for ``model``'s trainable parameters and normalize it.

    Args:
        model: the network; its current weights θ set the scale of the direction.
        norm: ``"filter"`` rescales each slice along dim 0 of every parameter
            with >= 2 dims (a conv filter, a linear row) to the norm of the same
            slice of θ; ``"layer"`` rescales each tensor to ||θ||; ``"model"``
            rescales the whole direction to the norm of all trainable weights;
            ``"none"`` keeps the raw Gaussian. A zero-norm filter gets a zero
            direction.
        ignore: ``"biasbn"`` gives 1-D parameters (biases, BatchNorm/LayerNorm
            affine) a zero direction; ``"none"`` normalizes each of them as one
            filter.
        seed: seeds a CPU ``torch.Generator``; the same seed gives the same
            direction on every process and device.
        orthogonal_to: another direction; the new one is made orthogonal to it
            before normalizing. The projection is taken per normalization unit
            (per filter for ``"filter"``, per tensor for ``"layer"``), so the
            rescaling keeps the two directions exactly orthogonal.

    Raises:
        ValueError: on an unknown ``norm`` or ``ignore``, a model without
            trainable parameters, or an ``orthogonal_to`` that does not match.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> d = random_direction(model, seed=1)
        >>> torch.allclose(d["weight"].norm(dim=1), model.weight.norm(dim=1))
        True
        >>> d["bias"].abs().sum().item()
        0.0
    """
    check_choice("norm", norm, NORMS)
    check_choice("ignore", ignore, IGNORES)
    params = trainable_parameters(model)
    if orthogonal_to is not None:
        check_direction("orthogonal_to", orthogonal_to, params)
    weights = {n: p.detach() for n, p in params.items()}
    other = None if orthogonal_to is None else (lambda: (orthogonal_to[n] for n in weights))
    scalars = direction_scalars(weights, norm=norm, ignore=ignore, seed=seed, other=other)
    return dict(direction_stream(weights, norm=norm, ignore=ignore, seed=seed, other=other, scalars=scalars))


OtherStream = Callable[[], Iterator[torch.Tensor]]


def direction_stream(
    weights: Mapping[str, torch.Tensor],
    *,
    norm: str,
    ignore: str,
    seed: int,
    other: OtherStream | None,
    scalars: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of :func:`random_direction` one parameter at a time, in the parameters' order.

    ``weights`` are θ* (they set the scale); ``other()`` yields the tensors of the direction to be
    orthogonal to, in the same order. ``scalars`` are the whole-direction factors of
    :func:`direction_scalars` (for ``norm`` ``"model"``/``"none"``): this is the one place a
    direction is built, so a direction streamed again per grid point (``memory="low"``) is bit
    for bit the stored one.

    Example:
        >>> w = {"w": torch.ones(2, 3)}
        >>> [(n, d.shape) for n, d in direction_stream(w, norm="filter", ignore="biasbn", seed=0, other=None)]
        [('w', torch.Size([2, 3]))]
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    others = None if other is None else other()
    projection, scale = scalars
    # No torch.no_grad() in here: a context held across `yield` would switch grad mode off for the
    # caller between items (and for good, when two streams interleave). Every input is detached
    # instead, so no op here records a graph whatever the grad mode.
    for name, p in weights.items():
        p = p.detach()
        # Drawn on CPU in float32 for every parameter, also ignored ones, so the stream
        # (and hence each tensor) does not depend on device, dtype or `ignore`.
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        o = None if others is None else next(others).detach().to(d)
        if _ignored(p, ignore):
            yield name, d.zero_()
            continue
        if o is not None:
            _project_out(d, o, _unit_dims(p, norm))
        if norm in ("filter", "layer"):
            _rescale(d, p, _unit_dims(p, norm))
        if projection is not None and o is not None:
            d.sub_(projection.to(d.dtype) * o)
        if scale is not None:
            d.mul_(scale.to(device=d.device, dtype=d.dtype))
        yield name, d


def direction_scalars(
    weights: Mapping[str, torch.Tensor], *, norm: str, ignore: str, seed: int, other: OtherStream | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The whole-direction factors of :func:`direction_stream`: the projection onto ``other`` and the
    rescaling to ‖θ‖, each ``None`` where ``norm`` has none; one or two extra streams to compute.

    ``"model"`` and ``"none"`` treat the direction as one unit, so their orthogonalization (a
    whole-vector projection, after the per-tensor one) and ``"model"``'s rescaling need sums over
    every parameter before any tensor is final.

    Example:
        >>> w = {"w": torch.ones(2, 3)}
        >>> direction_scalars(w, norm="filter", ignore="biasbn", seed=0, other=None)
        (None, None)
    """
    if norm not in ("model", "none"):
        return None, None
    kept = [n for n, p in weights.items() if not _ignored(p, ignore)]
    projection = None
    if other is not None:
        dot: torch.Tensor | int = 0
        sq: torch.Tensor | int = 0
        for (name, d), o in zip(direction_stream(weights, norm=norm, ignore=ignore, seed=seed, other=other), other()):
            if name in kept:
                o = o.detach()
                dot = dot + (d.double() * o.to(d).double()).sum()
                sq = sq + (o.double() ** 2).sum()
        if float(sq) > 0:
            projection = dot / sq
    if norm == "none":
        return projection, None
    d_sq: torch.Tensor | int = 0
    for name, d in direction_stream(
        weights, norm=norm, ignore=ignore, seed=seed, other=other, scalars=(projection, None)
    ):
        if name in kept:
            d_sq = d_sq + (d.double() ** 2).sum()
    w_norm = torch.sqrt(sum((weights[n].detach().double() ** 2).sum() for n in kept))
    d_norm = torch.sqrt(d_sq)
    scale = w_norm / d_norm if float(d_norm) > 0 else torch.zeros((), dtype=torch.float64)
    return projection, scale


def _ignored(p: torch.Tensor, ignore: str) -> bool:
    """Whether ``p`` gets a zero direction: a 1-D parameter (bias, norm affine) under ``ignore="biasbn"``."""
    return p.dim() <= 1 and ignore == "biasbn"


def _unit_dims(p: torch.Tensor, norm: str) -> tuple[int, ...]:
    """The dims to reduce over for one normalization unit of ``p``."""
    if norm == "filter" and p.dim() >= 2:
        return tuple(range(1, p.dim()))  # one unit per slice along dim 0
    return tuple(range(p.dim()))  # the whole tensor is one unit


def _rescale(d: torch.Tensor, weight: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not dims:  # a 0-dim parameter
        d_norm, w_norm = d.abs(), weight.abs()
    else:
        d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(weight, dim=dims, keepdim=True)
    # A zero-norm unit (of the direction or the weights) gets a zero direction, never NaN.
    scale = torch.where(
        d_norm > 0, w_norm / torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm)), torch.zeros_like(d_norm)
    )
    d.mul_(scale)


def _project_out(d: torch.Tensor, other: torch.Tensor, dims: tuple[int, ...]) -> None:
    if not dims:
        return
    dot = (d * other).sum(dim=dims, keepdim=True)
    sq = (other * other).sum(dim=dims, keepdim=True)
    d.sub_(torch.where(sq > 0, dot / torch.where(sq > 0, sq, torch.ones_like(sq)), torch.zeros_like(sq)) * other)


def check_direction(name: str, direction: object, params: Mapping[str, torch.Tensor]) -> None:
    """Check that ``direction`` has exactly the keys and shapes of ``params``.

    Raises:
        ValueError: naming the argument, the mismatching keys or shapes.

    Example:
        >>> params = {"w": torch.zeros(2, 3)}
        >>> check_direction("d", {"w": torch.ones(2, 3)}, params)  # a match returns None
        >>> check_direction("d", {"w": torch.ones(3)}, params)
        Traceback (most recent call last):
            ...
        ValueError: `d['w']` has shape (3,); expected (2, 3), the parameter's shape.
    """
    if not isinstance(direction, Mapping):
        raise ValueError(
            f"`{name}` is a {type(direction).__name__}; expected a dict of tensors keyed by parameter name."
        )
    missing = [k for k in params if k not in direction]
    extra = [k for k in direction if k not in params]
    if missing or extra:
        raise ValueError(
            f"`{name}` does not match the model's trainable parameters: missing {short_list(missing)}, "
            f"unexpected {short_list(extra)}; expected the keys {short_list(list(params))}."
        )
    for key, p in params.items():
        d = direction[key]
        if not isinstance(d, torch.Tensor) or d.shape != p.shape:
            shape = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
            raise ValueError(f"`{name}[{key!r}]` has shape {shape}; expected {tuple(p.shape)}, the parameter's shape.")
