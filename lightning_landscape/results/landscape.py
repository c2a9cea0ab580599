"""Result containers that save to and load from ``.npz`` exactly."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_landscape.results.npz import METADATA_KEY, load_npz, save_npz

_RESERVED = (METADATA_KEY, "evaluated")
#: The ``result_kind`` of a saved Landscape.
KIND = "landscape"


@dataclass
class Landscape:
    """Loss (and metrics) over a 1-D or 2-D grid of weight-space coordinates.

    Attributes:
        coords: one 1-D float array per axis (α, and β for a surface).
        values: ``name -> array`` of shape ``(len(coords[0]),)`` or
            ``(len(coords[0]), len(coords[1]))``; ``values[name][i, j]`` is taken at
            ``(coords[0][i], coords[1][j])``. Always holds ``"loss"``. A point not
            evaluated yet, or whose loss was not finite, holds NaN.
        evaluated: boolean mask of the grid points already evaluated (a partial
            result can be saved and resumed).
        metadata: JSON-serializable facts (``kind``, ``norm``, ``ignore``, ``seed``,
            ``center_loss``, ``num_nonfinite``, versions, ...).
        extras: further named arrays saved alongside (e.g. a trajectory's ``path``).

    Example:
        >>> ls = Landscape(coords=[np.linspace(-1, 1, 3)], values={"loss": np.array([1.0, 0.5, 1.0])})
        >>> ls.dims, float(ls.loss.min())
        (1, 0.5)
    """

    coords: list[np.ndarray]
    values: dict[str, np.ndarray]
    evaluated: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coords = [np.asarray(c, dtype=np.float64) for c in self.coords]
        self.values = {k: np.asarray(v, dtype=np.float64) for k, v in self.values.items()}
        if "loss" not in self.values:
            raise ValueError(f"`values` has keys {sorted(self.values)}; expected a 'loss' entry.")
        if self.evaluated is None:
            self.evaluated = np.ones(self.shape, dtype=bool)
        self.evaluated = np.asarray(self.evaluated, dtype=bool)
        for name, array in self.values.items():
            if array.shape != self.shape:
                raise ValueError(f"`values[{name!r}]` has shape {array.shape}; expected {self.shape} from `coords`.")

    @classmethod
    def empty(
        cls, coords: list[np.ndarray], names: Iterable[str] = (), metadata: dict[str, Any] | None = None
    ) -> Landscape:
        """A landscape over ``coords`` with nothing evaluated yet: NaN values for the loss and ``names``.

        Example:
            >>> ls = Landscape.empty([np.arange(3.0)], ["accuracy"])
            >>> sorted(ls.values), bool(ls.evaluated.any())
            (['accuracy', 'loss'], False)
        """
        shape = tuple(len(c) for c in coords)
        values = {name: np.full(shape, np.nan) for name in ("loss", *names)}
        return cls(coords=coords, values=values, evaluated=np.zeros(shape, dtype=bool), metadata=dict(metadata or {}))

    @property
    def dims(self) -> int:
        """1 for a curve, 2 for a surface."""
        return len(self.coords)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid shape, one entry per axis."""
        return tuple(len(c) for c in self.coords)

    @property
    def loss(self) -> np.ndarray:
        """The loss array (``values["loss"]``)."""
        return self.values["loss"]

    @property
    def complete(self) -> bool:
        """Whether every grid point has been evaluated."""
        return bool(self.evaluated.all())  # type: ignore[union-attr]

    @property
    def num_nonfinite(self) -> int:
        """How many evaluated points had a non-finite loss (stored as NaN)."""
        return int(np.sum(self.evaluated & ~np.isfinite(self.loss)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write all arrays and the metadata to one ``.npz`` file and return its path.

        Arrays are stored under plain names: ``coords_0`` (``coords_1``), one
        entry per value (``loss``, metric names), ``evaluated``, the extras, and
        ``metadata_json``.
        """
        arrays: dict[str, np.ndarray] = {f"coords_{i}": c for i, c in enumerate(self.coords)}
        for group in (self.values, self.extras):
            for name, array in group.items():
                if name in arrays or name in _RESERVED or name.startswith("coords_"):
                    raise ValueError(f"array name {name!r} is used twice or reserved; rename the metric or extra.")
                arrays[name] = np.asarray(array)
        arrays["evaluated"] = self.evaluated  # type: ignore[assignment]
        meta = dict(self.metadata, value_names=list(self.values), extra_names=list(self.extras), dims=self.dims)
        return save_npz(path, KIND, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Landscape:
        """Read a file written by :meth:`save`.

        Example:
            >>> import tempfile
            >>> ls = Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)}, metadata={"seed": 0})
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     back = Landscape.load(ls.save(tmp + "/surface.npz"))
            >>> back.metadata["seed"], back.loss.tolist()
            (0, [1.0, 1.0, 1.0])
        """
        data, meta = load_npz(path, kinds=(KIND,))
        meta.pop("result_format", None)
        meta.pop("result_kind", None)
        dims = meta.pop("dims")
        value_names = meta.pop("value_names")
        extra_names = meta.pop("extra_names")
        return cls(
            coords=[data[f"coords_{i}"] for i in range(dims)],
            values={name: data[name] for name in value_names},
            evaluated=data["evaluated"],
            metadata=meta,
            extras={name: data[name] for name in extra_names},
        )

    def summary(self, radii: tuple[float, ...] = ()) -> dict[str, float]:
        """Scalars for a logger: the loss at the centre and the mean rise of the loss at each radius.

        The centre loss is ``metadata["center_loss"]`` (the loss at θ*) when present, else
        the value at the grid point nearest to the origin. The rise at radius
        ``r`` is the mean over grid points at distance ``r`` (within half a grid
        step) of ``loss - center_loss``, ignoring non-finite points.
        """
        grids = np.meshgrid(*self.coords, indexing="ij")
        radius = np.sqrt(sum(g**2 for g in grids))
        center = np.unravel_index(np.argmin(radius), self.shape)
        # The loss at θ* itself when the analysis measured it (the grid need not contain 0).
        center_loss = float(self.metadata.get("center_loss", self.loss[center]))
        out = {"center_loss": center_loss}
        step = min((float(np.min(np.diff(c))) if len(c) > 1 else np.inf) for c in self.coords)
        for r in radii:
            ring = np.abs(radius - r) <= step / 2 + 1e-12
            vals = self.loss[ring & np.isfinite(self.loss)]
            out[f"loss_rise@{r:g}"] = float(np.mean(vals) - center_loss) if vals.size else float("nan")
        return out
