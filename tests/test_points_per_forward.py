"""``points_per_forward``: K grid points per vmapped forward pass give the one-point results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_landscape import LandscapeWarning, loss_surface, random_direction
from lightning_landscape.params import Plane, trainable_parameters
from lightning_landscape.surface.stacked import StackedPlane


def _linear_case():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    d = {"weight": torch.randn(2, 3, dtype=torch.float64), "bias": torch.randn(2, dtype=torch.float64)}
    e = {"weight": torch.randn(2, 3, dtype=torch.float64), "bias": torch.randn(2, dtype=torch.float64)}
    return model, [(x[:6], y[:6]), (x[6:], y[6:])], [d, e], x.numpy(), y.numpy()


def test_stacked_points_match_numpy_and_leave_the_model_alone():
    model, data, dirs, x, y = _linear_case()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 2, 4)  # 20 points: chunks of 3 and a short one of 2
    ls = loss_surface(model, data, dirs, [alphas, betas], loss_fn=F.mse_loss, progress=False, points_per_forward=3)
    w0, b0 = before["weight"].numpy(), before["bias"].numpy()
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            w = w0 + a * dirs[0]["weight"].numpy() + b * dirs[1]["weight"].numpy()
            c = b0 + a * dirs[0]["bias"].numpy() + b * dirs[1]["bias"].numpy()
            expected = np.mean((x @ w.T + c - y) ** 2)  # all 10 samples, each weighted once
            assert ls.loss[i, j] == pytest.approx(expected, rel=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert ls.metadata["num_samples"] == 10


def test_stacked_weights_are_bit_for_bit_the_plane_points():
    model, _, dirs, _, _ = _linear_case()
    params = trainable_parameters(model)
    center = {n: p.detach().clone() for n, p in params.items()}
    plane = Plane(params, center, dirs)
    stacked = StackedPlane(list(params), plane.center, plane.steps).stack([[0.3, -1.7], [0.0, 0.0], [2.5, 0.1]])
    for k, point in enumerate([[0.3, -1.7], [0.0, 0.0], [2.5, 0.1]]):
        plane.set(point)
        for n, p in params.items():
            assert torch.equal(stacked[n][k], p.detach())
    plane.reset()


def test_batchnorm_cnn_with_metrics_agrees_with_one_point_at_a_time():
    from examples.digits import digits_cnn, load_digits_tensors

    torch.manual_seed(0)
    x, y = load_digits_tensors()
    model = digits_cnn(8).eval()
    with torch.no_grad():  # running statistics that are not the defaults, so eval-mode BatchNorm matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    data = [(x[:100], y[:100]), (x[100:160], y[100:160])]
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    grid = [np.linspace(-1, 1, 3), np.linspace(-1, 1, 3)]
    metrics = {"acc": torchmetrics.Accuracy("multiclass", num_classes=10)}
    one = loss_surface(model, data, dirs, grid, loss_fn=F.cross_entropy, metrics=metrics, progress=False)
    four = loss_surface(
        model, data, dirs, grid, loss_fn=F.cross_entropy, metrics=metrics, progress=False, points_per_forward=4
    )
    np.testing.assert_allclose(four.loss, one.loss, rtol=1e-5)
    np.testing.assert_array_equal(four.values["acc"], one.values["acc"])
    assert len(np.unique(one.values["acc"])) > 1  # the points differ: a mix-up of points would show


def test_a_loss_vmap_cannot_run_warns_and_goes_on_one_point_at_a_time():
    model, data, dirs, _, _ = _linear_case()

    def loss_with_item(outputs, targets):
        loss = F.mse_loss(outputs, targets)
        if loss.item() < 0:  # data-dependent control flow: vmap cannot trace it
            raise AssertionError
        return loss

    grid = [np.linspace(-1, 1, 3)] * 2
    with pytest.warns(LandscapeWarning, match="points_per_forward"):
        stacked = loss_surface(model, data, dirs, grid, loss_fn=loss_with_item, progress=False, points_per_forward=4)
    plain = loss_surface(model, data, dirs, grid, loss_fn=F.mse_loss, progress=False)
    np.testing.assert_array_equal(stacked.loss, plain.loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"points_per_forward": 0}, r"`points_per_forward`=0 is not valid; expected an integer >= 1"),
        ({"points_per_forward": 2.0}, r"`points_per_forward`=2.0 is not valid"),
        ({"points_per_forward": 2, "bn": "recompute"}, r"`points_per_forward`=2 needs bn='eval', got bn='recompute'"),
        ({"points_per_forward": 2, "compile": True}, r"expected compile=False, got True"),
        ({"points_per_forward": 2, "memory": "low"}, r"memory='low' holds one"),
    ],
)
def test_bad_points_per_forward_is_refused_before_any_point(kwargs, match):
    from lightning_landscape import SeededDirection

    model, data, _, _, _ = _linear_case()
    dirs = [SeededDirection(seed=0), SeededDirection(seed=1)] if kwargs.get("memory") == "low" else _linear_case()[2]
    calls = []

    def counting_loss(outputs, targets):
        calls.append(1)
        return F.mse_loss(outputs, targets)

    with pytest.raises(ValueError, match=match):
        loss_surface(model, data, dirs, [np.linspace(-1, 1, 3)] * 2, loss_fn=counting_loss, progress=False, **kwargs)
    assert calls == []
