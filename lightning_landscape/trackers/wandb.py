"""W&B: figures as images, the plotly surface, tables, scalars in history and summary, arrays as an artifact."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger

from lightning_landscape.trackers.base import Publication


class WandbTracker:
    """Publishes to a :class:`~pytorch_lightning.loggers.WandbLogger` (or a subclass).

    Figures go through the logger's own ``log_image`` (one ``wandb.Image`` per figure,
    made from the figure object), tables through ``log_table``, scalars into the
    history with ``trainer/global_step`` and the run summary; the ``.npz`` files become
    an artifact of type ``pub.artifact_type`` and plain run files.

    Example:
        >>> WandbTracker.accepts(object())
        False
    """

    def __init__(self, logger: WandbLogger) -> None:
        self.logger = logger

    @staticmethod
    def accepts(logger: Any) -> bool:
        """Whether ``logger`` is a WandbLogger (subclasses included)."""
        return isinstance(logger, WandbLogger)

    def publish(self, pub: Publication) -> None:
        """Send ``pub`` to the logger's run."""
        import wandb

        run = self.logger.experiment
        named = pub.named_scalars()
        if named:
            self.logger.log_metrics(named, step=pub.step)
            run.summary.update(named)
        for key, fig in pub.figures.items():
            self.logger.log_image(pub.key(key), images=[fig], step=pub.step, caption=[f"{pub.prefix} {key}"])
        if pub.plotly_figure is not None:
            self.logger.log_metrics({pub.key("surface_interactive"): wandb.Plotly(pub.plotly_figure)}, step=pub.step)
        for key, (columns, rows) in pub.tables.items():
            self.logger.log_table(pub.key(key), columns=columns, data=rows, step=pub.step)
        self._log_arrays(run, pub)
        rehome_stray_run_files(run, self.logger)

    @staticmethod
    def _log_arrays(run: Any, pub: Publication) -> None:
        import wandb

        arrays = [Path(p) for p in pub.files.values() if Path(p).suffix == ".npz"]
        if not arrays:
            return
        artifact = wandb.Artifact(name=f"{pub.prefix.replace('/', '-')}-{run.id}", type=pub.artifact_type)
        for path in arrays:
            artifact.add_file(str(path))
            # Also a plain run file (a copy, not a link), so the arrays sit in the run directory next to the images.
            copy = Path(run.dir) / path.name
            shutil.copy2(path, copy)
            run.save(str(copy), base_path=run.dir, policy="now")
        run.log_artifact(artifact)


def rehome_stray_run_files(run: Any, logger: Any) -> None:
    """Move what this process wrote into the wrong run directory to the run's own (``ddp_spawn``).

    A spawned rank zero attaches to the run that the main process created under
    ``<save_dir>/wandb/<run>``, but the attached run takes its directory from the child's global
    W&B settings (the working directory by default), so the images logged there would land in
    ``./wandb/<run>/files`` while the run's records point to ``<save_dir>/wandb/<run>/files``.
    The stray folder then holds only the files this process logged: they are moved over (and the
    folder removed when it is left empty), so the run directory is complete for ``wandb sync``.
    """
    save_dir = getattr(logger, "save_dir", None)
    here = Path(run.dir)
    if not save_dir or not here.is_dir():
        return
    home = Path(save_dir) / "wandb" / here.parent.name / "files"
    if not home.is_dir() or home.resolve() == here.resolve():
        return
    for item in sorted(here.rglob("*")):
        if item.is_file():
            target = home / item.relative_to(here)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(item), str(target))
    for folder in (
        *sorted((p for p in here.rglob("*") if p.is_dir()), reverse=True),
        here,
        here.parent,
        here.parent.parent,
    ):
        with contextlib.suppress(OSError):  # only empty folders go; anything else stays
            folder.rmdir()
