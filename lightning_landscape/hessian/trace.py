"""Trace estimates of a symmetric operator from products with random sign vectors, with a standard error.

:func:`hutchinson` averages zᵀHz over Rademacher vectors z; :func:`hutchpp` (Meyer et al.,
SOSA 2021) first takes the trace of a sketched dominant subspace exactly and runs Hutchinson
only on the deflated rest, which has far less variance when a few eigenvalues dominate (as in
networks). Both take any ``scipy`` ``LinearOperator`` (or a matrix) and a numpy generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator, aslinearoperator

#: The fewest products each method accepts: the standard error needs 2 quadratic forms on the
#: (deflated) rest, and Hutch++ spends two thirds of its products on the sketch and its exact trace.
MIN_SAMPLES = {"hutch++": 6, "hutchinson": 2}


def rademacher(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """``m`` random sign vectors of length ``n``, as the columns of an (n, m) float64 array.

    Example:
        >>> rademacher(np.random.default_rng(0), 3, 2).shape
        (3, 2)
    """
    return rng.integers(0, 2, size=(n, m)).astype(np.float64) * 2.0 - 1.0


def check_samples(name: str, value: Any, method: str) -> int:
    """Return ``value`` if it is an integer of at least ``MIN_SAMPLES[method]``, else raise ``ValueError``.

    Example:
        >>> check_samples("samples", 6, "hutch++")
        6
    """
    minimum = MIN_SAMPLES[method]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"`{name}`={value!r} is not valid; expected an integer >= {minimum} for `trace_method`={method!r} "
            "(the standard error needs at least 2 residual samples)."
        )
    return int(value)


def _quadratic_forms(op: LinearOperator, vectors: np.ndarray) -> np.ndarray:
    """zᵀ op z for every column z of ``vectors`` (one product each)."""
    return np.array([vectors[:, i] @ op.matvec(vectors[:, i]) for i in range(vectors.shape[1])])


def _mean_and_stderr(samples: np.ndarray) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(ddof=1) / math.sqrt(samples.size))


def hutchinson(op: Any, samples: int, rng: np.random.Generator) -> tuple[float, float]:
    """Hutchinson's trace estimate and its standard error from ``samples`` products with Rademacher vectors.

    Args:
        op: a symmetric ``LinearOperator`` (e.g. :class:`~lightning_landscape.hessian.HessianOperator`)
            or anything ``aslinearoperator`` takes.
        samples: products to spend (at least 2).
        rng: draws the sign vectors.

    Returns:
        ``(estimate, stderr)``.

    Example:
        >>> matrix = np.diag([1.0, 2.0, 3.0])
        >>> hutchinson(matrix, 10, np.random.default_rng(0))  # exact on a diagonal matrix
        (6.0, 0.0)
    """
    op = aslinearoperator(op)
    samples = check_samples("samples", samples, "hutchinson")
    return _mean_and_stderr(_quadratic_forms(op, rademacher(rng, op.shape[0], samples)))


def hutchpp(op: Any, samples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The Hutch++ trace estimate (Meyer et al. 2021) and its standard error from ``samples`` products.

    A third of the products find the dominant subspace Q (range of H S for a sign matrix S), a
    third take tr(QᵀHQ) exactly, the rest run Hutchinson on the deflated rest (I-QQᵀ)H(I-QQᵀ).
    The outliers of a network's Hessian dominate Hutchinson's variance and go into the exact part.
    The sketch is fixed given S, so the (conditional) standard error is Hutchinson's on the rest.

    Args:
        op: a symmetric ``LinearOperator`` or anything ``aslinearoperator`` takes.
        samples: products to spend (at least 6).
        rng: draws the sign vectors.

    Returns:
        ``(estimate, stderr)``.

    Example:
        >>> q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((50, 50)))
        >>> matrix = (q * np.r_[100.0, 50.0, np.ones(48)]) @ q.T  # two outliers over a flat bulk
        >>> estimate, stderr = hutchpp(matrix, 30, np.random.default_rng(1))
        >>> bool(abs(estimate - np.trace(matrix)) < 4 * stderr)
        True
    """
    op = aslinearoperator(op)
    samples = check_samples("samples", samples, "hutch++")
    n, k = op.shape[0], samples // 3
    sketch = np.column_stack([op.matvec(col) for col in rademacher(rng, n, k).T])
    q, _ = np.linalg.qr(sketch)
    exact_part = float(sum(_quadratic_forms(op, q)))
    g = rademacher(rng, n, samples - 2 * k)
    g -= q @ (q.T @ g)
    rest, stderr = _mean_and_stderr(_quadratic_forms(op, g))
    return exact_part + rest, stderr


#: The trace estimators by name, as ``hessian_check(trace_method=...)`` accepts them.
TRACE_ESTIMATORS: dict[str, Callable[[Any, int, np.random.Generator], tuple[float, float]]] = {
    "hutch++": hutchpp,
    "hutchinson": hutchinson,
}
TRACE_METHODS: tuple[str, ...] = tuple(TRACE_ESTIMATORS)


def trace_estimate(op: Any, samples: int, method: str, rng: np.random.Generator) -> tuple[float, float]:
    """The trace and its standard error by ``method`` (``"hutch++"`` or ``"hutchinson"``), ``samples`` products.

    Example:
        >>> trace_estimate(np.eye(4), 4, "hutchinson", np.random.default_rng(0))
        (4.0, 0.0)
    """
    return TRACE_ESTIMATORS[method](op, samples, rng)
