"""What a Hessian check found: :class:`HessianReport` (with its :class:`SpectralDensity`), saved as ``.npz``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lightning_landscape.results.npz import load_npz, save_npz

#: The ``result_kind`` of a saved HessianReport.
KIND = "hessian"
#: Metadata entries that hold the file's own bookkeeping, not the report's metadata.
_FILE_ENTRIES = ("result_format", "result_kind", "report_scalars", "array_names")


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
    """What :func:`~lightning_landscape.hessian.hessian_check` found.

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
        metadata in ``metadata_json`` (see :func:`~lightning_landscape.results.save_npz`).
        """
        arrays = {"eigenvalues": self.eigenvalues}
        if self.density is not None:
            arrays.update(density_grid=self.density.grid, density=self.density.values)
        scalars = {name: getattr(self, name) for name in self._SCALARS}
        return save_npz(path, KIND, arrays, dict(self.metadata, report_scalars=scalars, array_names=list(arrays)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> HessianReport:
        """Read a file written by :meth:`save` (also one written before the files had a kind).

        Example:
            >>> import tempfile
            >>> report = HessianReport(eigenvalues=np.array([3.0]), lambda_max=3.0, metadata={"seed": 0})
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = HessianReport.load(report.save(tmp + "/hessian.npz"))
            >>> back.lambda_max, back.lambda_min, back.metadata
            (3.0, None, {'seed': 0})
        """
        data, meta = load_npz(path, kinds=(KIND,))
        scalars, names = meta["report_scalars"], meta["array_names"]
        metadata = {key: value for key, value in meta.items() if key not in _FILE_ENTRIES}
        arrays = {name: data[name] for name in names}
        density = SpectralDensity(arrays["density_grid"], arrays["density"]) if "density" in arrays else None
        return cls(eigenvalues=arrays["eigenvalues"], density=density, **scalars, metadata=metadata)
