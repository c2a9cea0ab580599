"""The Hessian of the loss: a linear operator, its extreme eigenvalues, trace and spectral density.

Everything here is matrix-free: the Hessian H of the sample-weighted mean loss
over a set of cached batches is only ever applied to vectors (Hessian-vector
products, HVPs), one full pass over the batches per product. On top of that one
operator (:class:`HessianOperator`, a ``scipy.sparse.linalg.LinearOperator``)
sit the consumers:

* extreme eigenvalues by one Lanczos run for both ends of the spectrum (our own, with full
  reorthogonalization and a per-step stopping test; ARPACK's ``eigsh`` only as a fallback),
* the trace by Hutchinson or Hutch++ with Rademacher vectors, with a standard error,
* the spectral density by stochastic Lanczos quadrature (SLQ),
* the map of |λmin/λmax| over a plane of weights (Li et al., NeurIPS 2018, Fig. 7).

Extreme eigenvalues (:func:`_lanczos_extremes`): Lanczos with full reorthogonalization from a
seeded Gaussian start vector; λmax (top-k) and λmin are read off the same Krylov space, so they
share their HVPs, and each end stops as soon as its Ritz values' residual norms
ρ = β_j·|last component of the eigenvector of T_j| (free: no extra HVP) are <= tol·|θ|, which
puts an eigenvalue within tol·|θ| of each (ARPACK's rule, tested at every step instead of once
per full basis). Like every single-vector Krylov method (ARPACK's included), Lanczos can report
a neighbouring eigenvalue when the start vector barely touches the extreme eigenvector and the
two are close. The basis costs steps × P × 8 bytes; when it reaches ``max_basis`` vectors before
convergence, ARPACK (``eigsh``) takes over from the Ritz vectors.

The module knows nothing of Lightning: the loss is a :data:`~lightning_landscape.surface.BatchLoss`,
so a callback can plug a LightningModule's own step in.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from tqdm.auto import tqdm

from lightning_landscape import _versions
from lightning_landscape._validation import (
    as_direction_list,
    as_grid_coords,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce, cache_batches, make_batch_loss, model_device
from lightning_landscape.directions import Direction, check_direction
from lightning_landscape.params import set_plane_point, trainable_parameters
from lightning_landscape.results import Landscape
from lightning_landscape.state import preserved_state

TRACE_METHODS: tuple[str, ...] = ("hutch++", "hutchinson")


def _clone_inference_tensors(batch: Any) -> Any:
    """Copy inference tensors into normal ones: autograd cannot save an inference tensor for backward."""
    if isinstance(batch, torch.Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, dict):
        return type(batch)({k: _clone_inference_tensors(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_clone_inference_tensors(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone_inference_tensors(v) for v in batch)
    return batch


class HessianOperator(LinearOperator):
    """The Hessian of the sample-weighted mean loss w.r.t. the trainable parameters, as a linear operator.

    With batches b of n_b samples and batch-mean losses L_b,
    ``H = Σ_b n_b ∇²L_b / Σ_b n_b``: the Hessian of the mean over all samples,
    also when the last batch is short. The operator acts on float64 numpy
    vectors of length P (the number of trainable weights, concatenated in model
    order, as in :func:`~lightning_landscape.directions.trainable_parameters`)
    so that scipy's solvers can use it; the products themselves are computed in
    each parameter's dtype on the model's device.

    The operator reads the parameters' *current* values at every product, so
    moving the weights in place (e.g. with
    :func:`~lightning_landscape.surface.set_plane_point`) moves the operator
    too. It neither changes the weights nor touches ``.grad``; it does not set
    the model's mode either: put the model in eval mode first (BatchNorm in
    train mode would make the loss depend on the batch composition and update
    the running statistics at every product).

    Products work inside ``torch.inference_mode()`` and ``torch.no_grad()``.

    Args:
        model: the network.
        data: an iterable of batches; cached on the model's device once.
        batch_loss: ``batch_loss(model, batch) -> (mean_loss, n, outputs, targets)``,
            see :func:`~lightning_landscape.surface.make_batch_loss`.
        num_batches: use at most this many batches of ``data``.
        reduce: sums the float64 vector ``[Σ n_b H_b v, Σ n_b L_b, Σ n_b]`` across
            processes before it is normalized; ``None`` (identity) on one process.

    Attributes:
        num_hvp: how many Hessian-vector products (full passes over the data) were made.
        num_samples: the number of samples seen by the last product or loss.

    Example:
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> op = HessianOperator(model.eval(), [(x, torch.zeros(3, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> op @ np.ones(3)  # H = 2 XᵀX / 3
        array([0.66666669, 2.66666675, 6.        ])
        >>> op.num_hvp
        1
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        batch_loss: BatchLoss,
        *,
        num_batches: int | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        check_positive_int("num_batches", num_batches, allow_none=True)
        if not callable(batch_loss):
            raise ValueError(
                f"`batch_loss`={batch_loss!r} is not callable; expected batch_loss(model, batch) -> (loss, n, outputs, targets)."
            )
        self.model = model
        self.params = list(trainable_parameters(model).values())
        #: Machine epsilon of the products' dtype: no eigenvalue is resolved more finely than ~10·eps·‖H‖.
        self.eps = max((float(torch.finfo(p.dtype).eps) for p in self.params), default=float(np.finfo(np.float64).eps))
        self.device = model_device(model)
        with torch.inference_mode(False):
            self.batches = [_clone_inference_tensors(b) for b in cache_batches(data, self.device, num_batches)]
        self.batch_loss = batch_loss
        self.reduce = reduce
        self.num_hvp = 0
        self.num_samples: int | None = None
        self._sizes = [p.numel() for p in self.params]
        size = sum(self._sizes)
        super().__init__(dtype=np.dtype(np.float64), shape=(size, size))

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return sums if self.reduce is None else self.reduce(sums)

    def loss(self) -> float:
        """The sample-weighted mean loss at the current weights (one forward pass per batch, no autograd)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.batches:
                loss, n, _, _ = self.batch_loss(self.model, batch)
                sums[0] += loss.detach().to(torch.float64) * n
                sums[1] += n
        total, count = self._reduce(sums).tolist()
        self.num_samples = int(count)
        if count <= 0:
            raise ValueError("the batches hold no samples; expected at least one sample to take the loss of.")
        return total / count

    def _split(self, x: np.ndarray) -> list[torch.Tensor]:
        flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        chunks = torch.split(flat, self._sizes)
        return [c.view(p.shape).to(device=p.device, dtype=p.dtype) for c, p in zip(chunks, self.params)]

    def _batch_hvp(self, batch: Any, vector: list[torch.Tensor]) -> tuple[torch.Tensor, int, list[torch.Tensor | None]]:
        # Double backward (reverse-over-reverse), because it was the cheaper one on CPU (torch 2.13,
        # 2 threads, 1024 samples in batches of 256): one HVP cost 2.6 gradients on a 6.6k-weight
        # MLP and 3.3 on a 2k-weight CNN with BatchNorm, against 7.5 to 23 and 5.7 gradients for
        # torch.func forward-over-reverse (jvp of grad through functional_call); benchmarks/hessian.py
        # measures 3.1 on the digits CNN. It also runs the user's step as ordinary eager autograd,
        # with no torch.func transform around it.
        loss, n, _, _ = self.batch_loss(self.model, batch)
        if not loss.requires_grad:  # a loss that does not depend on the weights
            return loss.detach(), n, [None] * len(self.params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient without a graph is constant in the weights: its block of H is zero.
        linked = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv: list[torch.Tensor | None] = [None] * len(self.params)
        if linked:
            parts = torch.autograd.grad(
                [grads[i] for i in linked], self.params, grad_outputs=[vector[i] for i in linked], allow_unused=True
            )
            hv = list(parts)
        return loss.detach(), n, hv

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        vector = self._split(x)
        size = self.shape[0]
        # Un-normalized float64 sums [Σ n_b H_b v, Σ n_b L_b, Σ n_b]: only these add up across
        # processes, so a `reduce` can sum them before the one division at the end.
        with torch.inference_mode(False), torch.enable_grad():
            # Created here: an inference tensor made under an outer inference_mode could not be updated.
            sums = torch.zeros(size + 2, dtype=torch.float64, device=self.device)
            for batch in self.batches:
                loss, n, hv = self._batch_hvp(batch, vector)
                offset = 0
                for h, numel in zip(hv, self._sizes):
                    if h is not None:
                        sums[offset : offset + numel] += h.detach().reshape(-1).to(torch.float64) * n
                    offset += numel
                sums[size] += loss.to(torch.float64) * n
                sums[size + 1] += n
        sums = self._reduce(sums)
        self.num_hvp += 1
        count = float(sums[size + 1])
        self.num_samples = int(count)
        if count <= 0:
            raise ValueError("the batches hold no samples; expected at least one sample to take the Hessian of.")
        loss_value = float(sums[size]) / count
        if not math.isfinite(loss_value):
            raise ValueError(f"the loss at the model's weights is {loss_value}; the Hessian needs a finite loss.")
        out = (sums[:size] / count).cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise ValueError(
                "a Hessian-vector product is not finite although the loss is; the Hessian is not defined here."
            )
        return out

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> HessianOperator:
        return self  # H is symmetric


class SpectralDensity(NamedTuple):
    """The Hessian's spectral density: ``values`` on the eigenvalue axis ``grid``.

    A named pair, so it unpacks as ``grid, values = report.density``. The values are
    a Gaussian-broadened density that integrates to 1 over the whole line.

    Example:
        >>> grid, values = SpectralDensity(np.array([-1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.0]))
        >>> grid.tolist(), values.tolist()
        ([-1.0, 0.0, 1.0], [0.0, 1.0, 0.0])
    """

    grid: np.ndarray
    values: np.ndarray


@dataclass
class HessianReport:
    """What :func:`hessian_check` found.

    Attributes:
        eigenvalues: the top-k eigenvalues, descending.
        lambda_max: the largest eigenvalue (``eigenvalues[0]``).
        lambda_min: the smallest eigenvalue (``None`` when not computed).
        ratio: |λmin / λmax|, the measure of non-convexity of Li et al. (2018);
            0.0 when λmax is 0 (``None`` without λmin).
        trace: the estimated trace of H (``None`` when not computed).
        trace_stderr: the standard error of ``trace``.
        density: the spectral density (``None`` when not computed), a
            :class:`SpectralDensity` pair ``(grid, values)``: the Gaussian-broadened
            density ``values`` on the eigenvalue axis ``grid``, integrating to 1.
        loss: the sample-weighted mean loss at the weights analysed.
        num_hvp: Hessian-vector products used, in full passes over the data.
        seconds: wall time of the analysis.
        metadata: JSON-serializable facts (``kind``, ``tol``, ``seed``, ``num_params``,
            ``num_samples``, the estimator settings, versions, ...).

    Example:
        >>> report = HessianReport(eigenvalues=np.array([2.0, 1.0]), lambda_max=2.0, lambda_min=-0.5, ratio=0.25)
        >>> report.scalars()
        {'lambda_max': 2.0, 'lambda_min': -0.5, 'ratio': 0.25}
    """

    eigenvalues: np.ndarray
    lambda_max: float
    lambda_min: float | None = None
    ratio: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    density: SpectralDensity | None = None
    loss: float | None = None
    num_hvp: int = 0
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    _SCALARS = ("lambda_max", "lambda_min", "ratio", "trace", "trace_stderr", "loss", "num_hvp", "seconds")

    def __post_init__(self) -> None:
        self.eigenvalues = np.asarray(self.eigenvalues, dtype=np.float64)
        if self.density is not None:
            grid, values = self.density
            self.density = SpectralDensity(np.asarray(grid, dtype=np.float64), np.asarray(values, dtype=np.float64))

    def scalars(self) -> dict[str, float]:
        """``lambda_max``, ``lambda_min``, ``ratio`` and ``trace`` for a logger, only those computed."""
        names = ("lambda_max", "lambda_min", "ratio", "trace")
        return {name: float(getattr(self, name)) for name in names if getattr(self, name) is not None}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report to one ``.npz`` file and return its path.

        Arrays are stored under plain names (``eigenvalues``, and with a density
        ``density_grid`` and ``density`` for its values), the scalars and the
        metadata in ``metadata_json``.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        arrays = {"eigenvalues": self.eigenvalues}
        if self.density is not None:
            arrays.update(density_grid=self.density.grid, density=self.density.values)
        # JSON writes floats with repr, which round-trips every float64 exactly (NaN included).
        scalars = {name: getattr(self, name) for name in self._SCALARS}
        meta = dict(self.metadata, report_scalars=scalars, array_names=list(arrays))
        arrays["metadata_json"] = np.array(json.dumps(meta, sort_keys=True))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HessianReport:
        """Read a file written by :meth:`save`.

        Example:
            >>> import tempfile
            >>> report = HessianReport(eigenvalues=np.array([3.0]), lambda_max=3.0, metadata={"seed": 0})
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = HessianReport.load(report.save(tmp + "/hessian.npz"))
            >>> back.lambda_max, back.lambda_min, back.metadata["seed"]
            (3.0, None, 0)
        """
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["metadata_json"]))
            scalars = meta.pop("report_scalars")
            arrays = {name: data[name] for name in meta.pop("array_names")}
        density = SpectralDensity(arrays["density_grid"], arrays["density"]) if "density" in arrays else None
        return cls(eigenvalues=arrays["eigenvalues"], density=density, **scalars, metadata=meta)


# --- numerical routines on any symmetric float64 operator --------------------------------------


class _OutOfBudget(Exception):
    """Raised by :class:`_Budgeted` when the eigensolver has spent its Hessian-vector products."""


class _Budgeted(LinearOperator):
    """``op`` with at most ``budget`` more products: the next one raises :class:`_OutOfBudget` (stops ARPACK mid-run)."""

    def __init__(self, op: LinearOperator, budget: int) -> None:
        self.op, self.left = op, budget
        super().__init__(dtype=np.dtype(np.float64), shape=op.shape)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        if self.left <= 0:
            raise _OutOfBudget
        self.left -= 1
        return self.op.matvec(x)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)


def _eigsh_end(
    op: LinearOperator, k: int, which: str, tol: float, v0: np.ndarray, ncv: int | None = None
) -> np.ndarray:
    """The ``k`` eigenvalues at one end of the spectrum (``which`` = 'LA' or 'SA') by ARPACK, descending.

    The fallback of :func:`_lanczos_extremes` once its basis is full. Raises ``ArpackNoConvergence``,
    ``ArpackError`` and :class:`_OutOfBudget` (from a :class:`_Budgeted` ``op``) to the caller.
    """
    values = eigsh(op, k=k, which=which, tol=tol, v0=v0, ncv=ncv, maxiter=10 * op.shape[0], return_eigenvectors=False)
    return np.sort(np.asarray(values, dtype=np.float64))[::-1]


# The stopping test never asks a residual below this many machine epsilons (of the operator's
# dtype) times max|θ|: the products themselves are not more accurate.
_NOISE = 10.0
MAX_BASIS = 200
# The default basis keeps at most this many bytes (but at least 20 vectors, ARPACK's default
# basis size): 200 vectors of a 1,000-weight model, 20 of an 11M-weight ResNet-18.
BASIS_BYTES = 2**30


def default_max_basis(num_params: int) -> int:
    """The Lanczos basis size used when ``max_basis`` is None: at most 200 vectors and, past 20, 1 GiB.

    Example:
        >>> default_max_basis(1_000), default_max_basis(11_000_000)
        (200, 20)
    """
    return max(20, min(MAX_BASIS, BASIS_BYTES // (8 * num_params)))


@dataclass
class _LanczosResult:
    """What :func:`_lanczos_extremes` found (the history is for tests and ``benchmarks/hessian.py``)."""

    top: np.ndarray  # the top-k eigenvalues, descending (NaN where the budget ran out first)
    low: float | None  # λmin, None when not asked for
    converged: bool
    hvp: int  # products used, Lanczos and fallback together
    steps: int  # Lanczos steps (basis vectors)
    solver: str  # "lanczos" or "lanczos+arpack"
    # per Lanczos step: (θmax, its residual norm, θmin, its residual norm)
    history: list[tuple[float, float, float, float]] = field(default_factory=list)


def _lanczos_extremes(
    op: LinearOperator,
    top_k: int,
    lambda_min: bool,
    tol: float,
    rng: np.random.Generator,
    maxiter: int | None = None,
    max_basis: int | None = None,
) -> _LanczosResult:
    """The ``top_k`` largest eigenvalues and (``lambda_min``) the smallest, from ONE Lanczos run.

    Lanczos with full reorthogonalization (classical Gram–Schmidt twice against the whole
    basis, float64) from a seeded Gaussian start vector. Both ends of the spectrum are read
    off the same Krylov space, so λmax and λmin share their Hessian-vector products. After
    every step the Ritz values of the tridiagonal T_j are checked: the residual norm of Ritz
    pair i is ρ_i = β_j·|s_i[last]| (no extra product), and some eigenvalue lies within ρ_i of
    θ_i (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 4.5.1), so θ_i has converged when
    ρ_i <= tol·|θ_i| (ARPACK's rule), or, for Ritz values below tol·λmax, ρ_i <= tol²·λmax, and
    never below 10·eps·max|θ| with eps that of the operator's dtype (its ``eps`` attribute,
    float64 by default). The run stops once the ``top_k``
    largest and, with ``lambda_min``, the smallest Ritz value (a different one) have all
    converged. The eigenvalue error is then usually far below ``tol`` (about ρ²/gap); a bound
    on ρ²/gap would stop earlier, but the gap to eigenvalues Lanczos has not resolved yet cannot
    be known, and with clustered eigenvalues such a rule returned values off by many ``tol``.

    An invariant Krylov space (β_j below a tenth of that floor: the start vector lies in the span of
    m < P eigenvectors, e.g. a zero Hessian; with ``top_k`` > 1 also once every Ritz value has
    converged, e.g. a linear layer under MSE, whose eigenvalues all repeat once per output) is
    exact to the accuracy asked, and the dropped β is added to every later residual bound;
    Lanczos then goes on from a fresh random
    vector orthogonal to the basis while fewer Ritz values than needed exist and, when
    ``top_k`` > 1, while the last such piece found an eigenvalue that enters the top k: one
    Krylov space holds one copy of each eigenvalue, further copies live in the rest.

    Memory: the basis, ``min(P, max(max_basis, 2·top_k + 1))`` float64 vectors of P numbers
    (``steps × P × 8`` bytes; 200 vectors of 1M weights are 1.6 GB). If it fills before
    convergence, ARPACK's implicitly restarted Lanczos (``eigsh``) takes over for each end not
    yet converged, started from the sum of that end's Ritz vectors, with the same rule.
    ``maxiter`` caps the products of both together (default 10 × P); when they run out the
    best estimates are returned (NaN for eigenvalues not reached) with ``converged=False``.
    """
    n = op.shape[0]
    eps = float(getattr(op, "eps", np.finfo(np.float64).eps))
    budget = 10 * n if maxiter is None else int(maxiter)
    max_basis = default_max_basis(n) if max_basis is None else int(max_basis)
    cap = min(n, max(max_basis, 2 * top_k + 1))
    need = min(n, top_k + 1 if lambda_min else top_k)  # the smallest Ritz value must not be a top-k one
    basis = np.empty((cap, n))
    alphas, betas = np.empty(cap), np.empty(cap)
    history: list[tuple[float, float, float, float]] = []
    v = rng.standard_normal(n)
    v /= np.linalg.norm(v)
    hvp = j = 0
    piece = 0  # where the current Krylov piece (since the last restart) begins
    dropped = 0.0  # the couplings β dropped at restarts: each moves a Ritz value by at most that much
    top_ok = low_ok = False
    while True:
        basis[j] = v
        w = np.asarray(op.matvec(v), dtype=np.float64).reshape(-1)
        hvp += 1
        alphas[j] = float(v @ w)
        w = w - alphas[j] * v
        if j > piece:
            w -= betas[j - 1] * basis[j - 1]
        for _ in range(2):  # "twice is enough" (Parlett)
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(np.linalg.norm(w))
        j += 1
        theta, s = eigh_tridiagonal(alphas[:j], betas[: j - 1])
        scale = float(max(abs(theta[0]), abs(theta[-1])))
        # Relative accuracy tol, except for Ritz values smaller than tol·λmax: those are resolved to
        # tol²·λmax, so |λmin/λmax| is right to tol² and a cluster of eigenvalues at 0 (a convex
        # model's null space) does not stall the run; never finer than the products' own noise.
        top_scale = float(theta[-1]) if theta[-1] > 0 else scale
        floor = max(tol * tol * top_scale, _NOISE * eps * scale)
        # Invariant (β ≈ 0): dropping β then moves no Ritz value by more than a tenth of that floor.
        invariant = j == n or beta <= 0.1 * floor
        residuals = beta * np.abs(s[-1]) + dropped
        ok = residuals <= np.maximum(tol * np.abs(theta), floor)
        top_ok = j >= need and bool(ok[-top_k:].all())
        low_ok = not lambda_min or (j >= need and bool(ok[0]))
        history.append((float(theta[-1]), float(residuals[-1]), float(theta[0]), float(residuals[0])))
        done = top_ok and low_ok
        own = None  # the Ritz values of the current piece alone, computed only when needed
        if done and piece:  # a probe for repeated eigenvalues: let it converge before judging it
            own = _block_eigenvalues(alphas, betas, piece, j)
            done = bool(ok[np.abs(theta[:, None] - own).argmin(axis=0)].all())  # nearest; copies are alike
        # Every Ritz value converged: the Krylov space is invariant at the accuracy asked (a float32
        # Hessian leaves β ~ 1e-7·max|θ| where exact arithmetic gives 0), so it holds one copy of each
        # eigenvalue it touches; with top_k > 1 further copies must be looked for outside it.
        invariant = invariant or (top_k > 1 and bool(ok.all()))
        if done and invariant and top_k > 1:
            # Did this piece find an eigenvalue of the top k? Then the rest may hold more copies of it.
            own = _block_eigenvalues(alphas, betas, piece, j) if own is None else own
            earlier = _block_eigenvalues(alphas, betas, 0, piece)  # earlier pieces: exact, T is block diagonal
            kth = earlier[-top_k] if earlier.size >= top_k else -np.inf
            done = own[-1] <= kth + tol * scale
        if done or j == n or j == cap or hvp >= budget:
            break
        if invariant:
            v = rng.standard_normal(n)
            for _ in range(2):
                v -= basis[:j].T @ (basis[:j] @ v)
            betas[j - 1] = 0.0  # T splits into blocks
            dropped += beta
            piece = j
        else:
            betas[j - 1] = beta
            v = w
        v /= np.linalg.norm(v)
    top = np.full(top_k, np.nan)
    found = theta[::-1][: min(top_k, j)]
    top[: found.size] = found
    low = (float(theta[0]) if j >= need else float("nan")) if lambda_min else None
    solver = "lanczos"
    if not (top_ok and low_ok) and j == cap < n and hvp < budget:
        # The basis is full: ARPACK goes on for each unconverged end from its Ritz vectors.
        solver = "lanczos+arpack"
        ends = [("LA", top_k, s[:, -top_k:])] if not top_ok else []
        ends += [("SA", 1, s[:, :1])] if not low_ok else []
        starts = [basis[:j].T @ cols.sum(axis=1) for _, _, cols in ends]
        del basis  # ARPACK holds its own ncv vectors
        limited = _Budgeted(op, budget - hvp)
        for (which, k, _), v0 in zip(ends, starts):
            ncv = min(n, max(2 * k + 1, min(20, cap)))
            try:
                values = _eigsh_end(limited, k, which, tol, v0, ncv)
            except (_OutOfBudget, ArpackNoConvergence, ArpackError):
                continue
            if which == "LA":
                top, top_ok = values, True
            else:
                low, low_ok = float(values[-1]), True
        hvp += (budget - hvp) - limited.left
    converged = top_ok and low_ok
    if not converged:
        warnings.warn(
            f"Lanczos did not converge to `tol`={tol} within `maxiter`={budget} Hessian-vector products "
            f"(basis of {cap} vectors); the eigenvalues are the best estimates. Raise `maxiter`, `max_basis` or `tol`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return _LanczosResult(top=top, low=low, converged=converged, hvp=hvp, steps=j, solver=solver, history=history)


def _block_eigenvalues(alphas: np.ndarray, betas: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The eigenvalues, ascending, of the diagonal block ``start:stop`` of the tridiagonal T (empty if none)."""
    if stop <= start:
        return np.empty(0)
    return eigh_tridiagonal(alphas[start:stop], betas[start : stop - 1], eigvals_only=True)


def _lanczos(op: LinearOperator, v0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos with full reorthogonalization: the Ritz values and their quadrature weights for start ``v0``.

    Without reorthogonalization the basis loses orthogonality once a Ritz value
    converges and ghost copies of the outliers appear in the density.
    """
    n = v0.size
    steps = min(steps, n)
    basis = np.zeros((steps, n))
    alphas: list[float] = []
    betas: list[float] = []
    v = v0 / np.linalg.norm(v0)
    for j in range(steps):
        basis[j] = v
        w = op.matvec(v)
        alpha = float(v @ w)
        w = w - alpha * v - (betas[-1] * basis[j - 1] if j else 0.0)
        for _ in range(2):  # "twice is enough" (Parlett)
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(np.linalg.norm(w))
        scale = max(abs(a) for a in alphas) + (max(betas) if betas else 0.0)
        if j == steps - 1 or beta <= 1e-12 * max(scale, 1e-300):
            break  # done, or an invariant subspace: the Ritz values are exact
        betas.append(beta)
        v = w / beta
    tridiagonal = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    nodes, vectors = np.linalg.eigh(tridiagonal)
    return nodes, vectors[0] ** 2


def _rademacher(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    return rng.integers(0, 2, size=(n, m)).astype(np.float64) * 2.0 - 1.0


def _trace_estimate(op: LinearOperator, samples: int, method: str, rng: np.random.Generator) -> tuple[float, float]:
    """Trace and its standard error with ``samples`` products (Hutchinson, or Hutch++ of Meyer et al. 2021)."""
    n = op.shape[0]
    if method == "hutchinson":
        z = _rademacher(rng, n, samples)
        quad = np.array([z[:, i] @ op.matvec(z[:, i]) for i in range(samples)])
        return float(quad.mean()), float(quad.std(ddof=1) / math.sqrt(samples))
    # Hutch++: a third of the products find the dominant subspace Q (range of H S), a third take
    # tr(QᵀHQ) exactly, the rest run Hutchinson on the deflated rest (I-QQᵀ)H(I-QQᵀ). The outliers
    # of a network's Hessian dominate Hutchinson's variance and go into the exact part.
    k = samples // 3
    sketch = np.column_stack([op.matvec(col) for col in _rademacher(rng, n, k).T])
    q, _ = np.linalg.qr(sketch)
    exact_part = float(sum(q[:, i] @ op.matvec(q[:, i]) for i in range(q.shape[1])))
    g = _rademacher(rng, n, samples - 2 * k)
    g -= q @ (q.T @ g)
    quad = np.array([g[:, i] @ op.matvec(g[:, i]) for i in range(g.shape[1])])
    # The sketch is fixed given S, so the conditional standard error is Hutchinson's on the rest.
    return exact_part + float(quad.mean()), float(quad.std(ddof=1) / math.sqrt(quad.size))


def _slq_density(
    op: LinearOperator,
    runs: int,
    steps: int,
    grid_size: int,
    sigma: float,
    bounds: tuple[float | None, float | None],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019), Gaussian-broadened.

    Each run starts Lanczos from a Rademacher vector; its Ritz values are the nodes and the
    squared first components of their eigenvectors the weights of a quadrature of the
    density. ``sigma`` is the Gaussian's width as a fraction of the spectrum's extent.
    """
    n = op.shape[0]
    node_runs = [_lanczos(op, _rademacher(rng, n, 1)[:, 0], steps) for _ in range(runs)]
    nodes = np.concatenate([r[0] for r in node_runs])
    weights = np.concatenate([r[1] for r in node_runs]) / runs
    lo = bounds[0] if bounds[0] is not None and math.isfinite(bounds[0]) else float(nodes.min())
    hi = bounds[1] if bounds[1] is not None and math.isfinite(bounds[1]) else float(nodes.max())
    lo, hi = min(lo, float(nodes.min())), max(hi, float(nodes.max()))
    width = sigma * (hi - lo) if hi > lo else sigma * max(abs(hi), 1.0)
    # Three widths of margin so the outermost Gaussians are drawn whole.
    grid = np.linspace(lo - 3 * width, hi + 3 * width, grid_size)
    gauss = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return grid, gauss @ weights


# --- public analyses --------------------------------------------------------------------------


def _resolve_batch_loss(
    loss_fn: LossFn | None, forward_fn: ForwardFn | None, batch_loss: BatchLoss | None
) -> BatchLoss:
    if batch_loss is not None:
        if loss_fn is not None or forward_fn is not None:
            raise ValueError(
                "`batch_loss` was given together with `loss_fn`/`forward_fn`; expected either a `batch_loss` "
                "or a `loss_fn` (with an optional `forward_fn`), not both."
            )
        if not callable(batch_loss):
            raise ValueError(
                f"`batch_loss`={batch_loss!r} is not callable; expected batch_loss(model, batch) -> (loss, n, outputs, targets)."
            )
        return batch_loss
    if loss_fn is None:
        raise ValueError(
            "`loss_fn`=None and `batch_loss`=None; expected one of them to say which loss to take the Hessian of."
        )
    return make_batch_loss(loss_fn, forward_fn)


def _num_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model).values())


def _check_top_k(top_k: Any, num_params: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= num_params:
        raise ValueError(
            f"`top_k`={top_k!r} is not valid; expected an integer between 1 and {num_params}, "
            "the number of trainable parameters."
        )
    return int(top_k)


def _seed_streams(seed: Any) -> list[np.random.Generator]:
    """Independent generators for the eigensolver, the trace and the density, so enabling one does not change another."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed`={seed!r} is not valid; expected an integer >= 0.")
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3)]


def _extremes(
    op: HessianOperator,
    top_k: int,
    lambda_min: bool,
    tol: float,
    rng: np.random.Generator,
    maxiter: int | None,
    max_basis: int | None,
) -> tuple[np.ndarray, float | None, float | None, _LanczosResult]:
    """Top-k eigenvalues, λmin and |λmin/λmax| at the operator's current weights, from one Lanczos run."""
    result = _lanczos_extremes(op, top_k, lambda_min, tol, rng, maxiter, max_basis)
    ratio = None
    if lambda_min:
        lmax = float(result.top[0])
        # A zero λmax (e.g. a loss that does not depend on the weights) gives ratio 0, not NaN or inf.
        ratio = abs(result.low / lmax) if lmax != 0 else 0.0
    return result.top, result.low, ratio, result


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
    max_basis: int | None = None,
) -> HessianReport:
    """Curvature of the loss at the model's current weights: extreme eigenvalues, trace, spectral density.

    The Hessian is that of the sample-weighted mean loss over ``data`` w.r.t. the
    trainable parameters, with the model in eval mode (see :class:`HessianOperator`).
    The model is left exactly as it was (weights, buffers, ``.grad``, modes, RNG states).

    Args:
        model: any ``nn.Module``.
        data: an iterable of batches; cached on the model's device once.
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
            networks) or ``"hutchinson"``.
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
        max_basis: the most Lanczos vectors kept (at least ``2·top_k + 1``): memory
            ``max_basis × number of weights × 8`` bytes (float64 on the CPU). ``None``:
            200, fewer when that would pass 1 GiB, never fewer than 20 (see
            :func:`default_max_basis`). Should the
            basis fill before convergence, ARPACK (``eigsh``) goes on from the Ritz vectors.

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
    batch_loss = _resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    top_k = _check_top_k(top_k, _num_trainable(model))
    tol = check_positive_float("tol", tol)
    check_positive_int("num_batches", num_batches, allow_none=True)
    check_positive_int("maxiter", maxiter, allow_none=True)
    max_basis = check_positive_int("max_basis", max_basis, allow_none=True)
    check_choice("trace_method", trace_method, TRACE_METHODS)
    minimum_samples = 6 if trace_method == "hutch++" else 2
    if (
        isinstance(trace_samples, bool)
        or not isinstance(trace_samples, (int, np.integer))
        or trace_samples < minimum_samples
    ):
        raise ValueError(
            f"`trace_samples`={trace_samples!r} is not valid; expected an integer >= {minimum_samples} for "
            f"`trace_method`={trace_method!r} (the standard error needs at least 2 residual samples)."
        )
    check_positive_int("density_runs", density_runs)
    check_positive_int("density_steps", density_steps)
    if (
        isinstance(density_grid_size, bool)
        or not isinstance(density_grid_size, (int, np.integer))
        or density_grid_size < 2
    ):
        raise ValueError(f"`density_grid_size`={density_grid_size!r} is not valid; expected an integer >= 2.")
    density_sigma = check_positive_float("density_sigma", density_sigma)
    eig_rng, trace_rng, density_rng = _seed_streams(seed)

    start = time.perf_counter()
    op = HessianOperator(model, data, batch_loss, num_batches=num_batches, reduce=reduce)
    with preserved_state(model):
        model.eval()
        loss = op.loss()
        if not math.isfinite(loss):
            raise ValueError(
                f"the loss at the model's current weights is {loss}; the Hessian needs a finite loss "
                "(check the weights, the data and `loss_fn`)."
            )
        top, low, ratio, eig = _extremes(op, top_k, lambda_min, tol, eig_rng, maxiter, max_basis)
        trace_value = trace_stderr = None
        if trace:
            trace_value, trace_stderr = _trace_estimate(op, int(trace_samples), trace_method, trace_rng)
        grid = values = None
        if density:
            bounds = (low, float(top[0]))
            grid, values = _slq_density(
                op, density_runs, density_steps, int(density_grid_size), density_sigma, bounds, density_rng
            )
    metadata: dict[str, Any] = {
        "kind": "hessian",
        "top_k": top_k,
        "tol": tol,
        "seed": int(seed),
        "maxiter": maxiter,
        "max_basis": default_max_basis(op.shape[0]) if max_basis is None else max_basis,
        "converged": eig.converged,
        "eigensolver": eig.solver,
        "eigensolver_hvp": eig.hvp,
        "num_params": op.shape[0],
        "num_samples": op.num_samples,
        "num_batches": len(op.batches),
        "dtype": str(op.params[0].dtype),
        **_versions.collect(),
    }
    if trace:
        metadata.update(trace_method=trace_method, trace_samples=int(trace_samples))
    if density:
        metadata.update(
            density_runs=density_runs,
            density_steps=density_steps,
            density_sigma=density_sigma,
            density_grid_size=int(density_grid_size),
        )
    return HessianReport(
        eigenvalues=top,
        lambda_max=float(top[0]),
        lambda_min=low,
        ratio=ratio,
        trace=trace_value,
        trace_stderr=trace_stderr,
        density=None if values is None else SpectralDensity(grid, values),
        loss=loss,
        num_hvp=op.num_hvp,
        seconds=time.perf_counter() - start,
        metadata=metadata,
    )


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
    max_basis: int | None = None,
) -> Landscape:
    """|λmin/λmax| of the Hessian at every point θ* + αδ (+ βη) of a coarse grid (Li et al. 2018, Fig. 7).

    Near-zero values mark locally convex regions, large ones strong negative
    curvature. Each point costs one Lanczos run for both ends (tens of
    Hessian-vector products), so keep the grid coarse. The values at a point equal those of
    :func:`hessian_check` (``top_k=1``, same ``tol`` and ``seed``) at those weights.
    A point whose loss is not finite is stored as NaN.

    Args:
        model: any ``nn.Module``; θ* are its current trainable weights. It is left exactly as it was.
        data, loss_fn, forward_fn, batch_loss, tol, seed, num_batches, maxiter, reduce, max_basis: as in
            :func:`hessian_check`.
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
    batch_loss = _resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    dirs = as_direction_list(directions)
    params = trainable_parameters(model)
    for k, d in enumerate(dirs):
        check_direction("directions" if len(dirs) == 1 else f"directions[{k}]", d, params)
    grid = as_grid_coords(coords, len(dirs))
    tol = check_positive_float("tol", tol)
    check_positive_int("maxiter", maxiter, allow_none=True)
    max_basis = check_positive_int("max_basis", max_basis, allow_none=True)
    _seed_streams(seed)  # validates the seed before any compute

    start = time.perf_counter()
    op = HessianOperator(model, data, batch_loss, num_batches=num_batches, reduce=reduce)
    shape = tuple(len(c) for c in grid)
    names = ("loss", "ratio", "lambda_max", "lambda_min")
    values = {name: np.full(shape, np.nan) for name in names}
    landscape = Landscape(
        coords=grid,
        values=values,
        evaluated=np.zeros(shape, dtype=bool),
        metadata={
            "kind": "ratio_map",
            "tol": tol,
            "seed": int(seed),
            "maxiter": maxiter,
            "max_basis": max_basis,
            **_versions.collect(),
        },
    )
    all_converged = True
    with preserved_state(model) as state:
        model.eval()
        targets = list(params.values())
        center = [state.parameters[n] for n in params]
        steps = [[d[n].to(device=p.device, dtype=p.dtype) for n, p in params.items()] for d in dirs]
        todo = list(np.ndindex(*shape))
        bar = tqdm(todo, desc="ratio map", disable=None if progress is None else not progress, leave=False)
        for idx in bar:
            with torch.inference_mode(False):
                set_plane_point(targets, center, steps, [float(grid[axis][i]) for axis, i in enumerate(idx)])
            loss = op.loss()
            values["loss"][idx] = loss if math.isfinite(loss) else np.nan
            if math.isfinite(loss):
                # A fresh generator per point: every point is the hessian_check of those weights.
                eig_rng = _seed_streams(seed)[0]
                top, low, ratio, eig = _extremes(op, 1, True, tol, eig_rng, maxiter, max_basis)
                all_converged = all_converged and eig.converged
                values["lambda_max"][idx], values["lambda_min"][idx], values["ratio"][idx] = top[0], low, ratio
            landscape.evaluated[idx] = True  # type: ignore[index]
    landscape.metadata.update(
        num_hvp=op.num_hvp,
        seconds=time.perf_counter() - start,
        converged=all_converged,
        num_samples=op.num_samples,
        num_params=op.shape[0],
        num_nonfinite=landscape.num_nonfinite,
    )
    return landscape
