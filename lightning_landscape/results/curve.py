"""CurveResult: loss and metrics along a fitted curve and along the straight line, saved as ``.npz``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_landscape.results.npz import load_npz, save_npz

#: The ``result_kind`` of a saved CurveResult.
KIND = "curve"


def barrier_height(loss: np.ndarray) -> float:
    """max_t loss(t) − max(loss(0), loss(1)), with the first and last entries as t = 0 and t = 1.

    NaN when any value is NaN (a point whose loss was not finite: the height is unknown).

    Example:
        >>> barrier_height(np.array([0.5, 2.5, 1.0]))
        1.5
    """
    loss = np.asarray(loss, dtype=np.float64)
    return float(np.max(loss) - max(loss[0], loss[-1]))


@dataclass
class CurveResult:
    """What :func:`~lightning_landscape.connect.evaluate_curve` measured.

    Attributes:
        ts: the curve parameters t at which both paths were evaluated (0 and 1 included).
        curve: ``name -> array`` along the fitted curve φ(t): ``"loss"`` and each metric.
        line: the same along the straight line (1−t)·w₁ + t·w₂.
        barrier_curve: max_t loss(φ(t)) − max(loss(w₁), loss(w₂)).
        barrier_line: the same along the line.
        history: the curve fit's loss at each step (empty when the curve was not fitted here).
        settings: the fit and evaluation settings (``curve``, ``num_bends``, ``epochs``, ``lr``,
            ``optimizer``, ``seed``, ``bn``, ...).
        metadata: further JSON-serializable facts (versions, ``num_samples``).

    Example:
        >>> ts = np.linspace(0, 1, 3)
        >>> r = CurveResult(ts, {"loss": np.array([0.1, 0.2, 0.1])}, {"loss": np.array([0.1, 2.0, 0.1])})
        >>> round(r.barrier_curve, 6), round(r.barrier_line, 6)
        (0.1, 1.9)
    """

    ts: np.ndarray
    curve: dict[str, np.ndarray]
    line: dict[str, np.ndarray]
    barrier_curve: float | None = None
    barrier_line: float | None = None
    history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    settings: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ts = np.asarray(self.ts, dtype=np.float64)
        self.curve = {k: np.asarray(v, dtype=np.float64) for k, v in self.curve.items()}
        self.line = {k: np.asarray(v, dtype=np.float64) for k, v in self.line.items()}
        self.history = np.asarray(self.history, dtype=np.float64)
        for label, values in (("curve", self.curve), ("line", self.line)):
            if "loss" not in values:
                raise ValueError(f"`{label}` has keys {sorted(values)}; expected a 'loss' entry.")
            for name, array in values.items():
                if array.shape != self.ts.shape:
                    raise ValueError(f"`{label}[{name!r}]` has shape {array.shape}; expected {self.ts.shape} as `ts`.")
        if self.barrier_curve is None:
            self.barrier_curve = barrier_height(self.curve["loss"])
        if self.barrier_line is None:
            self.barrier_line = barrier_height(self.line["loss"])

    @property
    def names(self) -> list[str]:
        """The measured values: ``"loss"`` and the metrics."""
        return list(self.curve)

    def scalars(self) -> dict[str, float]:
        """Scalars for a logger: both barriers, the end points' losses, the worst loss on each path,
        and with an ``"accuracy"`` metric the worst error (1 − accuracy) on each path and at the ends;
        ``fit_loss``, the mean loss of the fit's last epoch, when the fit's history is here.

        Example:
            >>> ts = np.linspace(0, 1, 3)
            >>> r = CurveResult(ts, {"loss": np.array([0.1, 0.2, 0.3])}, {"loss": np.array([0.1, 1.0, 0.3])})
            >>> sorted(r.scalars())
            ['barrier_curve', 'barrier_line', 'loss_end', 'loss_start', 'max_loss_curve', 'max_loss_line']
        """
        out = {
            "barrier_curve": float(self.barrier_curve),  # type: ignore[arg-type]
            "barrier_line": float(self.barrier_line),  # type: ignore[arg-type]
            "loss_start": float(self.curve["loss"][0]),
            "loss_end": float(self.curve["loss"][-1]),
            "max_loss_curve": float(np.max(self.curve["loss"])),
            "max_loss_line": float(np.max(self.line["loss"])),
        }
        if "accuracy" in self.curve:
            out["max_error_curve"] = float(1.0 - np.min(self.curve["accuracy"]))
            out["max_error_line"] = float(1.0 - np.min(self.line["accuracy"]))
            out["error_start"] = float(1.0 - self.curve["accuracy"][0])
            out["error_end"] = float(1.0 - self.curve["accuracy"][-1])
        if self.history.size:
            per_epoch = int(self.settings.get("steps_per_epoch") or self.history.size)
            out["fit_loss"] = float(np.mean(self.history[-per_epoch:]))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result to one ``.npz`` file (``.npz`` appended when missing) and return its path.

        Arrays: ``ts``, ``curve_<name>`` and ``line_<name>`` per value, ``history``; the barriers,
        settings and metadata go into the JSON metadata (see :func:`~lightning_landscape.results.save_npz`).

        Example:
            >>> import tempfile
            >>> r = CurveResult([0.0, 1.0], {"loss": [1.0, 2.0]}, {"loss": [1.0, 2.0]}, settings={"seed": 3})
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = CurveResult.load(r.save(Path(tmp) / "curve"))
            >>> back.settings, back.curve["loss"].tolist(), back.barrier_line
            ({'seed': 3}, [1.0, 2.0], 0.0)
        """
        arrays: dict[str, np.ndarray] = {"ts": self.ts, "history": self.history}
        for prefix, values in (("curve", self.curve), ("line", self.line)):
            arrays.update({f"{prefix}_{name}": array for name, array in values.items()})
        meta = {
            "value_names": self.names,
            "barrier_curve": float(self.barrier_curve),  # type: ignore[arg-type]
            "barrier_line": float(self.barrier_line),  # type: ignore[arg-type]
            "settings": dict(self.settings),
            "metadata": dict(self.metadata),
        }
        return save_npz(path, KIND, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CurveResult:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: naming the file, if it is not a saved CurveResult.
        """
        arrays, meta = load_npz(path, kinds=(KIND,))
        try:
            names = meta["value_names"]
            return cls(
                ts=arrays["ts"],
                curve={name: arrays[f"curve_{name}"] for name in names},
                line={name: arrays[f"line_{name}"] for name in names},
                barrier_curve=float(meta["barrier_curve"]),
                barrier_line=float(meta["barrier_line"]),
                history=arrays["history"],
                settings=dict(meta["settings"]),
                metadata=dict(meta["metadata"]),
            )
        except KeyError as err:
            raise ValueError(
                f"`path`={str(path)!r} has no entry {err}; expected a CurveResult saved by CurveResult.save."
            ) from err
