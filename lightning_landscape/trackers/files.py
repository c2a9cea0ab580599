"""Files: the result as ``.npz`` and every figure as PNG (and PDF), in one directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from matplotlib.figure import Figure

#: Resolution of the PNG files: sharp on screen and in W&B, a few hundred kB per figure.
PNG_DPI = 110


class SavableResult(Protocol):
    """Anything with ``save(path) -> Path`` (a Landscape, a HessianReport, a PCAResult).

    Example:
        >>> import tempfile
        >>> from lightning_landscape import Landscape
        >>> result: SavableResult = Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     result.save(Path(tmp) / "surface.npz").name
        'surface.npz'
    """

    def save(self, path: str | os.PathLike) -> Path: ...


def write_files(
    dirpath: str | os.PathLike, name: str, result: SavableResult, figures: Mapping[str, Figure], *, pdf: bool = True
) -> dict[str, Path]:
    """Save ``result`` as ``<dirpath>/<name>.npz`` and each figure as PNG (and PDF).

    Returns ``{"npz": path, "<figure>": png_path, "<figure>.pdf": pdf_path, ...}``.

    Example:
        >>> import tempfile
        >>> from lightning_landscape import Landscape
        >>> ls = Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)})
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     sorted(write_files(tmp, "surface", ls, {}))
        ['npz']
    """
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    files = {"npz": result.save(dirpath / f"{name}.npz")}
    for key, fig in figures.items():
        png = dirpath / f"{name}_{key}.png"
        fig.savefig(png, dpi=PNG_DPI)
        files[key] = png
        if pdf:
            fig.savefig(png.with_suffix(".pdf"))
            files[f"{key}.pdf"] = png.with_suffix(".pdf")
    return files
