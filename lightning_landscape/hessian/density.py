"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ), Gaussian-broadened.

Each run starts the :class:`~lightning_landscape.hessian.lanczos.Lanczos` core from a Rademacher
vector for a fixed number of steps; the Ritz values are the nodes and the squared first components
of their eigenvectors the weights of a quadrature of the density (Ghorbani et al., ICML 2019).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from lightning_landscape.hessian.lanczos import Lanczos
from lightning_landscape.hessian.trace import rademacher

#: A residual norm β below this fraction of ‖T‖ (estimated by max|α| + max β) ends a run early:
#: the Krylov space is invariant and its Ritz values are exact.
INVARIANT_RTOL = 1e-12
#: The smallest scale that test uses, so a zero operator (‖T‖ = 0) stops at once too.
TINY_SCALE = 1e-300
#: Margin of the density's grid beyond the outermost nodes, in Gaussian widths: the outermost
#: Gaussians are drawn whole.
GRID_MARGIN = 3


def slq_nodes(op: Any, v0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The quadrature of one SLQ run: Ritz values (nodes) and their weights, from ``steps`` Lanczos steps.

    Fewer steps are taken when the Krylov space becomes invariant (its Ritz values are then exact).

    Example:
        >>> nodes, weights = slq_nodes(np.diag([1.0, 2.0, 3.0]), np.ones(3), 3)
        >>> nodes.round(6).tolist(), weights.round(6).tolist()
        ([1.0, 2.0, 3.0], [0.333333, 0.333333, 0.333333])
    """
    lanczos = Lanczos(op, min(steps, v0.size))
    lanczos.start(v0)
    agree = getattr(op, "agree", None)  # under DDP: every rank takes rank zero's decision
    while True:
        beta = lanczos.step()
        alphas, betas = lanczos.tridiagonal()
        scale = max(abs(a) for a in alphas.tolist()) + (max(betas.tolist()) if betas.size else 0.0)
        stop = lanczos.size == lanczos.capacity or beta <= INVARIANT_RTOL * max(scale, TINY_SCALE)
        if agree(stop) if agree is not None else stop:
            break
        lanczos.extend(beta)
    # The dense eigensolver on T (small: at most `steps` square), as the quadrature always used.
    tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    nodes, vectors = np.linalg.eigh(tridiagonal)
    return nodes, vectors[0] ** 2


def slq_density(
    op: LinearOperator,
    runs: int,
    steps: int,
    grid_size: int,
    sigma: float,
    bounds: tuple[float | None, float | None],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral density by stochastic Lanczos quadrature, Gaussian-broadened: ``(grid, values)``.

    Args:
        op: a symmetric ``LinearOperator`` (or a matrix).
        runs: independent runs averaged, each from its own Rademacher vector.
        steps: Lanczos steps per run.
        grid_size: points of the eigenvalue grid.
        sigma: the Gaussians' width as a fraction of the spectrum's extent.
        bounds: known (λmin, λmax), widened to the nodes; ``None`` or non-finite ends are
            taken from the nodes.
        rng: draws the start vectors.

    Returns:
        the grid, spanning the bounds plus three widths on each side, and the density on it
        (it integrates to 1 over the whole line).

    Example:
        >>> matrix, rng = np.diag([1.0, 2.0, 3.0]), np.random.default_rng(0)
        >>> grid, values = slq_density(matrix, runs=1, steps=3, grid_size=200, sigma=0.05, bounds=(None, None), rng=rng)
        >>> round(float(grid[0]), 6), round(float(grid[-1]), 6), round(float(np.trapezoid(values, grid)), 2)
        (0.7, 3.3, 1.0)
    """
    n = op.shape[0]
    node_runs = [slq_nodes(op, rademacher(rng, n, 1)[:, 0], steps) for _ in range(runs)]
    nodes = np.concatenate([r[0] for r in node_runs])
    weights = np.concatenate([r[1] for r in node_runs]) / runs
    lo = bounds[0] if bounds[0] is not None and math.isfinite(bounds[0]) else float(nodes.min())
    hi = bounds[1] if bounds[1] is not None and math.isfinite(bounds[1]) else float(nodes.max())
    lo, hi = min(lo, float(nodes.min())), max(hi, float(nodes.max()))
    width = sigma * (hi - lo) if hi > lo else sigma * max(abs(hi), 1.0)
    grid = np.linspace(lo - GRID_MARGIN * width, hi + GRID_MARGIN * width, grid_size)
    gauss = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    return grid, gauss @ weights
