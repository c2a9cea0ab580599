"""The map of |λmin/λmax| of the Hessian over a plane of weights (Li et al., NeurIPS 2018, Fig. 7)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_landscape import _versions
from lightning_landscape._validation import (
    as_direction_list,
    as_grid_coords,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce
from lightning_landscape.directions import Direction, check_direction
from lightning_landscape.hessian.basis import BASIS_CHOICES
from lightning_landscape.hessian.check import basis_settings, resolve_batch_loss, seed_streams
from lightning_landscape.hessian.lanczos import lanczos_extremes
from lightning_landscape.hessian.operator import HessianOperator
from lightning_landscape.params import Plane, trainable_parameters
from lightning_landscape.results import Landscape
from lightning_landscape.state import preserved_state

#: The values of a ratio map besides the loss.
RATIO_VALUES = ("ratio", "lambda_max", "lambda_min")


def ratio_map(
    model: nn.Module,
    data: Iterable[Any],
    directions: Direction | Sequence[Direction],
    coords: Any,
    loss_fn: LossFn | None = None,
    *,
    forward_fn: ForwardFn | None = None,
    batch_loss: BatchLoss | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    num_batches: int | None = None,
    maxiter: int | None = None,
    progress: bool | None = None,
    reduce: Reduce | None = None,
    agree: Callable[[Any], Any] | None = None,
    max_basis: int | None = None,
    basis: str = "auto",
) -> Landscape:
    """|λmin/λmax| of the Hessian at every point θ* + αδ (+ βη) of a coarse grid (Li et al. 2018, Fig. 7).

    Near-zero values mark locally convex regions, large ones strong negative
    curvature. Each point costs one Lanczos run for both ends (tens of
    Hessian-vector products), so keep the grid coarse. The values at a point equal those of
    :func:`~lightning_landscape.hessian.hessian_check` (``top_k=1``, same ``tol`` and ``seed``)
    at those weights. A point whose loss is not finite is stored as NaN.

    Args:
        model: any ``nn.Module``; θ* are its current trainable weights. It is left exactly as it was.
        data, loss_fn, forward_fn, batch_loss, tol, seed, num_batches, maxiter, reduce, agree, max_basis, basis: as in
            :func:`~lightning_landscape.hessian.hessian_check` (batches already on the model's
            device, e.g. a surface evaluator's, are used as they are, not copied).
        directions: one direction or a list of two (see :func:`~lightning_landscape.random_direction`).
        coords: one 1-D array of coordinates per direction.
        progress: show a progress bar; ``None`` shows it only on a terminal.

    Returns:
        a :class:`~lightning_landscape.results.Landscape` with ``values`` ``"loss"``,
        ``"ratio"``, ``"lambda_max"`` and ``"lambda_min"``, metadata ``kind="ratio_map"``.

    Example:
        >>> from lightning_landscape import random_direction
        >>> model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
        >>> ls = ratio_map(model, data, dirs, [np.linspace(-1, 1, 2)] * 2, nn.functional.mse_loss, progress=False)
        >>> ls.values["ratio"].shape, sorted(ls.values)
        ((2, 2), ['lambda_max', 'lambda_min', 'loss', 'ratio'])
    """
    batch_loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    dirs = as_direction_list(directions)
    params = trainable_parameters(model)
    for k, d in enumerate(dirs):
        check_direction("directions" if len(dirs) == 1 else f"directions[{k}]", d, params)
    grid = as_grid_coords(coords, len(dirs))
    tol = check_positive_float("tol", tol)
    check_positive_int("maxiter", maxiter, allow_none=True)
    max_basis = check_positive_int("max_basis", max_basis, allow_none=True)
    check_choice("basis", basis, BASIS_CHOICES)
    seed = check_seed("seed", seed)  # before any compute

    start = time.perf_counter()
    op = HessianOperator(model, data, batch_loss, num_batches=num_batches, reduce=reduce, agree=agree)
    settings = {"kind": "ratio_map", "tol": tol, "seed": seed, "maxiter": maxiter, "max_basis": max_basis}
    settings["basis"] = basis_settings(basis, op.shape[0], max_basis)[0]
    solver = {"maxiter": maxiter, "max_basis": max_basis, "basis": basis}
    landscape = Landscape.empty(grid, RATIO_VALUES, {**settings, **_versions.collect()})
    with preserved_state(model) as state:
        model.eval()
        plane = Plane(params, state.parameters, dirs)
        bar = tqdm(
            list(np.ndindex(*landscape.shape)),
            desc="ratio map",
            disable=None if progress is None else not progress,
            leave=False,
        )
        converged = True
        for idx in bar:
            converged = _evaluate_point(op, plane, landscape, idx, tol, seed, solver) and converged
    landscape.metadata.update(
        num_hvp=op.num_hvp,
        seconds=time.perf_counter() - start,
        converged=converged,
        num_samples=op.num_samples,
        num_params=op.shape[0],
        num_nonfinite=landscape.num_nonfinite,
    )
    return landscape


def _evaluate_point(
    op: HessianOperator,
    plane: Plane,
    landscape: Landscape,
    idx: tuple[int, ...],
    tol: float,
    seed: int,
    solver: dict[str, Any],
) -> bool:
    """Move the weights to grid point ``idx`` and store its loss and extremes; return whether Lanczos converged.

    ``solver``: ``maxiter``, ``max_basis`` and ``basis`` for :func:`lanczos_extremes`.
    """
    with torch.inference_mode(False):
        plane.set([float(landscape.coords[axis][i]) for axis, i in enumerate(idx)])
    values = landscape.values
    loss = op.loss()
    values["loss"][idx] = loss if math.isfinite(loss) else np.nan
    converged = True
    if math.isfinite(loss):
        # A fresh generator per point: every point is the hessian_check of those weights.
        eig = lanczos_extremes(op, 1, True, tol, seed_streams(seed)[0], **solver)
        converged = eig.converged
        values["lambda_max"][idx], values["lambda_min"][idx], values["ratio"][idx] = eig.top[0], eig.low, eig.ratio
    landscape.evaluated[idx] = True  # type: ignore[index]
    return converged
