"""SWAComparison and Lightning's StochasticWeightAveraging, with a real Trainer on sklearn digits.

The model is a small MLP with BatchNorm1d; the train loader is not shuffled, so SWA's BatchNorm
epoch, ``torch.optim.swa_utils.update_bn`` and the callback's recomputation see the same batches.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, StochasticWeightAveraging
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import LandscapeWarning, LossSurface, random_direction
from lightning_landscape.callbacks.swa import SWAComparison, rise_crossings
from lightning_landscape.results import Landscape

LR = 0.1
MAX_EPOCHS = 4
SWA_START = 2  # 1-based, as StochasticWeightAveraging counts: averages from the start of epoch index 1


def digits_sets():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, val = perm[:256], perm[256:512]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


TRAIN, VAL = digits_sets()


def train_loader():
    return DataLoader(TRAIN, batch_size=32)  # not shuffled: 8 fixed batches


def val_loader():
    return DataLoader(VAL, batch_size=128)


class MLP(pl.LightningModule):
    def __init__(self, batchnorm: bool = True) -> None:
        super().__init__()
        norm = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(64, 32), norm, nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class Probe(Callback):
    """Records the module's state at fit end (where it stands among the callbacks)."""

    def __init__(self) -> None:
        self.state = None

    def on_fit_end(self, trainer, pl_module):
        self.state = copy.deepcopy(pl_module.state_dict())


def make_swa():
    # swa_lrs equal to the optimizer's lr and one annealing epoch: SWALR keeps the lr where it is,
    # so the SGD steps are those of a run without SWA (checked below, bit for bit).
    return StochasticWeightAveraging(swa_lrs=LR, swa_epoch_start=SWA_START, annealing_epochs=1)


def fit(tmp_path, callbacks, *, batchnorm=True, logger=False, val=True, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = MLP(batchnorm)
    trainer = pl.Trainer(
        max_epochs=kwargs.pop("max_epochs", MAX_EPOCHS),
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )
    trainer.fit(model, train_loader(), val_loader() if val else None)
    return trainer, model


def small_comparison(tmp_path, **kwargs):
    defaults = dict(resolution=7, num_directions=2, span=0.5, direction_resolution=5, num_batches=None, progress=False)
    return SWAComparison(dirpath=str(tmp_path / "out"), **{**defaults, **kwargs})


def averaged_reference(swa):
    """SWA's average with BatchNorm statistics recomputed by torch's own update_bn over the train loader."""
    ref = copy.deepcopy(swa._average_model).cpu()
    update_bn(train_loader(), ref)
    return ref.eval()


def reference_values(model, state=None):
    """Independent: load ``state``, update_bn over the train loader, then eval loss and val error."""
    model = copy.deepcopy(model).cpu()
    if state is not None:
        model.load_state_dict(state)
    if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
        update_bn(train_loader(), model)
    model.eval()
    with torch.no_grad():
        x, y = TRAIN.tensors
        loss = F.cross_entropy(model(x), y, reduction="sum").double().item() / len(y)
        xv, yv = VAL.tensors
        error = 1.0 - (model(xv).argmax(1) == yv).double().mean().item()
    return loss, error


def assert_params_equal(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach().cpu()), name


@pytest.fixture(scope="module")
def main_fit(tmp_path_factory):
    """One fit for most tests: SWA first, probes before and after the comparisons, CSV and W&B loggers."""
    tmp = tmp_path_factory.mktemp("swa_main")
    swa, before, cmp, after = make_swa(), Probe(), small_comparison(tmp), Probe()
    own = small_comparison(
        tmp, num_directions=1, resolution=2, direction_resolution=3, direction_scale="own", name="swa_own"
    )
    csv_logger = CSVLogger(str(tmp), name="csv")
    wandb_logger = WandbLogger(save_dir=str(tmp), offline=True, project="test")
    trainer, model = fit(tmp, [swa, before, cmp, own, after], logger=[csv_logger, wandb_logger])
    run_dir = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()
    return dict(swa=swa, cmp=cmp, own=own, before=before, after=after, model=model, csv=csv_logger, wandb=run_dir)


@pytest.fixture(scope="module")
def plain_state(tmp_path_factory):
    """The final state of the same seeded fit without SWA (same max_epochs)."""
    return fit(tmp_path_factory.mktemp("plain"), [])[1].state_dict()


@pytest.fixture(scope="module")
def reversed_fit(tmp_path_factory):
    """The other order: the comparison first, LossSurface and a probe, SWA last."""
    tmp = tmp_path_factory.mktemp("swa_reversed")
    cmp = small_comparison(tmp, num_directions=1, resolution=2, direction_resolution=3)
    surface = LossSurface(dims=1, resolution=3, span=0.1, num_batches=None, progress=False, dirpath=str(tmp / "ls"))
    swa, probe = make_swa(), Probe()
    fit(tmp, [cmp, surface, probe, swa])
    return dict(swa=swa, cmp=cmp, surface=surface, probe=probe)


# --- Lightning's SWA: what every fit-end callback sees --------------------------------------------------


def check_fit_end_state(swa, state):
    """``state`` holds SWA's average and the BatchNorm statistics update_bn computes for it."""
    ref = averaged_reference(swa)
    for name, p in ref.named_parameters():
        assert torch.equal(state[name], p.detach()), name
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(state[f"net.1.{name}"], getattr(ref.net[1], name), atol=1e-6, rtol=0)
    assert int(state["net.1.num_batches_tracked"]) == int(ref.net[1].num_batches_tracked) == 8
    # Not the stale statistics of SWA's copy of the module.
    assert not torch.allclose(state["net.1.running_var"], swa._average_model.net[1].running_var)
    return ref


def test_fit_end_sees_the_average_with_recomputed_batchnorm_swa_first(main_fit):
    check_fit_end_state(main_fit["swa"], main_fit["before"].state)


def test_fit_end_sees_the_average_with_recomputed_batchnorm_swa_last(reversed_fit):
    ref = check_fit_end_state(reversed_fit["swa"], reversed_fit["probe"].state)
    # LossSurface (before SWA in the list) evaluated around the same weights and statistics.
    expected_loss, _ = reference_values(ref)
    assert reversed_fit["surface"].landscape.metadata["center_loss"] == pytest.approx(expected_loss, rel=1e-5)


# --- the kept SGD weights ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["main_fit", "reversed_fit"])
def test_kept_sgd_weights_are_the_final_weights_of_a_run_without_swa(which, plain_state, request):
    run = request.getfixturevalue(which)  # the comparison after SWA, then before it
    cmp, swa = run["cmp"], run["swa"]
    assert cmp.sgd_epoch == MAX_EPOCHS - 1
    assert cmp.sgd_state.keys() == plain_state.keys()
    for name, t in plain_state.items():
        assert torch.equal(cmp.sgd_state[name], t), name
    # Not trivially so: the kept weights are not the average.
    assert not torch.equal(cmp.sgd_state["net.0.weight"], swa._average_model.net[0].weight.detach())


# --- the comparison ----------------------------------------------------------------------------------


def test_line_matches_independent_update_bn_evaluation_at_every_alpha(main_fit):
    cmp, swa, model = main_fit["cmp"], main_fit["swa"], main_fit["model"]
    line = cmp.line
    alphas = line.coords[0]
    assert 0.0 in alphas and 1.0 in alphas and alphas.min() == -0.5 and alphas.max() == 1.5
    sgd_state = cmp.sgd_state
    swa_state = main_fit["before"].state
    for i, alpha in enumerate(alphas):
        # Every floating-point entry interpolated (then the BatchNorm statistics recomputed).
        state = {
            k: torch.lerp(sgd_state[k], swa_state[k], float(alpha))
            if sgd_state[k].is_floating_point()
            else swa_state[k]
            for k in swa_state
        }
        loss, error = reference_values(model, state)
        assert line.loss[i] == pytest.approx(loss, rel=1e-5), alpha
        assert line.values["val_error"][i] == pytest.approx(error, abs=1e-9), alpha
    at_sgd, at_swa = int(np.flatnonzero(alphas == 0)[0]), int(np.flatnonzero(alphas == 1)[0])
    assert line.loss[at_swa] == pytest.approx(reference_values(averaged_reference(swa))[0], rel=1e-5)
    scalars = cmp.scalars
    assert scalars["sgd_train_loss"] == line.loss[at_sgd] and scalars["swa_train_loss"] == line.loss[at_swa]
    assert scalars["sgd_val_error"] == line.values["val_error"][at_sgd]
    flat = [torch.cat([s[n].flatten() for n, _ in model.named_parameters()]) for s in (sgd_state, swa_state)]
    assert scalars["distance"] == pytest.approx((flat[1] - flat[0]).norm().item(), rel=1e-6)
    np.testing.assert_allclose(line.extras["distance"], alphas * scalars["distance"])


def test_direction_curves_match_independent_evaluation(main_fit):
    cmp, model = main_fit["cmp"], main_fit["model"]
    swa_state = main_fit["before"].state
    at_swa = copy.deepcopy(model).cpu()
    at_swa.load_state_dict(swa_state)
    for label, curves, state in (("SGD", cmp.sgd_directions, cmp.sgd_state), ("SWA", cmp.swa_directions, swa_state)):
        assert curves.metadata["point"] == label and curves.loss.shape == (2, 5)
        coords = curves.coords[1]
        np.testing.assert_array_equal(coords, [-0.5, -0.25, 0.0, 0.25, 0.5])
        for k in range(2):
            d = random_direction(at_swa, seed=k)  # "shared": normalized to the SWA weights for both points
            assert curves.extras["direction_norms"][k] == pytest.approx(
                torch.cat([t.flatten() for t in d.values()]).norm().item(), rel=1e-6
            )
            for j in (0, 2, 4):
                moved = dict(state)
                moved.update({n: state[n] + float(coords[j]) * d[n] for n in d})
                assert curves.loss[k, j] == pytest.approx(reference_values(model, moved)[0], rel=1e-5), (label, k, j)
    # Both centres are the line's end points.
    assert cmp.sgd_directions.loss[0, 2] == pytest.approx(cmp.scalars["sgd_train_loss"], rel=1e-12)
    assert cmp.swa_directions.loss[1, 2] == pytest.approx(cmp.scalars["swa_train_loss"], rel=1e-12)


def test_widths_and_rises_follow_the_curves(main_fit):
    cmp = main_fit["cmp"]
    for key, curves in (("sgd", cmp.sgd_directions), ("swa", cmp.swa_directions)):
        crossings = np.stack(
            [rise_crossings(curves.coords[1], curves.loss[k], curves.loss[k, 2], cmp.rise) for k in range(2)]
        )
        np.testing.assert_array_equal(crossings, curves.extras["crossings"])
        reach = np.where(np.isfinite(crossings), crossings, cmp.span) * curves.extras["direction_norms"][:, None]
        assert cmp.scalars[f"{key}_width"] == pytest.approx(reach.mean())
        assert cmp.scalars[f"{key}_width_censored"] == float((~np.isfinite(crossings)).sum())
        rises = curves.loss[:, [0, 4]] - curves.loss[:, [2]]
        assert cmp.scalars[f"{key}_loss_rise"] == pytest.approx(rises.mean())


def test_the_module_after_the_analysis_is_the_swa_average_bit_for_bit(main_fit):
    before, after, model, swa = main_fit["before"].state, main_fit["after"].state, main_fit["model"], main_fit["swa"]
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) and torch.equal(model.state_dict()[k], before[k]), k
    assert_params_equal(model, swa._average_model)


def test_files_figures_and_csv_scalars(main_fit):
    cmp = main_fit["cmp"]
    out = cmp.files["npz"].parent
    assert cmp.files["npz"].name == "swa.npz" and cmp.files["sgd_directions_npz"].name == "swa_sgd_directions.npz"
    line = Landscape.load(out / "swa.npz")
    np.testing.assert_array_equal(line.loss, cmp.line.loss)
    assert line.metadata["start_label"] == "SGD" and line.metadata["bn"] == "recompute"
    for label in ("sgd", "swa"):
        back = Landscape.load(out / f"swa_{label}_directions.npz")
        np.testing.assert_array_equal(back.loss, getattr(cmp, f"{label}_directions").loss)
        np.testing.assert_array_equal(back.extras["crossings"], getattr(cmp, f"{label}_directions").extras["crossings"])
    for key in ("line", "directions"):
        assert (out / f"swa_{key}.png").stat().st_size > 5000 and (out / f"swa_{key}.pdf").exists()
    rows = list(csv.DictReader(open(Path(main_fit["csv"].log_dir) / "metrics.csv")))
    row = next(r for r in rows if r.get("swa/swa_width"))
    for key, value in cmp.scalars.items():
        assert float(row[f"swa/{key}"]) == pytest.approx(value, rel=1e-6, abs=1e-12), key


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


def test_wandb_offline_gets_images_scalars_and_files(main_fit):
    run_dir, cmp = main_fit["wandb"], main_fit["cmp"]
    images = sorted(p.name.rsplit("_", 2)[0] for p in (run_dir / "files/media/images/swa").glob("*.png"))
    assert images == ["directions", "line"]
    for name in ("swa.npz", "swa_sgd_directions.npz", "swa_swa_directions.npz"):
        assert (run_dir / "files" / name).exists(), name
    text = _leet_text(run_dir)
    assert '"swa/swa_train_loss"' in text and '"swa/sgd_width"' in text
    assert repr(cmp.scalars["swa_train_loss"])[:8] in text


def test_own_direction_scale_normalizes_to_each_point(main_fit):
    own, model = main_fit["own"], main_fit["model"]
    at_sgd = copy.deepcopy(model)
    at_sgd.load_state_dict(own.sgd_state)
    d = random_direction(at_sgd, seed=0)
    expected = torch.cat([t.flatten() for t in d.values()]).norm().item()
    assert own.sgd_directions.extras["direction_norms"][0] == pytest.approx(expected, rel=1e-6)
    assert own.sgd_directions.extras["direction_norms"][0] != own.swa_directions.extras["direction_norms"][0]
    moved = {**own.sgd_state, **{n: own.sgd_state[n] + 0.5 * d[n] for n in d}}
    assert own.sgd_directions.loss[0, 2] == pytest.approx(reference_values(model, moved)[0], rel=1e-5)


def test_without_batchnorm_the_average_arrives_at_train_end(tmp_path):
    swa = make_swa()
    cmp = small_comparison(tmp_path, num_directions=1, resolution=2, direction_resolution=3, bn="recompute")
    with pytest.warns(LandscapeWarning, match="nothing to recompute"):
        fit(tmp_path, [cmp, swa], batchnorm=False)
    _, plain = fit(tmp_path, [], batchnorm=False)
    for name, t in plain.state_dict().items():
        assert torch.equal(cmp.sgd_state[name], t), name
    assert cmp.line.metadata["bn"] == "eval"
    assert cmp.scalars["swa_train_loss"] == pytest.approx(reference_values(swa._average_model)[0], rel=1e-5)


# --- errors ------------------------------------------------------------------------------------------


class CountBatches(Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_start(self, *args):
        self.n += 1


def test_missing_swa_callback_fails_at_setup(tmp_path):
    count = CountBatches()
    with pytest.raises(MisconfigurationException, match=r"needs exactly one .*StochasticWeightAveraging.*found no"):
        fit(tmp_path, [small_comparison(tmp_path), count])
    assert count.n == 0


def test_val_without_val_data_fails_at_setup(tmp_path):
    count = CountBatches()
    with pytest.raises(MisconfigurationException, match=r"val=True.*no val_dataloader.*val=False"):
        fit(tmp_path, [make_swa(), small_comparison(tmp_path), count], val=False)
    assert count.n == 0


def test_a_fit_that_stops_before_the_swap_warns_and_goes_on(tmp_path):
    cmp = small_comparison(tmp_path)
    with pytest.warns(LandscapeWarning, match="never put its average into the module"):
        fit(tmp_path, [make_swa(), cmp], max_steps=10)
    assert cmp.line is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"extend": 0}, r"`extend`=0 .*> 0"),
        ({"resolution": 1}, r"`resolution`=1 .*>= 2"),
        ({"num_directions": 0}, r"`num_directions`=0 .*>= 1"),
        ({"span": -1.0}, r"`span`=-1.0 .*> 0"),
        ({"direction_resolution": 1.5}, r"`direction_resolution`=1.5"),
        ({"direction_scale": "swa"}, r"`direction_scale`='swa' .*'shared', 'own'"),
        ({"rise": 0.0}, r"`rise`=0.0 .*> 0"),
        ({"bn": "train"}, r"`bn`='train' .*'eval', 'recompute'"),
        ({"seed": -1}, r"`seed`=-1"),
        ({"num_batches": 0}, r"`num_batches`=0"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        SWAComparison(**kwargs)


def test_rise_crossings_hand_cases():
    a = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    # Left: 0 -> 1 at |α| = 0.5, the target 0.5 halfway; right: never reached.
    assert rise_crossings(a, [3.0, 1.0, 0.0, 0.1, 0.2], 0.0, 0.5).tolist()[0] == pytest.approx(0.25)
    assert np.isnan(rise_crossings(a, [3.0, 1.0, 0.0, 0.1, 0.2], 0.0, 0.5)[1])
    # A non-finite loss counts as reached at its grid point.
    assert rise_crossings(a, [0.0, 0.0, 0.0, np.nan, 9.0], 0.0, 0.5).tolist()[1] == 0.5
    # The grid need not contain 0: the centre is placed there.
    assert rise_crossings([-1.0, 1.0], [2.0, 2.0], 0.0, 1.0).tolist() == [0.5, 0.5]


class Regression(MLP):
    def landscape_step(self, batch):
        out = self(batch[0])[:, :1]
        return {"loss": F.mse_loss(out, batch[1].float()[:, None]), "outputs": out, "targets": batch[1].float()}


def test_error_on_outputs_that_are_not_class_scores_fails_before_training(tmp_path):
    count = CountBatches()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[make_swa(), small_comparison(tmp_path), count], logger=False, enable_progress_bar=False
    )
    with pytest.raises(MisconfigurationException, match=r"`error`=True.*error=False"):
        trainer.fit(Regression(), train_loader(), val_loader())
    assert count.n == 0
