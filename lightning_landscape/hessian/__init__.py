"""The Hessian of the loss: a linear operator, its extreme eigenvalues, trace and spectral density.

Everything here is matrix-free: the Hessian H of the sample-weighted mean loss
over a set of cached batches is only ever applied to vectors (Hessian-vector
products, HVPs), one full pass over the batches per product. On top of that one
operator (:class:`HessianOperator`, a ``scipy.sparse.linalg.LinearOperator``, in
:mod:`~lightning_landscape.hessian.operator`) sit the consumers:

* extreme eigenvalues by one Lanczos run for both ends of the spectrum
  (:func:`lanczos_extremes`, in :mod:`~lightning_landscape.hessian.lanczos`: our own, with full
  reorthogonalization and a per-step stopping test; ARPACK's ``eigsh`` only as a fallback),
* the trace by Hutchinson or Hutch++ with Rademacher vectors, with a standard error
  (:func:`hutchinson`, :func:`hutchpp`, in :mod:`~lightning_landscape.hessian.trace`),
* the spectral density by stochastic Lanczos quadrature (SLQ, :func:`slq_density`, in
  :mod:`~lightning_landscape.hessian.density`), on the same Lanczos core,
* :func:`hessian_check`, all of them at the model's weights in one :class:`HessianReport`
  (:mod:`~lightning_landscape.hessian.check`),
* :func:`hessian_directions`, the top eigenvectors as plane directions for a surface
  (:mod:`~lightning_landscape.hessian.directions`; Ritz vectors of the same Lanczos run),
* :func:`ratio_map`, the map of |λmin/λmax| over a plane of weights (Li et al., NeurIPS 2018,
  Fig. 7; :mod:`~lightning_landscape.hessian.ratio_map`).

Extreme eigenvalues: Lanczos with full reorthogonalization from a seeded Gaussian start vector;
λmax (top-k) and λmin are read off the same Krylov space, so they share their HVPs, and each end
stops as soon as its Ritz values' residual norms ρ = β_j·|last component of the eigenvector of
T_j| (free: no extra HVP) are <= tol·|θ|, which puts an eigenvalue within tol·|θ| of each
(ARPACK's rule, tested at every step instead of once per full basis). Like every single-vector
Krylov method (ARPACK's included), Lanczos can report a neighbouring eigenvalue when the start
vector barely touches the extreme eigenvector and the two are close. The basis costs steps × P × 8
bytes; when it reaches ``max_basis`` vectors before convergence, ARPACK (``eigsh``) takes over
from the Ritz vectors. Beyond 168k weights (``basis="auto"``) the basis goes to an unnamed
temporary file instead (:class:`DiskLanczos`, in :mod:`~lightning_landscape.hessian.basis`):
the same steps and products with the vectors in the parameters' dtype, two of them in memory.

The package knows nothing of Lightning: the loss is a :data:`~lightning_landscape.data.BatchLoss`,
so a callback can plug a LightningModule's own step in.

Example:
    >>> from lightning_landscape.hessian import hessian_check
    >>> model = nn.Linear(2, 1, bias=False)
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> report = hessian_check(model, [(x, torch.zeros(2, 1))], nn.functional.mse_loss)
    >>> round(report.lambda_max, 4), round(report.lambda_min, 4)  # H = XᵀX
    (4.0, 1.0)
"""

from lightning_landscape.hessian.basis import BASIS_CHOICES, DiskLanczos, resolve_basis
from lightning_landscape.hessian.check import hessian_check, seed_streams
from lightning_landscape.hessian.density import slq_density, slq_nodes
from lightning_landscape.hessian.directions import HessianDirections, hessian_directions
from lightning_landscape.hessian.lanczos import (
    BASIS_BYTES,
    MAX_BASIS,
    Lanczos,
    LanczosResult,
    default_max_basis,
    lanczos_extremes,
)
from lightning_landscape.hessian.operator import HessianOperator
from lightning_landscape.hessian.ratio_map import ratio_map
from lightning_landscape.hessian.trace import TRACE_METHODS, hutchinson, hutchpp, trace_estimate
from lightning_landscape.results.hessian import HessianReport, SpectralDensity

__all__ = [
    "BASIS_BYTES",
    "BASIS_CHOICES",
    "MAX_BASIS",
    "TRACE_METHODS",
    "DiskLanczos",
    "HessianDirections",
    "HessianOperator",
    "HessianReport",
    "Lanczos",
    "LanczosResult",
    "SpectralDensity",
    "default_max_basis",
    "hessian_check",
    "hessian_directions",
    "hutchinson",
    "hutchpp",
    "lanczos_extremes",
    "ratio_map",
    "resolve_basis",
    "seed_streams",
    "slq_density",
    "slq_nodes",
    "trace_estimate",
]
