"""Directions kept as their recipe (seed, normalization) and rebuilt per grid point: ``memory="low"``.

A 2-D surface with stored directions holds three model copies beside the model: θ*, δ and η.
With :class:`SeededDirection` recipes and ``loss_surface(..., memory="low")`` it holds θ* only:
:class:`SeededPlane` writes θ* + αδ + βη one parameter at a time, drawing that parameter's slice
of δ and η again from their seeds (:func:`~lightning_landscape.directions.direction_stream`,
the code that builds stored directions too, so the values are bit for bit the same).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_landscape._validation import check_choice
from lightning_landscape.directions import IGNORES, NORMS, Direction, direction_scalars, direction_stream
from lightning_landscape.params import Plane, trainable_parameters


@dataclass(frozen=True)
class SeededDirection:
    """The recipe of a :func:`~lightning_landscape.random_direction`: the same arguments, no tensors.

    Args:
        seed, norm, ignore: as in :func:`~lightning_landscape.random_direction`.
        orthogonal_to: another recipe; the direction is made orthogonal to it as
            ``random_direction(..., orthogonal_to=...)`` does.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> first = SeededDirection(seed=0)
        >>> second = SeededDirection(seed=1, orthogonal_to=first)
        >>> from lightning_landscape import random_direction
        >>> stored = random_direction(model, seed=1, orthogonal_to=random_direction(model, seed=0))
        >>> torch.equal(second.materialize(model)["weight"], stored["weight"])
        True
    """

    seed: int = 0
    norm: str = "filter"
    ignore: str = "biasbn"
    orthogonal_to: SeededDirection | None = None

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        check_choice("ignore", self.ignore, IGNORES)
        if self.orthogonal_to is not None and not isinstance(self.orthogonal_to, SeededDirection):
            raise ValueError(
                f"`orthogonal_to`={self.orthogonal_to!r} is not a SeededDirection; expected another recipe or None."
            )

    def bind(self, weights: Mapping[str, torch.Tensor]) -> BoundDirection:
        """This recipe at θ* = ``weights`` (detached tensors keyed like the trainable parameters)."""
        other = None if self.orthogonal_to is None else self.orthogonal_to.bind(weights)
        return BoundDirection(self, weights, other)

    def materialize(self, model: nn.Module) -> Direction:
        """The stored direction, equal to ``random_direction`` with the same arguments at the model's weights."""
        weights = {n: p.detach() for n, p in trainable_parameters(model).items()}
        return dict(self.bind(weights).stream())

    def describe(self) -> dict[str, object]:
        """Plain values for a result's metadata."""
        return {
            "seed": self.seed,
            "norm": self.norm,
            "ignore": self.ignore,
            "orthogonal_to": None if self.orthogonal_to is None else self.orthogonal_to.describe(),
        }


class BoundDirection:
    """A :class:`SeededDirection` at fixed weights θ*: its whole-direction factors computed once."""

    def __init__(
        self, recipe: SeededDirection, weights: Mapping[str, torch.Tensor], other: BoundDirection | None
    ) -> None:
        self.recipe, self.weights, self.other = recipe, weights, other
        self._scalars = direction_scalars(weights, **self._args(None))

    def _args(self, other_stream: Iterator[torch.Tensor] | None) -> dict:
        if self.other is None:
            other = None
        elif other_stream is not None:
            other = lambda: other_stream  # noqa: E731  # a stream shared with the caller, read once
        else:
            other = lambda: (d for _, d in self.other.stream())  # noqa: E731
        return {"norm": self.recipe.norm, "ignore": self.recipe.ignore, "seed": self.recipe.seed, "other": other}

    def stream(self, other: Iterator[torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` per parameter, in order; ``other`` reuses a stream of ``orthogonal_to``'s tensors."""
        return direction_stream(self.weights, scalars=self._scalars, **self._args(other))


class SeededPlane(Plane):
    """Writes θ* + Σ_k c_k d_k into the parameters, drawing each d_k again per point, one parameter at a time.

    A :class:`~lightning_landscape.params.Plane` giving the same values as one with the
    materialized directions, holding no direction: the extra memory is a few parameters' worth.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> params = trainable_parameters(model)
        >>> center = {n: p.detach().clone() for n, p in params.items()}
        >>> stored = SeededDirection(seed=0).materialize(model)  # at θ*
        >>> SeededPlane(params, center, [SeededDirection(seed=0)]).set([0.5])
        >>> moved = model.weight.detach().clone()
        >>> Plane(params, center, [stored]).set([0.5])
        >>> torch.equal(moved, model.weight)
        True
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        center: Mapping[str, torch.Tensor],
        directions: Sequence[SeededDirection],
    ) -> None:
        # Plane's targets and centre (its reset is this plane's too), but no stored directions.
        super().__init__(params, center, [])
        self.bound = [d.bind({n: center[n] for n in params}) for d in directions]

    @property
    def dims(self) -> int:
        """The number of directions."""
        return len(self.bound)

    def _streams(self) -> list[Iterator[torch.Tensor]]:
        streams = [(d for _, d in bound.stream()) for bound in self.bound]
        if len(self.bound) == 2 and self.bound[1].recipe.orthogonal_to == self.bound[0].recipe:
            # η orthogonal to δ: hand δ's tensor of each parameter to η's stream as it passes, instead
            # of drawing δ twice. (itertools.tee would hold every tensor it buffers until ~57 were read.)
            latest: list[torch.Tensor] = []
            deltas = streams[0]

            def first() -> Iterator[torch.Tensor]:
                for d in deltas:
                    latest.append(d)
                    yield d

            def relay() -> Iterator[torch.Tensor]:
                while latest:
                    yield latest.pop()

            streams = [first(), (d for _, d in self.bound[1].stream(other=relay()))]
        return streams

    def set(self, coefs: Sequence[float]) -> None:
        """Put the point θ* + Σ_k coefs[k]·d_k into the parameters."""
        streams = self._streams()
        with torch.no_grad():
            for target, center in zip(self.targets, self.center):
                steps = [next(s) for s in streams]
                # Single-tensor foreach calls: the same kernels as Plane's, so the same bits.
                torch._foreach_copy_([target], [center])
                for step, coef in zip(steps, coefs):
                    torch._foreach_add_([target], [step], alpha=float(coef))
