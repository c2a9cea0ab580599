"""ModeConnectivity on a real Trainer: the curve's numbers against an independent evaluation of the
weights (BatchNorm statistics from torch.optim.swa_utils.update_bn), the per-step fit loss in the CSV,
the files, W&B offline, the module untouched, and bad arguments refused before training."""

from __future__ import annotations

import copy
import csv
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape.callbacks._module_loss import module_batch_loss
from lightning_landscape.callbacks.connect import ModeConnectivity
from lightning_landscape.connect import plane_basis
from lightning_landscape.results import CurveResult, Landscape
from lightning_landscape.state import capture_state

from .helpers import assert_state_equal

EPOCHS = 3  # of the curve fit; 96 samples in batches of 32: 3 steps per epoch
POINTS = 5  # t = 0, 0.25, 0.5, 0.75, 1


def fit(root: Path, callbacks=(), *, seed: int, logger=False, channels: int = 2, max_epochs: int = 2):
    """A seeded fit of the digits CNN on 96 samples; shuffle=False, so every pass sees the same 3 batches."""
    pl.seed_everything(seed, verbose=False)
    model = DigitsClassifier(channels=channels)
    dm = DigitsDataModule(batch_size=32, num_train=96, shuffle=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        deterministic=True,
    )
    trainer.fit(model, dm)
    return trainer, model, dm


def with_params(model: torch.nn.Module, params: dict[str, torch.Tensor]) -> torch.nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(params[name].to(p.dtype))
    return out


def reference(model: torch.nn.Module, loader) -> tuple[float, float]:
    """Independent: (loss, accuracy) of a copy with BatchNorm statistics from update_bn, in eval mode."""
    ref = copy.deepcopy(model)
    update_bn(loader, ref)
    ref.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = ref(x)
            total += F.cross_entropy(out, y, reduction="sum").double().item()
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    return total / count, correct / count


class StateProbe(Callback):
    """Records the module's full state (values, grads, modes, RNG) at on_fit_end and counts training steps."""

    def __init__(self) -> None:
        self.state = None
        self.steps = 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        self.state = capture_state(pl_module)
        self.values = {k: t.clone() for k, t in pl_module.state_dict().items()}


class SameStateProbe(Callback):
    """After the analysis (later in the callback list): the module's full state equals ``before``'s record."""

    def __init__(self, before: StateProbe) -> None:
        self.before = before
        self.checked = False

    def on_fit_end(self, trainer, pl_module) -> None:
        assert_state_equal(pl_module, self.before.state)  # values, grads, modes and the global RNG
        self.values = {k: t.clone() for k, t in pl_module.state_dict().items()}
        self.checked = True


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    """w₂: a first run (another seed) saved with trainer.save_checkpoint."""
    root = tmp_path_factory.mktemp("first")
    trainer, _, _ = fit(root, seed=1)
    path = root / "first.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def connected(other_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("second")
    logger = CSVLogger(str(root), name="csv")
    before = StateProbe()
    after = SameStateProbe(before)
    cb = ModeConnectivity(
        other=other_ckpt,
        epochs=EPOCHS,
        lr=0.05,
        points=POINTS,
        plane_resolution=4,
        metrics=["accuracy"],
        num_batches=None,
        progress=False,
        on_error="raise",
    )
    trainer, model, dm = fit(root, [before, cb, after], seed=0, logger=logger)
    w2 = DigitsClassifier(channels=2)
    w2.load_state_dict(torch.load(other_ckpt, weights_only=False)["state_dict"])
    return cb, trainer, model, dm, w2, logger, before, after


def test_end_points_and_paths_match_an_independent_evaluation(connected):
    cb, _, model, dm, w2, *_ = connected
    r, loader = cb.result, dm.train_dataloader()
    assert r.ts.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r.metadata["num_samples"] == 96 and r.metadata["loss_source"] == "training_step"
    assert r.settings["bn"] == "recompute" and r.settings["epochs"] == EPOCHS
    for idx, weights in ((0, model), (-1, w2)):
        loss, acc = reference(weights, loader)
        for path in (r.curve, r.line):
            assert path["loss"][idx] == pytest.approx(loss, rel=1e-5)
            assert path["accuracy"][idx] == pytest.approx(acc, abs=1e-6)  # torchmetrics computes in float32
    w1_params, w2_params = dict(model.named_parameters()), dict(w2.named_parameters())
    middle = {n: (w1_params[n] + w2_params[n]).detach() / 2 for n in w1_params}
    assert r.line["loss"][2] == pytest.approx(reference(with_params(model, middle), loader)[0], rel=1e-5)
    on_curve = {n: t.detach() for n, t in cb.curve.weights(0.5).items()}
    assert r.curve["loss"][2] == pytest.approx(reference(with_params(model, on_curve), loader)[0], rel=1e-5)
    # The barriers by hand: max_t loss(t) − max(loss(0), loss(1)).
    line, along = r.line["loss"], r.curve["loss"]
    assert r.barrier_line == pytest.approx(np.max(line) - max(line[0], line[-1]), abs=1e-12)
    assert r.barrier_curve == pytest.approx(np.max(along) - max(along[0], along[-1]), abs=1e-12)
    assert r.barrier_line > 0.01  # two runs from different seeds: the line between them rises
    scalars = r.scalars()
    assert scalars["error_start"] == pytest.approx(1 - reference(model, loader)[1], abs=1e-6)


def test_plane_points_match_an_independent_evaluation(connected):
    cb, _, model, dm, w2, *_ = connected
    plane = cb.plane
    assert plane.loss.shape == (4, 4) and np.isfinite(plane.loss).all()
    w1_params, w2_params = dict(model.named_parameters()), dict(w2.named_parameters())
    distance = torch.sqrt(sum(((w2_params[n] - w1_params[n]).double() ** 2).sum() for n in w1_params)).item()
    # The plane's basis comes from float32 weights: its float64 distances agree to float32's last digits
    # (5e-9 relative seen with one thread, where the reductions run in another order).
    np.testing.assert_allclose(plane.extras["points"][[0, 2]], [[0.0, 0.0], [distance, 0.0]], rtol=1e-7, atol=1e-8)
    basis = plane_basis(cb.curve)
    x, y = plane.coords
    for i, j in ((0, 0), (2, 1)):
        weights = basis.point(float(x[i]), float(y[j]))
        expected, acc = reference(with_params(model, weights), dm.train_dataloader())
        assert plane.loss[i, j] == pytest.approx(expected, rel=1e-4)
        assert plane.values["accuracy"][i, j] == pytest.approx(acc, abs=1e-6)  # torchmetrics computes in float32


def test_fit_loss_rows_reach_the_csv_on_the_fit_s_own_step_axis(connected):
    cb, _, model, dm, w2, logger, *_ = connected
    history = cb.result.history
    assert history.shape == (EPOCHS * 3,)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    fit_rows = [row for row in rows if row.get("connect/fit_loss")]
    assert [int(row["step"]) for row in fit_rows] == list(range(EPOCHS * 3))
    np.testing.assert_allclose([float(row["connect/fit_loss"]) for row in fit_rows], history, rtol=1e-6)
    # The first step by hand (fit_curve's draws from Generator(seed=0): the epoch's batch order, then t).
    # The bend starts at the midpoint, so the Bezier point is the line's, (1−t)·w₁ + t·w₂; train mode.
    g = torch.Generator().manual_seed(0)
    first = int(torch.randperm(3, generator=g)[0])
    t = float(torch.rand((), generator=g, dtype=torch.float64))
    w1_params, w2_params = dict(model.named_parameters()), dict(w2.named_parameters())
    point = with_params(model, {n: torch.lerp(w1_params[n], w2_params[n], t).detach() for n in w1_params}).train()
    x, y = list(dm.train_dataloader())[first]
    with torch.no_grad():
        assert history[0] == pytest.approx(F.cross_entropy(point(x), y).item(), rel=1e-4)
    # The summary scalars at the trainer's step, the last epoch's mean as fit_loss_final.
    summary = next(row for row in rows if row.get("connect/barrier_curve"))
    assert int(summary["step"]) == cb.result.metadata["global_step"] == 6
    expected = {**cb.result.scalars()}
    expected["fit_loss_final"] = expected.pop("fit_loss")
    assert expected["fit_loss_final"] == pytest.approx(np.mean(history[-3:]))
    for key, value in expected.items():
        assert float(summary[f"connect/{key}"]) == pytest.approx(value, rel=1e-6), key


def test_files_are_written_and_load_back(connected):
    cb, *_ = connected
    files = cb.files
    back = CurveResult.load(files["npz"])
    np.testing.assert_array_equal(back.curve["loss"], cb.result.curve["loss"])
    assert back.barrier_line == cb.result.barrier_line and back.metadata["other"].endswith("first.ckpt")
    plane = Landscape.load(files["plane_npz"])
    np.testing.assert_array_equal(plane.loss, cb.plane.loss)
    assert plane.extras["points"].shape == (3, 2) and plane.metadata["kind"] == "curve_plane"
    assert files["npz"].name == "connect.npz" and files["plane_npz"].name == "connect_plane.npz"
    for key in ("connection", "plane"):
        assert files[key].suffix == ".png" and files[key].stat().st_size > 5000


def test_the_module_comes_out_bit_for_bit(connected):
    cb, _, model, _, _, _, before, after = connected
    assert cb.result is not None and after.checked  # the full state right before and right after the analysis
    final = model.state_dict()
    for key, value in before.values.items():
        assert torch.equal(value, after.values[key]) and torch.equal(value, final[key]), key


def test_wandb_offline_gets_scalars_figures_table_and_artifact(other_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    cb = ModeConnectivity(other=other_ckpt, epochs=1, points=3, plane_resolution=3, progress=False, on_error="raise")
    fit(tmp_path, [cb], seed=0, logger=logger, max_epochs=1)
    run_dir = Path(logger.experiment.dir).parent
    summary = dict(logger.experiment.summary)
    logger.experiment.finish()
    scalars = cb.result.scalars()
    for key in ("barrier_curve", "barrier_line", "loss_start", "loss_end", "max_loss_curve"):
        assert summary[f"connect/{key}"] == pytest.approx(scalars[key], rel=1e-6), key
    assert summary["connect/fit_loss"] == pytest.approx(cb.result.history[-1], rel=1e-6)  # the last step's
    images = sorted(p.name.split("_")[0] for p in (run_dir / "files/media/images/connect").glob("*.png"))
    assert images == ["connection", "plane"]
    table = json.loads(next((run_dir / "files/media/table/connect").glob("path*.table.json")).read_text())
    assert table["columns"] == ["t", "loss_curve", "loss_line"]
    np.testing.assert_allclose([row[0] for row in table["data"]], [0.0, 0.5, 1.0])
    np.testing.assert_allclose([row[2] for row in table["data"]], cb.result.line["loss"])
    assert (run_dir / "files" / "connect.npz").exists() and (run_dir / "files" / "connect_plane.npz").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_bends": 0}, r"`num_bends`=0 is not valid; expected an integer >= 1"),
        ({"curve": "spline"}, r"`curve`='spline' is not supported; accepted values: 'bezier', 'polychain'"),
        ({"epochs": 0}, r"`epochs`=0 is not valid"),
        ({"optimizer": "rmsprop"}, r"`optimizer`='rmsprop' is not supported"),
        ({"lr": 0}, r"`lr`=0 is not valid; expected a finite number > 0"),
        ({"points": 1}, r"`points`=1 is not valid; expected at least 2 points"),
        ({"points": [0.0, 0.5]}, r"`points`=\[0.0, 0.5\] is not valid; expected increasing values from 0 to 1"),
        ({"plane_resolution": 1}, r"`plane_resolution`=1 is not valid; expected an integer >= 2"),
        ({"margin": -0.1}, r"`margin`=-0.1 is not valid; expected a finite number >= 0"),
        ({"bn": "train"}, r"`bn`='train' is not supported; accepted values: 'eval', 'recompute'"),
        ({"metrics": ["f1"]}, r"`metrics` holds 'f1'"),
        ({"seed": -1}, r"`seed`=-1 is not valid"),
    ],
)
def test_bad_arguments_raise_at_construction(other_ckpt, kwargs, message):
    with pytest.raises(MisconfigurationException, match=message):
        ModeConnectivity(other=other_ckpt, **kwargs)


def test_a_missing_other_raises_at_construction(tmp_path):
    missing = tmp_path / "nowhere.ckpt"
    with pytest.raises(MisconfigurationException, match=r"`other`='.*nowhere\.ckpt' does not exist"):
        ModeConnectivity(other=missing)
    with pytest.raises(MisconfigurationException, match=r"`other`='.*' is a directory"):
        ModeConnectivity(other=tmp_path)
    with pytest.raises(MisconfigurationException, match=r"`other` is a int; expected the path"):
        ModeConnectivity(other=3)


def test_another_architecture_fails_at_fit_start_before_any_step(tmp_path):
    pl.seed_everything(0, verbose=False)
    path = tmp_path / "wide.pt"
    torch.save(DigitsClassifier(channels=3).state_dict(), path)  # a saved state dict of another width
    probe = StateProbe()
    cb = ModeConnectivity(other=path, progress=False, on_error="raise")
    message = r"ModeConnectivity\(other='.*wide\.pt'\): `other` does not match the model: 'net.0.weight' has shape"
    with pytest.raises(MisconfigurationException, match=message):
        fit(tmp_path, [probe, cb], seed=0)
    assert probe.steps == 0


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
from lightning_landscape.callbacks.connect import ModeConnectivity

def main():
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    cb = ModeConnectivity(other=sys.argv[2], epochs=2, lr=0.05, points=5, bn="eval", plane_resolution=3,
                          num_batches=None, progress=False, on_error="raise", dirpath=str(out / "files"))
    trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_epochs=1, callbacks=[cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(DigitsClassifier(channels=2), DigitsDataModule(batch_size=32, num_train=128, shuffle=False))
    r = cb.result
    result = {"history": r.history.tolist(), "curve": r.curve["loss"].tolist(), "plane": cb.plane.loss.tolist(),
              "num_samples": r.metadata["num_samples"],
              "shard": [int(i) for i in trainer.train_dataloader.sampler]}  # Lightning's DistributedSampler
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.is_global_zero:
        torch.save({k: v.cpu() for k, v in trainer.lightning_module.state_dict().items()}, out / "final.pt")


if __name__ == "__main__":
    main()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_under_ddp_the_processes_fit_one_curve_on_their_shards(other_ckpt, tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_connect.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(other_ckpt)],
        capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    shards = [ranks[r].pop("shard") for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(128))
    assert ranks[0] == ranks[1]  # the same steps on both: one curve, one evaluation
    assert len(ranks[0]["history"]) == 4 and ranks[0]["num_samples"] == 128  # 2 epochs x 2 batches of 32 each
    w1 = DigitsClassifier(channels=2)
    w1.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True))
    w2 = DigitsClassifier(channels=2)
    w2.load_state_dict(torch.load(other_ckpt, weights_only=False)["state_dict"])
    dm = DigitsDataModule(batch_size=32, num_train=128, shuffle=False)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    with torch.no_grad():  # w₁ over all 128 samples once (bn="eval": w₁'s own statistics)
        assert ranks[0]["curve"][0] == pytest.approx(float(F.cross_entropy(w1.eval()(x), y)), rel=1e-5)
    # The first step by hand: t and the batch as the fit draws them from its seed, each process's
    # batch k of its shard (the indices its DistributedSampler gave), train mode at the line's point θ(t)
    # (the bend starts on it), the two processes' losses averaged.
    generator = torch.Generator().manual_seed(0)
    k = int(torch.randperm(2, generator=generator)[0])
    t = float(torch.rand((), generator=generator, dtype=torch.float64))
    point = copy.deepcopy(w1).train()
    with torch.no_grad():
        for p, q in zip(point.parameters(), w2.parameters()):
            p.copy_((1 - t) * p + t * q)
        batches = [torch.tensor(shard[32 * k : 32 * k + 32]) for shard in shards]
        losses = [float(F.cross_entropy(point(x[i]), y[i])) for i in batches]
    assert ranks[0]["history"][0] == pytest.approx(sum(losses) / 2, rel=1e-5)
    assert CurveResult.load(tmp_path / "files" / "connect.npz").history.tolist() == ranks[0]["history"]


def test_the_core_takes_the_module_loss_as_a_batch_loss():
    """fit_curve/curve_plane(batch_loss=module loss) equal the same loss given as loss_fn."""
    from lightning_landscape import Curve, curve_plane, fit_curve

    pl.seed_everything(0, verbose=False)
    model, other = DigitsClassifier(channels=2), DigitsClassifier(channels=2)
    x, y = torch.rand(13, 1, 8, 8), torch.randint(0, 10, (13,))
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss_fn = lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])  # noqa: E731
    batch_loss, _ = module_batch_loss(model, loss_fn, want_outputs=False)
    kwargs = {"epochs": 2, "progress": False, "seed": 3}
    a = fit_curve(model, model, other, batches, batch_loss=batch_loss, **kwargs)
    b = fit_curve(model, model, other, batches, loss_fn=F.cross_entropy, **kwargs)
    assert a.history == b.history
    assert all(torch.equal(a.bends[0][k], b.bends[0][k]) for k in a.bends[0])
    plane = {"resolution": 3, "bn": "eval", "progress": False}
    pa = curve_plane(model, a, batches, batch_loss=batch_loss, **plane)
    pb = curve_plane(model, a, batches, loss_fn=F.cross_entropy, **plane)
    np.testing.assert_array_equal(pa.loss, pb.loss)
    with pytest.raises(ValueError, match="`batch_loss` was given together with `loss_fn`"):
        fit_curve(model, model, other, batches, batch_loss=batch_loss, loss_fn=F.cross_entropy)
    assert isinstance(a, Curve)


def test_every_hook_is_marked_override():
    hooks = {name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if not name.startswith("_")}
    for name, member in vars(ModeConnectivity).items():
        if name in hooks:
            assert getattr(member, "__override__", False), f"ModeConnectivity.{name} lacks @override"
