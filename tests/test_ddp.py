"""DDP on 2 CPU processes (gloo): every analysis equals one process on the same data, one set of files,
one W&B run, results in the main process after ddp_spawn, a failure on one rank reaches both.

Each fit runs tests/scripts/ddp_fit.py in a subprocess under a timeout, so a hang fails the test
instead of stalling CI; the references are computed here, on one process, from the final weights
and the weight path that the script recorded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics
from torch.nn import functional as F

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape import Landscape, hessian_check, loss_surface, random_direction

SCRIPT = Path(__file__).parent / "scripts" / "ddp_fit.py"
TIMEOUT_S = 300
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def run_fit(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    try:
        return subprocess.run(
            [sys.executable, str(SCRIPT), str(out), *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
            cwd=Path(__file__).parents[1],
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process fit {args} hung for {TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")


@pytest.fixture(scope="module", params=["ddp", "ddp_spawn", "ddp_fork", "ddp-grid"])
def ddp_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    strategy, _, grid = request.param.partition("-")  # "ddp-grid": the surface split by grid points
    proc = run_fit(out, "--strategy", strategy, *(["--distribute", "grid"] if grid else []))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out, json.loads((out / "result.json").read_text()), proc


@pytest.fixture(scope="module")
def reference_setup(ddp_run):
    out, result, _ = ddp_run
    model = DigitsClassifier(channels=4)
    model.load_state_dict(torch.load(out / "final.pt", weights_only=True))
    datamodule = DigitsDataModule(batch_size=64, num_train=193, seed=0, shuffle=False)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert len(datamodule.train_set) == 193
    return model.eval(), loader, result


def relative(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def test_surface_equals_one_process_on_all_data(reference_setup):
    model, loader, result = reference_setup
    saved = Landscape.load(result["files"]["surface"]["npz"])
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    accuracy = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    ref = loss_surface(model, loader, dirs, saved.coords, loss_fn=F.cross_entropy, metrics={"accuracy": accuracy})
    # 193 samples: rank 1's shard is padded with one of rank 0's; it must not be counted twice.
    assert result["num_samples"] == 193
    assert relative(result["surface"], ref.loss) < 1e-5
    np.testing.assert_allclose(result["surface_accuracy"], ref.values["accuracy"], rtol=1e-6)


def test_hessian_equals_one_process_on_all_data(reference_setup):
    model, loader, result = reference_setup
    ref = hessian_check(model, loader, F.cross_entropy, trace=True, seed=0)
    assert relative(result["lambda_max"], ref.lambda_max) < 1e-5
    assert relative(result["lambda_min"], ref.lambda_min) < 1e-5
    assert relative(result["trace"], ref.trace) < 1e-5


def test_trajectory_equals_pca_of_the_recorded_path(ddp_run, reference_setup):
    out, result, _ = ddp_run
    model, loader, _ = reference_setup
    path = torch.load(out / "path.pt", weights_only=True).double().numpy()  # start + after each of 8 steps
    assert path.shape[0] == 9
    m = path[:-1] - path[-1]
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    evr = s**2 / np.sum(s**2)
    assert relative(result["evr"], evr[:2]) < 1e-5
    ref_path = np.vstack([m @ vt[:2].T, np.zeros((1, 2))])
    np.testing.assert_allclose(np.abs(result["pca_path"]), np.abs(ref_path), rtol=1e-4, atol=1e-6)
    center = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in loader) / 193
    assert relative(result["trajectory_center"], center) < 1e-5


def test_one_set_of_files_and_one_wandb_run(ddp_run):
    out, result, _ = ddp_run
    landscape_dirs = sorted(p for p in out.rglob("landscape") if p.is_dir())
    assert len(landscape_dirs) == 1, landscape_dirs
    written = sorted(p.name for p in landscape_dirs[0].iterdir())
    for name in ("loss_surface.npz", "trajectory.npz", "hessian.npz"):
        assert written.count(name) == 1
    for files in result["files"].values():  # the main process knows every file, also after ddp_spawn
        assert files and all(Path(p).exists() for p in files.values())
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    media = runs[0] / "files" / "media" / "images"
    images = [str(p.relative_to(media)) for p in media.rglob("*.png")]
    for name in ("loss_surface", "trajectory", "hessian"):
        assert any(p.startswith(name) for p in images), images


def test_progress_and_logs_only_on_rank_zero(ddp_run):
    _, _, proc = ddp_run
    text = proc.stdout + proc.stderr
    assert text.count("[LossSurface] wrote") == 1
    starts = re.findall(r"^loss surface: \d+ point\(s\) x", text, flags=re.M)
    assert len(starts) == 2, starts  # the surface and the trajectory plane, each announced once


@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_failure_on_one_rank_reaches_both(tmp_path, on_error):
    proc = run_fit(tmp_path, "--strategy", "ddp", "--fail-rank", "1", "--on-error", on_error)
    text = proc.stdout + proc.stderr
    assert "boom on rank 1" in text
    if on_error == "raise":
        assert proc.returncode != 0
        assert "the analysis failed on rank 1: ValueError: boom on rank 1" in text  # rank 0's error
    else:  # both ranks skip every analysis alike and the fit ends normally
        assert proc.returncode == 0, text[-5000:]
        result = json.loads((tmp_path / "result.json").read_text())
        assert result["surface"] is None and result["lambda_max"] is None and result["evr"] is None
        assert text.count("failed and was skipped") >= 2


def test_an_interrupted_surface_resumes_under_ddp(tmp_path):
    proc = run_fit(tmp_path, "--strategy", "ddp", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "resume.json").read_text())
    assert result["partial"] == 10
    assert result["calls_both_ranks"] == 2 * 2 * (25 - 10)  # 2 ranks x 2 batches x the 15 missing points
    assert result["equal"]


def test_an_unknown_distribute_is_rejected_at_construction():
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_landscape import LossSurface

    with pytest.raises(MisconfigurationException, match=r"`distribute`='rows'.*'data', 'grid'"):
        LossSurface(distribute="rows")


def test_padding_is_dropped_only_at_the_end_of_a_shard():
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_landscape.callbacks._distributed import drop_padding

    data = torch.arange(7)
    for rank, real in ((0, [0, 2, 4, 6]), (1, [1, 3, 5])):  # rank 1's 4th sample repeats index 0
        loader = DataLoader(data, batch_size=3, sampler=DistributedSampler(data, 2, rank=rank, shuffle=False))
        kept = torch.cat(drop_padding(list(loader), loader)).tolist()
        assert kept == real
        first = list(loader)[:1]  # stops before the padding: kept as it is
        assert [b.tolist() for b in drop_padding(first, loader)] == [b.tolist() for b in first]
