"""The Hessian analyses against the exact Hessian built with torch.func.hessian, and their figures."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_landscape import random_direction
from lightning_landscape.hessian import HessianOperator, HessianReport, hessian_check, hutchinson, hutchpp, ratio_map
from lightning_landscape.plots import plot_density, plot_eigenvalues, plot_ratio_map
from lightning_landscape.surface import make_batch_loss


def small_mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)  # 136 weights


def small_cnn(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    ).to(dtype)  # 148 weights


def make_data(kind: str, sizes=(16, 16, 7), dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 6, generator=g) if kind == "mlp" else torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    x = x.to(dtype)
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def make_problem(kind: str, dtype: torch.dtype = torch.float64, sizes=(16, 16, 7)):
    model = small_mlp(dtype) if kind == "mlp" else small_cnn(dtype)
    data = make_data(kind, sizes, dtype)
    if kind == "cnn":  # non-trivial BatchNorm running statistics, as after training
        model.train()
        with torch.no_grad():
            for x, _ in data:
                model(x)
    return model, data


def exact_hessian(model: nn.Module, data, loss_fn=F.cross_entropy) -> np.ndarray:
    """Independent reference: torch.func.hessian of the sample-weighted mean loss over the flat weights, eval mode."""
    model = model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def mean_loss(flat):
        weights = {n: t.view(s) for (n, _), t, s in zip(named, torch.split(flat, sizes), shapes)}
        total = sum(loss_fn(functional_call(model, weights, (x,)), y) * len(x) for x, y in data)
        return total / sum(len(x) for x, _ in data)

    return torch.func.hessian(mean_loss)(flat0).detach().double().numpy()


def snapshot(model: nn.Module):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
    }


def assert_unchanged(model: nn.Module, before) -> None:
    after = snapshot(model)
    for n in before["params"]:
        assert torch.equal(before["params"][n], after["params"][n]), n
        assert after["grads"][n] is before["grads"][n], n  # the same .grad object
        if before["grad_values"][n] is not None:
            assert torch.equal(after["grads"][n], before["grad_values"][n]), n
    for n in before["buffers"]:
        assert torch.equal(before["buffers"][n], after["buffers"][n]), n
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert torch.equal(after["rng"], before["rng"])
    assert np.array_equal(after["np_rng"], before["np_rng"])


# --- the operator -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_operator_matvec_equals_exact_hessian_times_vector(kind):
    model, data = make_problem(kind)
    hess = exact_hessian(model, data)
    op = HessianOperator(model.eval(), data, make_batch_loss(F.cross_entropy))
    assert op.shape == hess.shape
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    np.testing.assert_allclose(op @ v, hess @ v, rtol=1e-9, atol=1e-12 * np.abs(hess).max())
    assert op.num_hvp == 1
    assert op.num_samples == 39


def test_operator_agrees_with_curvlinops():
    # An extra reference: the suite checks the operator against the exact dense Hessian without it.
    curvlinops = pytest.importorskip(
        "curvlinops", reason="curvlinops-for-pytorch is not installed (optional reference)"
    )
    HessianLinearOperator = curvlinops.HessianLinearOperator

    model, data = make_problem("mlp", sizes=(5, 5, 3))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    reference = HessianLinearOperator(model, nn.CrossEntropyLoss(reduction="mean"), params, data).to_scipy()
    ours = HessianOperator(model, data, make_batch_loss(F.cross_entropy))
    block = np.random.default_rng(1).standard_normal((ours.shape[0], 3))
    np.testing.assert_allclose(ours @ block, reference @ block, rtol=1e-9, atol=1e-12)


def test_short_last_batch_is_weighted_by_its_samples():
    model, batches = make_problem("mlp", sizes=(5, 5, 3))
    whole = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    loss = make_batch_loss(F.cross_entropy)
    split_op, whole_op = HessianOperator(model.eval(), batches, loss), HessianOperator(model, whole, loss)
    v = np.random.default_rng(2).standard_normal(split_op.shape[0])
    np.testing.assert_allclose(split_op @ v, whole_op @ v, rtol=1e-10, atol=1e-13)
    assert split_op.loss() == pytest.approx(whole_op.loss(), rel=1e-12)
    a = hessian_check(model, batches, F.cross_entropy, top_k=2)
    b = hessian_check(model, whole, F.cross_entropy, top_k=2)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-8)
    assert a.lambda_min == pytest.approx(b.lambda_min, rel=1e-6)


def test_reduce_hook_sees_unnormalized_sums():
    model, data = make_problem("mlp")
    seen = []

    def fake_two_processes(sums: torch.Tensor) -> torch.Tensor:
        seen.append(sums.clone())
        return sums * 2  # two identical ranks: sums double, the normalized result must not change

    plain = HessianOperator(model.eval(), data, make_batch_loss(F.cross_entropy))
    reduced = HessianOperator(model, data, make_batch_loss(F.cross_entropy), reduce=fake_two_processes)
    v = np.random.default_rng(3).standard_normal(plain.shape[0])
    np.testing.assert_allclose(reduced @ v, plain @ v, rtol=1e-12)
    assert seen[-1].dtype == torch.float64 and seen[-1][-1].item() == 39  # the sample count, before normalizing
    assert reduced.loss() == pytest.approx(plain.loss(), rel=1e-12) and reduced.num_samples == 78


def test_operator_reuses_batches_already_on_the_device():
    # The callbacks pass their evaluator's cached batches: those must not be copied a second time.
    from lightning_landscape.data import cache_batches

    model, data = make_problem("mlp")
    cached = cache_batches(data, "cpu")
    op = HessianOperator(model.eval(), cached, make_batch_loss(F.cross_entropy))
    for (x, y), (ox, oy) in zip(cached, op.batches):
        assert ox is x and oy is y and ox.data_ptr() == x.data_ptr() and oy.data_ptr() == y.data_ptr()
    with torch.inference_mode():  # inference tensors cannot enter autograd: those alone are cloned
        frozen = [(x.clone(), y.clone()) for x, y in data]
    op = HessianOperator(model, frozen, make_batch_loss(F.cross_entropy))
    assert all(not ox.is_inference() and ox.data_ptr() != x.data_ptr() for (x, _), (ox, _) in zip(frozen, op.batches))


# --- eigenvalues, trace, density ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_eigenvalues_match_exact_spectrum(kind):
    model, data = make_problem(kind)
    exact = np.linalg.eigvalsh(exact_hessian(model, data))
    report = hessian_check(model, data, F.cross_entropy, top_k=3, lambda_min=True, tol=1e-3)
    np.testing.assert_allclose(report.eigenvalues, exact[::-1][:3], rtol=1e-3)
    assert report.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert exact[0] < 0  # a genuinely indefinite Hessian
    assert report.lambda_min == pytest.approx(exact[0], rel=1e-2)
    assert report.ratio == pytest.approx(abs(exact[0] / exact[-1]), rel=1e-2)
    assert report.num_hvp > 0 and report.seconds > 0
    assert report.metadata["num_params"] == exact.size and report.metadata["converged"]


def test_float32_model_lambda_max():
    model, data = make_problem("cnn", dtype=torch.float32)
    exact = np.linalg.eigvalsh(exact_hessian(model.double(), [(x.double(), y) for x, y in data]))
    model.float()
    report = hessian_check(model, data, F.cross_entropy, lambda_min=False)
    assert report.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert report.lambda_min is None and report.ratio is None
    assert report.metadata["dtype"] == "torch.float32"


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_within_three_standard_errors(method):
    model, data = make_problem("cnn")
    exact = np.trace(exact_hessian(model, data))
    report = hessian_check(
        model, data, F.cross_entropy, lambda_min=False, trace=True, trace_method=method, trace_samples=30
    )
    assert report.trace_stderr > 0
    assert abs(report.trace - exact) < 3 * report.trace_stderr


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_public_trace_estimators_on_a_dense_symmetric_matrix(estimator):
    from scipy.sparse.linalg import aslinearoperator

    # A network-like spectrum: a few outliers over a bulk, in a random basis (so Rademacher probes are not exact).
    spectrum = np.concatenate([[40.0, 15.0, -3.0], np.random.default_rng(3).normal(0.5, 1.0, 97)])
    matrix = rotated(spectrum, 4)
    exact = np.trace(matrix)
    for seed in range(5):
        estimate, stderr = estimator(aslinearoperator(matrix), 30, np.random.default_rng(seed))
        assert stderr > 0 and abs(estimate - exact) < 4 * stderr, (seed, estimate, exact, stderr)
    # Deterministic given the generator; a plain matrix works as well as its LinearOperator.
    again = estimator(aslinearoperator(matrix), 30, np.random.default_rng(0))
    assert again == estimator(matrix, 30, np.random.default_rng(0))
    with pytest.raises(ValueError, match="`samples`=1"):
        estimator(matrix, 1, np.random.default_rng(0))


def diagonal_quadratic(curvatures: torch.Tensor):
    """A model whose loss is ½ Σ c_i θ_i²: its Hessian is diag(c), known exactly."""
    model = nn.Linear(len(curvatures), 1, bias=False).double()

    def batch_loss(model, batch):
        w = model.weight.reshape(-1)
        return 0.5 * (curvatures * w * w).sum(), len(batch[0]), None, None

    return model, [(torch.zeros(3, 1), torch.zeros(3))], batch_loss


def test_density_of_known_spectrum_is_the_broadened_eigenvalues():
    curvatures = torch.tensor([-1.0, 0.5, 2.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    model, data, batch_loss = diagonal_quadratic(curvatures)
    sigma = 0.02
    report = hessian_check(
        model, data, batch_loss=batch_loss, trace=True, density=True, density_runs=2, density_steps=10,
        density_sigma=sigma, trace_method="hutchinson", trace_samples=4,
    )  # fmt: skip
    assert report.lambda_max == pytest.approx(10.0) and report.lambda_min == pytest.approx(-1.0)
    # Hutchinson with Rademacher probes is exact on a diagonal matrix.
    assert report.trace == pytest.approx(18.5) and report.trace_stderr == pytest.approx(0.0, abs=1e-12)
    # Full Lanczos from a Rademacher vector gives every eigenvalue weight 1/6 whatever the vector.
    (grid, density), width = report.density, sigma * 11.0
    assert grid[0] == pytest.approx(-1.0 - 3 * width) and grid[-1] == pytest.approx(10.0 + 3 * width)
    gauss = np.exp(-0.5 * ((grid[:, None] - curvatures.numpy()[None, :]) / width) ** 2) / (
        width * math.sqrt(2 * math.pi)
    )
    np.testing.assert_allclose(density, gauss.mean(axis=1), rtol=1e-6, atol=1e-9)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)


# A known spectrum shaped like a network's: three positive outliers over a bulk, two negative outliers.
KNOWN = np.concatenate([[30.0, 12.0, 8.0], np.linspace(-0.5, 4.0, 395), [-0.8, -1.0]])


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_lanczos_stopping_rule_meets_tol_on_a_known_spectrum(tol):
    model, data, batch_loss = diagonal_quadratic(torch.tensor(KNOWN, dtype=torch.float64))
    exact = np.sort(KNOWN)[::-1]
    both = hessian_check(model, data, batch_loss=batch_loss, top_k=3, tol=tol)
    np.testing.assert_allclose(both.eigenvalues, exact[:3], rtol=tol)
    assert both.lambda_min == pytest.approx(-1.0, rel=tol)
    assert both.ratio == pytest.approx(1 / 30, rel=2 * tol)
    assert both.metadata["converged"] and both.metadata["eigensolver"] == "lanczos"
    # One Krylov space for both ends: λmin costs only the steps it needs beyond λmax's, not a second
    # run. With seed 0: 20, 24 and 28 products (ARPACK's eigsh took 4 to 5 times more per end).
    assert both.num_hvp <= {1e-2: 22, 1e-3: 26, 1e-4: 30}[tol]
    top = hessian_check(model, data, batch_loss=batch_loss, lambda_min=False, tol=tol)
    assert top.lambda_max == pytest.approx(30.0, rel=tol)
    assert top.num_hvp <= {1e-2: 5, 1e-3: 5, 1e-4: 7}[tol]  # a separated outlier
    assert top.num_hvp < both.num_hvp


def test_lanczos_error_bounds_hold_at_every_step():
    from scipy.sparse.linalg import aslinearoperator

    from lightning_landscape.hessian import lanczos_extremes

    rng = np.random.default_rng(5)
    spectrum = np.concatenate([rng.normal(0.0, 1.0, 150), [25.0, -6.0]])
    q, _ = np.linalg.qr(rng.standard_normal((152, 152)))
    matrix = (q * spectrum) @ q.T
    result = lanczos_extremes(aslinearoperator(matrix), 1, True, 1e-10, np.random.default_rng(0))
    assert result.converged and result.hvp == result.steps == len(result.history) < 60
    tops = np.array([h[0] for h in result.history])
    bottoms = np.array([h[2] for h in result.history])
    assert np.all(np.diff(tops) >= -1e-12) and np.all(np.diff(bottoms) <= 1e-12)  # monotone (interlacing)
    # At every step each extreme Ritz value is within its residual norm of an eigenvalue; it reaches the extreme one.
    for theta_max, bound_max, theta_min, bound_min in result.history:
        assert np.min(np.abs(spectrum - theta_max)) <= bound_max * (1 + 1e-9) + 1e-13
        assert np.min(np.abs(spectrum - theta_min)) <= bound_min * (1 + 1e-9) + 1e-13
    assert result.top[0] == pytest.approx(25.0, rel=1e-10) and result.low == pytest.approx(-6.0, rel=1e-10)


def rotated(spectrum: np.ndarray, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((spectrum.size, spectrum.size)))
    return (q * spectrum) @ q.T


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_every_reported_eigenvalue_is_within_tol_of_the_spectrum_for_clustered_ends(tol):
    from scipy.sparse.linalg import aslinearoperator

    from lightning_landscape.hessian import lanczos_extremes

    # Five top eigenvalues within 3 % of each other over a bulk, a close pair at the bottom: a Ritz value
    # can sit between cluster members for many steps, so only its residual tells how far it is from one.
    rng = np.random.default_rng(0)
    spectrum = np.concatenate([10 + rng.uniform(-0.3, 0.3, 5), rng.normal(0, 1, 193), [-4.0, -4.01]])
    op = aslinearoperator(rotated(spectrum, 1))
    for seed in range(25):
        for top_k, lambda_min in ((1, False), (3, True)):  # λmax alone stops earliest: the hardest case
            result = lanczos_extremes(op, top_k, lambda_min, tol, np.random.default_rng(seed))
            assert result.converged
            for value in [*result.top, *([result.low] if lambda_min else [])]:
                assert np.min(np.abs(spectrum - value)) <= tol * abs(value), (seed, top_k, value)


def test_small_eigenvalues_keep_their_accuracy_beside_a_huge_one():
    from scipy.sparse.linalg import aslinearoperator

    from lightning_landscape.hessian import lanczos_extremes

    # Eigenvalues from 1e-8 to 1e8 in magnitude: a coupling that is "zero" relative to the largest one is
    # not zero for the small ones, so the Krylov space must not be declared invariant too early.
    rng = np.random.default_rng(1002)
    spectrum = np.sign(rng.standard_normal(30)) * 10 ** rng.uniform(-8, 8, 30)
    exact = np.sort(spectrum)[::-1]
    result = lanczos_extremes(aslinearoperator(rotated(spectrum, 7)), 3, False, 1e-3, np.random.default_rng(2))
    np.testing.assert_allclose(result.top, exact[:3], rtol=1e-3)


def test_a_budget_smaller_than_top_k_pads_with_nan():
    model, data, batch_loss = diagonal_quadratic(torch.tensor([-1.0, 0.5, 2.0, 3.0, 5.0, 10.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        report = hessian_check(model, data, batch_loss=batch_loss, top_k=4, maxiter=2)
    assert report.eigenvalues.shape == (4,) and np.all(np.isnan(report.eigenvalues[2:]))
    assert np.isnan(report.lambda_min)  # two Ritz values are both top-k ones: no separate λmin yet
    assert not report.metadata["converged"] and report.num_hvp == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_linear_layer_under_mse_has_each_eigenvalue_once_per_output(dtype):
    # H = I_3 ⊗ (2/(3n))·XᵀX: every eigenvalue three times. One Krylov space holds one copy of each; the
    # float32 operator never gives β = 0, so the space counts as invariant once all its Ritz values converged.
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False).to(dtype)
    x, y = torch.randn(40, 5, dtype=dtype), torch.randn(40, 3, dtype=dtype)
    gram = np.linalg.eigvalsh(2 / (3 * 40) * (x.double().T @ x.double()).numpy())
    report = hessian_check(model, [(x, y)], F.mse_loss, top_k=4)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(report.eigenvalues, [gram[-1]] * 3 + [gram[-2]], rtol=rtol)
    assert report.lambda_min == pytest.approx(gram[0], rel=rtol) and report.metadata["converged"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_convex_model_with_a_null_space_converges_quickly_to_lambda_min_zero(dtype):
    # Softmax regression: its Hessian is PSD with an exact null space (the same vector added to every
    # class) and many tiny eigenvalues. Resolving λmin = 0 to a relative accuracy is impossible and
    # pointless; it is resolved to tol²·λmax, which keeps |λmin/λmax| right to 1e-6.
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data[:128] / 16.0, dtype=dtype)
    y = torch.tensor(digits.target[:128])
    torch.manual_seed(0)
    model = nn.Linear(64, 10).to(dtype)
    data = [(x[:64], y[:64]), (x[64:], y[64:])]
    exact = np.linalg.eigvalsh(exact_hessian(model, data))
    report = hessian_check(model, data, F.cross_entropy)
    assert report.metadata["converged"] and report.num_hvp < 400  # ran into the 6,500-product cap before
    assert report.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert abs(report.lambda_min - exact[0]) <= 2e-6 * exact[-1] and report.ratio <= 2e-6


def test_repeated_eigenvalues_are_found_after_an_invariant_krylov_space():
    curvatures = torch.tensor([-1.0, 0.5, 2.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    model, data, batch_loss = diagonal_quadratic(curvatures)
    report = hessian_check(model, data, batch_loss=batch_loss, top_k=4)
    np.testing.assert_allclose(report.eigenvalues, [10.0, 5.0, 2.0, 2.0], rtol=1e-12)
    assert report.lambda_min == pytest.approx(-1.0, rel=1e-12) and report.num_hvp <= 6


def test_zero_hessian_costs_a_few_products():
    model, data, batch_loss = diagonal_quadratic(torch.zeros(50, dtype=torch.float64))
    for top_k, most in ((1, 2), (3, 5)):
        report = hessian_check(model, data, batch_loss=batch_loss, top_k=top_k)
        assert np.array_equal(report.eigenvalues, np.zeros(top_k)) and report.lambda_min == 0.0 and report.ratio == 0.0
        assert report.metadata["converged"] and report.num_hvp <= most


def test_full_basis_falls_back_to_arpack():
    model, data, batch_loss = diagonal_quadratic(torch.tensor(KNOWN, dtype=torch.float64))
    report = hessian_check(model, data, batch_loss=batch_loss, top_k=2, max_basis=20)
    assert report.metadata["eigensolver"] == "lanczos+arpack" and report.metadata["converged"]
    np.testing.assert_allclose(report.eigenvalues, [30.0, 12.0], rtol=1e-3)
    assert report.lambda_min == pytest.approx(-1.0, rel=1e-3)
    assert report.metadata["max_basis"] == 20


def test_maxiter_caps_the_products_and_warns():
    model, data, batch_loss = diagonal_quadratic(torch.tensor(KNOWN, dtype=torch.float64))
    for max_basis in (200, 10):  # Lanczos alone, and Lanczos then ARPACK
        with pytest.warns(RuntimeWarning, match="did not converge"):
            report = hessian_check(model, data, batch_loss=batch_loss, maxiter=15, max_basis=max_basis)
        assert report.num_hvp <= 15 and not report.metadata["converged"]
        assert report.lambda_max == pytest.approx(30.0, rel=1e-3)  # converged long before
        assert -1.0 < report.lambda_min < 0.0  # a Ritz value: inside the spectrum, not NaN


def test_density_on_a_network_is_a_probability_density_within_the_spectrum():
    model, data = make_problem("mlp")
    report = hessian_check(model, data, F.cross_entropy, density=True, density_runs=2, density_steps=30)
    grid, density = report.density
    assert density.shape == grid.shape == report.density.values.shape == (512,)
    assert np.all(density >= 0)
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    assert grid[0] < report.lambda_min and grid[-1] > report.lambda_max
    mean = np.trapezoid(density * grid, grid)
    assert report.lambda_min < mean < report.lambda_max


# --- state, modes, edge cases ---------------------------------------------------------------------


def test_model_is_bit_exactly_unchanged():
    model, data = make_problem("cnn")
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model[0].bias.grad = None
    before = snapshot(model)
    hessian_check(model, data, F.cross_entropy, top_k=2, trace=True, density=True, density_steps=8)
    assert_unchanged(model, before)
    assert model.training


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_works_inside_inference_mode_and_no_grad(context):
    model, data = make_problem("mlp")
    outside = hessian_check(model, data, F.cross_entropy, trace=True, trace_samples=6)
    guard = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    before = snapshot(model)
    with guard:
        inner_data = [(x.clone(), y.clone()) for x, y in data]  # inference tensors under inference_mode
        inside = hessian_check(model, inner_data, F.cross_entropy, trace=True, trace_samples=6)
    assert_unchanged(model, before)
    np.testing.assert_array_equal(inside.eigenvalues, outside.eigenvalues)
    assert (inside.lambda_min, inside.trace) == (outside.lambda_min, outside.trace)


def test_zero_hessian_gives_zero_ratio_without_warnings_or_nan():
    model, data = make_problem("mlp")

    def loss_independent_of_weights(outputs, targets):
        return targets.double().mean()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = hessian_check(
            model, data, loss_independent_of_weights, top_k=2, trace=True, density=True, density_steps=5
        )
    assert report.ratio == 0.0 and report.lambda_max == 0.0 and report.lambda_min == 0.0
    assert np.array_equal(report.eigenvalues, np.zeros(2)) and report.trace == 0.0
    assert np.all(np.isfinite(report.density.values))


def test_nonfinite_loss_raises_and_restores_model():
    model, data = make_problem("mlp")
    with torch.no_grad():
        model[2].weight.mul_(1e200)  # outputs ~1e200: their MSE overflows to inf
    model.train()
    before = snapshot(model)
    targets = [(x, F.one_hot(y, 4).double()) for x, y in data]
    with pytest.raises(ValueError, match="loss at the model's current weights is inf"):
        hessian_check(model, targets, F.mse_loss)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "`top_k`=0 .*between 1 and 136"),
        ({"top_k": 137}, "`top_k`=137 .*between 1 and 136"),
        ({"top_k": 2.0}, "`top_k`=2.0"),
        ({"tol": 0}, "`tol`=0 .*> 0"),
        ({"tol": float("nan")}, "`tol`=nan"),
        ({"trace_method": "exact"}, "`trace_method`='exact'.*'hutch\\+\\+'"),
        ({"trace_samples": 2}, "`trace_samples`=2 .*>= 6"),
        ({"seed": -1}, "`seed`=-1"),
        ({"num_batches": 0}, "`num_batches`=0"),
        ({"max_basis": 0}, "`max_basis`=0"),
        ({"maxiter": 0}, "`maxiter`=0"),
        ({"density_sigma": -0.1}, "`density_sigma`=-0.1"),
        ({"batch_loss": make_batch_loss(F.cross_entropy)}, "`batch_loss`.*not both"),
    ],
)
def test_bad_input_raises_before_any_compute(kwargs, match):
    model, data = make_problem("mlp")
    calls = []

    def counting_loss(outputs, targets):
        calls.append(1)
        return F.cross_entropy(outputs, targets)

    with pytest.raises(ValueError, match=match):
        hessian_check(model, data, counting_loss, **kwargs)
    assert not calls


def test_missing_loss_is_an_error():
    model, data = make_problem("mlp")
    with pytest.raises(ValueError, match="`loss_fn`=None and `batch_loss`=None"):
        hessian_check(model, data)


# --- ratio map --------------------------------------------------------------------------------


def test_ratio_map_equals_hessian_check_at_each_point():
    model, data = make_problem("mlp")
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    coords = [np.array([-0.5, 0.0, 0.5]), np.array([-0.3, 0.0, 0.6])]
    before = snapshot(model)
    ls = ratio_map(model, data, [d1, d2], coords, F.cross_entropy, progress=False)
    assert_unchanged(model, before)
    assert ls.metadata["kind"] == "ratio_map" and ls.complete and ls.metadata["num_hvp"] > 0
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i, a in enumerate(coords[0]):
        for j, b in enumerate(coords[1]):
            with torch.no_grad():  # θ* + αδ + βη, by hand
                for n, p in model.named_parameters():
                    p.copy_(theta[n] + a * d1[n] + b * d2[n])
            report = hessian_check(model, data, F.cross_entropy)
            assert ls.values["loss"][i, j] == pytest.approx(report.loss, rel=1e-12)
            assert ls.values["lambda_max"][i, j] == pytest.approx(report.lambda_max, rel=1e-8)
            assert ls.values["lambda_min"][i, j] == pytest.approx(report.lambda_min, rel=1e-6)
            assert ls.values["ratio"][i, j] == pytest.approx(report.ratio, rel=1e-6)
    np.testing.assert_allclose(ls.values["ratio"], np.abs(ls.values["lambda_min"] / ls.values["lambda_max"]))


def test_ratio_map_bad_direction_is_an_error():
    model, data = make_problem("mlp")
    with pytest.raises(ValueError, match="directions"):
        ratio_map(model, data, [{"nope": torch.zeros(1)}], [np.zeros(1)], F.cross_entropy)


# --- report I/O and figures -------------------------------------------------------------------


def test_report_save_load_round_trip(tmp_path):
    model, data = make_problem("mlp")
    full = hessian_check(model, data, F.cross_entropy, top_k=2, trace=True, density=True, density_steps=8)
    partial = hessian_check(model, data, F.cross_entropy, lambda_min=False)
    for name, report in (("full", full), ("partial", partial)):
        back = HessianReport.load(report.save(tmp_path / name))
        assert np.array_equal(back.eigenvalues, report.eigenvalues) and back.eigenvalues.dtype == np.float64
        if report.density is None:
            assert back.density is None
        else:
            for a, b in zip(report.density, back.density):
                assert np.array_equal(a, b) and b.dtype == np.float64
        with np.load(report.save(tmp_path / f"{name}-plain.npz")) as arrays:  # plain array names in the file
            assert set(arrays.files) == {"eigenvalues", "metadata_json"} | (
                {"density_grid", "density"} if report.density else set()
            )
        for attr in ("lambda_max", "lambda_min", "ratio", "trace", "trace_stderr", "loss", "num_hvp", "seconds"):
            assert getattr(back, attr) == getattr(report, attr), attr
        assert back.metadata == report.metadata
    assert full.scalars().keys() == {"lambda_max", "lambda_min", "ratio", "trace"}
    assert partial.scalars() == {"lambda_max": partial.lambda_max}


def test_a_report_file_written_before_the_shared_npz_format_still_loads(tmp_path):
    # The old layout: plain arrays and a metadata_json with report_scalars and array_names, no result kind.
    import json

    scalars = {"lambda_max": 3.0, "lambda_min": -1.0, "ratio": 1 / 3, "trace": None, "trace_stderr": None}
    scalars.update(loss=0.5, num_hvp=7, seconds=0.25)
    meta = {
        "kind": "hessian",
        "seed": 0,
        "report_scalars": scalars,
        "array_names": ["eigenvalues", "density_grid", "density"],
    }
    arrays = {"eigenvalues": np.array([3.0, 2.0]), "density_grid": np.linspace(-1, 3, 5), "density": np.ones(5) / 4}
    np.savez(tmp_path / "old.npz", **arrays, metadata_json=np.array(json.dumps(meta, sort_keys=True)))
    back = HessianReport.load(tmp_path / "old.npz")
    assert back.eigenvalues.tolist() == [3.0, 2.0] and back.ratio == 1 / 3 and back.num_hvp == 7
    assert np.array_equal(back.density.grid, arrays["density_grid"]) and back.metadata == {"kind": "hessian", "seed": 0}


def png_size(fig) -> int:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return len(buffer.getvalue())


def test_figures_render():
    model, data = make_problem("mlp")
    report = hessian_check(model, data, F.cross_entropy, top_k=3, density=True, density_steps=10)
    density_fig = plot_density(report)
    assert density_fig.axes[0].get_yscale() == "log"
    assert png_size(density_fig) > 1000
    assert png_size(plot_eigenvalues(report)) > 1000
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    ls = ratio_map(model, data, [d1, d2], [np.linspace(-0.5, 0.5, 3)] * 2, F.cross_entropy, progress=False)
    fig = plot_ratio_map(ls)
    assert len([ax for ax in fig.axes if ax.get_label() != "<colorbar>"]) >= 2
    assert png_size(fig) > 1000
    with pytest.raises(ValueError, match="`report`"):
        plot_density(HessianReport(eigenvalues=np.ones(1), lambda_max=1.0))
