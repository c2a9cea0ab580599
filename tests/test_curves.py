"""Mode connectivity: curve formulas, the fit, evaluation along curve and line, BatchNorm, the plane, I/O."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from lightning_landscape import LandscapeWarning
from lightning_landscape.connect import (
    Curve,
    connect,
    curve_plane,
    evaluate_curve,
    fit_curve,
    plane_basis,
)
from lightning_landscape.plots import plot_connection, plot_curve_plane
from lightning_landscape.results import CurveResult, Landscape
from lightning_landscape.state import capture_state
from tests.helpers import assert_state_equal


# --------------------------------------------------------------------------- data and models
@pytest.fixture(scope="module")
def digits() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """1,024 digits as flat 64-pixel vectors in [0, 1], in 8 batches of 128."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:1024], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:1024], dtype=torch.long)
    return [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1024, 128)]


def mlp(seed: int, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(64, 32), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(32, 10)]
    return nn.Sequential(*layers)


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def sgd_train(model: nn.Module, batches, steps: int, seed: int, lr: float = 0.2) -> nn.Module:
    """Plain minibatch SGD: a minimum of the digits loss, different for every seed."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = batches[int(torch.randint(len(batches), (1,), generator=g))]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def direct_loss(model: nn.Module, batches, weights=None, *, recompute_bn: bool = False) -> tuple[float, float]:
    """Independent reference: (loss, accuracy) of a copy of ``model`` at ``weights``, BN stats from update_bn."""
    ref = copy.deepcopy(model)
    if weights is not None:
        with torch.no_grad():
            for name, p in ref.named_parameters():
                p.copy_(weights[name])
    if recompute_bn:
        update_bn([x for x, _ in batches], ref)
    ref.eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            out = ref(x)
            total += F.cross_entropy(out, y).double().item() * len(y)
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
    return total / count, correct / count


@pytest.fixture(scope="module")
def minima(digits):
    """Two minima of the 64-32-10 MLP trained from different seeds, and a Bezier curve fitted between them."""
    a = sgd_train(mlp(1), digits, 250, seed=1)
    b = sgd_train(mlp(2), digits, 250, seed=2)
    model = mlp(0)
    steps = []
    curve = fit_curve(
        model,
        a,
        b,
        digits,
        loss_fn=F.cross_entropy,
        epochs=12,
        lr=0.05,
        progress=False,
        on_step=lambda *s: steps.append(s),
    )
    return a, b, model, curve, steps


# --------------------------------------------------------------------------- formulas
def _random_points(k: int, n: int = 5, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n) for _ in range(k + 2)]


def _curve_of(kind: str, points: list[np.ndarray]) -> Curve:
    as_dict = [{"w": torch.tensor(p, dtype=torch.float64)} for p in points]
    return Curve(kind, as_dict[0], as_dict[-1], as_dict[1:-1])


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.77, 0.9])
def test_bezier_matches_the_hand_formula(t):
    w1, th, w2 = _random_points(1)
    expected = (1 - t) ** 2 * w1 + 2 * t * (1 - t) * th + t**2 * w2
    np.testing.assert_allclose(_curve_of("bezier", [w1, th, w2]).weights(t)["w"].detach().numpy(), expected, rtol=1e-12)
    p0, p1, p2, p3 = _random_points(2, seed=1)
    cubic = (1 - t) ** 3 * p0 + 3 * t * (1 - t) ** 2 * p1 + 3 * t**2 * (1 - t) * p2 + t**3 * p3
    np.testing.assert_allclose(
        _curve_of("bezier", [p0, p1, p2, p3]).weights(t)["w"].detach().numpy(), cubic, rtol=1e-12
    )


@pytest.mark.parametrize("t", [0.1, 0.3, 0.5, 0.77, 0.9])
def test_polychain_matches_the_hand_formula(t):
    w1, th, w2 = _random_points(1)
    expected = w1 + 2 * t * (th - w1) if t <= 0.5 else th + (2 * t - 1) * (w2 - th)
    np.testing.assert_allclose(
        _curve_of("polychain", [w1, th, w2]).weights(t)["w"].detach().numpy(), expected, rtol=1e-12
    )
    points = _random_points(2, seed=1)
    i = min(int(t * 3), 2)  # the segment [i/3, (i+1)/3]
    s = 3 * t - i
    np.testing.assert_allclose(
        _curve_of("polychain", points).weights(t)["w"].detach().numpy(),
        (1 - s) * points[i] + s * points[i + 1],
        rtol=1e-12,
    )


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("num_bends", [1, 2])
def test_end_points_are_exact(kind, num_bends):
    model = mlp(0)
    curve = Curve.between(model, mlp(1), mlp(2), curve=kind, num_bends=num_bends)
    with torch.no_grad():
        for bend in curve.bends:  # bends off the line, so nothing cancels by accident
            for p in bend.values():
                p.add_(torch.randn_like(p))
    start, end = dict(mlp(1).named_parameters()), dict(mlp(2).named_parameters())
    for t, target in ((0.0, start), (1.0, end)):
        for weights in (curve.weights(t), curve.line_weights(t)):
            assert all(torch.equal(weights[n], target[n]) for n in target)
    # Bends start on the straight line at t = i/(k+1).
    fresh = Curve.between(model, mlp(1), mlp(2), curve=kind, num_bends=num_bends)
    for i, bend in enumerate(fresh.bends, start=1):
        for n in start:
            torch.testing.assert_close(bend[n], start[n] + (end[n] - start[n]) * i / (num_bends + 1))


# --------------------------------------------------------------------------- the real case: a barrier
def test_the_fitted_curve_removes_the_barrier_of_the_line(minima, digits):
    a, b, model, curve, steps = minima
    result = evaluate_curve(
        model, curve, digits, loss_fn=F.cross_entropy, metrics=["accuracy"], ts=21, bn="eval", progress=False
    )
    assert result.barrier_line > 0.2  # two SGD minima from different seeds: the segment between them climbs
    assert result.barrier_curve < 0.5 * result.barrier_line
    # Barrier = max_t loss(t) − max(loss(0), loss(1)), by hand.
    assert result.barrier_curve == pytest.approx(result.curve["loss"].max() - max(result.curve["loss"][[0, -1]]))
    # The end points are the two minima, on both paths, and the values are the loss at the weights.
    for index, end in ((0, a), (-1, b)):
        loss, accuracy = direct_loss(end, digits)
        for path in (result.curve, result.line):
            assert path["loss"][index] == pytest.approx(loss, rel=1e-6)
            assert path["accuracy"][index] == pytest.approx(accuracy, abs=1e-6)
    with torch.no_grad():
        mid = curve.weights(0.35)
    assert result.curve["loss"][7] == pytest.approx(direct_loss(model, digits, mid)[0], rel=1e-6)  # ts[7] = 0.35
    # The fit's own loss: one entry per step, passed to on_step as it trained, kept in the result.
    assert len(curve.history) == 12 * len(digits) == len(steps)
    assert [s for s, _ in steps] == list(range(len(steps)))
    assert [v for _, v in steps] == curve.history == result.history.tolist()
    assert np.mean(curve.history[-8:]) < np.mean(curve.history[:8])
    assert result.settings["curve"] == "bezier" and result.settings["epochs"] == 12 and result.settings["bn"] == "eval"


def test_connect_is_fit_then_evaluate(digits):
    a, b = mlp(3), mlp(4)
    kwargs = dict(loss_fn=F.cross_entropy, curve="polychain", num_bends=2, epochs=2, optimizer="adam", lr=1e-3)
    result = connect(mlp(0), a, b, digits, seed=5, ts=5, bn="eval", progress=False, **kwargs)
    curve = fit_curve(mlp(0), a, b, digits, seed=5, progress=False, **kwargs)
    again = evaluate_curve(mlp(0), curve, digits, loss_fn=F.cross_entropy, ts=5, bn="eval", progress=False)
    assert np.array_equal(result.curve["loss"], again.curve["loss"]) and np.array_equal(result.history, again.history)
    assert result.settings["optimizer"] == "adam" and result.settings["num_bends"] == 2


# --------------------------------------------------------------------------- BatchNorm
def test_batchnorm_model_is_untouched_and_recompute_equals_update_bn(digits):
    a = sgd_train(bn_net(1), digits, 40, seed=1)
    b = sgd_train(bn_net(2), digits, 40, seed=2)
    model = bn_net(0)
    with torch.no_grad():  # the model's own statistics far from any point's
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.1)
    model.train()
    before = capture_state(model)
    curve = fit_curve(model, a, b, digits, loss_fn=F.cross_entropy, epochs=2, progress=False)
    assert_state_equal(model, before)
    result = evaluate_curve(model, curve, digits, loss_fn=F.cross_entropy, ts=[0.0, 0.5, 1.0], progress=False)
    assert_state_equal(model, before)
    assert result.settings["bn"] == "recompute"
    for index, t in enumerate([0.0, 0.5, 1.0]):
        with torch.no_grad():
            weights = curve.weights(t)
        expected = direct_loss(model, digits, weights, recompute_bn=True)[0]
        assert result.curve["loss"][index] == pytest.approx(expected, rel=1e-6)
    # With the stored (wrong) statistics the loss is another: the recomputation is what made them equal.
    stale = evaluate_curve(model, curve, digits, loss_fn=F.cross_entropy, ts=[0.0, 1.0], bn="eval", progress=False)
    assert abs(stale.curve["loss"][0] - result.curve["loss"][0]) > 0.1


def test_recompute_on_a_model_without_batchnorm_warns(digits):
    curve = Curve.between(mlp(0), mlp(1), mlp(2))
    with pytest.warns(LandscapeWarning, match="nothing to recompute"):
        result = evaluate_curve(mlp(0), curve, digits, loss_fn=F.cross_entropy, ts=2, progress=False)
    assert result.settings["bn"] == "eval"


# --------------------------------------------------------------------------- Garipov's plane
def test_plane_basis_is_orthonormal_and_reconstructs_the_points(minima):
    _, _, _, curve, _ = minima
    basis = plane_basis(curve)
    names = curve.names
    e1, e2 = (torch.cat([axis[n].reshape(-1) for n in names]) for axis in basis.axes)
    assert float(e1 @ e1) == pytest.approx(1.0, abs=1e-12) and float(e2 @ e2) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(e1 @ e2)) < 1e-12
    for (x, y), point in zip(basis.points, [curve.start, curve.bends[0], curve.end]):
        rebuilt = basis.point(x, y)
        for n in names:
            torch.testing.assert_close(rebuilt[n], point[n].double(), rtol=0, atol=1e-6)
    distance = math.sqrt(sum(float(((curve.end[n] - curve.start[n]).double() ** 2).sum()) for n in names))
    assert basis.points[2].tolist() == pytest.approx([distance, 0.0]) and basis.points[0].tolist() == [0.0, 0.0]


def test_plane_surface_equals_the_loss_at_the_grid_weights(digits, tmp_path):
    a = sgd_train(bn_net(1), digits, 30, seed=1)
    b = sgd_train(bn_net(2), digits, 30, seed=2)
    model = bn_net(0)
    curve = fit_curve(model, a, b, digits, loss_fn=F.cross_entropy, epochs=1, progress=False)
    before = capture_state(model)
    ls = curve_plane(model, curve, digits, loss_fn=F.cross_entropy, resolution=5, margin=0.25, progress=False)
    assert_state_equal(model, before)
    basis = plane_basis(curve)
    xs, ys = ls.coords
    # The grid covers the three points and the curve with a margin of 0.25 of their extent on each side.
    covered = np.vstack([basis.points, ls.extras["curve_path"]])
    span = covered.max(0) - covered.min(0)
    assert xs[0] == pytest.approx(covered[:, 0].min() - 0.25 * span[0])
    assert ys[-1] == pytest.approx(covered[:, 1].max() + 0.25 * span[1])
    np.testing.assert_allclose(ls.extras["points"], basis.points)
    assert np.all(ls.extras["curve_offset"] < 1e-5)  # one bend: the curve lies in its plane
    for i, j in ((1, 3), (4, 0)):
        weights = {n: w.float() for n, w in basis.point(float(xs[i]), float(ys[j])).items()}
        expected = direct_loss(model, digits, weights, recompute_bn=True)[0]
        assert ls.loss[i, j] == pytest.approx(expected, rel=1e-5)
    back = Landscape.load(ls.save(tmp_path / "plane"))
    assert np.array_equal(back.loss, ls.loss) and back.metadata["kind"] == "curve_plane"
    assert all(np.array_equal(back.extras[k], ls.extras[k]) for k in ls.extras)
    fig = plot_curve_plane(back)
    drawn = [line for line in fig.axes[0].lines if line.get_label() == "bezier curve"]
    assert len(drawn) == 1 and np.allclose(drawn[0].get_xydata(), ls.extras["curve_path"])


def test_the_plane_of_several_bends_goes_through_the_middle_one():
    points = _random_points(3, n=6, seed=4)
    curve = _curve_of("polychain", points)
    basis = plane_basis(curve)
    assert basis.bend_index == 1
    for xy, target in zip(basis.points, [points[0], points[2], points[4]]):
        np.testing.assert_allclose(basis.point(*xy)["w"].numpy(), target, atol=1e-12)
    # The other bends are off the plane: their projection drops a part of them.
    xy, distance = basis.project_with_offset({"w": torch.tensor(points[1])})
    np.testing.assert_allclose(np.linalg.norm(basis.point(*xy)["w"].numpy() - points[1]), distance, rtol=1e-9)
    assert distance > 0.1


def test_the_fit_reports_its_progress_in_log_lines(digits, caplog, monkeypatch):
    monkeypatch.setattr("lightning_landscape.progress._is_terminal", lambda: False)  # as in a job's log file
    with caplog.at_level("INFO", logger="lightning_landscape"):
        fit_curve(mlp(0), mlp(1), mlp(2), digits, loss_fn=F.cross_entropy, epochs=2, progress=None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "curve fit: 16 point(s) x 1 forward and backward pass"
    assert lines[-1].startswith("curve fit: 16/16 points")


def test_plane_of_an_unfitted_curve_is_refused():
    curve = Curve.between(mlp(0), mlp(1), mlp(2))
    with pytest.raises(ValueError, match="bend lies on the line through its end points"):
        plane_basis(curve)


# --------------------------------------------------------------------------- bad input
class _Unread:
    """Data that fails the test if anything reads it: the checks come first."""

    def __iter__(self):
        raise AssertionError("the data was read before the arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_bends": 0}, "`num_bends`=0 is not valid; expected an integer >= 1."),
        ({"num_bends": 1.5}, "`num_bends`=1.5 is not valid; expected an integer >= 1."),
        ({"curve": "spline"}, "`curve`='spline' is not supported; accepted values: 'bezier', 'polychain'."),
        ({"optimizer": "lbfgs"}, "`optimizer`='lbfgs' is not supported; accepted values: 'sgd', 'adam'."),
        ({"epochs": 0}, "`epochs`=0 is not valid; expected an integer >= 1."),
        ({"lr": -1.0}, "`lr`=-1.0 is not valid; expected a finite number > 0."),
        ({"seed": -1}, "`seed`=-1 is not valid; expected an integer from 0"),
        (
            {"end": mlp(0).state_dict() | {"0.weight": torch.zeros(16, 64)}},
            "`end['0.weight']` has shape (16, 64), `model`'s has (32, 64)",
        ),
        (
            {"start": nn.Sequential(nn.Linear(64, 10))},
            "`start` does not match the architecture of `model`: missing ['2.weight', '2.bias']",
        ),
        (
            {"end": nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 10))},
            "unexpected ['4.weight', '4.bias']",
        ),
        ({"start": "no-such-checkpoint.pt"}, "`start`='no-such-checkpoint.pt' is not a file; expected a .ckpt"),
        ({"start": 3}, "`start` is a int; expected a .ckpt path, a state dict or an nn.Module"),
    ],
)
def test_bad_input_is_named_before_the_data_is_read(kwargs, message):
    args = {"start": mlp(1), "end": mlp(2), **kwargs}
    start, end = args.pop("start"), args.pop("end")
    with pytest.raises(ValueError) as info:
        fit_curve(mlp(0), start, end, _Unread(), loss_fn=F.cross_entropy, **args)
    assert message in str(info.value)
    with pytest.raises(ValueError) as again:
        connect(mlp(0), start, end, _Unread(), loss_fn=F.cross_entropy, **args)
    assert message in str(again.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ts": [0.0, 0.5]}, "`ts`=[0.0, 0.5] is not valid; expected increasing values from 0 to 1, both included."),
        ({"ts": [0.0, 0.7, 0.5, 1.0]}, "expected increasing values from 0 to 1"),
        ({"bn": "train"}, "`bn`='train' is not supported; accepted values: 'eval', 'recompute'."),
    ],
)
def test_bad_evaluation_options_are_named_before_the_fit(kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        connect(mlp(0), mlp(1), mlp(2), _Unread(), loss_fn=F.cross_entropy, **kwargs)
    assert message in str(info.value)
    with pytest.raises(ValueError) as again:
        evaluate_curve(mlp(0), Curve.between(mlp(0), mlp(1), mlp(2)), _Unread(), loss_fn=F.cross_entropy, **kwargs)
    assert message in str(again.value)


def test_a_curve_of_another_architecture_is_refused(digits):
    curve = Curve.between(bn_net(0), bn_net(1), bn_net(2))
    with pytest.raises(ValueError, match="`curve` was built for another architecture than `model`"):
        evaluate_curve(mlp(0), curve, digits, loss_fn=F.cross_entropy)


# --------------------------------------------------------------------------- reproducibility, I/O, figures
def test_a_seeded_fit_is_reproducible_and_leaves_the_global_rng_alone(digits):
    model, a, b = mlp(0, dropout=0.3), mlp(1, 0.3), mlp(2, 0.3)  # built first: mlp() seeds the global RNG

    def fit(seed):
        return fit_curve(model, a, b, digits, loss_fn=F.cross_entropy, epochs=2, seed=seed, progress=False)

    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(7)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = fit(0)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    torch.rand(5)  # the global stream moves on between the fits: the seed alone decides
    second, other = fit(0), fit(1)
    sd1, sd2, sd3 = first.state_dict(), second.state_dict(), other.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1) and first.history == second.history
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)


def test_results_save_and_load_exactly(minima, digits, tmp_path):
    _, _, model, curve, _ = minima
    result = evaluate_curve(
        model, curve, digits, loss_fn=F.cross_entropy, metrics=["accuracy"], ts=5, bn="eval", progress=False
    )
    back = CurveResult.load(result.save(tmp_path / "curve"))
    assert np.array_equal(back.ts, result.ts) and np.array_equal(back.history, result.history)
    for name in ("loss", "accuracy"):
        assert np.array_equal(back.curve[name], result.curve[name]) and np.array_equal(
            back.line[name], result.line[name]
        )
    assert back.scalars() == result.scalars() and back.settings == result.settings
    assert back.scalars()["max_error_line"] == pytest.approx(1 - result.line["accuracy"].min())
    saved = Curve.load(curve.save(tmp_path / "curve.pt"))
    assert saved.kind == curve.kind and saved.history == curve.history and saved.settings == curve.settings
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in curve.state_dict().items())
    with pytest.raises(ValueError, match="holds a result of kind 'curve'; expected"):
        Landscape.load(tmp_path / "curve.npz")
    fig = plot_connection(back)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "error (1 − accuracy)"]
    curve_line = [line for line in fig.axes[0].lines if line.get_label().startswith("bezier curve")]
    assert np.array_equal(curve_line[0].get_ydata(), back.curve["loss"])
