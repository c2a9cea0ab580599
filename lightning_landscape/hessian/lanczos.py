"""Lanczos on a symmetric float64 operator: one iteration core, the extremes solver on it, ARPACK as fallback.

:class:`Lanczos` performs the steps (one product each, full reorthogonalization) and keeps the
basis and the tridiagonal T. Two consumers drive it:

* :func:`lanczos_extremes` (for :func:`~lightning_landscape.hessian.hessian_check` and
  :func:`~lightning_landscape.hessian.ratio_map`) tests the Ritz values of T after every step and
  stops each end of the spectrum by its residual rule, restarting after an invariant subspace;
  should its basis fill first, ARPACK (``eigsh``) goes on from the Ritz vectors;
* :func:`~lightning_landscape.hessian.density.slq_nodes` runs a fixed number of steps for
  stochastic Lanczos quadrature.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, aslinearoperator, eigsh

from lightning_landscape.errors import ConvergenceWarning
from lightning_landscape.hessian.basis import DiskLanczos, resolve_basis

#: Gram–Schmidt passes against the whole basis per step: "twice is enough" (Parlett).
REORTHOGONALIZATIONS = 2
#: The stopping test never asks a residual below this many machine epsilons (of the operator's
#: dtype) times max|θ|: the products themselves are not more accurate.
NOISE = 10.0
#: A coupling β below this fraction of the residual floor counts as zero (an invariant Krylov
#: space): dropping it moves no Ritz value by more than a tenth of the accuracy asked.
INVARIANT_FRACTION = 0.1
#: The default number of products the eigensolver may use, per weight: a cap far above need.
MAXITER_PER_WEIGHT = 10
#: The largest default Lanczos basis, in vectors.
MAX_BASIS = 200
#: The smallest default basis, in vectors: ARPACK's default basis size (``ncv``).
MIN_BASIS = 20
#: The default basis keeps at most this many bytes (but at least ``MIN_BASIS`` vectors):
#: 200 vectors of a 1,000-weight model, 20 of an 11M-weight ResNet-18.
BASIS_BYTES = 2**30
#: Bytes of one float64 number of a basis vector.
FLOAT64_BYTES = 8
#: A basis on disk (``basis="disk"``) keeps at most this many bytes of file (but at least
#: ``MIN_BASIS`` vectors): 200 float32 vectors of up to 10.7M weights.
DISK_BASIS_BYTES = 2**33


def default_max_basis(num_params: int) -> int:
    """The Lanczos basis size used when ``max_basis`` is None: at most 200 vectors and, past 20, 1 GiB.

    Example:
        >>> default_max_basis(1_000), default_max_basis(11_000_000)
        (200, 20)
    """
    return max(MIN_BASIS, min(MAX_BASIS, BASIS_BYTES // (FLOAT64_BYTES * num_params)))


def default_disk_basis(num_params: int, itemsize: int = 4) -> int:
    """The Lanczos basis size on disk when ``max_basis`` is None: at most 200 vectors and, past 20, 8 GiB of file.

    Example:
        >>> default_disk_basis(5_000_000), default_disk_basis(100_000_000)
        (200, 21)
    """
    return max(MIN_BASIS, min(MAX_BASIS, DISK_BASIS_BYTES // (itemsize * num_params)))


class Lanczos:
    """Lanczos steps with full reorthogonalization on a symmetric operator: the basis and the tridiagonal T.

    After :meth:`start`, each :meth:`step` applies ``op`` once to the newest basis vector, stores
    its diagonal entry α_j, orthogonalizes the residual against the whole basis (classical
    Gram–Schmidt twice, float64) and returns its norm β_j. The caller then either goes on with
    that residual (:meth:`extend`) or, when β_j is negligible (an invariant Krylov space), from a
    fresh vector orthogonal to the basis (:meth:`restart`), which splits T into diagonal blocks.
    Without reorthogonalization the basis loses orthogonality once a Ritz value converges and
    ghost copies of the outliers appear.

    Args:
        op: a symmetric operator: a ``LinearOperator`` or anything ``aslinearoperator`` takes (a matrix).
        capacity: the most basis vectors kept (``capacity × n × 8`` bytes).

    Attributes:
        size: basis vectors so far (= products used).
        piece: where the current Krylov piece (since the last restart) begins.

    Example:
        >>> lanczos = Lanczos(np.diag([1.0, 2.0, 3.0]), capacity=3)  # any symmetric matrix or LinearOperator
        >>> lanczos.start(np.ones(3))
        >>> beta = lanczos.step(); lanczos.extend(beta); beta = lanczos.step()
        >>> alphas, betas = lanczos.tridiagonal()
        >>> alphas.round(4).tolist(), lanczos.size
        ([2.0, 2.0], 2)
    """

    def __init__(self, op: LinearOperator, capacity: int) -> None:
        self.op = aslinearoperator(op)
        self.basis: np.ndarray | None = np.empty((capacity, op.shape[0]))
        self.alphas = np.empty(capacity)
        self.betas = np.empty(capacity)
        self.capacity = capacity
        self.size = 0
        self.piece = 0
        self._next = np.empty(0)  # the vector the next step applies op to
        self._residual = np.empty(0)

    def random_vector(self, rng: np.random.Generator) -> np.ndarray:
        """A start (or restart) vector: ``rng.standard_normal(P)``."""
        return rng.standard_normal(self.op.shape[0])

    def start(self, v0: np.ndarray) -> None:
        """Begin from ``v0`` (normalized here)."""
        self._next = v0 / np.linalg.norm(v0)

    def step(self) -> float:
        """One product: append the next basis vector and α_j; return the norm β_j of the new residual."""
        j, v, basis = self.size, self._next, self.basis
        basis[j] = v
        w = np.asarray(self.op.matvec(v), dtype=np.float64).reshape(-1)
        self.alphas[j] = float(v @ w)
        w = w - self.alphas[j] * v
        if j > self.piece:
            w -= self.betas[j - 1] * basis[j - 1]
        for _ in range(REORTHOGONALIZATIONS):
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        self.size = j + 1
        self._residual = w
        return float(np.linalg.norm(w))

    def extend(self, beta: float) -> None:
        """Go on with the residual of the last step, its norm ``beta`` coupling it into T."""
        self.betas[self.size - 1] = beta
        self._next = self._residual / beta

    def restart(self, v: np.ndarray) -> None:
        """Go on from ``v`` made orthogonal to the basis: T splits into blocks, a new piece begins."""
        v = np.array(v, dtype=np.float64)
        basis = self.basis[: self.size]
        for _ in range(REORTHOGONALIZATIONS):
            v -= basis.T @ (basis @ v)
        self.betas[self.size - 1] = 0.0
        self.piece = self.size
        self._next = v / np.linalg.norm(v)

    def tridiagonal(self) -> tuple[np.ndarray, np.ndarray]:
        """T so far: its diagonal (``size`` entries) and off-diagonal (``size - 1``), as views."""
        return self.alphas[: self.size], self.betas[: self.size - 1]

    def block_eigenvalues(self, start: int, stop: int) -> np.ndarray:
        """The eigenvalues, ascending, of the diagonal block ``start:stop`` of T (empty if none)."""
        if stop <= start:
            return np.empty(0)
        return eigh_tridiagonal(self.alphas[start:stop], self.betas[start : stop - 1], eigvals_only=True)

    def combine(self, coefficients: np.ndarray) -> np.ndarray:
        """The vector Σ_i c_i q_i of the basis vectors q_i (e.g. a Ritz vector from an eigenvector of T)."""
        return self.basis[: self.size].T @ coefficients

    def release(self) -> None:
        """Free the basis (T stays)."""
        self.basis = None


@dataclass
class LanczosResult:
    """What :func:`lanczos_extremes` found (the history is for tests and ``benchmarks/hessian.py``).

    Example:
        >>> LanczosResult(top=np.array([2.0]), low=-0.5, converged=True, hvp=3, steps=3, solver="lanczos").ratio
        0.25
    """

    top: np.ndarray  # the top-k eigenvalues, descending (NaN where the budget ran out first)
    low: float | None  # λmin, None when not asked for
    converged: bool
    hvp: int  # products used, Lanczos and fallback together
    steps: int  # Lanczos steps (basis vectors)
    solver: str  # "lanczos" or "lanczos+arpack"
    # per Lanczos step: (θmax, its residual norm, θmin, its residual norm)
    history: list[tuple[float, float, float, float]] = field(default_factory=list)
    # with ``vectors=True``: the unit Ritz vectors of ``top``, one row each (k × P float64), else None
    vectors: np.ndarray | None = None

    @property
    def ratio(self) -> float | None:
        """|λmin/λmax| (None without λmin); 0.0 when λmax is 0 (e.g. a loss that does not depend on the weights)."""
        if self.low is None:
            return None
        lmax = float(self.top[0])
        return abs(self.low / lmax) if lmax != 0 else 0.0

    def metadata(self) -> dict[str, object]:
        """The solver's facts for a report's metadata."""
        return {"converged": self.converged, "eigensolver": self.solver, "eigensolver_hvp": self.hvp}


def lanczos_extremes(
    op: LinearOperator,
    top_k: int,
    lambda_min: bool,
    tol: float,
    rng: np.random.Generator,
    maxiter: int | None = None,
    max_basis: int | None = None,
    vectors: bool = False,
    basis: str = "auto",
) -> LanczosResult:
    """The ``top_k`` largest eigenvalues and (``lambda_min``) the smallest, from ONE Lanczos run.

    :class:`Lanczos` from a seeded Gaussian start vector. Both ends of the spectrum are read
    off the same Krylov space, so λmax and λmin share their Hessian-vector products. After
    every step the Ritz values of the tridiagonal T_j are checked: the residual norm of Ritz
    pair i is ρ_i = β_j·|s_i[last]| (no extra product), and some eigenvalue lies within ρ_i of
    θ_i (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 4.5.1), so θ_i has converged when
    ρ_i <= tol·|θ_i| (ARPACK's rule), or, for Ritz values below tol·λmax, ρ_i <= tol²·λmax, and
    never below 10·eps·max|θ| with eps that of the operator's dtype (its ``eps`` attribute,
    float64 by default). The run stops once the ``top_k`` largest and, with ``lambda_min``, the
    smallest Ritz value (a different one) have all converged. The eigenvalue error is then
    usually far below ``tol`` (about ρ²/gap); a bound on ρ²/gap would stop earlier, but the gap
    to eigenvalues Lanczos has not resolved yet cannot be known, and with clustered eigenvalues
    such a rule returned values off by many ``tol``.

    An invariant Krylov space (β_j below a tenth of that floor: the start vector lies in the span of
    m < P eigenvectors, e.g. a zero Hessian; with ``top_k`` > 1 also once every Ritz value has
    converged, e.g. a linear layer under MSE, whose eigenvalues all repeat once per output) is
    exact to the accuracy asked, and the dropped β is added to every later residual bound;
    Lanczos then goes on from a fresh random vector orthogonal to the basis while fewer Ritz
    values than needed exist and, when ``top_k`` > 1, while the last such piece found an
    eigenvalue that enters the top k: one Krylov space holds one copy of each eigenvalue,
    further copies live in the rest.

    Memory: the basis, ``min(P, max(max_basis, 2·top_k + 1))`` float64 vectors of P numbers
    (``steps × P × 8`` bytes; 200 vectors of 1M weights are 1.6 GB). If it fills before
    convergence, ARPACK's implicitly restarted Lanczos (``eigsh``) takes over for each end not
    yet converged, started from the sum of that end's Ritz vectors, with the same rule.
    ``maxiter`` caps the products of both together (default 10 × P); when they run out the
    best estimates are returned (NaN for eigenvalues not reached) with ``converged=False``
    and a ``RuntimeWarning``.

    ``vectors=True`` also returns the Ritz vectors of the top ``top_k`` (``result.vectors``, one
    row each, orthonormal: the basis combined with eigenvectors of T, or ARPACK's eigenvectors when
    it took over the top end): ``top_k × P × 8`` more bytes, built while the basis still exists.
    A Ritz vector's angle to the eigenspace of its eigenvalue is at most ρ/gap (Davis–Kahan), so
    it converges more slowly than the eigenvalue (ρ²/gap): ask a smaller ``tol`` for vectors.

    ``basis``: where the basis lives. ``"memory"``: float64 in RAM, as described above.
    ``"disk"``: :class:`~lightning_landscape.hessian.basis.DiskLanczos`, the same steps with the
    vectors in the operator's dtype (float32 for a float32 model) and the basis in a temporary
    file streamed back for each orthogonalization: two vectors and a chunk in memory, whatever the
    number of steps; its default capacity is :func:`default_disk_basis` vectors, and there is no
    ARPACK fallback (ARPACK keeps its own float64 basis in memory). ``"auto"`` (default): memory
    while the default in-memory basis (:func:`default_max_basis`) fits in 256 MiB, else disk
    (:func:`~lightning_landscape.hessian.basis.resolve_basis`).

    Example:
        >>> result = lanczos_extremes(np.diag([-1.0, 0.5, 2.0, 4.0]), 1, True, 1e-6, np.random.default_rng(0))
        >>> round(float(result.top[0]), 9), round(result.low, 9), result.converged
        (4.0, -1.0, True)
    """
    n = op.shape[0]
    budget = MAXITER_PER_WEIGHT * n if maxiter is None else int(maxiter)
    where = resolve_basis(basis, n, default_max_basis(n) if max_basis is None else int(max_basis))
    if max_basis is None:
        max_basis = default_max_basis(n) if where == "memory" else default_disk_basis(n)
    capacity = min(n, max(int(max_basis), 2 * top_k + 1))
    search = _ExtremesSearch(op, top_k, lambda_min, tol, capacity, where)
    search.run(rng, budget)
    result = search.result(budget, vectors)
    search.lanczos.release()
    if not result.converged:
        warnings.warn(
            f"Lanczos did not converge to `tol`={tol} within `maxiter`={budget} Hessian-vector products "
            f"(basis of {search.lanczos.capacity} vectors); the eigenvalues are the best estimates. "
            "Raise `maxiter`, `max_basis` or `tol`.",
            ConvergenceWarning,
            stacklevel=3,
        )
    return result


class _ExtremesSearch:
    """One :func:`lanczos_extremes` run: the Lanczos core, the residual test of each end, the restarts."""

    def __init__(
        self, op: LinearOperator, top_k: int, lambda_min: bool, tol: float, capacity: int, basis: str = "memory"
    ) -> None:
        self.op, self.n = aslinearoperator(op), op.shape[0]
        self.agree = getattr(op, "agree", None)  # under DDP: every rank takes rank zero's decisions
        self.top_k, self.lambda_min, self.tol = top_k, lambda_min, tol
        self.eps = float(getattr(op, "eps", np.finfo(np.float64).eps))
        self.need = min(self.n, top_k + 1 if lambda_min else top_k)  # the smallest Ritz value must not be a top-k one
        # The disk core takes HessianOperator.product (torch, the parameters' dtype), not the float64 matvec.
        self.lanczos = Lanczos(self.op, capacity) if basis == "memory" else DiskLanczos(op, capacity)
        self.dropped = 0.0  # the couplings β dropped at restarts: each moves a Ritz value by at most that much
        self.top_ok = self.low_ok = False
        self.theta = self.s = np.empty(0)  # the Ritz values of T and their eigenvectors, after the last step
        self.history: list[tuple[float, float, float, float]] = []

    def run(self, rng: np.random.Generator, budget: int) -> None:
        """Lanczos steps until both ends converged, the space is exhausted, the basis full or ``budget`` spent."""
        lanczos = self.lanczos
        lanczos.start(lanczos.random_vector(rng))
        while True:
            beta = lanczos.step()
            done, invariant = self._test(beta)
            if self.agree is not None:
                done, invariant = self.agree((done, invariant))
            j = lanczos.size  # one product per step
            if done or j == self.n or j == lanczos.capacity or j >= budget:
                return
            if invariant:
                lanczos.restart(lanczos.random_vector(rng))
                self.dropped += beta
            else:
                lanczos.extend(beta)

    def _test(self, beta: float) -> tuple[bool, bool]:
        """The residual test of the Ritz values of T after a step: (stop now, Krylov space invariant)."""
        j = self.lanczos.size
        theta, s = eigh_tridiagonal(*self.lanczos.tridiagonal())
        self.theta, self.s = theta, s
        scale = float(max(abs(theta[0]), abs(theta[-1])))
        # Relative accuracy tol, except for Ritz values smaller than tol·λmax: those are resolved to
        # tol²·λmax, so |λmin/λmax| is right to tol² and a cluster of eigenvalues at 0 (a convex
        # model's null space) does not stall the run; never finer than the products' own noise.
        top_scale = float(theta[-1]) if theta[-1] > 0 else scale
        floor = max(self.tol * self.tol * top_scale, NOISE * self.eps * scale)
        invariant = j == self.n or beta <= INVARIANT_FRACTION * floor
        residuals = beta * np.abs(s[-1]) + self.dropped
        ok = residuals <= np.maximum(self.tol * np.abs(theta), floor)
        self.top_ok = j >= self.need and bool(ok[-self.top_k :].all())
        self.low_ok = not self.lambda_min or (j >= self.need and bool(ok[0]))
        self.history.append((float(theta[-1]), float(residuals[-1]), float(theta[0]), float(residuals[0])))
        # Every Ritz value converged: the Krylov space is invariant at the accuracy asked (a float32
        # Hessian leaves β ~ 1e-7·max|θ| where exact arithmetic gives 0), so it holds one copy of each
        # eigenvalue it touches; with top_k > 1 further copies must be looked for outside it.
        settled = self.top_k > 1 and bool(ok.all())
        done = self.top_ok and self.low_ok and self._copies_settled(ok, scale, invariant or settled)
        return done, invariant or settled

    def _copies_settled(self, ok: np.ndarray, scale: float, invariant: bool) -> bool:
        """With both ends converged: whether no further copy of a top-k eigenvalue may remain outside the basis."""
        lanczos, theta = self.lanczos, self.theta
        piece, j = lanczos.piece, lanczos.size
        own = None  # the Ritz values of the current piece alone, computed only when needed
        if piece:  # a probe for repeated eigenvalues: let it converge before judging it
            own = lanczos.block_eigenvalues(piece, j)
            if not bool(ok[np.abs(theta[:, None] - own).argmin(axis=0)].all()):  # nearest; copies are alike
                return False
        if not (invariant and self.top_k > 1):
            return True
        # Did this piece find an eigenvalue of the top k? Then the rest may hold more copies of it.
        own = lanczos.block_eigenvalues(piece, j) if own is None else own
        earlier = lanczos.block_eigenvalues(0, piece)  # earlier pieces: exact, T is block diagonal
        kth = earlier[-self.top_k] if earlier.size >= self.top_k else -np.inf
        return bool(own[-1] <= kth + self.tol * scale)

    def result(self, budget: int, vectors: bool = False) -> LanczosResult:
        """The estimates after :meth:`run`; ARPACK goes on for each unconverged end if the basis filled first.

        ``vectors``: also the Ritz vectors of ``top`` (rows; NaN rows for eigenvalues not reached).
        """
        j, theta = self.lanczos.size, self.theta
        top = np.full(self.top_k, np.nan)
        found = theta[::-1][: min(self.top_k, j)]
        top[: found.size] = found
        ritz = None
        if vectors:  # now: ARPACK below frees the basis
            ritz = np.full((self.top_k, self.n), np.nan)
            ritz[: found.size] = self.lanczos.combine(self.s[:, ::-1][:, : found.size]).T
        low = (float(theta[0]) if j >= self.need else float("nan")) if self.lambda_min else None
        solver, hvp = "lanczos", j
        full = j == self.lanczos.capacity < self.n and isinstance(self.lanczos, Lanczos)  # ARPACK: in memory only
        if not (self.top_ok and self.low_ok) and full and hvp < budget:
            solver = "lanczos+arpack"
            top, low, hvp, ritz = self._arpack(top, low, budget - hvp, ritz)
        converged = self.top_ok and self.low_ok
        history = self.history
        return LanczosResult(
            top=top, low=low, converged=converged, hvp=hvp, steps=j, solver=solver, history=history, vectors=ritz
        )

    def _arpack(
        self, top: np.ndarray, low: float | None, budget: int, ritz: np.ndarray | None = None
    ) -> tuple[np.ndarray, float | None, int, np.ndarray | None]:
        """ARPACK for each end not converged, from the sum of its Ritz vectors, within ``budget`` more products.

        With ``ritz`` (the top Ritz vectors), ARPACK's eigenvectors replace them when it finds the top end.
        """
        lanczos, s, top_k = self.lanczos, self.s, self.top_k
        ends = [("LA", top_k, s[:, -top_k:])] if not self.top_ok else []
        ends += [("SA", 1, s[:, :1])] if not self.low_ok else []
        starts = [lanczos.combine(cols.sum(axis=1)) for _, _, cols in ends]
        lanczos.release()  # ARPACK holds its own ncv vectors
        limited = _Budgeted(self.op, budget)
        for (which, k, _), v0 in zip(ends, starts):
            ncv = min(self.n, max(2 * k + 1, min(MIN_BASIS, lanczos.capacity)))
            want = ritz is not None and which == "LA"
            try:
                values, vecs = _eigsh_end(limited, k, which, self.tol, v0, ncv, vectors=want)
            except (_OutOfBudget, ArpackNoConvergence, ArpackError):
                continue
            if which == "LA":
                top, self.top_ok = values, True
                ritz = vecs.T if want else ritz
            else:
                low, self.low_ok = float(values[-1]), True
        return top, low, lanczos.size + budget - limited.left, ritz


class _OutOfBudget(Exception):
    """Raised by :class:`_Budgeted` when the eigensolver has spent its Hessian-vector products."""


class _Budgeted(LinearOperator):
    """``op`` with at most ``budget`` more products; the next one raises :class:`_OutOfBudget` to stop ARPACK."""

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
    op: LinearOperator, k: int, which: str, tol: float, v0: np.ndarray, ncv: int, vectors: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``k`` eigenvalues at one end of the spectrum (``which`` = 'LA' or 'SA') by ARPACK, descending.

    With ``vectors``, also their unit eigenvectors as columns in the same order (else None).
    Raises ``ArpackNoConvergence``, ``ArpackError`` and :class:`_OutOfBudget` (from a
    :class:`_Budgeted` ``op``) to the caller.
    """
    maxiter = MAXITER_PER_WEIGHT * op.shape[0]
    found = eigsh(op, k=k, which=which, tol=tol, v0=v0, ncv=ncv, maxiter=maxiter, return_eigenvectors=vectors)
    values, vecs = found if vectors else (found, None)
    order = np.argsort(np.asarray(values, dtype=np.float64))[::-1]
    values = np.asarray(values, dtype=np.float64)[order]
    return values, (None if vecs is None else np.asarray(vecs, dtype=np.float64)[:, order])
