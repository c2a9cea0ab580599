"""The one tracker layer: results -> files, W&B, TensorBoard, CSV and any other logger.

Callbacks compute; these functions only write. They never call a collective, so
the callers run them on global rank zero only.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from matplotlib.figure import Figure

log = logging.getLogger(__name__)


class SavableResult(Protocol):
    """Anything with ``save(path) -> Path`` (a Landscape, a HessianReport).

    Example:
        >>> import tempfile, numpy as np
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
        >>> import tempfile, numpy as np
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
        fig.savefig(png, dpi=110)
        files[key] = png
        if pdf:
            fig.savefig(png.with_suffix(".pdf"))
            files[f"{key}.pdf"] = png.with_suffix(".pdf")
    return files


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def _is_tensorboard(logger: Any) -> bool:
    return type(logger).__name__ == "TensorBoardLogger"


def log_to_loggers(
    loggers: Iterable[Any],
    prefix: str,
    *,
    step: int,
    scalars: Mapping[str, float],
    figures: Mapping[str, Figure],
    files: Mapping[str, Path],
    artifact_type: str = "landscape",
    plotly_figure: Any = None,
    tables: Mapping[str, tuple[list[str], list[list[Any]]]] | None = None,
) -> None:
    """Send one analysis' scalars, figures and arrays to every logger.

    - W&B: figures as ``wandb.Image`` (from the PNG files), the plotly figure as
      ``wandb.Plotly``, tables as ``wandb.Table``, scalars in the history with
      ``trainer/global_step`` and in the run summary, the ``.npz`` as an artifact
      of type ``artifact_type`` and as a run file.
    - TensorBoard: ``add_figure`` and ``add_scalar``.
    - Any other logger (CSV, MLflow, ...): ``log_metrics`` with the scalars.

    Keys are ``<prefix>/<name>``.

    Example:
        >>> class PrintLogger:  # stands in for a CSV or MLflow logger
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        ...     def save(self):
        ...         pass
        >>> log_to_loggers([PrintLogger()], "surface", step=3, scalars={"center_loss": 0.5}, figures={}, files={})
        3 {'surface/center_loss': 0.5}
    """
    named = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
    for logger in loggers:
        try:
            if _is_wandb(logger):
                _log_wandb(logger, prefix, step, named, figures, files, artifact_type, plotly_figure, tables or {})
            elif _is_tensorboard(logger):
                writer = logger.experiment
                for key, fig in figures.items():
                    writer.add_figure(f"{prefix}/{key}", fig, global_step=step, close=False)
                for key, value in named.items():
                    writer.add_scalar(key, value, global_step=step)
                writer.flush()
            elif named:
                logger.log_metrics(named, step=step)
                logger.save()
        except Exception as err:  # a logger failing must not lose the files already written
            log.warning("lightning_landscape: logging %r to %s failed: %s", prefix, type(logger).__name__, err)


def _log_wandb(
    logger: Any,
    prefix: str,
    step: int,
    named: Mapping[str, float],
    figures: Mapping[str, Figure],
    files: Mapping[str, Path],
    artifact_type: str,
    plotly_figure: Any,
    tables: Mapping[str, tuple[list[str], list[list[Any]]]],
) -> None:
    import wandb

    run = logger.experiment
    payload: dict[str, Any] = dict(named)
    for key in figures:
        if key in files:
            payload[f"{prefix}/{key}"] = wandb.Image(str(files[key]), caption=f"{prefix} {key}")
    if plotly_figure is not None:
        payload[f"{prefix}/surface_interactive"] = wandb.Plotly(plotly_figure)
    for key, (columns, rows) in tables.items():
        payload[f"{prefix}/{key}"] = wandb.Table(columns=columns, data=rows)
    payload["trainer/global_step"] = step
    run.log(payload)
    run.summary.update(dict(named))
    arrays = [Path(p) for p in files.values() if Path(p).suffix == ".npz"]
    if arrays:
        artifact = wandb.Artifact(name=f"{prefix.replace('/', '-')}-{run.id}", type=artifact_type)
        for path in arrays:
            artifact.add_file(str(path))
            # Also a plain run file (a copy, not a link), so the arrays sit in the run directory next to the images.
            copy = Path(run.dir) / path.name
            shutil.copy2(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")
        run.log_artifact(artifact)
