"""All the sharpness numbers at the model's weights in one :class:`~lightning_landscape.results.SharpnessReport`.

:func:`sharpness` runs, inside one state guard and over one set of cached batches: the Hessian's
λmax and trace (optional, :func:`~lightning_landscape.hessian.hessian_check`), the ε-sharpness
(:mod:`~lightning_landscape.sharpness.epsilon`), the basin radius along ``num_directions`` random
directions, the loss rise at fixed radii and the log basin volume
(:mod:`~lightning_landscape.sharpness.basin`). :func:`~lightning_landscape.plots.plot_basin_radii` draws the radii.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import MAX_SEED, check_choice, check_positive_float, check_positive_int
from lightning_landscape.batchnorm import BN_POLICIES
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce, model_device
from lightning_landscape.directions import IGNORES, NORMS, random_direction
from lightning_landscape.hessian import HessianReport, hessian_check
from lightning_landscape.hessian.check import resolve_batch_loss
from lightning_landscape.params import check_finite_weights, trainable_parameters
from lightning_landscape.results.sharpness import SharpnessReport
from lightning_landscape.sharpness.basin import BasinRadii, basin_radii, log_basin_volume
from lightning_landscape.sharpness.epsilon import EpsilonSharpness, check_epsilon_args, epsilon_sharpness
from lightning_landscape.state import preserved_state
from lightning_landscape.surface import GridEvaluator


def _check_radii(radii: Any) -> tuple[float, ...]:
    try:
        values = tuple(float(r) for r in radii)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`radii`={radii!r} is not valid; expected a sequence of finite numbers > 0.") from err
    if any(not (math.isfinite(r) and r > 0) for r in values):
        raise ValueError(f"`radii`={radii!r} is not valid; expected a sequence of finite numbers > 0.")
    return values


def check_sharpness_args(
    *,
    epsilon: Any = 1e-3,
    steps: Any = 20,
    step_size: Any = None,
    subspace_dim: Any = None,
    num_directions: Any = 10,
    threshold: Any = None,
    rise: Any = 0.1,
    radii: Any = (0.25, 0.5, 1.0),
    initial_radius: Any = 0.05,
    max_radius: Any = 10.0,
    rtol: Any = 1e-3,
    norm: Any = "filter",
    ignore: Any = "biasbn",
    bn: Any = "eval",
    seed: Any = 0,
) -> dict[str, Any]:
    """The checked settings of :func:`sharpness` (those that need no model); ``ValueError`` naming a bad one.

    Example:
        >>> check_sharpness_args(num_directions=3)["step_size"]
        0.125
        >>> check_sharpness_args(num_directions=0)
        Traceback (most recent call last):
            ...
        ValueError: `num_directions`=0 is not valid; expected an integer >= 1.
    """
    epsilon, steps, step_size, subspace_dim, seed = check_epsilon_args(epsilon, steps, step_size, subspace_dim, seed)
    num_directions = check_positive_int("num_directions", num_directions)
    if seed + num_directions - 1 > MAX_SEED:
        raise ValueError(f"`seed`={seed} is too large for {num_directions} directions; expected at most {MAX_SEED}.")
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float, np.number))
        or not math.isfinite(threshold)
    ):
        raise ValueError(f"`threshold`={threshold!r} is not valid; expected a finite number or None.")
    initial_radius = check_positive_float("initial_radius", initial_radius)
    max_radius = check_positive_float("max_radius", max_radius)
    if max_radius < initial_radius:
        raise ValueError(
            f"`max_radius`={max_radius!r} is not valid; expected a number >= `initial_radius`={initial_radius!r}."
        )
    rtol = check_positive_float("rtol", rtol)
    if rtol >= 1:
        raise ValueError(f"`rtol`={rtol!r} is not valid; expected a number in (0, 1).")
    return {
        "epsilon": epsilon,
        "steps": steps,
        "step_size": step_size,
        "subspace_dim": subspace_dim,
        "num_directions": num_directions,
        "threshold": None if threshold is None else float(threshold),
        "rise": check_positive_float("rise", rise),
        "radii": _check_radii(radii),
        "initial_radius": initial_radius,
        "max_radius": max_radius,
        "rtol": rtol,
        "norm": check_choice("norm", norm, NORMS),
        "ignore": check_choice("ignore", ignore, IGNORES),
        "bn": check_choice("bn", bn, BN_POLICIES),
        "seed": seed,
    }


def sharpness(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batch_loss: BatchLoss | None = None,
    epsilon: float = 1e-3,
    steps: int = 20,
    step_size: float | None = None,
    subspace_dim: int | None = None,
    num_directions: int = 10,
    threshold: float | None = None,
    rise: float = 0.1,
    radii: Sequence[float] = (0.25, 0.5, 1.0),
    initial_radius: float = 0.05,
    max_radius: float = 10.0,
    rtol: float = 1e-3,
    norm: str = "filter",
    ignore: str = "biasbn",
    hessian: bool = True,
    bn: str = "eval",
    seed: int = 0,
    num_batches: int | None = None,
    progress: bool | None = None,
    reduce: Reduce | None = None,
    agree: Callable[[Any], Any] | None = None,
) -> SharpnessReport:
    """Sharpness and basin numbers of the loss at the model's current weights.

    The loss is the sample-weighted mean over ``data`` (cached once on the model's device). The
    model is left exactly as it was (weights, buffers, ``.grad``, modes, RNG states).

    * ε-sharpness (Keskar et al. 2017) by ``steps`` projected sign-gradient ascent steps in the box
      ``|δ_i| <= ε(|θ_i| + 1)`` (or in a random ``subspace_dim``-dimensional subspace), eval mode
      (stored BatchNorm statistics, no dropout) whatever ``bn`` says; see
      :func:`~lightning_landscape.sharpness.epsilon_sharpness`.
    * Basin radius along ``num_directions`` random directions (seeds ``seed, ..., seed + m − 1``,
      normalized by ``norm``, ``ignore`` as in :func:`~lightning_landscape.random_direction`): where
      the loss first exceeds ``threshold`` (default ``center_loss + rise``), by doubling from
      ``initial_radius`` up to ``max_radius`` and bisection to ``rtol``; in direction units and in
      weight-space units ``‖r d‖``. The basin losses are taken with the BatchNorm policy ``bn``.
    * The mean loss rise ``mean_i L(θ + r d_i) − L(θ)`` at each of ``radii`` (direction units).
    * ``log V = log ω_n + log mean_i ‖r_i d_i‖^n`` (Huang et al. 2019), n the number of weights the
      directions move (see :mod:`~lightning_landscape.sharpness.basin` for what it measures).
    * With ``hessian=True``: λmax and the trace, by ``hessian_check(trace=True, lambda_min=False)``.

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; or pass ``batch_loss``.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)`` for ``loss_fn``.
        batch_loss: ``batch_loss(model, batch) -> (mean_loss, n, outputs, targets)``.
        epsilon, steps, step_size, subspace_dim: the ε-box and its ascent.
        num_directions, threshold, rise, initial_radius, max_radius, rtol, norm, ignore: the basin.
        radii: the radii of the loss rise (direction units).
        hessian: also compute λmax and the trace.
        bn: ``"eval"`` or ``"recompute"`` (see :class:`~lightning_landscape.surface.GridEvaluator`).
        seed: seeds the subspace, the start of the ascent, the directions and the Hessian probes.
        num_batches: use at most this many batches of ``data``.
        progress: a progress bar / log lines / nothing (True / None / False).
        reduce, agree: the DDP collectives (see :func:`~lightning_landscape.hessian.hessian_check`).

    Raises:
        ValueError: for a bad argument, before any data is read (``epsilon`` <= 0, ``num_directions``
            < 1, ...); a non-finite loss at the weights; a ``threshold`` not above the loss at the
            weights (with both values in the message).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(4, 1)
        >>> data = [(torch.randn(16, 4), torch.randn(16, 1))]
        >>> report = sharpness(model, data, loss_fn=nn.functional.mse_loss, num_directions=3, hessian=False)
        >>> report.eps_sharpness > 0, report.basin_radii.shape, sorted(report.scalars())[:3]
        (True, (3,), ['basin_radius_mean', 'basin_radius_min', 'eps_sharpness'])
    """
    batch_loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    settings = check_sharpness_args(
        epsilon=epsilon, steps=steps, step_size=step_size, subspace_dim=subspace_dim, num_directions=num_directions,
        threshold=threshold, rise=rise, radii=radii, initial_radius=initial_radius, max_radius=max_radius, rtol=rtol,
        norm=norm, ignore=ignore, bn=bn, seed=seed,
    )  # fmt: skip
    check_positive_int("num_batches", num_batches, allow_none=True)
    params = trainable_parameters(model)
    check_finite_weights(params)
    num_params = sum(p.numel() for p in params.values())
    if settings["subspace_dim"] is not None and settings["subspace_dim"] > num_params:
        raise ValueError(
            f"`subspace_dim`={settings['subspace_dim']} is larger than the model's {num_params} trainable "
            f"parameters; expected an integer from 1 to {num_params}, or None for the full space."
        )
    start = time.perf_counter()
    evaluator = GridEvaluator(
        data, batch_loss, device=model_device(model), num_batches=num_batches, reduce=reduce, bn=settings["bn"]
    )
    with preserved_state(model):
        hess = None
        if hessian:
            hess = hessian_check(
                model, evaluator.batches, batch_loss=batch_loss, lambda_min=False, trace=True,
                seed=settings["seed"], reduce=reduce, agree=agree,
            )  # fmt: skip
        eps = epsilon_sharpness(
            model, evaluator.batches, batch_loss, epsilon=settings["epsilon"], steps=settings["steps"],
            step_size=settings["step_size"], subspace_dim=settings["subspace_dim"], seed=settings["seed"],
            reduce=reduce, progress=progress,
        )  # fmt: skip
        basin, used_threshold = _basin(model, evaluator, settings, progress)
    metadata = {
        "kind": "sharpness",
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()},
        "hessian": bool(hessian),
        "num_params": num_params,
        "num_samples": evaluator.num_samples,
        "num_batches": len(evaluator.batches),
        **_versions.collect(),
    }
    return _report(eps, basin, used_threshold, hess, settings, metadata, time.perf_counter() - start)


def _report(
    eps: EpsilonSharpness,
    basin: BasinRadii,
    threshold: float,
    hess: HessianReport | None,
    settings: dict[str, Any],
    metadata: dict[str, Any],
    seconds: float,
) -> SharpnessReport:
    """The report from the parts' results."""
    metadata = {
        **metadata,
        "basin_evaluations": basin.evaluations,
        "basin_direction_norms": basin.direction_norms.tolist(),
    }
    if hess is not None:
        metadata.update(hessian_num_hvp=hess.num_hvp, hessian_converged=hess.metadata.get("converged"))
    return SharpnessReport(
        loss=eps.loss,
        eps_sharpness=eps.value,
        max_loss=eps.max_loss,
        ascent_losses=eps.losses,
        basin_radii=basin.radii,
        basin_weight_radii=basin.weight_radii,
        basin_capped=basin.capped,
        threshold=threshold,
        basin_center_loss=basin.center_loss,
        log_basin_volume=log_basin_volume(basin.weight_radii, basin.num_moved) if basin.num_moved else None,
        num_moved=basin.num_moved,
        radii=np.asarray(settings["radii"], dtype=np.float64),
        loss_at_radii=basin.loss_at_radii,
        lambda_max=None if hess is None else hess.lambda_max,
        trace=None if hess is None else hess.trace,
        trace_stderr=None if hess is None else hess.trace_stderr,
        seconds=seconds,
        metadata=metadata,
    )


def _basin(
    model: nn.Module, evaluator: GridEvaluator, settings: dict[str, Any], progress: bool | None
) -> tuple[BasinRadii, float]:
    """The directions, the centre loss, the threshold (checked) and the radii (inside the guard)."""
    directions = [
        random_direction(model, norm=settings["norm"], ignore=settings["ignore"], seed=settings["seed"] + i)
        for i in range(settings["num_directions"])
    ]
    center = evaluator.evaluate(model)["loss"]
    if not math.isfinite(center):
        raise ValueError(f"the loss at the model's weights is {center}; a basin needs a finite loss.")
    threshold = settings["threshold"] if settings["threshold"] is not None else center + settings["rise"]
    if not threshold > center:
        raise ValueError(
            f"`threshold`={threshold!r} is not above the loss at the weights ({center!r}); expected a threshold "
            "above it (or threshold=None and a `rise` > 0 above the centre loss)."
        )
    basin = basin_radii(
        model, evaluator, directions, threshold, center_loss=center, radii=settings["radii"],
        initial_radius=settings["initial_radius"], max_radius=settings["max_radius"], rtol=settings["rtol"],
        progress=progress,
    )  # fmt: skip
    return basin, float(threshold)
