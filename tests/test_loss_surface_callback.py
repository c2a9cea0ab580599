"""LossSurface with a real Trainer: W&B offline, TensorBoard, CSV, files, CLI, bit-exact training."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import StochasticWeightAveraging
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F

from lightning_landscape import Landscape, LandscapeWarning, LossSurface

from .helpers import eval_loss, small_fit

ROOT = Path(__file__).resolve().parents[1]


def train_loader_of(trainer):
    return trainer.train_dataloader


def test_files_and_center_loss_match_independent_eval(tmp_path):
    cb = LossSurface(resolution=5, dirpath=str(tmp_path / "out"), metrics=["accuracy"], progress=False)
    trainer, model, dm = small_fit(tmp_path, [cb])
    ls = Landscape.load(tmp_path / "out" / "loss_surface.npz")
    assert ls.loss.shape == (5, 5) and ls.complete
    # Independent: the plain eval loss of the final weights over the whole train set.
    expected = eval_loss(model, torch.utils.data.DataLoader(dm.train_set, batch_size=50))
    assert ls.loss[2, 2] == pytest.approx(expected, rel=1e-5)
    assert ls.metadata["center_loss"] == pytest.approx(expected, rel=1e-5)
    assert ls.metadata["loss_source"] == "training_step" and ls.metadata["num_samples"] == 192
    assert model.training  # handed back in the mode Lightning left it
    model.eval()
    with torch.no_grad():
        x, y = dm.train_set.tensors
        acc = (model(x).argmax(1) == y).double().mean().item()
    assert ls.values["accuracy"][2, 2] == pytest.approx(acc)
    for key in ("contour", "contour_filled", "heatmap", "surface_3d"):
        assert (tmp_path / "out" / f"loss_surface_{key}.png").stat().st_size > 5000
        assert (tmp_path / "out" / f"loss_surface_{key}.pdf").exists()


@pytest.mark.parametrize("orthogonal", [False, True])
def test_low_memory_gives_the_default_surface_bit_for_bit(tmp_path, orthogonal):
    runs = {}
    for memory in ("default", "low"):
        cb = LossSurface(resolution=4, span=0.7, orthogonal=orthogonal, memory=memory, progress=False, dirpath=None)
        small_fit(tmp_path / memory, [cb])
        runs[memory] = cb.landscape
    np.testing.assert_array_equal(runs["low"].loss, runs["default"].loss)
    assert runs["low"].metadata["center_loss"] == runs["default"].metadata["center_loss"]  # θ* off the grid
    assert runs["low"].metadata["memory"] == "low"
    assert runs["low"].metadata["seeded_directions"][0]["seed"] == 0


def test_bf16_grid_records_its_error_against_the_exact_centre(tmp_path):
    cb = LossSurface(resolution=3, dtype="bf16", progress=False, dirpath=str(tmp_path / "out"))
    trainer, model, dm = small_fit(tmp_path, [cb])
    exact = eval_loss(model, torch.utils.data.DataLoader(dm.train_set, batch_size=50))
    meta = cb.landscape.metadata
    assert meta["eval_dtype"] == "bf16" and meta["exact_center_loss"] == pytest.approx(exact, rel=1e-5)
    assert meta["center_loss_rel_error"] == pytest.approx(abs(meta["center_loss"] - exact) / exact, abs=1e-6)
    assert 0 < meta["center_loss_rel_error"] < 2e-2


def _leet_text(run_dir: Path) -> str:
    wandb_file = next(run_dir.glob("run-*.wandb"))
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", str(wandb_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    return out.stdout


def test_wandb_offline_run_holds_images_plotly_arrays_and_scalars(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    cb = LossSurface(resolution=5, dirpath=str(tmp_path / "out"), progress=False)
    trainer, model, _ = small_fit(tmp_path, [cb], logger=logger)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    images = sorted(p.name.rsplit("_", 2)[0] for p in (run_dir / "files/media/images/loss_surface").glob("*.png"))
    assert images == ["contour", "contour_filled", "heatmap", "surface_3d"]
    assert list((run_dir / "files/media/plotly/loss_surface").glob("*.plotly.json"))
    saved = Landscape.load(run_dir / "files" / "loss_surface.npz")
    np.testing.assert_array_equal(saved.loss, cb.landscape.loss)
    text = _leet_text(run_dir)
    assert 'type:  "landscape"' in text  # the artifact
    assert '"loss_surface/center_loss"' in text and '"trainer/global_step"' in text
    center = cb.landscape.metadata["center_loss"]
    assert repr(center)[:8] in text  # the value itself is in the history/summary


def test_tensorboard_event_file_holds_figures_and_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    cb = LossSurface(dims=1, resolution=7, dirpath=str(tmp_path / "out"), progress=False)
    trainer, _, _ = small_fit(tmp_path, [cb], logger=logger)
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "loss_surface/curve" in acc.Tags()["images"]
    image = acc.Images("loss_surface/curve")[-1]
    assert image.encoded_image_string[:4] == b"\x89PNG" and image.step == trainer.global_step
    scalars = acc.Scalars("loss_surface/center_loss")
    assert scalars[-1].value == pytest.approx(cb.landscape.metadata["center_loss"], rel=1e-6)


def test_csv_logger_gets_the_summary_scalars(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    cb = LossSurface(dims=1, resolution=9, span=1.0, dirpath=str(tmp_path / "out"), progress=False)
    small_fit(tmp_path, [cb], logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    row = next(r for r in rows if r.get("loss_surface/center_loss"))
    loss, alphas = cb.landscape.loss, cb.landscape.coords[0]
    assert float(row["loss_surface/center_loss"]) == pytest.approx(loss[4], rel=1e-6)
    # Mean rise at |α| = span (the two end points) and at 0.25·span (α = ±0.25), computed by hand.
    assert float(row["loss_surface/loss_rise_span"]) == pytest.approx((loss[0] + loss[8]) / 2 - loss[4], rel=1e-6)
    quarter = np.isclose(np.abs(alphas), 0.25)
    assert float(row["loss_surface/loss_rise_quarter_span"]) == pytest.approx(loss[quarter].mean() - loss[4], rel=1e-6)


def test_no_logger_files_under_default_dir(tmp_path):
    cb = LossSurface(dims=1, resolution=3, progress=False)
    trainer, _, _ = small_fit(tmp_path, [cb])
    assert cb.files["npz"].exists()
    assert Path(trainer.default_root_dir) in cb.files["npz"].parents


def _final_weights(tmp_path, callbacks):
    _, model, _ = small_fit(tmp_path, callbacks, max_epochs=3)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bit_for_bit_the_same_with_the_callback(tmp_path):
    plain = _final_weights(tmp_path / "a", [])
    with_cb = _final_weights(
        tmp_path / "b", [LossSurface(resolution=3, every_n_epochs=1, progress=False, metrics=["accuracy"])]
    )
    assert plain.keys() == with_cb.keys()
    for k in plain:
        assert torch.equal(plain[k], with_cb[k]), k


def test_every_n_epochs_writes_one_file_per_epoch(tmp_path):
    cb = LossSurface(dims=1, resolution=3, every_n_epochs=1, dirpath=str(tmp_path / "out"), progress=False)
    small_fit(tmp_path, [cb], max_epochs=2)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.npz"))
    assert names == ["loss_surface.npz", "loss_surface_epoch0.npz", "loss_surface_epoch1.npz"]
    epoch0 = Landscape.load(tmp_path / "out" / "loss_surface_epoch0.npz")
    assert epoch0.metadata["global_step"] == 6  # 192 samples / 32 per batch


def test_loss_fn_and_landscape_step_take_precedence(tmp_path):
    from examples.digits import DigitsClassifier

    calls = {"landscape_step": 0}

    class WithLandscapeStep(DigitsClassifier):
        def landscape_step(self, batch):
            calls["landscape_step"] += 1
            x, y = batch
            return {"loss": F.cross_entropy(self(x), y) * 2.0}

    import pytorch_lightning as pl

    from examples.digits import DigitsDataModule

    pl.seed_everything(0)
    cb = LossSurface(dims=1, resolution=3, progress=False)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[cb],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        limit_train_batches=2,
    )
    model = WithLandscapeStep(channels=4)
    dm = DigitsDataModule(batch_size=32, num_train=64)
    trainer.fit(model, dm)
    assert calls["landscape_step"] == 3 * 2  # 3 points x 2 batches
    doubled = cb.landscape.metadata["center_loss"]
    assert doubled == pytest.approx(
        2 * eval_loss(model, torch.utils.data.DataLoader(dm.train_set, batch_size=64)), rel=1e-5
    )

    cb2 = LossSurface(dims=1, resolution=3, progress=False, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]) * 3.0)
    cb2.run(trainer, model)
    assert cb2.landscape.metadata["loss_source"] == "loss_fn"
    assert cb2.landscape.metadata["center_loss"] == pytest.approx(1.5 * doubled, rel=1e-6)


def test_points_per_forward_gives_the_one_point_surface(tmp_path):
    common = {"resolution": 5, "progress": False, "metrics": ["accuracy"], "dirpath": str(tmp_path / "out")}
    one = LossSurface(name="one", **common)
    four = LossSurface(name="four", points_per_forward=4, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LandscapeWarning)  # the module's loss vmaps: no fallback to one point
        small_fit(tmp_path, [one, four], max_epochs=1)
    np.testing.assert_allclose(four.landscape.loss, one.landscape.loss, rtol=1e-5)
    np.testing.assert_array_equal(four.landscape.values["accuracy"], one.landscape.values["accuracy"])
    assert np.ptp(one.landscape.loss) > 0.1  # 25 distinct points: a mix-up would show


def test_sees_the_weights_swapped_in_by_swa(tmp_path):
    cb = LossSurface(dims=1, resolution=3, progress=False)
    trainer, model, dm = small_fit(
        tmp_path, [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1), cb], max_epochs=3
    )
    expected = eval_loss(model, torch.utils.data.DataLoader(dm.train_set, batch_size=64))
    assert cb.landscape.metadata["center_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dims": 3}, r"`dims`=3.*1, 2"),
        ({"resolution": 0}, r"`resolution`=0.*integer >= 1"),
        ({"span": -1.0}, r"`span`=-1.0.*> 0"),
        ({"norm": "unit"}, r"`norm`='unit'.*'filter'"),
        ({"ignore": "bn"}, r"`ignore`='bn'.*'biasbn'"),
        ({"data": "test"}, r"`data`='test'.*'train', 'val'"),
        ({"num_batches": 0}, r"`num_batches`=0.*>= 1 or None"),
        ({"metrics": ["f2"]}, r"`metrics` holds 'f2'.*'accuracy'"),
        ({"every_n_epochs": -2}, r"`every_n_epochs`=-2"),
        ({"axis_ranges": [[1.0, -1.0], [0, 1]]}, r"`axis_ranges`.*lo < hi"),
        ({"seed": 1.5}, r"`seed`=1.5.*integer"),
        ({"loss_fn": "mse"}, r"`loss_fn`='mse' is not callable"),
        ({"memory": "tiny"}, r"`memory`='tiny'.*'default', 'low'"),
        ({"dtype": "fp16"}, r"`dtype`='fp16'.*'model', 'bf16'"),
        ({"memory": "low", "directions": "hessian"}, r"`memory`='low'.*directions='random'"),
        ({"points_per_forward": 0}, r"`points_per_forward`=0.*integer >= 1"),
        ({"points_per_forward": 4, "bn": "recompute"}, r"`points_per_forward`=4 needs bn='eval'"),
        ({"points_per_forward": 4, "memory": "low"}, r"`points_per_forward`=4.*memory='low' holds one"),
    ],
)
def test_bad_arguments_raise_misconfiguration(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        LossSurface(**kwargs)


def test_val_without_val_loader_fails_before_training(tmp_path):
    import pytorch_lightning as pl

    from examples.digits import DigitsClassifier

    steps = {"n": 0}

    class Counting(DigitsClassifier):
        def training_step(self, batch, batch_idx):
            steps["n"] += 1
            return super().training_step(batch, batch_idx)

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    )
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[LossSurface(data="val")],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="data='val'.*no val_dataloader"):
        trainer.fit(Counting(channels=4), train_dataloaders=data)
    assert steps["n"] == 0


def _run_cli(tmp_path, *args):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    Path(tmp_path).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        "fit",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def test_cli_flags_add_the_callback_and_enabled_false_turns_it_off(tmp_path):
    out = _run_cli(
        tmp_path / "on",
        "--trainer.callbacks+=lightning_landscape.LossSurface",
        "--trainer.callbacks.resolution=3",
        "--trainer.callbacks.dims=1",
        f"--trainer.callbacks.dirpath={tmp_path / 'on' / 'ls'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ls = Landscape.load(tmp_path / "on" / "ls" / "loss_surface.npz")
    assert ls.loss.shape == (3,) and np.isfinite(ls.loss).all()
    assert "lightning_landscape results" in out.stdout

    off = _run_cli(
        tmp_path / "off",
        "--trainer.callbacks+=lightning_landscape.LossSurface",
        "--trainer.callbacks.enabled=false",
        f"--trainer.callbacks.dirpath={tmp_path / 'off' / 'ls'}",
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert not (tmp_path / "off" / "ls").exists()


def test_cli_yaml_class_path_config(tmp_path):
    cfg = tmp_path / "ls.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_landscape.LossSurface\n      init_args:\n"
        f"        resolution: 3\n        metrics: [accuracy]\n        dirpath: {tmp_path / 'yaml'}\n"
    )
    out = _run_cli(tmp_path, "--config", str(ROOT / "examples/configs/digits.yaml"), "--config", str(cfg))
    assert out.returncode == 0, out.stderr[-3000:]
    ls = Landscape.load(tmp_path / "yaml" / "loss_surface.npz")
    assert ls.loss.shape == (3, 3) and "accuracy" in ls.values


def test_cli_bad_value_is_rejected_before_training(tmp_path):
    out = _run_cli(tmp_path, "--trainer.callbacks+=lightning_landscape.LossSurface", "--trainer.callbacks.norm=unit")
    assert out.returncode != 0
    assert "norm" in out.stderr and "unit" in out.stderr
