"""The Sharpness callback on a real Trainer: the logged scalars and the .npz, the numbers against an
independent evaluation of the final weights, training untouched, bad arguments refused early."""

from __future__ import annotations

import copy
import csv
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F

from lightning_landscape import random_direction
from lightning_landscape.callbacks.sharpness import Sharpness
from lightning_landscape.results import SharpnessReport

from .helpers import small_fit

NUM_BATCHES = 2  # of 32 samples: with shuffle=False the analysis sees train_set[:64]


def first_samples(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = datamodule.train_set.tensors
    return x[: 32 * NUM_BATCHES], y[: 32 * NUM_BATCHES]


def eval_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Independent reference: the eval-mode mean cross-entropy of a copy of the model."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def moved(model: torch.nn.Module, direction: dict, r: float) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.add_(r * direction[name])
    return out


def test_scalars_reach_the_csv_and_the_numbers_match_the_final_weights(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    rtol = 1e-3
    cb = Sharpness(
        epsilon=1e-4, steps=6, num_directions=3, rtol=rtol, num_batches=NUM_BATCHES, hessian=False, progress=False
    )
    trainer, model, dm = small_fit(tmp_path, [cb], logger=logger, max_epochs=1, shuffle=False)
    r = cb.report
    x, y = first_samples(dm)
    assert r.metadata["num_samples"] == 64 and r.metadata["loss_source"] == "training_step"
    assert r.loss == pytest.approx(eval_loss(model, x, y), rel=1e-5)
    # Each radius brackets the threshold crossing of the loss along its own direction.
    for i, radius in enumerate(r.basin_radii):
        d = random_direction(model, seed=i)
        below = eval_loss(moved(model, d, radius * (1 - rtol)), x, y)
        above = eval_loss(moved(model, d, radius * (1 + rtol)), x, y)
        assert below <= r.threshold < above
    assert r.threshold == pytest.approx(r.loss + 0.1, rel=1e-5)
    # ε = 1e-4: the loss is linear across the box, so its maximum is the vertex w·sign(∇L):
    # L + Σ w_i |g_i|, with w_i = ε(|θ_i| + 1) and the gradient computed here by plain autograd.
    ref = copy.deepcopy(model).eval()
    F.cross_entropy(ref(x), y).backward()
    rise = sum(float((1e-4 * (p.detach().abs() + 1) * p.grad.abs()).sum()) for p in ref.parameters())
    assert r.eps_sharpness == pytest.approx(100 * rise / (1 + r.loss), rel=0.05)
    # The files and the CSV scalars.
    back = SharpnessReport.load(cb.files["npz"])
    assert back.scalars() == r.scalars()
    assert cb.files["basin_radii"].stat().st_size > 5000
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    row = next(row for row in rows if row.get("sharpness/eps_sharpness"))
    expected = {"loss", "eps_sharpness", "basin_radius_mean", "basin_radius_min", "log_basin_volume"}
    assert expected | {"loss_rise@0.25", "loss_rise@0.5", "loss_rise@1"} == set(r.scalars())
    for key, value in r.scalars().items():
        assert float(row[f"sharpness/{key}"]) == pytest.approx(value, rel=1e-6), key


def test_wandb_gets_scalars_figure_table_and_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    cb = Sharpness(steps=2, num_directions=2, num_batches=1, progress=False, dirpath=str(tmp_path / "out"))
    small_fit(tmp_path, [cb], logger=logger, max_epochs=1)
    run_dir = Path(logger.experiment.dir).parent
    summary = dict(logger.experiment.summary)  # the run's own record, what a sweep charts
    logger.experiment.finish()
    for key in ("eps_sharpness", "basin_radius_mean", "log_basin_volume", "lambda_max", "trace"):
        assert summary[f"sharpness/{key}"] == pytest.approx(cb.report.scalars()[key], rel=1e-6), key
    tables = list((run_dir / "files/media/table/sharpness").glob("basin_radii*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["direction", "radius", "weight_space_radius", "capped"]
    np.testing.assert_allclose([row[1] for row in table["data"]], cb.report.basin_radii)
    images = [p.name for p in (run_dir / "files/media/images/sharpness").glob("*.png")]
    assert len(images) == 1 and images[0].startswith("basin_radii")
    assert (run_dir / "files" / "sharpness.npz").exists() and (tmp_path / "out" / "sharpness.npz").exists()


class _Weights(Callback):
    def on_fit_end(self, trainer, pl_module) -> None:  # runs before the callbacks after it
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_training_is_untouched_and_every_n_epochs_writes_one_file_per_epoch(tmp_path):
    plain = _Weights()
    small_fit(tmp_path / "a", [plain], max_epochs=2)
    watched = _Weights()
    cb = Sharpness(
        steps=2, num_directions=2, num_batches=1, every_n_epochs=1, bn="recompute", hessian=False, progress=False
    )
    trainer, model, _ = small_fit(tmp_path / "b", [watched, cb], max_epochs=2)
    assert plain.state.keys() == watched.state.keys()
    for key in plain.state:
        assert torch.equal(plain.state[key], watched.state[key]), key  # the analyses moved nothing
    after = model.state_dict()
    assert all(torch.equal(after[k], watched.state[k]) for k in after)  # nor did the fit-end one
    out = cb.files["npz"].parent
    names = sorted(p.name for p in out.glob("*.npz"))
    assert names == ["sharpness.npz", "sharpness_epoch0.npz", "sharpness_epoch1.npz"]
    assert cb.report.metadata["bn"] == "recompute" and math.isfinite(cb.report.eps_sharpness)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0}, r"`epsilon`=0 is not valid; expected a finite number > 0"),
        ({"epsilon": -0.1}, r"`epsilon`=-0.1 is not valid"),
        ({"num_directions": 0}, r"`num_directions`=0 is not valid; expected an integer >= 1"),
        ({"steps": 1.5}, r"`steps`=1.5 is not valid"),
        ({"rise": -1.0}, r"`rise`=-1.0 is not valid"),
        ({"threshold": "high"}, r"`threshold`='high' is not valid; expected a finite number or None"),
        ({"radii": [0.5, 0.0]}, r"`radii`=\[0.5, 0.0\] is not valid"),
        ({"bn": "train"}, r"`bn`='train' is not supported; accepted values: 'eval', 'recompute'"),
        ({"norm": "unit"}, r"`norm`='unit' is not supported"),
        ({"every_n_epochs": 0}, r"`every_n_epochs`=0 is not valid"),
        ({"subspace_dim": 0}, r"`subspace_dim`=0 is not valid"),
        ({"seed": -1}, r"`seed`=-1 is not valid"),
        ({"num_batches": 0}, r"`num_batches`=0 is not valid"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        Sharpness(**kwargs)


def test_a_subspace_larger_than_the_model_fails_before_training(tmp_path):
    cb = Sharpness(subspace_dim=10**7)
    steps = []

    class Count(Callback):
        def on_train_batch_end(self, *args) -> None:
            steps.append(1)

    with pytest.raises(MisconfigurationException, match=r"`subspace_dim`=10000000 is larger than the model's"):
        small_fit(tmp_path, [Count(), cb], max_epochs=1)
    assert steps == []


def test_every_hook_is_marked_override():
    hooks = {name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if not name.startswith("_")}
    for name, member in vars(Sharpness).items():
        if name in hooks:
            assert getattr(member, "__override__", False), f"Sharpness.{name} lacks @override"


def test_constructing_creates_no_directory(tmp_path):
    Sharpness(dirpath=str(tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


# --- DDP: a 2-process fit (gloo) equals one process on all the data --------------------------------

DDP_SCRIPT = """
import json, os, sys
import atexit, torch.distributed as _dist
# Spawned children import this file too: each closes its process group at exit (left to the
# interpreter's teardown, gloo can abort with "terminate called without an active exception").
atexit.register(lambda: _dist.destroy_process_group() if _dist.is_available() and _dist.is_initialized() else None)
from pathlib import Path
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.getcwd())
import pytorch_lightning as pl
import torch
from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape.callbacks.sharpness import Sharpness

def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    settings = json.loads(sys.argv[2])
    cb = Sharpness(**settings, num_batches=None, progress=False, on_error="raise", dirpath=str(out / "files"))
    trainer = pl.Trainer(
        strategy=sys.argv[3], devices=2, accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(DigitsClassifier(channels=2), DigitsDataModule(batch_size=32, num_train=128, shuffle=False))
    r = cb.report
    result = {"scalars": r.scalars(), "radii": r.basin_radii.tolist(), "num_samples": r.metadata["num_samples"]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.is_global_zero and sys.argv[3] == "ddp":
        torch.save({k: v.cpu() for k, v in trainer.lightning_module.state_dict().items()}, out / "final.pt")


if __name__ == "__main__":  # ddp_spawn re-imports this file in its children
    main()
"""
#: The Hessian under DDP (reduce, agree) is covered by tests/test_sharpness.py's two-process test.
DDP_SETTINGS = {"steps": 3, "num_directions": 2, "rtol": 1e-4, "seed": 3, "hessian": False}


def run_ddp_script(tmp_path: Path, strategy: str) -> None:
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_sharpness.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    root = Path(__file__).parents[1]
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(DDP_SETTINGS), strategy],
        capture_output=True, text=True, timeout=300, env=env, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_spawn_hands_the_report_back_to_the_main_process(tmp_path):
    run_ddp_script(tmp_path, "ddp_spawn")
    main = json.loads((tmp_path / "rank0.json").read_text())  # written by the main process, after the fit
    assert main["scalars"] == SharpnessReport.load(tmp_path / "files" / "sharpness.npz").scalars()
    assert main["num_samples"] == 128 and len(main["radii"]) == DDP_SETTINGS["num_directions"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_ddp_fit_equals_one_process_on_all_the_data(tmp_path):
    from examples.digits import DigitsClassifier, DigitsDataModule
    from lightning_landscape.sharpness import sharpness

    run_ddp_script(tmp_path, "ddp")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank took the same steps and holds the same report
    assert ranks[0]["num_samples"] == 128
    model = DigitsClassifier(channels=2)
    model.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    dm = DigitsDataModule(batch_size=32, num_train=128, shuffle=False)
    dm.setup("fit")
    ref = sharpness(model, [dm.train_set.tensors], loss_fn=F.cross_entropy, progress=False, **DDP_SETTINGS)
    assert ranks[0]["scalars"].keys() == ref.scalars().keys()
    for key, value in ref.scalars().items():
        # A loss rise is a difference of two losses summed in another order: compare it absolutely.
        assert ranks[0]["scalars"][key] == pytest.approx(value, rel=1e-3, abs=1e-5 if "rise" in key else 0), key
    np.testing.assert_allclose(ranks[0]["radii"], ref.basin_radii, rtol=1e-3)
    assert SharpnessReport.load(tmp_path / "files" / "sharpness.npz").scalars() == ranks[0]["scalars"]
