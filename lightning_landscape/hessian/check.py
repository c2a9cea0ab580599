"""The Hessian check at the model's weights: extreme eigenvalues, trace and spectral density in one report.

All arguments are checked before the data is read or the model touched; the model is left
exactly as it was. The checks shared with :func:`~lightning_landscape.hessian.ratio_map`
(the loss, the seed streams) live here too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import (
    check_callable,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_seed,
)
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce, make_batch_loss
from lightning_landscape.hessian.basis import BASIS_CHOICES, resolve_basis
from lightning_landscape.hessian.density import slq_density
from lightning_landscape.hessian.lanczos import default_disk_basis, default_max_basis, lanczos_extremes
from lightning_landscape.hessian.operator import BATCH_LOSS_SIGNATURE, HessianOperator
from lightning_landscape.hessian.trace import TRACE_METHODS, check_samples, trace_estimate
from lightning_landscape.params import check_finite_weights, trainable_parameters
from lightning_landscape.results.hessian import HessianReport, SpectralDensity
from lightning_landscape.state import preserved_state

#: Independent random streams drawn from the seed: the eigensolver's, the trace's and the density's.
NUM_STREAMS = 3
#: The fewest points of the density's eigenvalue grid (its two ends).
MIN_GRID_SIZE = 2


def resolve_batch_loss(loss_fn: LossFn | None, forward_fn: ForwardFn | None, batch_loss: BatchLoss | None) -> BatchLoss:
    """The :data:`~lightning_landscape.data.BatchLoss` to use: ``batch_loss``, or one built from ``loss_fn``.

    Example:
        >>> batch_loss = resolve_batch_loss(nn.functional.mse_loss, None, None)
        >>> loss, n, _, _ = batch_loss(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        >>> loss.item(), n
        (1.0, 2)
    """
    if batch_loss is not None:
        if loss_fn is not None or forward_fn is not None:
            raise ValueError(
                "`batch_loss` was given together with `loss_fn`/`forward_fn`; expected either a `batch_loss` "
                "or a `loss_fn` (with an optional `forward_fn`), not both."
            )
        return check_callable("batch_loss", batch_loss, BATCH_LOSS_SIGNATURE, allow_none=False)
    if loss_fn is None:
        raise ValueError("`loss_fn`=None and `batch_loss`=None; expected one of them to say which loss to use.")
    return make_batch_loss(loss_fn, forward_fn)


def check_top_k(top_k: Any, model: nn.Module) -> int:
    """Return ``top_k`` if it is an integer from 1 to the model's number of trainable weights, else raise."""
    params = trainable_parameters(model)
    check_finite_weights(params)  # a diverged model: say so before any Hessian-vector product
    num_params = sum(p.numel() for p in params.values())
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_params:
        raise ValueError(
            f"`top_k`={top_k!r} is not valid; expected an integer between 1 and {num_params}, "
            "the number of trainable parameters."
        )
    return int(top_k)


def seed_streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for the eigensolver, the trace and the density, so enabling one does not change another.

    ``seed`` must have passed :func:`~lightning_landscape._validation.check_seed`.

    Example:
        >>> eig_rng, trace_rng, density_rng = seed_streams(0)
        >>> eig_rng.standard_normal() == seed_streams(0)[0].standard_normal()
        True
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(NUM_STREAMS)]


def _check_grid_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < MIN_GRID_SIZE:
        raise ValueError(f"`density_grid_size`={value!r} is not valid; expected an integer >= {MIN_GRID_SIZE}.")
    return int(value)


def finite_loss(op: HessianOperator) -> float:
    """The loss at the operator's weights; ``ValueError`` if it is not finite (no Hessian there).

    Example:
        >>> model = nn.Linear(2, 1, bias=False); _ = nn.init.zeros_(model.weight)
        >>> batch_loss = resolve_batch_loss(nn.functional.mse_loss, None, None)
        >>> finite_loss(HessianOperator(model, [(torch.ones(3, 2), torch.ones(3, 1))], batch_loss))
        1.0
    """
    loss = op.loss()
    if not math.isfinite(loss):
        raise ValueError(
            f"the loss at the model's current weights is {loss}; the Hessian needs a finite loss "
            "(check the weights, the data and `loss_fn`)."
        )
    return loss


def basis_settings(basis: str, num_params: int, max_basis: int | None) -> tuple[str, int]:
    """Where :func:`lanczos_extremes` keeps its basis (``"memory"``/``"disk"``) and its capacity, for metadata.

    Example:
        >>> basis_settings("auto", 1_986, None), basis_settings("auto", 5_000_000, None)
        (('memory', 200), ('disk', 200))
    """
    where = resolve_basis(basis, num_params, default_max_basis(num_params) if max_basis is None else max_basis)
    if max_basis is None:
        max_basis = default_max_basis(num_params) if where == "memory" else default_disk_basis(num_params)
    return where, max_basis


def hessian_check(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    top_k: int = 1,
    lambda_min: bool = True,
    trace: bool = False,
    density: bool = False,
    forward_fn: ForwardFn | None = None,
    tol: float = 1e-3,
    seed: int = 0,
    num_batches: int | None = None,
    batch_loss: BatchLoss | None = None,
    trace_samples: int = 60,
    trace_method: str = "hutch++",
    density_runs: int = 4,
    density_steps: int = 64,
    density_grid_size: int = 512,
    density_sigma: float = 0.01,
    maxiter: int | None = None,
    reduce: Reduce | None = None,
    agree: Callable[[Any], Any] | None = None,
    max_basis: int | None = None,
    basis: str = "auto",
) -> HessianReport:
    """Curvature of the loss at the model's current weights: extreme eigenvalues, trace, spectral density.

    The Hessian is that of the sample-weighted mean loss over ``data`` w.r.t. the
    trainable parameters, with the model in eval mode (see :class:`HessianOperator`).
    The model is left exactly as it was (weights, buffers, ``.grad``, modes, RNG states).

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches; cached on the model's device once (batches already
            there, e.g. a surface evaluator's, are used as they are, not copied).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; or pass ``batch_loss``.
        top_k: how many of the largest eigenvalues to compute.
        lambda_min: also compute the smallest eigenvalue and |λmin/λmax|; it comes from the
            same Lanczos run as the largest ones, so it costs only the extra steps it needs.
            With ``top_k`` > 1, repeated eigenvalues can be missed (as by any single-vector
            Krylov method, ARPACK included) unless the Krylov space becomes invariant.
        trace: estimate the trace with ``trace_samples`` Rademacher vectors.
        density: estimate the spectral density by stochastic Lanczos quadrature.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)`` for ``loss_fn``.
        tol: relative accuracy of the eigenvalues. Lanczos stops an end of the spectrum once
            the residual norm ρ of its Ritz values is <= tol·|λ|, which puts an eigenvalue within
            tol·|λ|; the actual error is usually far smaller (about ρ²/gap). Eigenvalues smaller
            than tol·λmax (e.g. λmin of a nearly convex model) are resolved to tol²·λmax, which
            keeps |λmin/λmax| right to tol²; none finer than the float32 (or float64) noise of
            the products.
        seed: seeds the Lanczos start vector and the random probes (numpy, not the global RNGs).
        num_batches: use at most this many batches of ``data``.
        batch_loss: ``batch_loss(model, batch) -> (mean_loss, n, outputs, targets)``,
            e.g. a LightningModule's own step; replaces ``loss_fn``/``forward_fn``.
        trace_samples: Hessian-vector products spent on the trace.
        trace_method: ``"hutch++"`` (lower variance when a few eigenvalues dominate, as in
            networks) or ``"hutchinson"``; see :func:`~lightning_landscape.hessian.hutchpp`.
        density_runs: independent SLQ runs averaged for the density.
        density_steps: Lanczos steps per run (each stores one float64 vector of all weights).
        density_grid_size: points of the density's eigenvalue grid, which spans [λmin, λmax]
            plus three Gaussian widths on each side.
        density_sigma: width of the Gaussians as a fraction of λmax - λmin.
        maxiter: the most Hessian-vector products the eigensolver may use (default ``10 ×
            number of weights``); past it the best estimates are returned with a ``RuntimeWarning``
            and ``metadata["converged"]`` False.
        reduce: sums the per-product sums across processes (see :class:`HessianOperator`).
            Every process must then call this with the same arguments and ``seed``: the
            solvers are deterministic, so all processes ask for the same products in step.
        agree: rank zero's value of a decision on every rank (see :class:`HessianOperator`).
        max_basis: the most Lanczos vectors kept (at least ``2·top_k + 1``): memory
            ``max_basis × number of weights × 8`` bytes (float64 on the CPU). ``None``:
            200, fewer when that would pass 1 GiB, never fewer than 20 (see
            :func:`default_max_basis`). Should the
            basis fill before convergence, ARPACK (``eigsh``) goes on from the Ritz vectors.
            With ``basis="disk"`` the default is 200 vectors (at most 8 GiB of file) and there
            is no ARPACK.
        basis: where the Lanczos basis lives: ``"memory"`` (float64 in RAM, as above),
            ``"disk"`` (the same steps with the vectors in the parameters' dtype and the basis in
            a temporary file streamed back for each orthogonalization: about two vectors plus
            the products' own memory, whatever the number of steps; see
            :class:`~lightning_landscape.hessian.basis.DiskLanczos`) or ``"auto"`` (memory while
            the default in-memory basis fits in 256 MiB, about 168k weights; disk beyond).
            ``metadata["basis"]`` says which was used.

    Returns:
        a :class:`HessianReport`.

    Raises:
        ValueError: before any computation for a bad argument (``top_k`` not in
            [1, number of trainable parameters], ``tol`` <= 0, ...), empty data, a model
            without trainable parameters; and if the loss at the weights is not finite
            (the model is restored).

    Example:
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> report = hessian_check(model, [(x, torch.zeros(3, 1))], nn.functional.mse_loss, top_k=2, trace=True)
        >>> np.round(report.eigenvalues, 4).tolist(), round(report.lambda_min, 4), round(report.trace, 4)
        ([6.0, 2.6667], 0.6667, 9.3333)
    """
    # Every argument is checked before the data is read or the model touched.
    batch_loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    top_k = check_top_k(top_k, model)
    tol = check_positive_float("tol", tol)
    check_positive_int("num_batches", num_batches, allow_none=True)
    check_positive_int("maxiter", maxiter, allow_none=True)
    max_basis = check_positive_int("max_basis", max_basis, allow_none=True)
    check_choice("basis", basis, BASIS_CHOICES), check_choice("trace_method", trace_method, TRACE_METHODS)
    trace_samples = check_samples("trace_samples", trace_samples, trace_method)
    check_positive_int("density_runs", density_runs)
    check_positive_int("density_steps", density_steps)
    density_grid_size = _check_grid_size(density_grid_size)
    density_sigma = check_positive_float("density_sigma", density_sigma)
    eig_rng, trace_rng, density_rng = seed_streams(check_seed("seed", seed))

    start = time.perf_counter()
    op = HessianOperator(model, data, batch_loss, num_batches=num_batches, reduce=reduce, agree=agree)
    with preserved_state(model, read_only=True):  # products never write the weights: no copy of them
        model.eval()
        loss = finite_loss(op)
        eig = lanczos_extremes(op, top_k, lambda_min, tol, eig_rng, maxiter, max_basis, basis=basis)
        trace_value = trace_stderr = spectral = None
        if trace:
            trace_value, trace_stderr = trace_estimate(op, trace_samples, trace_method, trace_rng)
        if density:
            bounds = (eig.low, float(eig.top[0]))
            spectral = SpectralDensity(
                *slq_density(op, density_runs, density_steps, density_grid_size, density_sigma, bounds, density_rng)
            )
    settings = {"kind": "hessian", "top_k": top_k, "tol": tol, "seed": int(seed), "maxiter": maxiter}
    settings["basis"], settings["max_basis"] = basis_settings(basis, op.shape[0], max_basis)
    metadata = {**settings, **eig.metadata(), **op.describe(), **_versions.collect()}
    if trace:
        metadata.update(trace_method=trace_method, trace_samples=trace_samples)
    if density:
        metadata.update(
            density_runs=density_runs,
            density_steps=density_steps,
            density_sigma=density_sigma,
            density_grid_size=density_grid_size,
        )
    return HessianReport(
        eigenvalues=eig.top,
        lambda_max=float(eig.top[0]),
        lambda_min=eig.low,
        ratio=eig.ratio,
        trace=trace_value,
        trace_stderr=trace_stderr,
        density=spectral,
        loss=loss,
        num_hvp=op.num_hvp,
        seconds=time.perf_counter() - start,
        metadata=metadata,
    )
