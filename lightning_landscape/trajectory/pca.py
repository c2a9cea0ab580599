"""Trajectory PCA (Li et al. 2018, section 7): :func:`trajectory_pca`, :func:`pca_directions`, :func:`path_range`.

The trajectory matrix M = [θ_0 − θ_n; ...; θ_{n−1} − θ_n] of a
:class:`~lightning_landscape.trajectory.SnapshotStore` is never held in memory.
The store is streamed twice by column blocks, in float64: the first pass
accumulates the n x n Gram matrix G = M Mᵀ, whose eigendecomposition
G = U diag(s²) Uᵀ gives the singular values s and the left singular vectors U;
the second forms V_k = Mᵀ U_k / s_k. The path is M V_k = s_k U_k (plus the mean
row's projection when centering). The components are kept in float32 and
re-orthonormalized (Cholesky QR, twice, accumulated in float64 block by block),
so memory is O(n² + n·chunk_size) plus the n_components float32 vectors of the
result: the n x P matrix, and any float64 vector of P numbers, is never formed.

Degenerate trajectories: singular values below the numerical-rank tolerance
(s_k² <= s_1² · n · 1e-12) count as 0. Components past the rank (also when
``n_components`` exceeds the number of rows) get zero singular value and
explained variance, and are filled with deterministic unit vectors orthogonal
to the others (drawn from ``seed``), so the rows stay orthonormal and nothing is NaN.

Sign convention: each component is oriented so that the earliest path point
with a non-negligible coordinate along it (|x| > 1e-6 · max |x|) has a positive
coordinate; normally that is θ_0, so the start of training lies at positive
coordinates. A component along which every point projects to 0 is oriented so
that its largest-magnitude entry is positive.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_landscape._validation import check_nonnegative_float, check_positive_int
from lightning_landscape.params import unflatten_vector
from lightning_landscape.results.pca import PCAResult
from lightning_landscape.trajectory.store import SnapshotStore

#: The fewest snapshots a trajectory PCA accepts.
MIN_SNAPSHOTS = 3
# trajectory_pca streams float64 column blocks of about an eighth of one float32 model copy (within
# these bounds), so that with its two float32 components it stays well under three model copies.
_PCA_BLOCK_BYTES = (2**20, 64 * 2**20)
_FLOAT64_BYTES = 8  # the streamed blocks are float64
# Eigenvalues s_k² <= s_1² · n · _RANK_RTOL count as 0: a float64 Gram matrix is exact to about 1e-16 of s_1².
_RANK_RTOL = 1e-12
# A path coordinate |x| > _SIGN_RTOL · max |x| decides a component's sign; smaller ones are rounding noise.
_SIGN_RTOL = 1e-6

#: ``part(a, b)``: elements ``a:b`` of a flat vector, as a 1-D CPU tensor.
FlatSlicer = Callable[[int, int], torch.Tensor]


class TooFewSnapshotsError(ValueError):
    """Raised by :func:`trajectory_pca` when the store holds fewer than 3 snapshots.

    Attributes:
        count: the number of snapshots found.
        minimum: the number needed (3).

    Example:
        >>> err = TooFewSnapshotsError(2)
        >>> err.count, isinstance(err, ValueError)
        (2, True)
    """

    def __init__(self, count: int, minimum: int = MIN_SNAPSHOTS) -> None:
        self.count = count
        self.minimum = minimum
        super().__init__(
            f"`store` holds {count} snapshot(s); trajectory PCA needs at least {minimum}. "
            "Record snapshots more often (or train longer) before computing the PCA."
        )


def _tensor_list(final: Any, num_params: int) -> list[torch.Tensor]:
    """``final`` as a non-empty list of floating tensors, else ``ValueError``."""
    iterable = isinstance(final, Iterable) and not isinstance(final, (str, bytes, Mapping))
    tensors = list(final) if iterable else None
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        raise ValueError(
            f"`final` is a {type(final).__name__}; expected a floating tensor of {num_params} elements or a "
            "non-empty list of floating tensors (the parameters, in snapshot order)."
        )
    return tensors


def _flat_slicer(final: Any, num_params: int) -> FlatSlicer:
    """``final`` (a tensor of P elements, or tensors whose flattened concatenation has P) as ``part(a, b)``.

    ``part(a, b)`` returns elements ``a:b`` of the flat vector as a 1-D CPU tensor of the
    original dtype, gathering the pieces of a sequence without ever concatenating all of it.
    """
    if isinstance(final, torch.Tensor):
        if not final.is_floating_point() or final.numel() != num_params:
            raise ValueError(
                f"`final` has {final.numel()} elements of {final.dtype}; expected a floating tensor of "
                f"{num_params} elements (the store's `num_params`)."
            )
        flat = final.detach().reshape(-1)
        return lambda a, b: flat[a:b].cpu()
    pieces = [t.detach().reshape(-1) for t in _tensor_list(final, num_params)]
    offsets = np.cumsum([0] + [p.numel() for p in pieces])
    if offsets[-1] != num_params:
        raise ValueError(
            f"`final` holds {int(offsets[-1])} elements in all; expected {num_params} (the store's `num_params`)."
        )

    def part(a: int, b: int) -> torch.Tensor:
        first = int(np.searchsorted(offsets, a, side="right")) - 1
        out = []
        for i in range(first, len(pieces)):
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            if lo >= b:
                break
            out.append(pieces[i][max(a, lo) - lo : min(b, hi) - lo].cpu())
        if len(out) == 1:
            return out[0]
        dtype = functools.reduce(torch.promote_types, (o.dtype for o in out))
        return torch.cat([o.to(dtype) for o in out])

    return part


def _orthonormalize_rows(vectors: torch.Tensor, cols: int) -> None:
    """Orthonormalize the rows of ``vectors`` (m x P, float32) in place, in order, by Cholesky QR done twice.

    Row k becomes a combination of rows 0..k, as in Gram–Schmidt. Products are
    accumulated in float64 over column blocks of ``cols``, so no float64 copy of a
    row is made.
    """
    m, num_params = vectors.shape
    for _ in range(2):  # twice: the second pass removes what float32 rounding left of the first's error
        gram = torch.zeros((m, m), dtype=torch.float64)
        for a in range(0, num_params, cols):
            block = vectors[:, a : a + cols].double()
            gram.addmm_(block, block.T)
        inverse = torch.linalg.inv(torch.linalg.cholesky(gram))
        for a in range(0, num_params, cols):
            vectors[:, a : a + cols] = inverse @ vectors[:, a : a + cols].double()


class _TrajectoryMatrix:
    """M = [θ_i − θ_n] of a store (centred when ``center``), streamed by float64 column blocks of ``cols``.

    One buffer for the stored values and one for their float64 copies serve every
    pass: a fresh block per step would leave the heap fragmented by freed blocks.
    """

    def __init__(self, store: SnapshotStore, final_part: FlatSlicer, cols: int, center: bool) -> None:
        self.store, self.final_part, self.cols, self.center = store, final_part, cols, center
        self._raw = torch.empty(len(store) * min(cols, store.num_params), dtype=store.torch_dtype)
        self._wide = torch.empty(self._raw.numel(), dtype=torch.float64)
        self.final_in_store = self._last_is_final()
        #: n, the rows of M: θ_n itself is left out when it is the store's last snapshot.
        self.rows = len(store) - 1 if self.final_in_store else len(store)

    def _snapshots(self, start: int, stop: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        out = self._raw
        for a, b, block in self.store.iter_column_blocks(self.cols, start=start, stop=stop, dtype=out.dtype, out=out):
            yield a, b, self._wide[: block.numel()].view(block.shape).copy_(block)

    def _last_is_final(self) -> bool:
        """Is the store's last snapshot θ_n itself (``final`` rounded to the storage dtype)? One row read."""
        count = len(self.store)
        return all(
            torch.equal(last[0], self.store.quantize(self.final_part(a, b)).double())
            for a, b, last in self._snapshots(count - 1, count)
        )

    def blocks(self) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """``(a, b, M[:, a:b], mean)``, ``mean`` the block's mean row (subtracted) when centering, else ``None``."""
        for a, b, block in self._snapshots(0, self.rows):
            block -= self.final_part(a, b)
            mean = None
            if self.center:
                mean = block.mean(dim=0)
                block -= mean
            yield a, b, block, mean


def _gram_spectrum(matrix: _TrajectoryMatrix) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Pass 1: eigenvalues (decreasing, >= 0) and eigenvectors of G = M Mᵀ in float64, its trace and M's rank."""
    n = matrix.rows
    gram = torch.zeros((n, n), dtype=torch.float64)
    for _, _, block, _ in matrix.blocks():
        gram.addmm_(block, block.T)
    gram = (gram + gram.T) / 2
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(
            "the snapshots hold NaN or Inf weights (training diverged?), so the trajectory has no principal "
            "directions; lower the learning rate, or record snapshots only up to the divergence "
            "(float16 storage, also dtype='auto' from 500,000 weights, holds only |w| <= 65504: use 'bfloat16')."
        )
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)  # decreasing
    tol = float(evals[0]) * n * _RANK_RTOL
    rank = int((evals > tol).sum()) if float(evals[0]) > 0 else 0
    return evals, evecs, float(torch.trace(gram)), rank


def _components(
    matrix: _TrajectoryMatrix, left: torch.Tensor, sing: torch.Tensor, n_components: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: the orthonormal float32 components V_k = Mᵀ U_k / s_k, and the mean row's projections on them.

    Components past the ``r = len(sing)`` kept singular values are deterministic filler
    directions drawn from ``seed``, orthogonal to the others after the QR.
    """
    r = sing.numel()
    weights = left / sing  # n x r: V = Mᵀ U / s
    comps = torch.zeros((n_components, matrix.store.num_params), dtype=torch.float32)
    mean_proj = torch.zeros(n_components, dtype=torch.float64)
    if r:
        for a, b, block, mean in matrix.blocks():
            part = weights.T @ block  # computed in float64 per block, kept in float32
            comps[:r, a:b] = part
            if mean is not None:
                mean_proj[:r] += part @ mean
    generator = torch.Generator().manual_seed(int(seed))
    for k in range(r, n_components):
        comps[k].normal_(generator=generator)
    _orthonormalize_rows(comps, matrix.cols)  # exact orthonormality, lost to rounding in small components
    if matrix.center and r < n_components:  # the fillers' coordinate of every point is the mean row's projection
        for a, b, _, mean in matrix.blocks():
            mean_proj[r:] += comps[r:, a:b].double() @ mean  # type: ignore[operator]
    return comps, mean_proj


def _oriented_path(comps: torch.Tensor, scaled_left: torch.Tensor, mean_proj: torch.Tensor | None) -> np.ndarray:
    """The ``(n + 1, n_components)`` path M V_k = s_k U_k (+ the mean row's projection), the final point 0.

    Flips components (in place) and their path columns to the sign convention of the module docstring.
    """
    n, r = scaled_left.shape
    path = np.zeros((n + 1, comps.shape[0]), dtype=np.float64)
    path[:n, :r] = scaled_left.numpy()
    if mean_proj is not None:
        path[:n] += mean_proj.numpy()
    for k in range(comps.shape[0]):
        column = path[:n, k]
        scale = float(np.max(np.abs(column))) if n else 0.0
        if scale > 0:
            first = int(np.argmax(np.abs(column) > _SIGN_RTOL * scale))
            flip = column[first] < 0
        else:
            flip = float(comps[k, int(torch.argmax(comps[k].abs()))]) < 0
        if flip:
            comps[k].neg_()
            path[:n, k] *= -1
    path[n] = 0.0
    return path


def _spectrum(kept: torch.Tensor, total: float, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Singular values and explained variance ratios of the kept eigenvalues s_k² of G, zero-padded to n_components."""
    r = kept.numel()
    singular_values = np.zeros(n_components, dtype=np.float64)
    singular_values[:r] = torch.sqrt(kept).numpy()
    ratio = np.zeros(n_components, dtype=np.float64)
    if total > 0:
        ratio[:r] = kept.numpy() / total
    return singular_values, ratio


def _path_labels(
    store: SnapshotStore, n: int, final_in_store: bool, final_step: int | None, final_epoch: int | None
) -> tuple[list[int], list[int]]:
    """The steps and epochs of the n path rows of M and of the final point."""
    steps, epochs = store.steps[:n], store.epochs[:n]
    if final_in_store:
        steps.append(store.steps[-1])
        epochs.append(store.epochs[-1])
    else:
        steps.append(-1 if final_step is None else int(final_step))
        epochs.append(-1 if final_epoch is None else int(final_epoch))
    return steps, epochs


def _checked_arguments(store: Any, final: Any, n_components: Any, chunk_size: Any) -> tuple[int, FlatSlicer, int]:
    """``n_components``, ``final`` as a slicer and the streamed block width, after checking every argument."""
    if not isinstance(store, SnapshotStore):
        raise ValueError(f"`store` is a {type(store).__name__}; expected a SnapshotStore.")
    n_components = check_positive_int("n_components", n_components)
    chunk_size = check_positive_int("chunk_size", chunk_size, allow_none=True)
    num_params = store.num_params
    final_part = _flat_slicer(final, num_params)
    if n_components > num_params:
        raise ValueError(
            f"`n_components`={n_components} is not valid; expected at most {num_params}, the number of parameters."
        )
    count = len(store)
    if count < MIN_SNAPSHOTS:
        raise TooFewSnapshotsError(count)
    low, high = _PCA_BLOCK_BYTES
    block_bytes = max(low, min(high, num_params // 2))  # num_params // 2 bytes: an eighth of a float32 copy
    cols = chunk_size or max(1, min(num_params, block_bytes // (_FLOAT64_BYTES * count)))
    return n_components, final_part, cols


def trajectory_pca(
    store: SnapshotStore,
    final: torch.Tensor | Sequence[torch.Tensor],
    n_components: int = 2,
    *,
    center: bool = False,
    chunk_size: int | None = None,
    final_step: int | None = None,
    final_epoch: int | None = None,
    seed: int = 0,
) -> PCAResult:
    """PCA of the trajectory matrix M = [θ_0 − θ_n; ...; θ_{n−1} − θ_n] (Li et al. 2018, section 7).

    θ_n is ``final`` (the weights the surface is centred on) and θ_0, ..., θ_{n−1}
    are the store's snapshots. If the store's last snapshot equals ``final``
    (after rounding ``final`` to the storage dtype) it is θ_n itself: it is left
    out of M instead of adding a zero row, which would not change the SVD of the
    uncentered M anyway.

    By default M is decomposed exactly as written, with no centering, which is
    what ``numpy.linalg.svd(M)`` gives; ``center=True`` subtracts the mean row
    first, as ``sklearn.decomposition.PCA`` does. Either way the path holds the
    orthogonal projections (θ_i − θ_n)·V_k, so the final point is the origin of
    the plane θ_n + αV_1 + βV_2. The store is streamed twice by column blocks
    (see the module docstring for the algorithm, the rank tolerance, the filler
    directions past the rank and the sign convention).

    Args:
        store: the snapshots, at least 3.
        final: θ_n, a tensor of P elements (flattened like the snapshots), or
            the sequence of tensors whose flattened concatenation it is (e.g.
            the model's trainable parameters in snapshot order), which are read
            block by block without making a flat copy.
        n_components: how many principal directions to keep.
        center: subtract the mean row of M before the SVD.
        chunk_size: parameters per streamed column block; ``None`` picks float64
            blocks of about an eighth of one float32 copy of the weights (1 to 64 MiB).
        final_step, final_epoch: the step and epoch reported for the final path
            point when it is not the store's last snapshot.
        seed: seeds the filler directions past the trajectory's rank.

    Raises:
        TooFewSnapshotsError: if the store holds fewer than 3 snapshots.
        ValueError: on a ``final`` of the wrong size or another invalid argument.

    Example:
        >>> store = SnapshotStore(3, storage="memory")
        >>> for t in range(4):
        ...     store.append(torch.tensor([1.0, 2.0, 0.0]) * (3 - t), step=t, epoch=0)
        >>> result = trajectory_pca(store, torch.zeros(3))
        >>> result.final_in_store, result.explained_variance_ratio.round(6).tolist()
        (True, [1.0, 0.0])
        >>> result.path[:, 0].round(4).tolist()
        [6.7082, 4.4721, 2.2361, 0.0]
    """
    n_components, final_part, cols = _checked_arguments(store, final, n_components, chunk_size)
    matrix = _TrajectoryMatrix(store, final_part, cols, bool(center))
    n = matrix.rows
    evals, evecs, total, rank = _gram_spectrum(matrix)
    r = min(rank, n_components)
    sing, left = torch.sqrt(evals[:r]), evecs[:, :r]
    comps, mean_proj = _components(matrix, left, sing, n_components, seed)

    path = _oriented_path(comps, left * sing, mean_proj if center else None)
    singular_values, ratio = _spectrum(evals[:r], total, n_components)
    steps, epochs = _path_labels(store, n, matrix.final_in_store, final_step, final_epoch)
    return PCAResult(
        components=comps,
        singular_values=singular_values,
        explained_variance_ratio=ratio,
        path=path,
        steps=steps,
        epochs=epochs,
        centered=bool(center),
        rank=rank,
        final_in_store=matrix.final_in_store,
        metadata={"num_snapshots": len(store), "storage_dtype": store.dtype},
    )


def pca_directions(result: PCAResult, like: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The components of ``result`` as direction dicts shaped, typed and placed like ``like``.

    ``like`` must hold the tensors the snapshots were flattened from, in the
    same key order (usually the model's trainable parameters); the directions
    are unit vectors in the flat weight space and feed the surface engine as
    ``loss_surface(model, data, pca_directions(result, params), coords, ...)``,
    with coordinates on the scale of ``result.path``.

    Raises:
        ValueError: if the tensors in ``like`` do not add up to P elements.

    Example:
        >>> store = SnapshotStore(3, storage="memory")
        >>> for t in range(3):
        ...     store.append(torch.tensor([3.0 - t, 0.0, 0.0]), step=t, epoch=0)
        >>> result = trajectory_pca(store, torch.zeros(3), n_components=1)
        >>> (direction,) = pca_directions(result, {"w": torch.zeros(1, 2), "b": torch.zeros(1)})
        >>> direction["w"].abs().tolist(), direction["b"].shape
        ([[1.0, 0.0]], torch.Size([1]))
    """
    if not isinstance(result, PCAResult):
        raise ValueError(f"`result` is a {type(result).__name__}; expected a PCAResult from trajectory_pca.")
    return [unflatten_vector(component, like) for component in result.components]


def path_range(path: Any, margin: float = 0.25) -> list[np.ndarray]:
    """Per-axis bounds ``array([lo, hi])`` covering every point of ``path`` plus a relative margin.

    Each axis spans [min, max] of its path coordinates widened by ``margin`` times
    its extent on both sides. An axis of zero extent (all points equal along it)
    borrows the largest extent of the other axes (1.0 if every axis is flat) and
    is centred on its value, so the bounds are never degenerate.

    Args:
        path: ``(points, axes)`` array, e.g. :attr:`PCAResult.path`.
        margin: the fraction of the extent added on each side (>= 0).

    Raises:
        ValueError: on an empty or non-finite path or a negative margin.

    Example:
        >>> path = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
        >>> [b.tolist() for b in path_range(path, margin=0.5)]
        [[-1.0, 3.0], [-2.0, 2.0]]
    """
    margin = check_nonnegative_float("margin", margin)
    try:
        points = np.asarray(path, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"`path` is not valid ({err}); expected a 2-D array of finite coordinates (points x axes)."
        ) from err
    if points.ndim != 2 or points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"`path` has shape {points.shape}; expected a non-empty 2-D array (points x axes).")
    if not np.all(np.isfinite(points)):
        raise ValueError("`path` contains non-finite coordinates; expected finite numbers.")
    lo, hi = points.min(axis=0), points.max(axis=0)
    extent = hi - lo
    fallback = float(extent.max()) if float(extent.max()) > 0 else 1.0
    bounds = []
    for axis in range(points.shape[1]):
        if extent[axis] > 0:
            pad = margin * extent[axis]
            bounds.append(np.array([lo[axis] - pad, hi[axis] + pad]))
        else:
            half = fallback * (0.5 + margin)
            bounds.append(np.array([lo[axis] - half, hi[axis] + half]))
    return bounds
