"""Optimization trajectories and their PCA directions (Li et al., NeurIPS 2018, section 7).

Random directions capture almost none of a descent path, because two random
vectors in a high-dimensional space are nearly orthogonal. Li et al. instead
stack the snapshots θ_0, ..., θ_{n-1} of the trainable weights taken during
training, relative to the final weights θ_n,

    M = [θ_0 − θ_n; θ_1 − θ_n; ...; θ_{n−1} − θ_n]        (n rows, P columns),

and plot the loss on the plane through θ_n spanned by the top two right singular
vectors of M, with the path projected onto it.

This package is the Lightning-free core:

* :func:`flatten_parameters` / :func:`unflatten_vector` (from
  :mod:`lightning_landscape.params`) convert between a ``dict[str, Tensor]`` of
  parameters and one flat float32 vector;
* :class:`SnapshotStore` (:mod:`~lightning_landscape.trajectory.store`) keeps the
  K flat snapshots in CPU memory or, past a memory budget, in ``.npy`` files on
  disk (float32, float16 or bfloat16, or ``"auto"``: float16 from
  :data:`AUTO_FLOAT16_PARAMS` parameters; any of them opens with
  ``numpy.load(path, mmap_mode="r")``), and can be checkpointed and resumed; its
  blocks live in :mod:`~lightning_landscape.trajectory.blocks` and their file I/O
  and background writer in :mod:`~lightning_landscape.trajectory._npy`;
* :func:`trajectory_pca` (:mod:`~lightning_landscape.trajectory.pca`) computes the
  PCA by streaming the store twice, so the K x P matrix is never held in memory,
  and returns a :class:`~lightning_landscape.results.pca.PCAResult`;
* :func:`pca_directions` turns the components into direction dicts for the
  surface engine and :func:`path_range` picks plot bounds around the path.

Example:
    >>> store = SnapshotStore(2, storage="memory")
    >>> for t in range(3):
    ...     store.append(torch.tensor([2.0 - t, 0.0]), step=t, epoch=0)
    >>> trajectory_pca(store, torch.zeros(2), n_components=1).path[:, 0].tolist()
    [2.0, 1.0, 0.0]
"""

from lightning_landscape.params import flatten_parameters, unflatten_vector
from lightning_landscape.results.pca import PCAResult
from lightning_landscape.trajectory._npy import DTYPES as DTYPES
from lightning_landscape.trajectory.checks import AUTO_FLOAT16_PARAMS as AUTO_FLOAT16_PARAMS
from lightning_landscape.trajectory.checks import DTYPE_CHOICES as DTYPE_CHOICES
from lightning_landscape.trajectory.checks import STORAGES as STORAGES
from lightning_landscape.trajectory.checks import SnapshotChangedError
from lightning_landscape.trajectory.checks import check_max_memory_mb as check_max_memory_mb
from lightning_landscape.trajectory.pca import MIN_SNAPSHOTS as MIN_SNAPSHOTS
from lightning_landscape.trajectory.pca import TooFewSnapshotsError, path_range, pca_directions, trajectory_pca
from lightning_landscape.trajectory.store import SnapshotStore

__all__ = [
    "PCAResult",
    "SnapshotChangedError",
    "SnapshotStore",
    "TooFewSnapshotsError",
    "flatten_parameters",
    "pca_directions",
    "path_range",
    "trajectory_pca",
    "unflatten_vector",
]
