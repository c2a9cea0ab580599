"""Evaluating a curve: loss along it and along the straight line, the barrier, and Garipov's plane.

Every point is evaluated by :class:`~lightning_landscape.GridEvaluator` in eval mode. A
point on a curve has no BatchNorm statistics of its own, so by default (``bn="recompute"``)
they are recomputed at every point with one pass over the evaluation data, as Garipov
et al. (2018) do; the model's own statistics come back afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import as_coordinate_array, check_choice, check_positive_int
from lightning_landscape.batchnorm import BN_POLICIES
from lightning_landscape.connect.curves import Curve
from lightning_landscape.connect.fit import check_fit_options, fit_curve
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce, make_batch_loss, model_device
from lightning_landscape.hessian.check import resolve_batch_loss
from lightning_landscape.params import Plane, trainable_parameters, unflatten_vector
from lightning_landscape.results import CurveResult, Landscape
from lightning_landscape.state import preserved_state
from lightning_landscape.surface.evaluator import GridEvaluator, as_metric_dict

_SUBSCRIPTS = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")
#: The default curve parameters: 61 points from w₁ to w₂.
DEFAULT_TS = np.linspace(0.0, 1.0, 61)


def check_ts(ts: Any) -> np.ndarray:
    """``ts`` as increasing float64 values from exactly 0 to exactly 1 (an int n gives n evenly spaced).

    The barrier is measured against the end points, so both must be evaluated.

    Example:
        >>> check_ts(3).tolist()
        [0.0, 0.5, 1.0]
        >>> check_ts([0.0, 0.5])
        Traceback (most recent call last):
            ...
        ValueError: `ts`=[0.0, 0.5] is not valid; expected increasing values from 0 to 1, both included.
    """
    if isinstance(ts, (int, np.integer)) and not isinstance(ts, bool):
        if ts < 2:
            raise ValueError(f"`ts`={ts!r} is not valid; expected at least 2 points, or an array from 0 to 1.")
        return np.linspace(0.0, 1.0, int(ts))
    array = as_coordinate_array("ts", ts)
    if array.size < 2 or array[0] != 0.0 or array[-1] != 1.0 or np.any(np.diff(array) <= 0):
        raise ValueError(
            f"`ts`={array.tolist()!r} is not valid; expected increasing values from 0 to 1, both included."
        )
    return array


def _curve_params(model: nn.Module, curve: Curve) -> dict[str, nn.Parameter]:
    if not isinstance(curve, Curve):
        raise ValueError(f"`curve` is a {type(curve).__name__}; expected a Curve (see fit_curve).")
    params = trainable_parameters(model)
    if list(params) != curve.names or any(params[n].shape != curve.start[n].shape for n in params):
        raise ValueError(
            "`curve` was built for another architecture than `model`; expected the trainable parameters "
            f"{list(params)[:5]} with the shapes of `model`."
        )
    return params


def _along(
    model: nn.Module,
    evaluator: GridEvaluator,
    params: Mapping[str, torch.Tensor],
    ts: np.ndarray,
    weights: Callable[[float], Mapping[str, torch.Tensor]],
    progress: bool | None,
    description: str,
) -> Landscape:
    landscape = Landscape.empty([ts], evaluator.metrics, {"kind": description})

    def set_point(idx: tuple[int, ...]) -> None:
        with torch.no_grad():
            for name, value in weights(float(ts[idx[0]])).items():
                params[name].copy_(value)

    return evaluator.run(model, landscape, set_point, progress=progress, description=description)


def curve_result_from_evaluator(
    model: nn.Module, curve: Curve, evaluator: GridEvaluator, ts: Any = DEFAULT_TS, *, progress: bool | None = None
) -> CurveResult:
    """:func:`evaluate_curve` with a ready :class:`~lightning_landscape.GridEvaluator`.

    Example:
        >>> model = nn.Linear(1, 1, bias=False)
        >>> curve = Curve.between(model, {"weight": torch.zeros(1, 1)}, {"weight": torch.ones(1, 1)})
        >>> ev = GridEvaluator([(torch.ones(2, 1), torch.zeros(2, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> curve_result_from_evaluator(model, curve, ev, [0.0, 0.5, 1.0]).line["loss"].tolist()
        [0.0, 0.25, 1.0]
    """
    ts = check_ts(ts)
    params = _curve_params(model, curve)
    with preserved_state(model):
        on_curve = _along(model, evaluator, params, ts, curve.weights, progress, "curve")
        on_line = _along(model, evaluator, params, ts, curve.line_weights, progress, "line")
    settings = {**curve.settings, "curve": curve.kind, "num_bends": curve.num_bends, "bn": evaluator.bn}
    metadata = {**_versions.collect(), "num_samples": evaluator.num_samples}
    return CurveResult(ts, on_curve.values, on_line.values, history=curve.history, settings=settings, metadata=metadata)


def evaluate_curve(
    model: nn.Module,
    curve: Curve,
    data: Iterable[Any],
    *,
    loss_fn: LossFn,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    ts: Any = DEFAULT_TS,
    bn: str = "recompute",
    num_batches: int | None = None,
    progress: bool | None = None,
    reduce: Reduce | None = None,
) -> CurveResult:
    """Loss and metrics along a curve and along the straight line between its end points, at the same t.

    Both paths move only the trainable parameters. With ``bn="recompute"`` (the default) the
    BatchNorm statistics are recomputed at every point with one pass over ``data``; with
    ``"eval"`` the model's own statistics are used everywhere (right only for a network
    without BatchNorm). ``model`` is left exactly as it was.

    Args:
        model: a module with the curve's architecture.
        curve: a :class:`Curve` (see :func:`fit_curve`).
        data, loss_fn, metrics, forward_fn, num_batches, progress: as in :func:`~lightning_landscape.loss_surface`.
        ts: increasing curve parameters from 0 to 1, both included (or a number of evenly spaced ones).
        bn: ``"recompute"`` or ``"eval"``.
        reduce: under ``torch.distributed``, a function summing a tensor over all processes, each
            passing its own shard of the data: the values are those of all shards together (see
            :class:`~lightning_landscape.GridEvaluator`).

    Returns:
        a :class:`~lightning_landscape.results.CurveResult` with both barriers,
        max_t loss(t) − max(loss(0), loss(1)), and the curve's fit history.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> curve = Curve.between(model, nn.Linear(2, 1), nn.Linear(2, 1))
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> r = evaluate_curve(model, curve, data, loss_fn=nn.functional.mse_loss, ts=5, bn="eval", progress=False)
        >>> r.ts.tolist(), np.allclose(r.curve["loss"], r.line["loss"])  # an unfitted curve is the line
        ([0.0, 0.25, 0.5, 0.75, 1.0], True)
    """
    ts = check_ts(ts)
    check_choice("bn", bn, BN_POLICIES)
    _curve_params(model, curve)
    evaluator = GridEvaluator(
        data,
        make_batch_loss(loss_fn, forward_fn),
        metrics=metrics,
        device=model_device(model),
        num_batches=num_batches,
        bn=bn,
        reduce=reduce,
    )
    return curve_result_from_evaluator(model, curve, evaluator, ts, progress=progress)


def connect(
    model: nn.Module,
    start: Any,
    end: Any,
    data: Iterable[Any],
    *,
    loss_fn: LossFn,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    curve: str = "bezier",
    num_bends: int = 1,
    epochs: int = 10,
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
    num_batches: int | None = None,
    ts: Any = DEFAULT_TS,
    bn: str = "recompute",
    eval_data: Iterable[Any] | None = None,
    progress: bool | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> CurveResult:
    """Fit a curve from ``start`` to ``end`` (:func:`fit_curve`) and evaluate it (:func:`evaluate_curve`).

    Every option is checked before the fit starts. The curve is fitted on ``data`` and
    evaluated on ``eval_data`` (``data`` when ``None``); the fit options are those of
    :func:`fit_curve`, the evaluation options (``metrics``, ``ts``, ``bn``) those of
    :func:`evaluate_curve`; ``num_batches`` limits both.

    Example:
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> r = connect(nn.Linear(2, 1), nn.Linear(2, 1), nn.Linear(2, 1), data, loss_fn=nn.functional.mse_loss,
        ...             epochs=2, ts=3, bn="eval", progress=False)
        >>> r.history.shape, r.settings["epochs"], r.barrier_curve >= 0
        ((2,), 2, True)
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
    ts = check_ts(ts)
    check_choice("bn", bn, BN_POLICIES)
    as_metric_dict(metrics)
    fitted = fit_curve(
        model,
        start,
        end,
        data,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        curve=curve,
        num_bends=num_bends,
        epochs=epochs,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        seed=seed,
        num_batches=num_batches,
        progress=progress,
        on_step=on_step,
    )
    return evaluate_curve(
        model,
        fitted,
        data if eval_data is None else eval_data,
        loss_fn=loss_fn,
        metrics=metrics,
        forward_fn=forward_fn,
        ts=ts,
        bn=bn,
        num_batches=num_batches,
        progress=progress,
    )


def _flat(weights: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    # float64 on the CPU: the plane's coordinates are inner products over every weight.
    return torch.cat([weights[n].detach().reshape(-1).to("cpu", torch.float64) for n in names])


@dataclass
class PlaneBasis:
    """The plane through w₁, a bend θ and w₂: origin w₁ and an orthonormal basis (Gram-Schmidt).

    ``axes[0]`` points from w₁ to w₂; ``axes[1]`` is the part of θ − w₁ orthogonal to it,
    normalized. ``points`` holds the plane coordinates of w₁, θ, w₂: (0, 0), (x_θ, y_θ), (‖w₂ − w₁‖, 0).

    Example:
        >>> a, b, bend = {"w": torch.zeros(2)}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([1.0, 3.0])}
        >>> basis = plane_basis(Curve("bezier", a, b, [bend]))
        >>> basis.points.tolist()
        [[0.0, 0.0], [1.0, 3.0], [2.0, 0.0]]
    """

    origin: dict[str, torch.Tensor]
    axes: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
    points: np.ndarray
    bend_index: int

    @cached_property
    def _flat_basis(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        names = list(self.origin)
        return _flat(self.origin, names), _flat(self.axes[0], names), _flat(self.axes[1], names)

    def project(self, weights: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The plane coordinates (x, y) of ``weights`` (the orthogonal projection onto the plane)."""
        return self.project_with_offset(weights)[0]

    def project_with_offset(self, weights: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, float]:
        """The plane coordinates of ``weights`` and their distance from the plane."""
        origin, e1, e2 = self._flat_basis
        offset = _flat(weights, list(self.origin)) - origin
        x, y = float(offset @ e1), float(offset @ e2)
        return np.array([x, y]), float((offset - x * e1 - y * e2).norm())

    def point(self, x: float, y: float) -> dict[str, torch.Tensor]:
        """The weights w₁ + x·axes[0] + y·axes[1] (in float64)."""
        return {n: self.origin[n].double() + x * self.axes[0][n] + y * self.axes[1][n] for n in self.origin}


def plane_basis(curve: Curve) -> PlaneBasis:
    """Garipov's plane of ``curve``: through w₁, the bend (the middle one, index (k−1)//2, for k > 1) and w₂.

    Raises:
        ValueError: if w₁ = w₂ or the bend lies on the line through them (an unfitted curve).

    Example:
        >>> a, b, bend = {"w": torch.zeros(3)}, {"w": torch.tensor([4.0, 0, 0])}, {"w": torch.tensor([1.0, 2, 0])}
        >>> basis = plane_basis(Curve("polychain", a, b, [bend]))
        >>> basis.points[1].tolist(), basis.axes[1]["w"].tolist()
        ([1.0, 2.0], [0.0, 1.0, 0.0])
        >>> basis.project({"w": torch.tensor([3.0, 1.0, 5.0])}).tolist()  # the out-of-plane part is dropped
        [3.0, 1.0]
    """
    names = curve.names
    w1, w2 = _flat(curve.start, names), _flat(curve.end, names)
    bend_index = (curve.num_bends - 1) // 2
    theta = _flat(curve.bends[bend_index], names)
    u = w2 - w1
    if float(u.norm()) == 0.0:
        raise ValueError("the curve's end points are equal; the plane through them and the bend is not defined.")
    e1 = u / u.norm()
    v = theta - w1
    v_perp = v - (v @ e1) * e1
    if float(v_perp.norm()) <= 1e-7 * float(u.norm()):
        raise ValueError(
            "the curve's bend lies on the line through its end points (a curve not fitted yet?); "
            "the plane is not defined. Fit the curve first (fit_curve)."
        )
    e2 = v_perp / v_perp.norm()
    like = {n: curve.start[n].double() for n in names}
    axes = (unflatten_vector(e1, like), unflatten_vector(e2, like))
    points = np.array([[0.0, 0.0], [float(v @ e1), float(v_perp.norm())], [float(u.norm()), 0.0]])
    return PlaneBasis({n: curve.start[n] for n in names}, axes, points, bend_index)


def _plane_grid(covered: np.ndarray, resolution: int, margin: float) -> list[np.ndarray]:
    lo, hi = covered.min(axis=0), covered.max(axis=0)
    span = hi - lo
    return [np.linspace(lo[a] - margin * span[a], hi[a] + margin * span[a], resolution) for a in range(2)]


def curve_plane(
    model: nn.Module,
    curve: Curve,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    batch_loss: BatchLoss | None = None,
    resolution: int = 21,
    margin: float = 0.2,
    bn: str = "recompute",
    num_batches: int | None = None,
    curve_points: int = 61,
    progress: bool | None = None,
    reduce: Reduce | None = None,
) -> Landscape:
    """The loss over Garipov's plane through w₁, the bend and w₂ (see :func:`plane_basis`).

    The grid covers the three points and the curve's projection, with ``margin`` times their
    extent added on each side; each grid point w₁ + x·e₁ + y·e₂ is evaluated like a curve point
    (``bn="recompute"`` by default). ``model`` is left exactly as it was. The loss is ``loss_fn``
    (with ``forward_fn``) or a ready :data:`~lightning_landscape.data.BatchLoss`. Under
    ``torch.distributed`` each process passes its own shard of ``data`` and ``reduce`` (a sum over all
    processes, as for :class:`~lightning_landscape.GridEvaluator`).

    Returns:
        a 2-D :class:`~lightning_landscape.Landscape` (``kind`` ``"curve_plane"``) whose extras hold
        ``points`` (3 x 2: w₁, the bend, w₂), ``curve_path`` (the curve at ``curve_points`` values
        of t, projected), ``curve_ts`` and ``curve_offset`` (each curve point's distance from the
        plane: 0 for one bend). It saves and loads as any Landscape.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> curve = Curve.between(model, nn.Linear(2, 1), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = curve.bends[0]["bias"].add_(1.0)  # move the bend off the line
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> ls = curve_plane(model, curve, data, loss_fn=nn.functional.mse_loss, resolution=5, bn="eval",
        ...                  progress=False)
        >>> ls.loss.shape, ls.extras["points"].shape
        ((5, 5), (3, 2))
    """
    check_positive_int("resolution", resolution)
    check_positive_int("curve_points", curve_points)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < np.inf:
        raise ValueError(f"`margin`={margin!r} is not valid; expected a finite number >= 0.")
    check_choice("bn", bn, BN_POLICIES)
    loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    params = _curve_params(model, curve)
    basis = plane_basis(curve)
    curve_ts = np.linspace(0.0, 1.0, int(curve_points))
    with torch.no_grad():  # one curve point at a time: a list of them would hold curve_points copies of the model
        projected = [basis.project_with_offset(curve.weights(float(t))) for t in curve_ts]
    path = np.array([xy for xy, _ in projected])
    offset = np.array([distance for _, distance in projected])
    grid = _plane_grid(np.vstack([basis.points, path]), int(resolution), float(margin))
    evaluator = GridEvaluator(
        data,
        loss,
        metrics=metrics,
        device=model_device(model),
        num_batches=num_batches,
        bn=bn,
        reduce=reduce,
    )
    meta = {
        "kind": "curve_plane",
        "axis_labels": ["x (w₁ → w₂)", "y (towards the bend)"],
        "point_labels": ["w₁", "θ" + str(basis.bend_index + 1).translate(_SUBSCRIPTS), "w₂"],
        "resolution": int(resolution),
        "margin": float(margin),
        "bend_index": basis.bend_index,
        **{k: v for k, v in curve.settings.items() if k != "steps_per_epoch"},
        "curve": curve.kind,
        "num_bends": curve.num_bends,
        **_versions.collect(),
    }
    landscape = Landscape.empty(grid, evaluator.metrics, meta)
    landscape.extras.update(points=basis.points, curve_path=path, curve_ts=curve_ts, curve_offset=offset)
    with preserved_state(model):
        plane = Plane(params, basis.origin, list(basis.axes))
        evaluator.run(
            model,
            landscape,
            lambda idx: plane.set([grid[0][idx[0]], grid[1][idx[1]]]),
            progress=progress,
            description="curve plane",
        )
    landscape.metadata["bn"] = evaluator.bn
    return landscape
