"""An interrupted surface leaves a valid partial file and resumes to the uninterrupted result, bit for bit."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lightning_landscape import Landscape, loss_surface

from .conftest import ROOT

SETUP = """
import sys, time, numpy as np, torch
from torch import nn
from torch.nn import functional as F
from lightning_landscape import loss_surface, random_direction
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
coords = [np.linspace(-1, 1, 7)] * 2
"""


def _problem():
    namespace: dict = {}
    exec(SETUP, namespace)  # the same model, data and directions as the subprocess
    return namespace["model"], namespace["data"], namespace["dirs"], namespace["coords"]


def test_keyboard_interrupt_leaves_a_partial_file_that_resumes_bit_for_bit(tmp_path):
    model, data, dirs, coords = _problem()
    full = loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False)
    calls = {"n": 0}

    def interrupting(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 1:  # the 21st point (2 batches a point)
            raise KeyboardInterrupt
        return F.cross_entropy(outputs, targets)

    path = tmp_path / "surface.npz"
    with pytest.raises(KeyboardInterrupt):
        loss_surface(model, data, dirs, coords, loss_fn=interrupting, progress=False, resume=path)
    partial = Landscape.load(path)
    assert partial.metadata["partial"] and int(partial.evaluated.sum()) == 20

    calls["n"] = 0

    def counting(outputs, targets):
        calls["n"] += 1
        return F.cross_entropy(outputs, targets)

    resumed = loss_surface(model, data, dirs, coords, loss_fn=counting, progress=False, resume=path)
    assert calls["n"] == 2 * (49 - 20)  # only the missing points
    np.testing.assert_array_equal(resumed.loss, full.loss)
    assert not Landscape.load(path).metadata["partial"]


def test_other_weights_start_over(tmp_path, caplog):
    model, data, dirs, coords = _problem()
    path = tmp_path / "surface.npz"
    loss_surface(model, data, dirs, coords[:1] * 2, loss_fn=F.cross_entropy, progress=False, resume=path)
    with torch.no_grad():
        model[0].bias.add_(0.5)
    again = loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False, resume=path)
    assert again.complete and "holds a surface with other weights; starting over" in caplog.text


def test_sigterm_mid_grid_then_a_second_run_completes_it(tmp_path):
    path = tmp_path / "surface.npz"
    marker = tmp_path / "started"
    slow = SETUP + textwrap.dedent(
        f"""
        calls = 0
        def loss_fn(outputs, targets):
            global calls
            calls += 1
            if calls == 30:
                open({str(marker)!r}, "w").close()
            if calls >= 30:
                time.sleep(0.05)
            return F.cross_entropy(outputs, targets)
        loss_surface(model, data, dirs, coords, loss_fn=loss_fn, progress=False, resume={str(path)!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "SIGTERM" in err
    partial = Landscape.load(path)  # valid, not corrupt
    assert partial.metadata["partial"] and 0 < int(partial.evaluated.sum()) < 49

    finish = (
        SETUP
        + f"loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False, resume={str(path)!r})"
    )
    subprocess.run([sys.executable, "-c", finish], cwd=ROOT, check=True, timeout=120)
    model, data, dirs, coords = _problem()
    full = loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False)
    done = Landscape.load(path)
    assert done.complete and not done.metadata["partial"]
    np.testing.assert_array_equal(done.loss, full.loss)


def test_loss_surface_callback_resumes_its_partial_surface(tmp_path):
    from lightning_landscape import LossSurface

    from .helpers import StoppingLoss, small_fit

    loss_fn = StoppingLoss(KeyboardInterrupt)

    out = tmp_path / "out"
    cb = LossSurface(resolution=5, num_batches=2, loss_fn=loss_fn, dirpath=str(out), progress=False, interactive=False)
    trainer, model, _ = small_fit(tmp_path, [cb], max_epochs=1)
    full = cb.landscape.loss.copy()
    (out / "loss_surface.npz").unlink()

    loss_fn.restart(stop_at=2 * 10 + 1)  # stop at the 11th point
    with pytest.raises(KeyboardInterrupt):
        cb.run(trainer, model)
    assert int(Landscape.load(out / "loss_surface.npz").evaluated.sum()) == 10

    loss_fn.restart(stop_at=None)
    cb.run(trainer, model)
    assert loss_fn.calls == 2 * (25 - 10)
    np.testing.assert_array_equal(cb.landscape.loss, full)


def test_a_fit_resumed_from_a_checkpoint_ends_with_the_uninterrupted_results(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_landscape import HessianSpectrum, LossSurface

    from .helpers import small_fit

    def run(root, max_epochs, ckpt_path=None):
        surface = LossSurface(dims=1, resolution=5, num_batches=2, progress=False, every_n_epochs=1, on_error="raise")
        second = LossSurface(dims=1, resolution=3, num_batches=1, progress=False, name="coarse", on_error="raise")
        spectrum = HessianSpectrum(num_batches=1, trace=False, density=False, on_error="raise")
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        small_fit(
            root,
            [surface, second, spectrum, ckpt],
            max_epochs=max_epochs,
            shuffle=False,
            ckpt_path=ckpt_path,
            enable_checkpointing=True,
        )
        return surface, second, spectrum

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 1)
    torch.load(next((tmp_path / "part" / "ckpt").glob("*.ckpt")), weights_only=True)  # primitives and tensors only
    resumed = run(tmp_path / "part", 3, ckpt_path=str(next((tmp_path / "part" / "ckpt").glob("*.ckpt"))))
    for a, b in zip(full[:2], resumed[:2]):
        np.testing.assert_array_equal(a.landscape.loss, b.landscape.loss)
    assert full[2].report.lambda_max == resumed[2].report.lambda_max


def test_trajectory_plane_surface_resumes_after_a_failure_at_fit_end(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from lightning_landscape import TrajectoryPCA

    from .helpers import StoppingLoss, small_fit

    loss_fn = StoppingLoss(ValueError("stopped at the 7th plane point"))

    def run(root, ckpt_path=None):
        trajectory = TrajectoryPCA(
            every_n_steps=1,
            resolution=4,
            num_batches=1,
            loss_fn=loss_fn,
            progress=False,
            on_error="raise",
            snapshot_dir=str(root / "snapshots"),  # a checkpoint carries the trajectory through its files
        )
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        small_fit(root, [trajectory, ckpt], max_epochs=2, shuffle=False, ckpt_path=ckpt_path, enable_checkpointing=True)
        return trajectory

    loss_fn.restart(stop_at=None)
    full = run(tmp_path / "full").landscape.loss.copy()
    loss_fn.restart(stop_at=7)  # one batch per point: the 7th point raises, 6 are evaluated
    with pytest.raises(ValueError, match="7th plane point"):
        run(tmp_path / "part")
    partial = next((tmp_path / "part").rglob("trajectory.npz"))
    assert int(Landscape.load(partial).evaluated.sum()) == 6
    loss_fn.restart(stop_at=None)
    last = sorted((tmp_path / "part" / "ckpt").glob("*.ckpt"))[-1]
    resumed = run(tmp_path / "part", ckpt_path=str(last))
    assert [partial] == list((tmp_path / "part").rglob("trajectory.npz"))  # the resumed fit writes where it was
    assert loss_fn.calls == 16 - 6 + 1  # the missing points, and θ* (not a grid point at resolution 4)
    np.testing.assert_array_equal(resumed.landscape.loss, full)
