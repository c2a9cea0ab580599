"""What a sharpness analysis found: :class:`SharpnessReport`, saved as ``.npz``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_landscape.results.npz import load_npz, save_npz

#: The ``result_kind`` of a saved SharpnessReport.
KIND = "sharpness"
#: Metadata entries that hold the file's own bookkeeping, not the report's metadata.
_FILE_ENTRIES = ("result_format", "result_kind", "report_scalars")
_ARRAYS = ("ascent_losses", "basin_radii", "basin_weight_radii", "basin_capped", "radii", "loss_at_radii")
_SCALARS = (
    "loss",
    "eps_sharpness",
    "max_loss",
    "threshold",
    "basin_center_loss",
    "log_basin_volume",
    "num_moved",
    "lambda_max",
    "trace",
    "trace_stderr",
    "seconds",
)


@dataclass
class SharpnessReport:
    """The sharpness numbers at one set of weights, with the settings that produced them.

    Attributes:
        loss: L(θ), the eval-mode loss at the weights (the ε-sharpness' reference).
        eps_sharpness: ε-sharpness (Keskar et al. 2017), ``100 · (max_loss − loss) / (1 + loss)``.
        max_loss: the largest loss the ascent found in the ε-box.
        ascent_losses: the loss at each iterate of the ascent.
        basin_radii: the basin radius along each direction, in units of the direction.
        basin_weight_radii: the same in weight-space units ``‖r d‖`` (those enter the volume).
        basin_capped: True where the loss stayed below the threshold up to ``max_radius``
            (that radius, and then the volume, is a lower bound).
        threshold: the loss that bounds the basin.
        basin_center_loss: the loss at θ under the basin's BatchNorm policy (``bn``).
        log_basin_volume: ``log ω_n + log mean r_i^n`` over the weight-space radii (Huang et al. 2019).
        num_moved: n, the number of weights the directions move.
        radii: the radii (direction units) of the loss rise.
        loss_at_radii: ``L(θ + r d)``, one row per direction, one column per radius.
        lambda_max: the Hessian's largest eigenvalue (``None`` when not computed).
        trace: the Hessian's estimated trace (``None`` when not computed).
        trace_stderr: the standard error of ``trace``.
        seconds: wall time of the analysis.
        metadata: the settings (``epsilon``, ``steps``, ``subspace_dim``, ``seed``, ``num_directions``,
            ``rise``, ``bn``, ...) and versions, JSON-serializable.

    Example:
        >>> report = SharpnessReport(loss=0.5, eps_sharpness=2.0, basin_radii=np.array([1.0, 3.0]),
        ...                          radii=np.array([0.5]), loss_at_radii=np.array([[0.5], [1.0]]))
        >>> report.scalars()
        {'loss': 0.5, 'eps_sharpness': 2.0, 'basin_radius_mean': 2.0, 'basin_radius_min': 1.0, 'loss_rise@0.5': 0.25}
    """

    loss: float
    eps_sharpness: float
    max_loss: float | None = None
    ascent_losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    basin_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    basin_weight_radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    basin_capped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    threshold: float | None = None
    basin_center_loss: float | None = None
    log_basin_volume: float | None = None
    num_moved: int | None = None
    radii: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss_at_radii: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    lambda_max: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _ARRAYS:
            dtype = bool if name == "basin_capped" else np.float64
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))
        if self.loss_at_radii.ndim != 2:
            self.loss_at_radii = self.loss_at_radii.reshape(-1, self.radii.size)

    @property
    def loss_rise(self) -> np.ndarray:
        """The mean over directions of ``L(θ + r d) − L(θ)`` at each of :attr:`radii` (non-finite losses ignored)."""
        center = self.loss if self.basin_center_loss is None else self.basin_center_loss
        out = np.full(self.radii.shape, np.nan)
        for j in range(self.radii.size):
            column = self.loss_at_radii[:, j]
            column = column[np.isfinite(column)]
            if column.size:
                out[j] = float(np.mean(column) - center)
        return out

    def scalars(self) -> dict[str, float]:
        """The numbers for a logger (those computed): ``loss``, ``eps_sharpness``, ``basin_radius_mean``,
        ``basin_radius_min``, ``log_basin_volume``, ``loss_rise@<r>``, ``lambda_max``, ``trace``."""
        out = {"loss": float(self.loss), "eps_sharpness": float(self.eps_sharpness)}
        if self.basin_radii.size:
            out.update(basin_radius_mean=float(self.basin_radii.mean()), basin_radius_min=float(self.basin_radii.min()))
        if self.log_basin_volume is not None:
            out["log_basin_volume"] = float(self.log_basin_volume)
        for r, rise in zip(self.radii, self.loss_rise):
            out[f"loss_rise@{r:g}"] = float(rise)
        for name in ("lambda_max", "trace"):
            if getattr(self, name) is not None:
                out[name] = float(getattr(self, name))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report to one ``.npz`` file (arrays by name, scalars and settings in the metadata)."""
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        scalars = {name: getattr(self, name) for name in _SCALARS}
        return save_npz(path, KIND, arrays, dict(self.metadata, report_scalars=scalars))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SharpnessReport:
        """Read a file written by :meth:`save`.

        Example:
            >>> import tempfile
            >>> report = SharpnessReport(loss=0.5, eps_sharpness=2.0, basin_radii=np.array([1.0]), metadata={"seed": 0})
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = SharpnessReport.load(report.save(tmp + "/sharpness.npz"))
            >>> back.eps_sharpness, back.basin_radii.tolist(), back.lambda_max, back.metadata
            (2.0, [1.0], None, {'seed': 0})
        """
        data, meta = load_npz(path, kinds=(KIND,))
        metadata = {key: value for key, value in meta.items() if key not in _FILE_ENTRIES}
        arrays = {name: data[name] for name in _ARRAYS if name in data}
        return cls(**meta["report_scalars"], **arrays, metadata=metadata)
