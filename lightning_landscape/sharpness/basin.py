"""Basin radius along random directions, and the log volume of the basin (Huang et al., 2019).

Along each direction d the radius r is where the loss L(θ + r d) first exceeds a threshold:
r doubles from ``initial_radius`` until the loss exceeds it (at most ``max_radius``; a ray that
never leaves the basin is recorded at ``max_radius`` and flagged ``capped``), then bisection
narrows the crossing to ``rtol`` relative. A non-finite loss counts as outside the basin. If the
loss along the ray is not monotone, bisection returns *a* crossing inside the first doubling
bracket that contains one, not necessarily the first.

The volume of the basin is ``V = ω_n E_φ[r(φ)^n]`` with ``ω_n = π^{n/2} / Γ(n/2 + 1)`` the
volume of the unit n-ball and r(φ) the radius along the unit vector φ, in weight-space units
(``‖r d‖``). ``log V = log ω_n + log E[r^n]`` is computed in log space, ``log E[r^n] =
logsumexp(n log r_i) − log m``, so n in the millions neither overflows nor underflows.

n is the number of weights the directions move: entries that are nonzero in at least one
direction. With ``ignore="biasbn"`` biases and BatchNorm/LayerNorm weights get a zero direction and
are not counted: the volume is that of the basin's section through θ in the subspace of the other
weights. The mean over directions estimates E_φ for φ uniform on the sphere only with
``norm="none"`` (a Gaussian direction); filter-normalized directions (the default) weight
each layer by its own scale, so their "volume" is the same formula over a different distribution
of φ: comparable between models, not the Lebesgue volume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.special import logsumexp
from torch import nn

from lightning_landscape.params import Plane, trainable_parameters
from lightning_landscape.progress import track
from lightning_landscape.state import preserved_state
from lightning_landscape.surface import GridEvaluator

#: The most bisection steps along one ray: 2⁻⁶⁰ of the bracket is far below any float32 weight change.
MAX_BISECTIONS = 60


def basin_radius(
    loss_at: Callable[[float], float],
    threshold: float,
    *,
    initial_radius: float = 0.05,
    max_radius: float = 10.0,
    rtol: float = 1e-3,
) -> tuple[float, bool, int]:
    """The radius where ``loss_at(r)`` first exceeds ``threshold``: ``(radius, capped, evaluations)``.

    ``r`` doubles from ``initial_radius`` until ``loss_at(r) > threshold`` (NaN counts as
    above), capped at ``max_radius``: a ray that never exceeds it returns ``(max_radius, True, k)``.
    Then bisection until the bracket ``[lo, hi]`` is within ``rtol · hi``; the radius is its midpoint.
    ``loss_at(0)`` is taken to be below the threshold (it is not evaluated).

    Example:
        >>> r, capped, _ = basin_radius(lambda r: r**2, 2.0, rtol=1e-9)
        >>> round(r, 6), capped
        (1.414214, False)
        >>> basin_radius(lambda r: 0.0, 1.0, max_radius=1.0)[:2]
        (1.0, True)
    """
    lo, r, evaluations = 0.0, min(initial_radius, max_radius), 0
    while True:
        value = loss_at(r)
        evaluations += 1
        if not value <= threshold:  # above it, or NaN
            hi = r
            break
        lo = r
        if r >= max_radius:
            return max_radius, True, evaluations
        r = min(2.0 * r, max_radius)
    for _ in range(MAX_BISECTIONS):
        if hi - lo <= rtol * hi:
            break
        mid = 0.5 * (lo + hi)
        evaluations += 1
        if loss_at(mid) <= threshold:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi), False, evaluations


def log_unit_ball_volume(n: int) -> float:
    """``log ω_n = (n/2) log π − log Γ(n/2 + 1)``, the log volume of the unit n-ball.

    Example:
        >>> round(math.exp(log_unit_ball_volume(2)), 6), round(math.exp(log_unit_ball_volume(3)), 6)  # π, 4π/3
        (3.141593, 4.18879)
    """
    return 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n + 1.0)


def log_basin_volume(radii: Sequence[float] | np.ndarray, num_params: int) -> float:
    """``log V = log ω_n + log mean_i r_i^n`` for the radii ``r_i`` (weight-space units) in n = ``num_params`` dims.

    Computed as ``log ω_n + logsumexp(n log r_i) − log m``: finite for any n (``-inf`` when all
    radii are 0).

    Raises:
        ValueError: if ``radii`` is empty or holds negative or non-finite values, or ``num_params`` < 1.

    Example:
        >>> round(log_basin_volume([2.0, 2.0], 3), 6) == round(math.log(4 / 3 * math.pi * 2.0**3), 6)
        True
        >>> log_basin_volume([0.5] * 4, 10**6) < 0  # no overflow, no underflow
        True
    """
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"`radii`={r.tolist()!r} is not valid; expected at least one finite radius >= 0.")
    if isinstance(num_params, bool) or not isinstance(num_params, (int, np.integer)) or num_params < 1:
        raise ValueError(f"`num_params`={num_params!r} is not valid; expected an integer >= 1.")
    n = int(num_params)
    with np.errstate(divide="ignore"):  # log 0 = -inf is the right limit: a zero radius adds no volume
        log_r = np.log(r)
    return log_unit_ball_volume(n) + float(logsumexp(n * log_r)) - math.log(r.size)


class BasinRadii(NamedTuple):
    """What :func:`basin_radii` found, per direction.

    Attributes:
        radii: the radius along each direction, in units of the direction.
        weight_radii: the same in weight-space units, ``radii · ‖d‖``.
        capped: True where the loss never exceeded the threshold up to ``max_radius``.
        direction_norms: ``‖d‖`` of each direction (float64, over all trainable weights).
        center_loss: the loss at θ.
        loss_at_radii: ``L(θ + r d)`` for each direction (rows) and each of ``radii`` (columns).
        num_moved: the number of weights some direction moves (the n of the volume).
        evaluations: loss evaluations (passes over the data) spent.

    Example:
        >>> BasinRadii(np.ones(2), np.ones(2), np.zeros(2, bool), np.ones(2), 0.1, np.zeros((2, 0)), 5, 9).num_moved
        5
    """

    radii: np.ndarray
    weight_radii: np.ndarray
    capped: np.ndarray
    direction_norms: np.ndarray
    center_loss: float
    loss_at_radii: np.ndarray
    num_moved: int
    evaluations: int


def count_moved(directions: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """How many weights at least one of ``directions`` moves (entries nonzero in some direction).

    Example:
        >>> count_moved([{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([0.0, 2.0, 0.0])}])
        2
    """
    moved = 0
    for name in directions[0]:
        mask = torch.zeros(directions[0][name].shape, dtype=torch.bool, device=directions[0][name].device)
        for d in directions:
            mask |= d[name] != 0
        moved += int(mask.sum())
    return moved


def basin_radii(
    model: nn.Module,
    evaluator: GridEvaluator,
    directions: Sequence[Mapping[str, torch.Tensor]],
    threshold: float,
    *,
    center_loss: float,
    radii: Sequence[float] = (),
    initial_radius: float = 0.05,
    max_radius: float = 10.0,
    rtol: float = 1e-3,
    progress: bool | None = False,
) -> BasinRadii:
    """The basin radius along each direction (see :func:`basin_radius`) and the loss at ``radii``.

    Every loss is ``evaluator.evaluate`` at θ + r d (its BatchNorm policy, its ``reduce``); the
    model is left exactly as it was. ``threshold`` must be above ``center_loss``, the loss at θ
    (checked by the caller, :func:`~lightning_landscape.sharpness.sharpness`).

    Example:
        >>> from lightning_landscape.data import make_batch_loss
        >>> model = nn.Linear(1, 1, bias=False)
        >>> _ = model.weight.data.fill_(1.0)
        >>> ev = GridEvaluator([(torch.ones(1, 1), torch.ones(1, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> out = basin_radii(model, ev, [{"weight": torch.ones(1, 1)}], 0.25, center_loss=0.0, rtol=1e-6)
        >>> round(float(out.radii[0]), 4)  # (1 + r - 1)² = 0.25
        0.5
    """
    params = trainable_parameters(model)
    found: list[tuple[float, bool, int]] = []
    rows: list[list[float]] = []
    cost = (
        f"≈{math.ceil(math.log2(max_radius / initial_radius)) + math.ceil(-math.log2(rtol)) + len(radii)} evaluations"
    )
    with preserved_state(model) as state:
        for direction in track(
            directions, len(directions), description="basin radii", progress=progress, unit_cost=cost
        ):
            plane = Plane(params, state.parameters, [direction])

            def loss_at(r: float, plane: Any = plane) -> float:
                plane.set([r])
                return evaluator.evaluate(model)["loss"]

            found.append(
                basin_radius(loss_at, threshold, initial_radius=initial_radius, max_radius=max_radius, rtol=rtol)
            )
            rows.append([loss_at(float(r)) for r in radii])
            plane.reset()
    norms = np.array([math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values())) for d in directions])
    r = np.array([f[0] for f in found], dtype=np.float64)
    return BasinRadii(
        radii=r,
        weight_radii=r * norms,
        capped=np.array([f[1] for f in found], dtype=bool),
        direction_norms=norms,
        center_loss=float(center_loss),
        loss_at_radii=np.asarray(rows, dtype=np.float64).reshape(len(directions), len(radii)),
        num_moved=count_moved(directions),
        evaluations=sum(f[2] for f in found) + len(directions) * len(radii),
    )
