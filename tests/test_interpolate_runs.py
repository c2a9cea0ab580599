"""Two runs compared on the line through their weights: checkpoints in, values, figure, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from examples.digits import DigitsClassifier
from lightning_landscape.checkpoints import load_weights
from lightning_landscape.plots.interpolation import plot_interpolation
from lightning_landscape.state import capture_state
from lightning_landscape.surface.runs import interpolate_runs
from tests.helpers import assert_state_equal, eval_loss, small_fit


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two digits fits from different seeds, saved as Lightning checkpoints."""
    paths, models = [], []
    for seed in (0, 1):
        tmp = tmp_path_factory.mktemp(f"run{seed}")
        trainer, model, datamodule = small_fit(tmp, seed=seed, shuffle=False, max_epochs=1)
        path = tmp / f"seed{seed}.ckpt"
        trainer.save_checkpoint(path)
        paths.append(path)
        models.append(model)
    datamodule.setup()
    return paths, models, datamodule


def accuracy(model: nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def test_runs_from_checkpoints_reproduce_both_models_on_train_and_val(two_runs):
    (a, b), (model_a, model_b), dm = two_runs
    train, val = list(dm.train_dataloader()), list(dm.val_dataloader())
    model = DigitsClassifier(channels=4)
    before = capture_state(model)
    ls = interpolate_runs(
        model,
        str(a),
        b,
        train,
        val_data=val,
        loss_fn=F.cross_entropy,
        metrics=["accuracy"],
        labels=("seed 0", "seed 1"),
        progress=False,
    )
    alphas = ls.coords[0]
    assert alphas[0] == -0.5 and alphas[-1] == 1.5 and len(alphas) == 41
    i0, i1 = int(np.argmin(abs(alphas))), int(np.argmin(abs(alphas - 1)))
    for idx, ref in ((i0, model_a), (i1, model_b)):
        assert ls.loss[idx] == pytest.approx(eval_loss(ref, train), rel=1e-6)
        assert ls.values["val_loss"][idx] == pytest.approx(eval_loss(ref, val), rel=1e-6)
        assert ls.values["val_accuracy"][idx] == pytest.approx(accuracy(ref, val), abs=1e-6)
    # A point beyond the end: the extrapolated weights by hand.
    point = copy.deepcopy(model_a)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    point.load_state_dict({k: torch.lerp(sa[k].double(), sb[k].double(), 1.5).to(sa[k].dtype) for k in sa})
    assert ls.loss[-1] == pytest.approx(eval_loss(point, train), rel=1e-5)
    assert_state_equal(model, before)
    fig = plot_interpolation(ls)
    assert [t.get_text() for t in fig.axes[0].texts] == ["seed 0", "seed 1"]
    assert sorted(line.get_label() for ax in fig.axes for line in ax.lines if not line.get_label().startswith("_")) == [
        "train accuracy",
        "train loss",
        "val accuracy",
        "val loss",
    ]


def test_checkpoint_of_another_architecture_names_the_parameter_and_both_shapes(two_runs):
    (a, _), _, dm = two_runs
    wider = DigitsClassifier(channels=6)
    with pytest.raises(
        ValueError,
        match=r"`start` does not match the model: 'net.0.weight' has shape \(4, 1, 3, 3\) "
        r"there and \(6, 1, 3, 3\) in the model",
    ):
        interpolate_runs(wider, a, wider, list(dm.train_dataloader()), loss_fn=F.cross_entropy)


def test_bad_sources_are_named():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"`end`='/nonexistent.ckpt' is not a file"):
        load_weights(model, "/nonexistent.ckpt", "end")
    with pytest.raises(ValueError, match=r"`end` does not match the model: it lacks 'bias'"):
        load_weights(model, {"weight": torch.zeros(1, 2)}, "end")
    with pytest.raises(ValueError, match=r"`start` is a int; expected a .ckpt path"):
        load_weights(model, 3, "start")
    with pytest.raises(ValueError, match=r"`labels`=\('a',\) is not valid"):
        interpolate_runs(model, model, model, [(torch.ones(1, 2), torch.ones(1, 1))], loss_fn=F.mse_loss, labels=("a",))


def test_a_saved_state_dict_file_works_like_the_module(tmp_path):
    torch.manual_seed(0)
    a, b = nn.Linear(3, 1), nn.Linear(3, 1)
    torch.save(b.state_dict(), tmp_path / "b.pt")
    data = [(torch.randn(8, 3), torch.randn(8, 1))]
    from_file = interpolate_runs(a, a, tmp_path / "b.pt", data, loss_fn=F.mse_loss, progress=False)
    from_module = interpolate_runs(a, a, b, data, loss_fn=F.mse_loss, progress=False)
    np.testing.assert_array_equal(from_file.loss, from_module.loss)
    assert "val_loss" not in from_file.values


def test_val_values_use_statistics_recomputed_from_the_training_data():
    """bn='recompute': a point's BatchNorm statistics come from the train data, for the val values too."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    train = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    val = [(3 * torch.randn(16, 4, generator=g) + 2, torch.randint(0, 3, (16,), generator=g))]  # other statistics
    ls = interpolate_runs(
        nets[0], nets[0], nets[1], train, val_data=val, loss_fn=F.cross_entropy, alphas=[0.5], bn="recompute"
    )
    point = copy.deepcopy(nets[0])
    sa, sb = nets[0].state_dict(), nets[1].state_dict()
    point.load_state_dict({k: torch.lerp(sa[k].double(), sb[k].double(), 0.5).to(sa[k].dtype) for k in sa})
    update_bn([x for x, _ in train], point)
    assert ls.values["val_loss"][0] == pytest.approx(eval_loss(point, val), rel=1e-6)
    assert ls.loss[0] == pytest.approx(eval_loss(point, train), rel=1e-6)


def test_interpolate_takes_checkpoint_paths_too(two_runs):
    from lightning_landscape import interpolate

    (a, b), (model_a, model_b), dm = two_runs
    train = list(dm.train_dataloader())
    alphas = np.array([0.0, 0.5, 1.0])
    from_paths = interpolate(DigitsClassifier(channels=4), a, str(b), alphas, train, loss_fn=F.cross_entropy)
    from_modules = interpolate(DigitsClassifier(channels=4), model_a, model_b, alphas, train, loss_fn=F.cross_entropy)
    np.testing.assert_array_equal(from_paths.loss, from_modules.loss)
    assert from_paths.loss[0] == pytest.approx(eval_loss(model_a, train), rel=1e-6)
