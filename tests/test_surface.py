"""The functional core: directions, grid evaluation, interpolation, the state guard, Landscape I/O."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchmetrics
from torch import nn
from torch.nn import functional as F

from lightning_landscape import (
    Landscape,
    interpolate,
    landscape_figures,
    loss_surface,
    plot_contour,
    plot_curve,
    plot_heatmap,
    plot_surface_3d,
    preserved_state,
    random_direction,
)
from lightning_landscape.state import capture_state
from tests.helpers import assert_state_equal


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 10),
    )


def make_data(n: int = 37, batch: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def warm_bn(model: nn.Module, data) -> None:
    """Give BatchNorm non-trivial running statistics, as after training."""
    model.train()
    with torch.no_grad():
        for x, _ in data:
            model(x)


def numpy_forward_loss(model: nn.Module, data, params: dict[str, np.ndarray]) -> float:
    """Independent reference: sample-weighted mean cross-entropy computed with numpy
    from the conv/BN/linear weights of `small_cnn` in eval mode (float64)."""
    conv_w, conv_b = params["0.weight"], params["0.bias"]
    bn_w, bn_b = params["1.weight"], params["1.bias"]
    mean = model[1].running_mean.double().numpy()
    var = model[1].running_var.double().numpy()
    lin_w, lin_b = params["5.weight"], params["5.bias"]
    total, count = 0.0, 0
    for x, y in data:
        xn = np.pad(x.double().numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((x.shape[0], 4, 8, 8))
        for i in range(3):
            for j in range(3):
                patch = xn[:, :, i : i + 8, j : j + 8]  # (N, 1, 8, 8)
                out += np.einsum("nchw,oc->nohw", patch, conv_w[:, :, i, j])
        out += conv_b[None, :, None, None]
        out = (out - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
        out = out * bn_w[None, :, None, None] + bn_b[None, :, None, None]
        out = np.maximum(out, 0).reshape(x.shape[0], -1)
        logits = out @ lin_w.T + lin_b
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total += -logp[np.arange(len(y)), y.numpy()].sum()
        count += len(y)
    return total / count


# --- directions -------------------------------------------------------------------------------


def test_filter_norms_equal_weight_filter_norms_and_biasbn_zero():
    model = small_cnn()
    d = random_direction(model, norm="filter", ignore="biasbn", seed=3)
    assert list(d) == [n for n, p in model.named_parameters() if p.requires_grad]
    for name, p in model.named_parameters():
        w = p.detach().double().numpy()
        dn = d[name].double().numpy()
        if p.dim() <= 1:
            assert np.all(dn == 0), name
        else:
            w_norms = np.linalg.norm(w.reshape(w.shape[0], -1), axis=1)
            d_norms = np.linalg.norm(dn.reshape(dn.shape[0], -1), axis=1)
            np.testing.assert_allclose(d_norms, w_norms, rtol=1e-5)


def test_ignore_none_normalizes_1d_parameters_as_one_filter():
    model = small_cnn()
    d = random_direction(model, ignore="none", seed=0)
    for name in ("0.bias", "1.weight", "1.bias", "5.bias"):
        w = dict(model.named_parameters())[name].detach()
        assert d[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-5)


def test_layer_model_and_none_norms():
    model = small_cnn()
    params = dict(model.named_parameters())
    layer = random_direction(model, norm="layer", seed=0)
    assert layer["0.weight"].norm().item() == pytest.approx(params["0.weight"].norm().item(), rel=1e-5)
    whole = random_direction(model, norm="model", seed=0)
    included = [n for n, p in params.items() if p.dim() > 1]
    d_norm = np.sqrt(sum(float((whole[n].double() ** 2).sum()) for n in included))
    w_norm = np.sqrt(sum(float((params[n].detach().double() ** 2).sum()) for n in included))
    assert d_norm == pytest.approx(w_norm, rel=1e-6)
    raw = random_direction(model, norm="none", seed=0)
    expected = torch.randn(params["0.weight"].shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(raw["0.weight"], expected)


def test_same_seed_same_direction_other_seed_differs():
    a = random_direction(small_cnn(), seed=7)
    b = random_direction(small_cnn(), seed=7)
    c = random_direction(small_cnn(), seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_zero_filter_gets_zero_direction_not_nan():
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[2].zero_()
    d = random_direction(model, seed=0)
    assert torch.all(d["0.weight"][2] == 0)
    assert torch.isfinite(d["0.weight"]).all()


@pytest.mark.parametrize("norm", ["filter", "layer", "model", "none"])
def test_orthogonal_second_direction_is_orthogonal_and_normalized(norm):
    model = small_cnn()
    d1 = random_direction(model, norm=norm, seed=0)
    d2 = random_direction(model, norm=norm, seed=1, orthogonal_to=d1)
    dot = sum(float((d1[k].double() * d2[k].double()).sum()) for k in d1)
    scale = np.sqrt(sum(float((d1[k].double() ** 2).sum()) for k in d1))
    assert abs(dot) < 1e-5 * scale**2
    if norm == "filter":
        w = model[0].weight.detach()
        torch.testing.assert_close(d2["0.weight"].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1))


def test_frozen_parameters_get_no_direction():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in random_direction(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"norm": "filterwise"}, "`norm`='filterwise'.*'filter'"), ({"ignore": "bn"}, "`ignore`='bn'.*'biasbn'")],
)
def test_direction_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_direction(small_cnn(), **kwargs)


def test_no_trainable_parameters_is_an_error():
    model = small_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="`model`.*no trainable parameters"):
        random_direction(model)


# --- loss surface -----------------------------------------------------------------------------


def test_surface_values_equal_numpy_reference_at_every_point():
    model = small_cnn()
    data = make_data()
    warm_bn(model, data)
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    xs, ys = np.array([-0.5, 0.0, 0.5]), np.array([-0.25, 0.0, 0.75])
    ls = loss_surface(model, data, [d1, d2], [xs, ys], loss_fn=F.cross_entropy, progress=False)
    theta = {n: p.detach().double().numpy() for n, p in model.named_parameters()}
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            point = {n: theta[n] + a * d1[n].double().numpy() + b * d2[n].double().numpy() for n in theta}
            assert ls.loss[i, j] == pytest.approx(numpy_forward_loss(model, data, point), rel=1e-5)
    assert ls.metadata["center_loss"] == pytest.approx(numpy_forward_loss(model, data, theta), rel=1e-5)


def test_surface_at_origin_equals_plain_eval_loss_and_sample_weighted_mean():
    model = small_cnn()
    data = make_data(n=37, batch=16)  # batches of 16, 16 and a short last one of 5
    warm_bn(model, data)
    ls = loss_surface(model, data, random_direction(model), [np.array([0.0])], loss_fn=F.cross_entropy)
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        plain = F.cross_entropy(model(x), y).item()
        mean_of_means = np.mean([F.cross_entropy(model(bx), by).item() for bx, by in data])
    assert ls.loss[0] == pytest.approx(plain, rel=1e-6)
    assert abs(mean_of_means - plain) > 1e-4  # the data really distinguishes the two means
    assert ls.metadata["num_samples"] == 37


def test_metrics_are_reset_per_point_and_match_direct_accuracy():
    model = small_cnn()
    data = make_data()
    warm_bn(model, data)
    acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    d = random_direction(model)
    coords = np.array([-1.0, 0.0, 1.0])
    ls = loss_surface(model, data, d, [coords], loss_fn=F.cross_entropy, metrics={"accuracy": acc})
    assert acc.update_count == 0  # the user's metric object is not mutated
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    for i, a in enumerate(coords):
        with preserved_state(model):
            model.eval()
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.add_(d[n], alpha=float(a))
                expected = (model(x).argmax(1) == y).double().mean().item()
        assert ls.values["accuracy"][i] == pytest.approx(expected)


def test_forward_fn_for_dict_batches():
    model = small_cnn()
    data = [{"image": b[0], "label": b[1]} for b in make_data()]
    ls = loss_surface(
        model,
        data,
        random_direction(model),
        [np.array([0.0, 1.0])],
        loss_fn=F.cross_entropy,
        forward_fn=lambda m, batch: (m(batch["image"]), batch["label"]),
    )
    assert np.all(np.isfinite(ls.loss))


def test_data_is_read_once_not_per_point():
    class CountingLoader:
        def __init__(self, batches):
            self.batches, self.iterations = batches, 0

        def __iter__(self):
            self.iterations += 1
            return iter(self.batches)

    model = small_cnn()
    loader = CountingLoader(make_data())
    loss_surface(model, loader, random_direction(model), [np.linspace(-1, 1, 5)], loss_fn=F.cross_entropy)
    assert loader.iterations == 1


def prepared_model():
    model = small_cnn()
    data = make_data()
    warm_bn(model, data)
    model.train()
    model[1].eval()  # a mixed-mode model: restoration must be per submodule
    model[0].bias.requires_grad_(False)
    loss = F.cross_entropy(model(data[0][0]), data[0][1])
    loss.backward()
    return model, data


def test_model_restored_bit_for_bit_after_surface_and_interpolation():
    model, data = prepared_model()
    other = small_cnn()  # (seeds the global RNG itself, so before the capture)
    torch.manual_seed(123)
    before = capture_state(model)
    grad_values = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    rng_before = torch.get_rng_state()
    loss_surface(
        model,
        data,
        [random_direction(model, seed=0), random_direction(model, seed=1)],
        [np.linspace(-1, 1, 3)] * 2,
        loss_fn=F.cross_entropy,
    )
    interpolate(model, model.state_dict(), other, np.linspace(-0.5, 1.5, 3), data, loss_fn=F.cross_entropy)
    assert_state_equal(model, before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for n, g in grad_values.items():
        assert torch.equal(dict(model.named_parameters())[n].grad, g)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_model_restored_after_exception_mid_grid(error):
    model, data = prepared_model()
    before = capture_state(model)
    calls = {"n": 0}

    def failing_loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] == 5:  # past the first grid points: weights are displaced when it fails
            raise error("stop")
        return F.cross_entropy(outputs, targets)

    with pytest.raises(error):
        loss_surface(model, data, random_direction(model), [np.linspace(-1, 1, 5)], loss_fn=failing_loss)
    assert calls["n"] == 5
    assert_state_equal(model, before)


def test_nonfinite_loss_is_nan_and_counted():
    model = small_cnn()
    data = make_data()
    d = random_direction(model, norm="none")

    def loss_fn(outputs, targets):
        loss = F.cross_entropy(outputs, targets)
        # Infinite wherever the weights were moved far along the direction.
        return torch.where(model[5].weight.abs().max() > 5, torch.tensor(float("inf")), loss)

    ls = loss_surface(model, data, d, [np.array([0.0, 100.0, 200.0])], loss_fn=loss_fn)
    assert np.isfinite(ls.loss[0]) and np.isnan(ls.loss[1:]).all()
    assert ls.num_nonfinite == 2 and ls.metadata["num_nonfinite"] == 2


# --- interpolation ----------------------------------------------------------------------------


def test_interpolation_endpoints_equal_each_models_own_loss_with_bn_buffers():
    data = make_data()
    a, b = small_cnn(), small_cnn()
    torch.manual_seed(5)
    b = nn.Sequential(*[m for m in b])  # same architecture
    for m in b.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
    warm_bn(a, data)
    warm_bn(b, data[:1])
    assert not torch.equal(a[1].running_mean, b[1].running_mean)

    def own_loss(model):
        model.eval()
        with torch.no_grad():
            # Same accumulation as the engine (batch mean x samples, in float64), so equal weights give equal bits.
            total = sum(F.cross_entropy(model(x), y).double().item() * len(y) for x, y in data)
        return total / sum(len(y) for _, y in data)

    alphas = np.array([-0.5, 0.0, 0.5, 1.0, 1.5])
    target = small_cnn()
    ls = interpolate(target, a, b.state_dict(), alphas, data, loss_fn=F.cross_entropy)
    assert ls.loss[1] == own_loss(a)
    assert ls.loss[3] == own_loss(b)
    # An interior point equals a model built by hand from the interpolated state dict.
    mid = small_cnn()
    sa, sb = a.state_dict(), b.state_dict()
    mid.load_state_dict({k: (0.5 * sa[k] + 0.5 * sb[k]) if sa[k].is_floating_point() else sa[k] for k in sa})
    assert ls.loss[2] == pytest.approx(own_loss(mid), rel=1e-5)
    assert ls.metadata["kind"] == "interpolation"


def test_interpolation_bad_input():
    model = small_cnn()
    with pytest.raises(ValueError, match="`end` lacks"):
        interpolate(model, model, {"0.weight": model[0].weight}, [0.0, 1.0], make_data(), loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="`alphas`"):
        interpolate(model, model, model, [], make_data(), loss_fn=F.cross_entropy)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directions", "coords", "match"),
    [
        ("three", [[0.0]] * 3, "3 directions; expected 1 or 2"),
        ("one", [[]], r"`coords\[0\]` is empty"),
        ("one", [[[0.0, 1.0]]], r"`coords\[0\]` has shape \(1, 2\); expected a 1-D"),
        ("one", [[0.0, float("nan")]], r"`coords\[0\]`=\[0.0, nan\] contains non-finite"),
        ("one", [[0.0], [1.0]], "`coords` holds 2 axes; expected one 1-D array per direction"),
        ("badkey", [[0.0]], "`directions` does not match.*unexpected \\['nope'\\]"),
        ("badshape", [[0.0]], r"`directions\['0.weight'\]` has shape \(1,\); expected \(4, 1, 3, 3\)"),
    ],
)
def test_surface_bad_input(directions, coords, match):
    model = small_cnn()
    d = random_direction(model)
    dirs = {
        "three": [d, d, d],
        "one": [d],
        "badkey": [{**d, "nope": torch.zeros(1)}],
        "badshape": [{**d, "0.weight": torch.zeros(1)}],
    }[directions]
    with pytest.raises(ValueError, match=match):
        loss_surface(model, make_data(), dirs, coords, loss_fn=F.cross_entropy)


def test_empty_data_and_frozen_model_errors():
    model = small_cnn()
    d = random_direction(model)
    with pytest.raises(ValueError, match="`data`.*yielded no batch"):
        loss_surface(model, [], d, [[0.0]], loss_fn=F.cross_entropy)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="`model`.*no trainable parameters"):
        loss_surface(model, make_data(), d, [[0.0]], loss_fn=F.cross_entropy)


# --- Landscape I/O and figures ----------------------------------------------------------------


def test_save_load_round_trip_exact(tmp_path):
    model = small_cnn()
    data = make_data()
    acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
    ls = loss_surface(
        model,
        data,
        [random_direction(model, seed=0), random_direction(model, seed=1)],
        [np.linspace(-1, 1, 4), np.linspace(-0.5, 0.5, 3)],
        loss_fn=F.cross_entropy,
        metrics={"accuracy": acc},
        metadata={"norm": "filter", "seed": 0},
    )
    ls.values["loss"][0, 0] = np.nan
    ls.extras["path"] = np.arange(6.0).reshape(3, 2)
    back = Landscape.load(ls.save(tmp_path / "surface"))
    assert (tmp_path / "surface.npz").exists()
    for a, b in zip(ls.coords, back.coords):
        assert np.array_equal(a, b)
    for k in ls.values:
        np.testing.assert_array_equal(ls.values[k], back.values[k])
    np.testing.assert_array_equal(back.extras["path"], ls.extras["path"])
    assert back.metadata == ls.metadata
    assert np.array_equal(back.evaluated, ls.evaluated)


def test_summary_radii():
    a = np.linspace(-1, 1, 21)
    ls = Landscape(coords=[a, a], values={"loss": np.add.outer(a**2, a**2) + 1.0})
    s = ls.summary(radii=(1.0,))
    assert s["center_loss"] == 1.0
    # Points within half a step of radius 1 have a loss rise of ~r² = 1.
    assert s["loss_rise@1"] == pytest.approx(1.0, abs=0.1)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_each_figure_renders_to_png_with_nan_masked():
    a = np.linspace(-1, 1, 7)
    z = np.add.outer(a**2, a**2) + 0.1
    z[0, 0] = np.nan
    ls2 = Landscape(coords=[a, a], values={"loss": z})
    ls1 = Landscape(coords=[a], values={"loss": a**2 + 0.1, "accuracy": 1 - a**2})
    figs = [
        plot_curve(ls1, metric="accuracy"),
        plot_curve(ls1, log_scale=True),
        plot_contour(ls2),
        plot_contour(ls2, filled=True, log_scale=True),
        plot_contour(ls2, path=np.array([[0.8, 0.8], [0.3, 0.2], [0.0, 0.0]]), path_markers=[1]),
        plot_heatmap(ls2, log_scale=True),
        plot_surface_3d(ls2),
        plot_surface_3d(ls2, log_scale=True),
        *landscape_figures(ls2).values(),
    ]
    for fig in figs:
        png = _png_bytes(fig)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert len(figs[0].axes) == 2  # twin axis for the metric
    with pytest.raises(ValueError, match="`landscape` has 1 dimension"):
        plot_contour(ls1)
