"""Curves in weight space between two trained networks (Garipov et al., 2018).

A :class:`Curve` joins fixed end points w₁ (t = 0) and w₂ (t = 1) through trainable
bends θ_1..θ_k. ``"bezier"``: the Bezier curve of degree k + 1 with control points
w₁, θ_1..θ_k, w₂, φ(t) = Σ_i C(k+1, i) t^i (1−t)^(k+1−i) P_i, which for one bend is
φ(t) = (1−t)² w₁ + 2t(1−t) θ + t² w₂. ``"polychain"``: the broken line through
w₁, θ_1..θ_k, w₂ at the knots t = i/(k+1). Only the model's trainable parameters
lie on the curve; BatchNorm running statistics are recomputed at each point instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_landscape._validation import check_choice, check_positive_int, short_list
from lightning_landscape.checkpoints import read_state_dict
from lightning_landscape.params import trainable_parameters

#: The accepted curve types.
CURVES = ("bezier", "polychain")


def check_curve(curve: Any, num_bends: Any) -> tuple[str, int]:
    """Validate a curve type and its number of bends (``ValueError`` naming the argument otherwise).

    Example:
        >>> check_curve("bezier", 1)
        ('bezier', 1)
        >>> check_curve("spline", 1)
        Traceback (most recent call last):
            ...
        ValueError: `curve`='spline' is not supported; accepted values: 'bezier', 'polychain'.
    """
    return check_choice("curve", curve, CURVES), check_positive_int("num_bends", num_bends)  # type: ignore[return-value]


def bezier_coefficients(t: float, num_bends: int) -> np.ndarray:
    """The Bernstein weights C(n, i) t^i (1−t)^(n−i), n = num_bends + 1, of the points w₁, θ_1..θ_k, w₂.

    Exact at the ends: t = 0 gives (1, 0, ..., 0), t = 1 gives (0, ..., 0, 1).

    Example:
        >>> bezier_coefficients(0.5, 1).tolist()  # (1−t)², 2t(1−t), t²
        [0.25, 0.5, 0.25]
    """
    n = num_bends + 1
    return np.array([math.comb(n, i) * t**i * (1.0 - t) ** (n - i) for i in range(n + 1)], dtype=np.float64)


def polychain_coefficients(t: float, num_bends: int) -> np.ndarray:
    """The weights of w₁, θ_1..θ_k, w₂ on the broken line with knots at t = i/(k+1).

    On the segment [i/(k+1), (i+1)/(k+1)] only points i and i+1 have weight: 1−s and s,
    with s = t(k+1) − i.

    Example:
        >>> polychain_coefficients(0.25, 1).tolist()  # halfway from w₁ to the bend
        [0.5, 0.5, 0.0]
    """
    scaled = t * (num_bends + 1)
    segment = min(int(math.floor(scaled)), num_bends)  # t = 1 belongs to the last segment
    s = scaled - segment
    coefs = np.zeros(num_bends + 2, dtype=np.float64)
    coefs[segment] = 1.0 - s
    coefs[segment + 1] = s
    return coefs


def curve_coefficients(curve: str, t: float, num_bends: int) -> np.ndarray:
    """The weights of the points w₁, θ_1..θ_k, w₂ at ``t`` for a ``"bezier"`` or ``"polychain"`` curve.

    Example:
        >>> curve_coefficients("polychain", 1.0, 2).tolist()
        [0.0, 0.0, 0.0, 1.0]
    """
    check_curve(curve, num_bends)
    if not (isinstance(t, (int, float, np.floating)) and 0.0 <= t <= 1.0):
        raise ValueError(f"`t`={t!r} is not valid; expected a number from 0 to 1.")
    t = float(t)
    return bezier_coefficients(t, num_bends) if curve == "bezier" else polychain_coefficients(t, num_bends)


def end_point(label: str, obj: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of an end point (``start`` or ``end``: a Lightning ``.ckpt`` path, a saved
    state dict's path, a state dict or a module), checked against ``model``'s architecture.

    Returns detached copies on the model's devices and dtypes, keyed by ``model``'s
    trainable parameter names.

    Raises:
        ValueError: for a missing or unexpected entry (named), or the first parameter whose
            shape differs, with both shapes.

    Example:
        >>> end_point("start", nn.Linear(2, 3), nn.Linear(3, 2))
        Traceback (most recent call last):
            ...
        ValueError: `start['weight']` has shape (3, 2), `model`'s has (2, 3); expected the architecture of `model`.
    """
    params = trainable_parameters(model)
    state = read_state_dict(obj, label)  # a .ckpt path, a saved state dict, a mapping or a module
    missing = [n for n in params if n not in state]
    known = set(model.state_dict()) | set(params)
    extra = [n for n in state if n not in known]
    if missing or extra:
        raise ValueError(
            f"`{label}` does not match the architecture of `model`: missing {short_list(missing)}, "
            f"unexpected {short_list(extra)}; expected a state dict or module with the parameters "
            f"{short_list(list(params))}."
        )
    out = {}
    for name, p in params.items():
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"`{label}[{name!r}]` is a {type(value).__name__}; expected a tensor.")
        if value.shape != p.shape:
            raise ValueError(
                f"`{label}[{name!r}]` has shape {tuple(value.shape)}, `model`'s has {tuple(p.shape)}; "
                "expected the architecture of `model`."
            )
        out[name] = value.detach().to(device=p.device, dtype=p.dtype, copy=True)
    return out


class Curve:
    """A curve φ(t), t ∈ [0, 1], from w₁ = φ(0) to w₂ = φ(1) through trainable bends.

    Build one with :meth:`between` (bends on the straight line) and train it with
    :func:`~lightning_landscape.connect.fit_curve`. The bends are leaf tensors that
    require grad, so ``weights(t)`` is differentiable in them.

    Attributes:
        kind: ``"bezier"`` or ``"polychain"``.
        start, end: the fixed end points, ``name -> tensor`` over the model's trainable parameters.
        bends: ``num_bends`` dicts ``name -> tensor``, the trainable control points.
        history: the fit's loss at each step (empty before a fit).
        settings: the fit's settings (empty before a fit).

    Example:
        >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
        >>> curve = Curve("bezier", a, b, [{"w": torch.tensor([0.5, 2.0])}])
        >>> curve.weights(0.5)["w"].tolist()  # 0.25·0 + 0.5·θ + 0.25·1
        [0.5, 1.25]
        >>> curve.point_count, torch.equal(curve.weights(1.0)["w"], b["w"])
        (3, True)
    """

    def __init__(
        self,
        kind: str,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        bends: Sequence[Mapping[str, torch.Tensor]],
    ) -> None:
        self.kind, self.num_bends = check_curve(kind, len(bends))
        self.names = list(start)
        for label, point in [("end", end)] + [(f"bends[{i}]", b) for i, b in enumerate(bends)]:
            if list(point) != self.names or any(point[n].shape != start[n].shape for n in self.names):
                raise ValueError(f"`{label}` does not have the keys and shapes of `start`; expected {self.names}.")
        self.start = {n: start[n].detach() for n in self.names}
        self.end = {n: end[n].detach() for n in self.names}
        self.bends = [{n: b[n].detach().clone().requires_grad_(True) for n in self.names} for b in bends]
        self.history: list[float] = []
        self.settings: dict[str, Any] = {}

    @classmethod
    def between(cls, model: nn.Module, start: Any, end: Any, *, curve: str = "bezier", num_bends: int = 1) -> Curve:
        """A curve from ``start`` to ``end`` (state dicts or modules shaped like ``model``), bends on the line.

        The bends start at θ_i = w₁ + (w₂ − w₁)·i/(k+1), so before training the curve is the segment.

        Example:
            >>> model = nn.Linear(1, 1, bias=False)
            >>> curve = Curve.between(model, {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)}, num_bends=3)
            >>> [b["weight"].item() for b in curve.bends]
            [0.25, 0.5, 0.75]
        """
        kind, num_bends = check_curve(curve, num_bends)
        w1, w2 = end_point("start", start, model), end_point("end", end, model)
        bends = [{n: torch.lerp(w1[n], w2[n], i / (num_bends + 1)) for n in w1} for i in range(1, num_bends + 1)]
        return cls(kind, w1, w2, bends)

    @property
    def point_count(self) -> int:
        """The number of control points: the two end points and the bends."""
        return self.num_bends + 2

    @property
    def points(self) -> list[dict[str, torch.Tensor]]:
        """The control points in order: w₁, θ_1..θ_k, w₂."""
        return [self.start, *self.bends, self.end]

    def parameters(self) -> list[torch.Tensor]:
        """The trainable tensors (every bend's), for an optimizer."""
        return [b[n] for b in self.bends for n in self.names]

    def coefficients(self, t: float) -> np.ndarray:
        """The weights of :attr:`points` at ``t`` (see :func:`curve_coefficients`)."""
        return curve_coefficients(self.kind, t, self.num_bends)

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        """φ(t) as ``name -> tensor``; differentiable in the bends (run under ``no_grad`` to evaluate only).

        A point with weight exactly 1 (t = 0, t = 1, a polychain knot) is returned as a copy of
        itself, so the end points come back bit for bit.
        """
        coefs = self.coefficients(t)
        points = self.points
        exact = np.flatnonzero(coefs == 1.0)
        if exact.size:
            return {n: points[int(exact[0])][n].clone() for n in self.names}
        # One foreach op per control point instead of one op per parameter tensor: the fit builds
        # this graph at every step, and for small networks the per-tensor Python calls would dominate.
        terms = [(float(c), [p[n] for n in self.names]) for c, p in zip(coefs, points) if c != 0.0]
        total = torch._foreach_mul(terms[0][1], terms[0][0])
        for c, tensors in terms[1:]:
            total = torch._foreach_add(total, tensors, alpha=c)
        return dict(zip(self.names, total))

    def line_weights(self, t: float) -> dict[str, torch.Tensor]:
        """The straight line (1−t)·w₁ + t·w₂ as ``name -> tensor`` (``torch.lerp``: exact at both ends)."""
        if not (isinstance(t, (int, float, np.floating)) and 0.0 <= t <= 1.0):
            raise ValueError(f"`t`={t!r} is not valid; expected a number from 0 to 1.")
        return {n: torch.lerp(self.start[n], self.end[n], float(t)) for n in self.names}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The bends as ``"bends.{i}.{name}" -> tensor`` (detached copies).

        Example:
            >>> curve = Curve("polychain", {"w": torch.zeros(1)}, {"w": torch.ones(1)}, [{"w": torch.ones(1)}])
            >>> list(curve.state_dict())
            ['bends.0.w']
        """
        return {f"bends.{i}.{n}": b[n].detach().clone() for i, b in enumerate(self.bends) for n in self.names}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the bends from a :meth:`state_dict` (same curve shape), in place."""
        expected = self.state_dict()
        if set(state) != set(expected):
            raise ValueError(
                f"`state` has the keys {short_list(sorted(state))}; expected {short_list(list(expected))}."
            )
        with torch.no_grad():
            for i, bend in enumerate(self.bends):
                for n in self.names:
                    value = state[f"bends.{i}.{n}"]
                    if value.shape != bend[n].shape:
                        raise ValueError(
                            f"`state['bends.{i}.{n}']` has shape {tuple(value.shape)}; expected {tuple(bend[n].shape)}."
                        )
                    bend[n].copy_(value)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the curve (type, end points, bends, fit history and settings) with ``torch.save``.

        Example:
            >>> import tempfile
            >>> curve = Curve("bezier", {"w": torch.zeros(1)}, {"w": torch.ones(1)}, [{"w": torch.full((1,), 3.0)}])
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = Curve.load(curve.save(Path(tmp) / "curve.pt"))
            >>> back.kind, back.bends[0]["w"].tolist()
            ('bezier', [3.0])
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "kind": self.kind,
            "start": self.start,
            "end": self.end,
            "bends": [{n: b[n].detach() for n in self.names} for b in self.bends],
            "history": list(map(float, self.history)),
            "settings": dict(self.settings),
        }
        torch.save(payload, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: Any = None) -> Curve:
        """Read a curve written by :meth:`save` (tensors only: ``weights_only`` loading)."""
        payload = torch.load(path, map_location=map_location, weights_only=True)
        curve = cls(payload["kind"], payload["start"], payload["end"], payload["bends"])
        curve.history = list(payload["history"])
        curve.settings = dict(payload["settings"])
        return curve

    def __repr__(self) -> str:
        size = sum(int(t.numel()) for t in self.start.values())
        return f"Curve(kind={self.kind!r}, num_bends={self.num_bends}, num_params={size})"
