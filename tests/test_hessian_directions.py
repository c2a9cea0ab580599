"""Hessian-eigenvector plane directions against the exact Hessian (torch.autograd.functional.hessian + numpy eigh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_landscape.directions import check_direction
from lightning_landscape.errors import ConvergenceWarning
from lightning_landscape.hessian import hessian_check, hessian_directions
from lightning_landscape.hessian.directions import fix_signs
from lightning_landscape.params import trainable_parameters
from lightning_landscape.surface import loss_surface

TOL = 1e-10  # Lanczos residual rule: vectors within ~TOL·λ/gap of the eigenvectors


def mlp(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)  # 38 weights


def make_data(dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(17, 3, generator=g) * torch.tensor([3.0, 1.0, 0.3])  # unequal scales: separated eigenvalues
    x, y = x.to(dtype), torch.randn(17, 2, generator=g).to(dtype)
    return [(x[:10], y[:10]), (x[10:], y[10:])]  # a short last batch: the mean is sample-weighted


def flat_loss(model: nn.Module, data):
    """The sample-weighted mean MSE as a function of the flat trainable weights (independent of the package)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(flat):
        weights = {n: t.view(s) for (n, _), t, s in zip(named, torch.split(flat, sizes), shapes)}
        total = sum(F.mse_loss(functional_call(model, weights, (x,)), y) * len(x) for x, y in data)
        return total / sum(len(x) for x, _ in data)

    return loss, flat0


def exact_top(model: nn.Module, data, k: int = 2):
    loss, flat0 = flat_loss(model.eval(), data)
    hessian = torch.autograd.functional.hessian(loss, flat0).numpy()
    values, vectors = np.linalg.eigh(hessian)
    return values[::-1][:k], vectors[:, ::-1][:, :k].T, values


def flat(direction) -> np.ndarray:
    return torch.cat([t.reshape(-1) for t in direction.values()]).double().numpy()


@pytest.fixture(scope="module")
def problem():
    model, data = mlp(), make_data()
    values, vectors, spectrum = exact_top(model, data)
    return model, data, values, vectors, spectrum


def test_the_directions_are_the_top_eigenvectors(problem):
    model, data, values, vectors, spectrum = problem
    # The problem is well posed: the top two eigenvalues are simple, so their eigenvectors are unique up to sign.
    assert spectrum[-1] - spectrum[-2] > 0.05 * spectrum[-1] and spectrum[-2] - spectrum[-3] > 0.05 * spectrum[-1]
    dirs, eigenvalues = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL)
    np.testing.assert_allclose(eigenvalues, values, rtol=1e-9)
    params = trainable_parameters(model)
    got = np.stack([flat(d) for d in dirs])
    for k, d in enumerate(dirs):
        assert list(d) == list(params)  # the keys and order of random_direction
        check_direction(f"directions[{k}]", d, params)
        for name, p in params.items():
            assert d[name].dtype == p.dtype and d[name].device == p.device and not d[name].requires_grad
        sign = np.sign(got[k] @ vectors[k])
        np.testing.assert_allclose(got[k], sign * vectors[k], atol=1e-6)
    np.testing.assert_allclose(got @ got.T, np.eye(2), atol=1e-12)  # orthonormal in the flat space


def test_the_sign_is_fixed_by_the_largest_entry(problem):
    model, data, _, vectors, _ = problem
    first = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL)
    second = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL, seed=5)  # another start vector
    for k, d in enumerate(first.directions):
        v = flat(d)
        top = np.abs(v).argmax()
        assert v[top] > 0 and np.sort(np.abs(v))[-2] < 0.9 * abs(v[top])  # no near-tie: the rule decides
        # The same rule on numpy's eigenvector gives the same vector, whatever sign each solver started from.
        np.testing.assert_allclose(v, fix_signs(vectors)[k], atol=1e-6)
        np.testing.assert_allclose(v, flat(second.directions[k]), atol=1e-6)
    again = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL)
    for d, e in zip(first.directions, again.directions):
        assert all(torch.equal(d[n], e[n]) for n in d)  # bit for bit
    assert np.array_equal(first.eigenvalues, again.eigenvalues)


def test_fix_signs_by_hand():
    vectors = np.array([[0.1, -0.7, 0.7], [0.0, 0.0, -1.0], [0.5, -0.5, 0.0]])
    # Row 0: |−0.7| and |0.7| tie, the first (negative) decides; row 2 likewise.
    assert fix_signs(vectors).tolist() == [[-0.1, 0.7, -0.7], [0.0, 0.0, 1.0], [0.5, -0.5, 0.0]]


def test_the_eigenvalues_are_those_of_the_same_lanczos_run_as_hessian_check(problem):
    model, data, *_ = problem
    for tol in (1e-3, TOL):
        found = hessian_directions(model, data, loss_fn=F.mse_loss, tol=tol, seed=3)
        report = hessian_check(model, data, F.mse_loss, top_k=2, lambda_min=False, tol=tol, seed=3)
        assert np.array_equal(found.eigenvalues, report.eigenvalues)
        assert found.metadata["num_hvp"] == report.num_hvp


def test_a_surface_along_them_is_the_loss_at_theta_plus_alpha_v(problem):
    model, data, values, *_ = problem
    dirs, eigenvalues = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL)
    alphas, betas = np.array([-0.5, -1e-3, 0.0, 1e-3, 0.3]), np.array([-0.2, 0.0, 0.4])
    ls = loss_surface(model, data, dirs, [alphas, betas], loss_fn=F.mse_loss, progress=False)
    loss, flat0 = flat_loss(model, data)
    v1, v2 = (torch.from_numpy(flat(d)) for d in dirs)
    for i, a in enumerate(alphas):
        assert ls.loss[i, 1] == pytest.approx(float(loss(flat0 + a * v1)), rel=1e-12, abs=1e-15)
    assert ls.loss[0, 2] == pytest.approx(float(loss(flat0 - 0.5 * v1 + 0.4 * v2)), rel=1e-12)
    # The curvature along v1 is λ1: the second difference of the surface's own values.
    h = 1e-3
    curvature = (ls.loss[1, 1] - 2 * ls.loss[2, 1] + ls.loss[3, 1]) / h**2
    assert curvature == pytest.approx(values[0], rel=1e-4)


def test_the_model_is_left_bit_for_bit(problem):
    model, data, *_ = problem
    model.train()
    model(data[0][0]).sum().backward()  # a user .grad that must survive
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: (p.grad, p.grad.clone()) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    hessian_directions(model, data, loss_fn=F.mse_loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is grads[n][0] and torch.equal(p.grad, grads[n][1])
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_arpack_fallback_returns_its_eigenvectors(problem):
    model, data, values, vectors, _ = problem
    found = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL, max_basis=5)  # basis of 5 < 38 weights
    assert found.metadata["eigensolver"] == "lanczos+arpack" and found.metadata["converged"]
    np.testing.assert_allclose(found.eigenvalues, values, rtol=1e-8)
    got = np.stack([flat(d) for d in found.directions])
    np.testing.assert_allclose(np.abs(got @ vectors.T), np.eye(2), atol=1e-6)
    np.testing.assert_allclose(got, fix_signs(vectors), atol=1e-6)


def test_a_repeated_top_eigenvalue_gives_an_orthonormal_basis_of_its_eigenspace():
    curvatures = torch.tensor([1.0, 5.0, -2.0, 5.0, 0.5, 3.0], dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()

    def batch_loss(model, batch):  # ½ Σ c_i θ_i²: the Hessian is diag(c)
        w = model.weight.reshape(-1)
        return 0.5 * (curvatures * w * w).sum(), 1, None, None

    dirs, eigenvalues = hessian_directions(model, [(torch.zeros(1, 6),)], batch_loss=batch_loss, num=3, tol=TOL)
    np.testing.assert_allclose(eigenvalues, [5.0, 5.0, 3.0], rtol=1e-12)
    got = np.stack([flat(d) for d in dirs])
    np.testing.assert_allclose(got @ got.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(got[:2][:, [1, 3]], axis=1), [1.0, 1.0], atol=1e-10)  # in span(e₁, e₃)
    np.testing.assert_allclose(got[2], [0, 0, 0, 0, 0, 1.0], atol=1e-10)


def test_reduce_and_agree_are_passed_through(problem):
    model, data, *_ = problem
    plain = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL)
    calls = []

    def agree(value):  # rank zero's value; the final call carries the vectors
        calls.append(value)
        if isinstance(value, tuple) and isinstance(value[0], np.ndarray):
            vectors, eigenvalues = value
            return vectors[::-1], eigenvalues[::-1]  # what "rank zero" holds wins
        return value

    def two_identical_ranks(sums):  # Σ over two ranks holding the same shard: the means are unchanged
        return 2 * sums

    found = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL, reduce=two_identical_ranks, agree=agree)
    assert len(calls) == plain.metadata["num_hvp"] + 1  # one decision per Lanczos step, then the vectors
    assert found.metadata["num_samples"] == 34  # the reduced count
    np.testing.assert_allclose(found.eigenvalues, plain.eigenvalues[::-1], rtol=1e-12)
    for d, e in zip(found.directions, plain.directions[::-1]):
        for n in d:
            torch.testing.assert_close(d[n], e[n], rtol=0, atol=1e-12)


def test_products_and_memory_are_reported(problem):
    model, data, *_ = problem
    calls = 0

    def counting_loss(model, batch):
        nonlocal calls
        calls += 1
        x, y = batch
        return F.mse_loss(model(x), y), len(x), None, None

    found = hessian_directions(model, data, batch_loss=counting_loss, tol=1e-3)
    meta = found.metadata
    assert calls == len(data) * (meta["num_hvp"] + 1)  # one pass per product, one for the loss
    assert meta["num_hvp"] == meta["eigensolver_hvp"] == meta["lanczos_steps"] and 2 <= meta["num_hvp"] < 38
    assert meta["vector_bytes"] == 2 * 38 * 8 and meta["basis_bytes"] == meta["lanczos_steps"] * 38 * 8
    assert meta["num_params"] == 38 and meta["kind"] == "hessian_directions" and meta["converged"]
    assert meta["eigenvalues"] == found.eigenvalues.tolist()


def test_float32_directions_are_float32_unit_vectors():
    model, data = mlp(torch.float32), make_data(torch.float32)
    _, vectors, _ = exact_top(mlp(), make_data())
    dirs, _ = hessian_directions(model, data, loss_fn=F.mse_loss, tol=1e-5)
    got = np.stack([flat(d) for d in dirs])
    assert all(t.dtype == torch.float32 for d in dirs for t in d.values())
    np.testing.assert_allclose(got @ got.T, np.eye(2), atol=1e-6)
    np.testing.assert_allclose(got, fix_signs(vectors), atol=1e-3)  # float32 products


def test_a_small_budget_warns_and_still_gives_orthonormal_directions(problem):
    model, data, *_ = problem
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        found = hessian_directions(model, data, loss_fn=F.mse_loss, tol=TOL, maxiter=3)
    assert not found.metadata["converged"] and found.metadata["num_hvp"] == 3
    got = np.stack([flat(d) for d in found.directions])
    np.testing.assert_allclose(got @ got.T, np.eye(2), atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num": 0}, r"`num`=0 is not valid; expected an integer between 1 and 38"),
        ({"num": 39}, r"`num`=39 is not valid; expected an integer between 1 and 38"),
        ({"num": 1.5}, r"`num`=1.5"),
        ({"num": True}, r"`num`=True"),
        ({"maxiter": 1}, r"`maxiter`=1 is less than `num`=2"),
        ({"tol": 0.0}, r"`tol`"),
        ({"seed": -1}, r"`seed`"),
        ({"batch_loss": lambda m, b: None}, r"`batch_loss`"),
    ],
)
def test_bad_input_names_the_argument(problem, kwargs, message):
    model, data, *_ = problem
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        hessian_directions(model, data, loss_fn=F.mse_loss, **kwargs)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
