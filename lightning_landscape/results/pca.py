"""PCAResult: the principal directions of a trajectory and the path projected onto them, saved as ``.npz``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_landscape.results.npz import load_npz, save_npz

#: The ``result_kind`` of a saved PCAResult.
KIND = "pca"


@dataclass
class PCAResult:
    """The principal directions of a trajectory and the path projected onto them.

    Attributes:
        components: ``(n_components, P)`` float32 tensor with orthonormal rows, the
            right singular vectors V_k of M (of the centered M with ``centered``).
        singular_values: ``(n_components,)`` float64, s_k, in decreasing order;
            0 beyond the numerical rank.
        explained_variance_ratio: ``(n_components,)`` float64, s_k² / Σ_all s², the
            sum running over all singular values of M, not only the kept ones.
        path: ``(n + 1, n_components)`` float64: row i < n is the projection
            (θ_i − θ_final)·V_k of snapshot i used in M; the last row is the final
            point, exactly 0.
        steps: the global step of each path row (the final row takes the last
            snapshot's step when the store's last snapshot is the final one,
            else ``final_step``, -1 when unknown).
        epochs: the epoch of each path row, like ``steps``.
        centered: whether the row mean of M was subtracted before the SVD.
        rank: the numerical rank of the (centered) M.
        final_in_store: whether the store's last snapshot equalled ``final`` and
            was left out of M.
        metadata: JSON-serializable facts (``num_snapshots``, ``storage_dtype``, ...).

    Example:
        >>> r = PCAResult(torch.eye(2, 3), np.ones(2), np.full(2, 0.5), np.zeros((4, 2)), [0, 1, 2, 3], [0] * 4)
        >>> r.n_components, r.num_params
        (2, 3)
    """

    components: torch.Tensor
    singular_values: np.ndarray
    explained_variance_ratio: np.ndarray
    path: np.ndarray
    steps: list[int]
    epochs: list[int]
    centered: bool = False
    rank: int = 0
    final_in_store: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        """The number of components kept."""
        return int(self.components.shape[0])

    @property
    def num_params(self) -> int:
        """P, the length of each component."""
        return int(self.components.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to one ``.npz`` file (``.npz`` is appended when missing) and return its path.

        Arrays are stored under their attribute names (``components`` in its own
        dtype, ``steps`` and ``epochs`` as int64); ``centered``, ``rank``,
        ``final_in_store`` and ``metadata`` go into the JSON metadata, so
        ``metadata`` must hold JSON values. :meth:`load` gives back every field exactly.

        Example:
            >>> import tempfile
            >>> r = PCAResult(torch.eye(2, 3), np.ones(2), np.full(2, 0.5), np.zeros((3, 2)), [0, 5, 9], [0, 0, 1])
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     saved = r.save(Path(tmp) / "pca")
            ...     back = PCAResult.load(saved)
            >>> saved.name, back.components.dtype, torch.equal(back.components, r.components), back.steps
            ('pca.npz', torch.float32, True, [0, 5, 9])
        """
        arrays = {
            "components": self.components.detach().cpu().numpy(),
            "singular_values": np.asarray(self.singular_values),
            "explained_variance_ratio": np.asarray(self.explained_variance_ratio),
            "path": np.asarray(self.path),
            "steps": np.asarray(self.steps, dtype=np.int64),
            "epochs": np.asarray(self.epochs, dtype=np.int64),
        }
        meta = {
            "centered": bool(self.centered),
            "rank": int(self.rank),
            "final_in_store": bool(self.final_in_store),
            "metadata": dict(self.metadata),
        }
        return save_npz(path, KIND, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCAResult:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming the file, if it is not a saved PCAResult (truncated,
                another ``.npz``, another result kind, an entry missing).

        Example:
            >>> import tempfile
            >>> r = PCAResult(torch.eye(1, 2), np.ones(1), np.ones(1), np.zeros((3, 1)), [0, 1, 2], [0, 0, 0], rank=1)
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = PCAResult.load(r.save(Path(tmp) / "pca.npz"))
            >>> back.rank, back.path.shape
            (1, (3, 1))
        """
        arrays, meta = load_npz(path, kinds=(KIND,))
        try:
            return cls(
                components=torch.from_numpy(arrays["components"]),
                singular_values=arrays["singular_values"],
                explained_variance_ratio=arrays["explained_variance_ratio"],
                path=arrays["path"],
                steps=arrays["steps"].tolist(),
                epochs=arrays["epochs"].tolist(),
                centered=bool(meta["centered"]),
                rank=int(meta["rank"]),
                final_in_store=bool(meta["final_in_store"]),
                metadata=dict(meta["metadata"]),
            )
        except KeyError as err:
            raise ValueError(
                f"`path`={str(path)!r} has no entry {err}; expected a PCAResult saved by PCAResult.save."
            ) from err
