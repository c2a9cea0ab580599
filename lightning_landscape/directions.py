"""Random directions in weight space, normalized as in Li et al. (NeurIPS 2018).

A direction is a ``dict[str, Tensor]`` keyed by the model's trainable parameter
names, with each tensor shaped like its parameter. Filter normalization rescales
every filter d_{i,j} of the direction to the norm of the matching filter of the
weights, ``d_{i,j} <- d_{i,j} / ||d_{i,j}|| * ||θ_{i,j}||``, so that plots of
differently scaled networks are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping
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

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    direction: Direction = {}
    for name, p in params.items():
        # Drawn on CPU in float32 for every parameter, also ignored ones, so the stream
        # (and hence each tensor) does not depend on device, dtype or `ignore`.
        raw = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        direction[name] = raw.to(device=p.device, dtype=p.dtype)

    with torch.no_grad():
        for name, p in params.items():
            d = direction[name]
            if p.dim() <= 1 and ignore == "biasbn":
                d.zero_()
                continue
            if orthogonal_to is not None:
                _project_out(d, orthogonal_to[name].to(d), _unit_dims(p, norm))
            if norm in ("filter", "layer"):
                _rescale(d, p.detach(), _unit_dims(p, norm))
        if orthogonal_to is not None and norm in ("model", "none"):
            # Whole-vector projection: these norms treat the direction as one unit.
            names = [n for n in direction if not (params[n].dim() <= 1 and ignore == "biasbn")]
            dot = sum((direction[n].double() * orthogonal_to[n].to(direction[n]).double()).sum() for n in names)
            sq = sum((orthogonal_to[n].double() ** 2).sum() for n in names)
            if float(sq) > 0:
                for n in names:
                    direction[n].sub_((dot / sq).to(direction[n].dtype) * orthogonal_to[n].to(direction[n]))
        if norm == "model":
            names = [n for n in direction if not (params[n].dim() <= 1 and ignore == "biasbn")]
            d_norm = torch.sqrt(sum((direction[n].double() ** 2).sum() for n in names))
            w_norm = torch.sqrt(sum((params[n].detach().double() ** 2).sum() for n in names))
            scale = w_norm / d_norm if float(d_norm) > 0 else torch.zeros((), dtype=torch.float64)
            for n in names:
                direction[n].mul_(scale.to(device=direction[n].device, dtype=direction[n].dtype))
    return direction


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
