"""Plane directions along the top eigenvectors of the Hessian: where the loss curves most.

The vectors are the Ritz vectors of the same Lanczos run that
:func:`~lightning_landscape.hessian.hessian_check` makes for its top eigenvalues
(:func:`~lightning_landscape.hessian.lanczos_extremes` with ``vectors=True``), turned into
directions keyed like :func:`~lightning_landscape.random_direction`'s, so that
:func:`~lightning_landscape.surface.loss_surface` and ``surface_from_evaluator`` take them as they are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import check_choice, check_positive_float, check_positive_int, check_seed
from lightning_landscape.data import BatchLoss, ForwardFn, LossFn, Reduce
from lightning_landscape.directions import Direction
from lightning_landscape.hessian.basis import BASIS_CHOICES
from lightning_landscape.hessian.check import basis_settings, finite_loss, resolve_batch_loss, seed_streams
from lightning_landscape.hessian.lanczos import FLOAT64_BYTES, lanczos_extremes
from lightning_landscape.hessian.operator import HessianOperator
from lightning_landscape.params import check_finite_weights, trainable_parameters, unflatten_vector
from lightning_landscape.state import preserved_state


@dataclass
class HessianDirections:
    """What :func:`hessian_directions` returns; unpacks as ``directions, eigenvalues = ...``.

    Attributes:
        directions: ``num`` directions, each a dict parameter name -> tensor shaped, typed and
            placed like the parameter (the keys of :func:`~lightning_landscape.random_direction`).
        eigenvalues: the matching eigenvalues, descending (float64).
        metadata: the solver's facts (``num_hvp``, ``converged``, ``eigensolver``, memory in
            bytes, ...), JSON-friendly, to store with a surface made along the directions.

    Example:
        >>> found = HessianDirections([{"w": torch.ones(1)}], np.array([2.0]), {"num_hvp": 3})
        >>> directions, eigenvalues = found
        >>> directions[0]["w"].tolist(), eigenvalues.tolist(), found.metadata["num_hvp"]
        ([1.0], [2.0], 3)
    """

    directions: list[Direction]
    eigenvalues: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.directions, self.eigenvalues))


def _check_num(num: Any, num_params: int) -> int:
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 1 <= num <= num_params:
        raise ValueError(
            f"`num`={num!r} is not valid; expected an integer between 1 and {num_params}, "
            "the number of trainable parameters."
        )
    return int(num)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so that its entry of largest magnitude (the first such) is positive.

    An eigenvector is only defined up to sign; this makes the choice a function of the vector
    alone, so the same weights, data and seed always give the same directions.

    Example:
        >>> fix_signs(np.array([[0.6, -0.8], [0.0, 1.0]])).tolist()
        [[-0.6, 0.8], [0.0, 1.0]]
    """
    rows = np.arange(vectors.shape[0])
    signs = np.where(vectors[rows, np.abs(vectors).argmax(axis=1)] < 0, -1.0, 1.0)
    return vectors * signs[:, None]


def hessian_directions(
    model: nn.Module,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None = None,
    forward_fn: ForwardFn | None = None,
    batch_loss: BatchLoss | None = None,
    num: int = 2,
    num_batches: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    maxiter: int | None = None,
    max_basis: int | None = None,
    reduce: Reduce | None = None,
    agree: Callable[[Any], Any] | None = None,
    basis: str = "auto",
) -> HessianDirections:
    """The top-``num`` eigenvectors of the Hessian of the loss at the current weights, as plane directions.

    They are the directions in which the loss curves most (the largest algebraic eigenvalues,
    as :func:`~lightning_landscape.hessian.hessian_check` finds them): the Ritz vectors of one
    Lanczos run (:func:`~lightning_landscape.hessian.lanczos_extremes` with ``lambda_min=False``;
    its eigenvalues are those of ``hessian_check(top_k=num, lambda_min=False)`` with the same
    ``tol`` and ``seed``). The Hessian is that of the sample-weighted mean loss over ``data`` in
    eval mode (see :class:`~lightning_landscape.hessian.HessianOperator`).

    **Not comparable across networks.** Unlike filter-normalized random directions, these are
    unit vectors in the flattened space of ALL trainable parameters (biases and normalization
    layers included) with no rescaling to the weights: a surface along them depends on the
    parameterization (rescale a ReLU layer's weights by c and the next layer's by 1/c: the
    function is the same, the eigenvectors and the curvature along them change), so its
    sharpness is meaningful for this model at these weights only; compare networks with
    filter-normalized planes (:func:`~lightning_landscape.random_direction`) instead.

    The directions are unit-norm (in float64, then cast to each parameter's dtype) and mutually
    orthogonal. Sign: each is flipped so that its entry of largest magnitude is positive
    (:func:`fix_signs`), so repeated calls give identical tensors. For a repeated eigenvalue any
    orthonormal basis of its eigenspace is an answer; the one returned depends on ``seed``.

    Args:
        model: any ``nn.Module``; left exactly as it was (weights, buffers, ``.grad``, modes, RNG).
        data, loss_fn, forward_fn, batch_loss, num_batches, seed, maxiter, max_basis, reduce, agree, basis: as
            in :func:`~lightning_landscape.hessian.hessian_check` (``loss_fn(outputs, targets)``, or
            a ``batch_loss(model, batch) -> (mean_loss, n, outputs, targets)``).
        num: how many directions (the top ``num`` eigenvectors), from 1 to the number of weights.
        tol: the residual rule of Lanczos: ‖Hv − λv‖ <= tol·|λ| for each direction v, which puts
            v within an angle of about tol·|λ|/gap of the true eigenvector (gap: the distance
            to the nearest other eigenvalue); hence a tenth of ``hessian_check``'s default, for
            a few more products.

    Under DDP every rank calls this with the same arguments and its own shard of the data, with
    ``reduce`` summing the products' sums and ``agree`` broadcasting rank zero's value, as for
    ``hessian_check``; the vectors also pass through ``agree`` once at the end (``num × P × 8``
    bytes), so every rank gets rank zero's directions bit for bit.

    Memory: the Lanczos basis (as in ``hessian_check``: ``steps × P × 8`` bytes) plus ``num``
    float64 vectors of P numbers, then the directions in the parameters' dtype;
    ``metadata`` reports ``basis_bytes``, ``vector_bytes``, ``num_hvp``, ``converged``. With
    ``basis="disk"`` (the default above 168k weights) the basis is a temporary file instead
    (``basis_file_bytes``; ``basis_bytes`` 0) and the vectors are combined from it in chunks.

    Returns:
        a :class:`HessianDirections`: ``directions, eigenvalues = hessian_directions(...)``.

    Raises:
        ValueError: before any computation for a bad argument (``num`` not an integer in
            [1, number of trainable parameters], ``maxiter`` < ``num``, ``tol`` <= 0, ...);
            and if the loss at the weights is not finite (the model is restored).

    Example:
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> dirs, eigenvalues = hessian_directions(model, [(x, torch.zeros(3, 1))], loss_fn=nn.functional.mse_loss)
        >>> eigenvalues.round(4).tolist()  # H = 2XᵀX/3 = diag(2/3, 8/3, 6)
        [6.0, 2.6667]
        >>> torch.allclose(dirs[0]["weight"], torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6)  # e₃, sign: largest entry > 0
        True
    """
    # Every argument is checked before the data is read or the model touched.
    batch_loss = resolve_batch_loss(loss_fn, forward_fn, batch_loss)
    params = trainable_parameters(model)
    check_finite_weights(params)
    num_params = sum(p.numel() for p in params.values())
    num = _check_num(num, num_params)
    tol = check_positive_float("tol", tol)
    check_positive_int("num_batches", num_batches, allow_none=True)
    check_positive_int("maxiter", maxiter, allow_none=True)
    if maxiter is not None and maxiter < num:
        raise ValueError(
            f"`maxiter`={maxiter} is less than `num`={num}; expected at least one Hessian-vector product "
            "per direction (or None for the default cap)."
        )
    max_basis = check_positive_int("max_basis", max_basis, allow_none=True)
    check_choice("basis", basis, BASIS_CHOICES)
    eig_rng = seed_streams(check_seed("seed", seed))[0]  # hessian_check's eigensolver stream

    start = time.perf_counter()
    op = HessianOperator(model, data, batch_loss, num_batches=num_batches, reduce=reduce, agree=agree)
    with preserved_state(model):
        model.eval()
        loss = finite_loss(op)
        eig = lanczos_extremes(op, num, False, tol, eig_rng, maxiter, max_basis, vectors=True, basis=basis)
    vectors, eigenvalues = eig.vectors, eig.top
    if agree is not None:  # float noise must not give two ranks two planes (or two signs)
        vectors, eigenvalues = agree((vectors, eigenvalues))
    vectors = fix_signs(vectors)
    where, capacity = basis_settings(basis, num_params, max_basis)
    directions = [unflatten_vector(torch.from_numpy(np.ascontiguousarray(v)), params) for v in vectors]
    metadata = {
        "kind": "hessian_directions",
        "num": num,
        "tol": tol,
        "seed": int(seed),
        "maxiter": maxiter,
        "max_basis": capacity,
        "basis": where,
        **eig.metadata(),
        "eigenvalues": [float(e) for e in eigenvalues],
        "num_hvp": op.num_hvp,
        "lanczos_steps": eig.steps,
        "basis_bytes": eig.steps * num_params * FLOAT64_BYTES if where == "memory" else 0,
        "basis_file_bytes": 0 if where == "memory" else eig.steps * num_params * _itemsize(op),
        "vector_bytes": num * num_params * FLOAT64_BYTES,
        "loss": loss,
        "seconds": time.perf_counter() - start,
        **op.describe(),
        **_versions.collect(),
    }
    return HessianDirections(directions, np.asarray(eigenvalues, dtype=np.float64), metadata)


def _itemsize(op: HessianOperator) -> int:
    """Bytes per number of a basis vector on disk (the operator's vector dtype)."""
    return torch.empty(0, dtype=op.vector_dtype).element_size()
