"""The bounded-memory Lanczos (basis='disk') against the exact Hessian and the in-memory core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn
from torch.nn import functional as F

from lightning_landscape.hessian import HessianOperator, hessian_check, hessian_directions, lanczos_extremes
from lightning_landscape.hessian.basis import DiskLanczos, resolve_basis
from lightning_landscape.hessian.lanczos import default_disk_basis, default_max_basis
from lightning_landscape.surface import make_batch_loss
from tests.test_hessian import KNOWN, diagonal_quadratic, exact_hessian, make_problem, rotated


def exact_spectrum(model: nn.Module, data) -> np.ndarray:
    dtype = next(model.parameters()).dtype
    spectrum = np.linalg.eigvalsh(exact_hessian(model.double(), [(x.double(), y) for x, y in data]))
    model.to(dtype)
    return spectrum


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_disk_basis_matches_the_exact_spectrum_and_the_memory_basis(kind, dtype):
    model, data = make_problem(kind, dtype)
    exact = exact_spectrum(model, data)
    disk = hessian_check(model, data, F.cross_entropy, top_k=3, basis="disk")
    memory = hessian_check(model, data, F.cross_entropy, top_k=3, basis="memory")
    np.testing.assert_allclose(disk.eigenvalues, exact[::-1][:3], rtol=1e-3)
    assert disk.lambda_min == pytest.approx(exact[0], rel=1e-2)
    assert disk.metadata["basis"] == "disk" and memory.metadata["basis"] == "memory"
    assert disk.metadata["converged"] and disk.metadata["eigensolver"] == "lanczos"
    # The same steps: the same products, the same values to the vectors' rounding.
    assert disk.num_hvp == memory.num_hvp
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(disk.eigenvalues, memory.eigenvalues, rtol=rtol)
    assert disk.lambda_min == pytest.approx(memory.lambda_min, rel=100 * rtol)
    alone = hessian_check(model, data, F.cross_entropy, lambda_min=False, basis="disk")
    assert alone.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert alone.num_hvp == hessian_check(model, data, F.cross_entropy, lambda_min=False, basis="memory").num_hvp


@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4])
def test_disk_basis_uses_the_products_of_the_memory_basis_on_a_known_spectrum(tol):
    model, data, batch_loss = diagonal_quadratic(torch.tensor(KNOWN, dtype=torch.float64))
    for basis in ("memory", "disk"):
        both = hessian_check(model, data, batch_loss=batch_loss, top_k=3, tol=tol, basis=basis)
        np.testing.assert_allclose(both.eigenvalues, [30.0, 12.0, 8.0], rtol=tol)
        assert both.lambda_min == pytest.approx(-1.0, rel=tol)
        # The figures test_hessian.py states for the in-memory core, seed 0.
        assert both.num_hvp <= {1e-2: 22, 1e-3: 26, 1e-4: 30}[tol]
        top = hessian_check(model, data, batch_loss=batch_loss, lambda_min=False, tol=tol, basis=basis)
        assert top.lambda_max == pytest.approx(30.0, rel=tol)
        assert top.num_hvp <= {1e-2: 5, 1e-3: 5, 1e-4: 7}[tol]


def test_the_disk_core_holds_two_vectors_and_writes_one_per_step():
    # Repeated eigenvalues force restarts (a fresh vector orthogonalized against the file).
    curvatures = torch.tensor([-1.0, 0.5, 2.0, 2.0, 5.0, 10.0], dtype=torch.float64)
    model, data, batch_loss = diagonal_quadratic(curvatures)
    op = HessianOperator(model, data, batch_loss)
    lanczos = DiskLanczos(op, capacity=6)
    lanczos.start(lanczos.random_vector(np.random.default_rng(0)))
    for _ in range(3):
        lanczos.extend(lanczos.step())
    lanczos.step()
    lanczos.restart(lanczos.random_vector(np.random.default_rng(1)))
    lanczos.step()
    assert lanczos.size == 5 and lanczos.peak_resident == 2  # never more than two P-sized buffers
    assert lanczos.disk_bytes == 5 * 6 * 8 and lanczos._file.seek(0, 2) == 5 * 6 * 8  # float64 model
    assert lanczos.piece == 4
    # The basis in the file is orthonormal.
    basis = np.stack([lanczos.combine(np.eye(5)[i]) for i in range(5)])
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-12)
    lanczos.release()
    assert lanczos._file.closed

    report = hessian_check(model, data, batch_loss=batch_loss, top_k=4, basis="disk")
    np.testing.assert_allclose(report.eigenvalues, [10.0, 5.0, 2.0, 2.0], rtol=1e-12)
    assert report.lambda_min == pytest.approx(-1.0, rel=1e-12) and report.num_hvp <= 6


def test_float32_vectors_and_file_for_a_float32_model():
    model, data = make_problem("mlp", torch.float32)
    op = HessianOperator(model.eval(), data, make_batch_loss(F.cross_entropy))
    hess = exact_hessian(model.double(), [(x.double(), y) for x, y in data])
    model.float()
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
    out = op.product(v)
    assert out.dtype == torch.float32 and op.num_hvp == 1
    np.testing.assert_allclose(out.numpy(), hess @ v.double().numpy(), rtol=1e-4, atol=1e-5)
    lanczos = DiskLanczos(op, capacity=4)
    lanczos.start(lanczos.random_vector(np.random.default_rng(0)))
    lanczos.extend(lanczos.step())
    lanczos.step()
    assert lanczos.dtype == torch.float32 and lanczos.disk_bytes == 2 * op.shape[0] * 4
    # The start vector is the in-memory core's: rng.standard_normal(P), drawn in chunks.
    expected = np.random.default_rng(0).standard_normal(op.shape[0])
    np.testing.assert_allclose(lanczos.combine(np.array([1.0, 0.0])), expected / np.linalg.norm(expected), rtol=1e-6)


def test_a_matrix_operator_runs_on_disk_in_float64():
    rng = np.random.default_rng(5)
    spectrum = np.concatenate([rng.normal(0.0, 1.0, 150), [25.0, -6.0]])
    op = aslinearoperator(rotated(spectrum, 3))
    disk = lanczos_extremes(op, 2, True, 1e-8, np.random.default_rng(0), basis="disk", vectors=True)
    memory = lanczos_extremes(op, 2, True, 1e-8, np.random.default_rng(0), basis="memory", vectors=True)
    assert disk.hvp == memory.hvp and disk.converged
    np.testing.assert_allclose(disk.top, memory.top, rtol=1e-12)
    assert disk.top[0] == pytest.approx(25.0, rel=1e-8) and disk.low == pytest.approx(-6.0, rel=1e-8)
    np.testing.assert_allclose(np.abs(disk.vectors @ memory.vectors.T), np.eye(2), atol=1e-6)


def test_hessian_directions_on_disk_are_the_memory_ones():
    model, data = make_problem("mlp")
    disk = hessian_directions(model, data, loss_fn=F.cross_entropy, basis="disk")
    memory = hessian_directions(model, data, loss_fn=F.cross_entropy, basis="memory")
    np.testing.assert_allclose(disk.eigenvalues, memory.eigenvalues, rtol=1e-10)
    for a, b in zip(disk.directions, memory.directions):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-8)
    meta = disk.metadata
    assert meta["basis"] == "disk" and meta["basis_bytes"] == 0
    assert meta["basis_file_bytes"] == meta["lanczos_steps"] * 136 * 8


def test_disk_basis_inside_inference_mode_and_with_ddp_hooks():
    model, data = make_problem("cnn", torch.float32)
    plain = hessian_check(model, data, F.cross_entropy, basis="disk")
    decisions = []

    def agree(value):
        decisions.append(value)
        return value

    with torch.inference_mode():
        inner = [(x.clone(), y.clone()) for x, y in data]
        hooked = hessian_check(model, inner, F.cross_entropy, basis="disk", reduce=lambda s: s * 2, agree=agree)
    assert hooked.lambda_max == pytest.approx(plain.lambda_max, rel=1e-6)
    assert hooked.lambda_min == pytest.approx(plain.lambda_min, rel=1e-5)
    assert len(decisions) == hooked.num_hvp  # one agreed decision per Lanczos step, as in memory


def test_auto_basis_goes_to_disk_only_for_large_models():
    assert resolve_basis("auto", 136, default_max_basis(136)) == "memory"
    assert resolve_basis("auto", 167_772, 200) == "memory" and resolve_basis("auto", 167_773, 200) == "disk"
    assert resolve_basis("auto", 5_000_000, default_max_basis(5_000_000)) == "disk"
    assert default_disk_basis(5_000_000) == 200 and default_disk_basis(10**9) == 20
    model, data = make_problem("mlp")
    assert hessian_check(model, data, F.cross_entropy).metadata["basis"] == "memory"


def test_bad_basis_raises_before_any_compute():
    model, data = make_problem("mlp")
    calls = []

    def counting_loss(outputs, targets):
        calls.append(1)
        return F.cross_entropy(outputs, targets)

    with pytest.raises(ValueError, match="`basis`='ram' is not supported; accepted values: 'auto', 'memory', 'disk'"):
        hessian_check(model, data, counting_loss, basis="ram")
    with pytest.raises(ValueError, match="`basis`=None"):
        hessian_directions(model, data, loss_fn=counting_loss, basis=None)
    assert not calls
