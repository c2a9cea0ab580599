"""dtype="bf16" and compile=...: faster evaluations whose error against an exact one is on record."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape import GridEvaluator, LandscapeWarning, loss_surface, make_batch_loss, random_direction


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3)).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))]
    return model, data


def _exact(model, data):
    with torch.no_grad():
        return float(F.cross_entropy(model(data[0][0]), data[0][1]))


def test_bf16_is_close_and_its_error_is_recorded_exactly():
    model, data = _problem()
    d = random_direction(model, seed=0)
    ls = loss_surface(model, data, d, [np.linspace(-1, 1, 5)], loss_fn=F.cross_entropy, progress=False, dtype="bf16")
    exact = _exact(model, data)
    assert ls.metadata["eval_dtype"] == "bf16"
    assert ls.metadata["exact_center_loss"] == pytest.approx(exact, rel=1e-6)
    recorded = abs(ls.metadata["center_loss"] - exact) / exact
    assert ls.metadata["center_loss_rel_error"] == pytest.approx(recorded, rel=1e-4, abs=1e-9)
    assert 0 < recorded < 2e-2  # bfloat16 keeps ~3 significant digits: not exact, but close
    # The same grid in the model's dtype: bf16 moved every point a little, none a lot.
    full = loss_surface(model, data, d, [np.linspace(-1, 1, 5)], loss_fn=F.cross_entropy, progress=False)
    np.testing.assert_allclose(ls.loss, full.loss, rtol=3e-2)
    assert not np.array_equal(ls.loss, full.loss)
    assert "center_loss_rel_error" not in full.metadata


def test_compile_gives_the_eager_values_and_records_a_zero_error():
    model, data = _problem()
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    coords = [np.linspace(-1, 1, 4)] * 2
    eager = loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False)
    compiled = loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False, compile="aot_eager")
    np.testing.assert_allclose(compiled.loss, eager.loss, rtol=1e-6)
    assert compiled.metadata["compile"] == "aot_eager"
    assert compiled.metadata["center_loss_rel_error"] < 1e-6
    assert torch.is_grad_enabled()


def test_a_backend_that_fails_warns_once_and_evaluates_eagerly():
    model, data = _problem()

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    ev = GridEvaluator(data, make_batch_loss(F.cross_entropy), compile=broken_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = ev.evaluate(model), ev.evaluate(model)
    assert first["loss"] == pytest.approx(_exact(model, data), rel=1e-6) and second == first
    messages = [str(w.message) for w in caught if issubclass(w.category, LandscapeWarning)]
    assert len(messages) == 1 and "evaluating eagerly" in messages[0]
    assert ev.compile is False


def test_bad_values_name_the_argument():
    model, data = _problem()
    with pytest.raises(ValueError, match="`dtype`='fp8'"):
        GridEvaluator(data, make_batch_loss(F.cross_entropy), dtype="fp8")
    with pytest.raises(ValueError, match="`compile`=3"):
        GridEvaluator(data, make_batch_loss(F.cross_entropy), compile=3)
