"""Every Lightning precision works: the analyses see the batches the way training_step does."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lightning_landscape import HessianSpectrum, LossSurface, TrajectoryPCA

from .helpers import small_fit


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "bf16-mixed"])
def test_all_three_callbacks_run_under_the_precision(tmp_path, precision):
    surface = LossSurface(dims=1, resolution=3, num_batches=2, progress=False)
    trajectory = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False)
    spectrum = HessianSpectrum(num_batches=1, trace=False, density=False, tol=1e-2)
    callbacks = [surface, trajectory, spectrum]
    trainer, model, dm = small_fit(tmp_path, callbacks, max_epochs=1, precision=precision, shuffle=False)
    assert surface.landscape.complete and trajectory.landscape.complete and spectrum.report is not None
    dtype = next(model.parameters()).dtype
    assert dtype == {"64-true": torch.float64, "bf16-true": torch.bfloat16, "bf16-mixed": torch.float32}[precision]
    if precision == "64-true":
        # The centre is the float64 model's own loss on the first two batches, computed independently.
        x, y = dm.train_set.tensors
        model.eval()
        with torch.no_grad():
            loss = F.cross_entropy(model(x[:64].double()), y[:64]).item()
        assert surface.landscape.metadata["center_loss"] == pytest.approx(loss, rel=1e-9)
