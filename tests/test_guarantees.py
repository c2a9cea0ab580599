"""Bad input and broken states are caught before training time or grid points are spent,
each with a message naming the argument, the value and what is accepted."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape import (
    Landscape,
    LossSurface,
    SnapshotStore,
    TrajectoryPCA,
    loss_surface,
    random_direction,
    trajectory_pca,
)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LossSurface(resolution=1), r"`resolution`=1 is not valid; expected an integer >= 2"),
        (lambda: LossSurface(resolution=10**6), r"`resolution`=1000000 gives 1,000,000,000,000 grid points.*<= 1000"),
        (lambda: LossSurface(dims=1, resolution=10**6 + 1), r"at most 1,000,000"),
        (lambda: LossSurface(ratio_map=True, ratio_resolution=1), r"`ratio_resolution`=1 is not valid"),
        (lambda: TrajectoryPCA(every_n_steps=1, resolution=1), r"`resolution`=1 is not valid"),
        (
            lambda: LossSurface(on_error="ignore"),
            r"`on_error`='ignore' is not supported; accepted values: 'warn', 'raise'",
        ),
        (lambda: LossSurface(name="a/b"), r"`name`='a/b' is not valid"),
    ],
)
def test_bad_arguments_fail_at_construction(make, match):
    with pytest.raises(MisconfigurationException, match=match):
        make()


def test_complex_parameters_are_rejected_not_silently_dropped():
    model = nn.Linear(2, 1)
    model.weight = nn.Parameter(torch.ones(1, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex parameters \['weight'\]"):
        random_direction(model)


def test_nan_weights_are_reported_before_any_grid_point():
    calls = {"n": 0}

    def loss_fn(outputs, targets):
        calls["n"] += 1
        return F.mse_loss(outputs, targets)

    model = nn.Linear(2, 1)
    direction = random_direction(model)
    with torch.no_grad():
        model.bias.fill_(float("nan"))
    data = [(torch.ones(3, 2), torch.zeros(3, 1))]
    with pytest.raises(ValueError, match=r"weights are not finite in \['bias'\].*diverged"):
        loss_surface(model, data, direction, [np.linspace(-1, 1, 5)], loss_fn=loss_fn)
    assert calls["n"] == 0


def test_nan_snapshots_give_a_clear_message_not_a_linear_algebra_error():
    store = SnapshotStore(4)
    for step, value in enumerate([0.0, 1.0, float("nan"), 3.0]):
        store.append(torch.full((4,), value), step=step, epoch=0)
    with pytest.raises(ValueError, match="NaN or Inf weights.*diverged"):
        trajectory_pca(store, torch.zeros(4), 2)


def test_the_center_loss_is_the_loss_at_theta_star_for_an_even_resolution():
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    data = [(torch.randn(8, 2), torch.randn(8, 1))]
    ls = loss_surface(model, data, random_direction(model), [np.linspace(-1, 1, 4)], loss_fn=F.mse_loss)
    with torch.no_grad():
        exact = F.mse_loss(model(data[0][0]), data[0][1]).item()
    assert 0.0 not in ls.coords[0]
    assert ls.metadata["center_loss"] == pytest.approx(exact, rel=1e-6)
    assert ls.summary()["center_loss"] == pytest.approx(exact, rel=1e-6)


def test_loading_a_file_that_is_not_a_result_names_it(tmp_path):
    good = Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)}).save(tmp_path / "ok.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, x=np.arange(3))
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    for path in (truncated, foreign, text):
        with pytest.raises(ValueError, match=rf"`path`='{path}'.*expected a result saved by lightning_landscape"):
            Landscape.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Landscape.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(good) and Landscape.load(good).loss.tolist() == [1.0, 1.0, 1.0]


class _Manual(DigitsClassifier):
    """The digits CNN with manual optimization: its training_step steps the optimizer."""

    def __init__(self, with_landscape_step: bool) -> None:
        super().__init__(channels=4)
        self.automatic_optimization = False
        self.with_landscape_step = with_landscape_step
        self.steps = 0

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()
        self.steps += 1
        return loss

    def landscape_step(self, batch):
        if not self.with_landscape_step:
            raise AssertionError("not used")
        return F.cross_entropy(self(batch[0]), batch[1])


def _manual_fit(tmp_path, model, callbacks):
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, num_train=64))
    return trainer


def test_manual_optimization_without_landscape_step_fails_before_training(tmp_path):
    model = _Manual(with_landscape_step=False)
    model.landscape_step = None  # no landscape_step at all
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*landscape_step"):
        _manual_fit(tmp_path, model, [LossSurface(dims=1, resolution=3, progress=False)])
    assert model.steps == 0


def test_manual_optimization_with_landscape_step_works_and_trains_nothing_more(tmp_path):
    model = _Manual(with_landscape_step=True)
    surface = LossSurface(dims=1, resolution=3, progress=False, on_error="raise")
    _manual_fit(tmp_path, model, [surface])
    assert (
        surface.landscape.complete
        and model.steps == 2
        and surface.landscape.metadata["loss_source"] == "landscape_step"
    )


@pytest.mark.parametrize("everywhere", [False, True])
def test_non_finite_points_are_kept_as_nan_counted_and_still_written(tmp_path, everywhere):
    from lightning_landscape import LandscapeWarning

    from .helpers import small_fit

    def loss_fn(module, batch):
        loss = F.cross_entropy(module(batch[0]), batch[1])
        return loss * float("inf") if everywhere or loss.item() > 3.0 else loss

    out = tmp_path / "out"
    cb = LossSurface(dims=1, resolution=9, span=40.0, num_batches=1, loss_fn=loss_fn, dirpath=str(out), progress=False)
    with pytest.warns(
        LandscapeWarning, match=r"grid points have a non-finite loss" + (r".*all of them" if everywhere else "")
    ):
        small_fit(tmp_path, [cb], max_epochs=1)
    ls = Landscape.load(out / "loss_surface.npz")
    bad = int(np.isnan(ls.loss).sum())
    assert bad == ls.metadata["num_nonfinite"] and (bad == 9 if everywhere else 0 < bad < 9)
    assert (out / "loss_surface_curve.png").exists()


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.steps = 0

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self(batch[0]), batch[1])

    def on_train_batch_start(self, batch, batch_idx):
        self.steps += 1  # a training step really started

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "make", [lambda: LossSurface(metrics=["accuracy"]), lambda: TrajectoryPCA(every_n_steps=1, metrics=["accuracy"])]
)
def test_metrics_that_do_not_fit_the_outputs_fail_before_training(tmp_path, make):
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4
    )
    model = _Regression()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[make()],
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    with pytest.raises(MisconfigurationException, match=r"`metrics`=\['accuracy'\] do not fit _Regression's outputs"):
        trainer.fit(model, data)
    assert model.steps == 0


class _BuiltInConfigureModel(pl.LightningModule):
    """Layers made in configure_model(), as for large models: none exist at setup."""

    def configure_model(self):
        if not hasattr(self, "layer"):
            self.layer = nn.Linear(3, 2)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_built_in_configure_model_is_analysed(tmp_path):
    from lightning_landscape import HessianSpectrum

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,))), batch_size=4
    )
    spectrum = HessianSpectrum(top_k=2, trace=False, density=False)
    surface = LossSurface(dims=1, resolution=3, progress=False)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spectrum, surface],
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(_BuiltInConfigureModel(), data)
    assert spectrum.report is not None and len(spectrum.report.eigenvalues) == 2
    assert surface.landscape.complete


def test_sharded_strategies_are_rejected_at_setup(tmp_path):
    # FSDP and DeepSpeed need GPUs or packages this machine lacks: the check reads the strategy's
    # class name, so a stand-in named like Lightning's FSDPStrategy exercises it.
    from pytorch_lightning.strategies import SingleDeviceStrategy

    class FSDPStrategy(SingleDeviceStrategy):
        pass

    trainer = pl.Trainer(logger=False, strategy=FSDPStrategy(device=torch.device("cpu")), default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match=r"LossSurface does not support strategy FSDPStrategy.*DDP"):
        LossSurface().setup(trainer, _Regression(), "fit")


def test_a_full_snapshot_disk_stops_the_snapshots_and_training_goes_on(tmp_path, monkeypatch):
    import errno

    from lightning_landscape import LandscapeWarning

    from .helpers import small_fit

    real = SnapshotStore.append

    def append(self, vec, *, step, epoch, defer=False):
        if len(self) >= 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, vec, step=step, epoch=epoch, defer=defer)

    monkeypatch.setattr(SnapshotStore, "append", append)
    cb = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False, storage="disk")
    with pytest.warns(LandscapeWarning, match=r"No space left on device.*training goes on.*4 snapshot"):
        trainer, _, _ = small_fit(tmp_path, [cb], max_epochs=2)
    assert trainer.global_step == 12  # the whole fit ran
    assert cb.pca is not None and len(cb.pca.path) == 4 + 1  # 4 snapshots + the final weights


def test_sigterm_during_training_removes_the_temporary_snapshot_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from .conftest import ROOT

    marker = tmp_path / "training"
    script = textwrap.dedent(
        f"""
        import time, pytorch_lightning as pl
        from examples.digits import DigitsClassifier, DigitsDataModule
        from lightning_landscape import TrajectoryPCA

        class Slow(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step == 2:
                    open({str(marker)!r}, "w").close()
                time.sleep(0.2)

        trainer = pl.Trainer(max_epochs=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             callbacks=[TrajectoryPCA(every_n_steps=1, storage="disk"), Slow()])
        trainer.fit(DigitsClassifier(channels=4), DigitsDataModule(batch_size=32, num_train=96))
        """
    )
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob("lightning_landscape-snapshots-*")), "the temporary folder exists while training"
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=120)
    assert not list(tmp_path.glob("lightning_landscape-snapshots-*"))


class _Lazy(_BuiltInConfigureModel):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 2))


def test_lazy_modules_are_analysed_once_they_have_their_shapes(tmp_path):
    from lightning_landscape import HessianSpectrum

    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,))), batch_size=4
    )
    spectrum = HessianSpectrum(top_k=1, trace=False, density=False, on_error="raise")
    trajectory = TrajectoryPCA(every_n_steps=1, resolution=3, progress=False, on_error="raise")
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spectrum, trajectory],
        default_root_dir=tmp_path,
        enable_model_summary=False,
    )
    trainer.fit(_Lazy(), data)
    assert spectrum.report is not None and trajectory.pca is not None
    assert trajectory.pca.steps[0] == 1  # the first snapshot is after the first step, when the shapes exist


def test_tied_weights_are_counted_once():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.Linear(3, 3, bias=False))
    model[2].weight = model[0].weight
    direction = random_direction(model, seed=0)
    assert list(direction) == ["0.weight"]


def test_hessian_check_reports_nan_weights_before_any_product():
    from lightning_landscape import hessian_check

    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"not finite in \['weight'\]"):
        hessian_check(model, [(torch.ones(3, 2), torch.zeros(3, 1))], F.mse_loss)
