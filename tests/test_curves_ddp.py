"""fit_curve under torch.distributed: two gloo processes, each on its half of the data, take the steps
one process takes on both halves together (the mean of equal-size halves' losses is the loss of the union)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from lightning_landscape.connect import Curve, fit_curve
from tests.curve_ddp_setup import CURVES, end_points, union_batches

SCRIPT = Path(__file__).parent / "scripts" / "ddp_curve.py"


@pytest.fixture(scope="module")
def ddp_curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_curve")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "curves.pt")


@pytest.mark.parametrize("name", sorted(CURVES))
def test_two_processes_fit_the_curve_one_process_fits_on_their_union(ddp_curves, name):
    model, a, b = end_points()
    alone = fit_curve(model, a, b, union_batches(), loss_fn=F.cross_entropy, progress=False, **CURVES[name])
    ddp = ddp_curves[name]
    assert len(ddp["history"]) == len(alone.history) == CURVES[name]["epochs"] * 4
    assert ddp["history"] == pytest.approx(alone.history, rel=1e-5)
    for theirs, ours in zip(ddp["bends"], alone.parameters()):
        torch.testing.assert_close(theirs, ours.detach(), rtol=1e-5, atol=1e-6)
    start = Curve.between(model, a, b, curve=CURVES[name]["curve"], num_bends=CURVES[name]["num_bends"])
    moved = max(float((p - q).abs().max()) for p, q in zip(alone.parameters(), start.parameters()))
    assert moved > 1e-3  # the fit moved the bends, so the comparison is not of two unfitted curves


def test_a_process_with_other_batch_counts_is_refused_on_every_process():
    # One process alone stands in for "all": the sum of n and n² tell it the counts differ.
    model, a, b = end_points()
    fake_peer = lambda t: t + torch.tensor([5.0, 25.0, 1.0], dtype=t.dtype)  # noqa: E731  (a peer holding 5)
    with pytest.raises(ValueError, match="different numbers of batches"):
        fit_curve(model, a, b, union_batches(), loss_fn=F.cross_entropy, progress=False, reduce=fake_peer, epochs=1)
