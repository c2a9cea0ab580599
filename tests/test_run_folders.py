"""No run overwrites another's files: each run writes into its own folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from lightning_landscape import HessianSpectrum, Landscape, LossSurface

from .helpers import small_fit

FILES = {"loss_surface.npz", "hessian.npz"}


def _callbacks(**kwargs):
    return [
        LossSurface(dims=1, resolution=3, num_batches=1, progress=False, **kwargs),
        HessianSpectrum(num_batches=1, trace=False, density=False, **kwargs),
    ]


def _result_sets(root: Path) -> dict[Path, set[str]]:
    found: dict[Path, set[str]] = {}
    for npz in root.rglob("*.npz"):
        if "wandb" not in npz.parts:
            found.setdefault(npz.parent, set()).add(npz.name)
    return found


@pytest.mark.parametrize("logger", ["none", "tensorboard", "wandb"])
def test_two_fits_leave_two_complete_sets_of_files(tmp_path, logger):
    def make_logger(i):
        if logger == "tensorboard":
            return TensorBoardLogger(str(tmp_path))
        if logger == "wandb":
            return WandbLogger(project="p", save_dir=str(tmp_path), offline=True)
        return False

    for seed in (0, 1):
        small_fit(tmp_path, _callbacks(), logger=make_logger(seed), max_epochs=1, seed=seed)
        if logger == "wandb":
            import wandb

            wandb.finish()
    sets = _result_sets(tmp_path)
    assert len(sets) == 2 and all(names == FILES for names in sets.values()), sets
    first, second = sorted(sets, key=lambda p: p.stat().st_mtime)
    losses = [Landscape.load(d / "loss_surface.npz").loss for d in (first, second)]
    assert (losses[0] != losses[1]).any()  # two runs, two results


def test_a_shared_dirpath_gets_a_run_stamped_subfolder_for_the_second_run(tmp_path):
    out = tmp_path / "out"
    small_fit(tmp_path, _callbacks(dirpath=str(out)), max_epochs=1)
    small_fit(tmp_path, _callbacks(dirpath=str(out)), max_epochs=1, seed=1)
    assert {p.name for p in out.glob("*.npz")} == FILES
    (stamped,) = [p for p in out.iterdir() if p.is_dir()]
    assert stamped.name.startswith("run-") and {p.name for p in stamped.glob("*.npz")} == FILES
