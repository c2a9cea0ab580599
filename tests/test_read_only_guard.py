"""``preserved_state(read_only=True)``: no copy of the weights, a write is caught, nesting with a writing block."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape import hessian_check, preserved_state
from lightning_landscape.data import make_batch_loss
from lightning_landscape.state import _ACTIVE


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).train()


def test_read_only_copies_no_weight_and_restores_the_rest():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad = torch.ones(4, 3)
    model[0].weight.grad = grad
    with preserved_state(model, read_only=True) as state:
        assert not state.copied
        for name, p in model.named_parameters():  # views of the live weights, not copies
            assert state.parameters[name].data_ptr() == p.data_ptr()
        model.eval()
        model(torch.ones(5, 3)).sum().backward()  # .grad is written, the weights are not
    assert model.training and model[0].weight.grad is grad
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize("how", ["in place", "through .data", "replaced"])
def test_a_write_inside_a_read_only_guard_is_an_error_naming_the_parameter(how):
    model = _model()
    grad = model[0].weight.grad = torch.ones(4, 3)
    with pytest.raises(RuntimeError, match=r"read-only analysis changed the parameters \['2.bias'\]"):
        with preserved_state(model, read_only=True):
            model.eval()
            if how == "in place":
                with torch.no_grad():
                    model[2].bias.add_(1.0)
            elif how == "through .data":  # escapes the version counter, not the sum
                model[2].bias.data.mul_(3.0).add_(0.5)
            else:
                model[2].bias.data = torch.zeros(2)
    assert model.training and model[0].weight.grad is grad  # the rest is restored before the error


def test_a_writing_block_inside_a_read_only_guard_copies_and_restores_for_itself():
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with preserved_state(model, read_only=True) as outer:
        with preserved_state(model) as inner:
            assert inner.copied and inner is not outer
            with torch.no_grad():
                model[0].weight.add_(1.0)
        assert torch.equal(model[0].weight, before["0.weight"])  # restored by the inner block
        with preserved_state(model, read_only=True) as again:
            assert again is outer  # read-only inside read-only: the outer record, no copy
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


def test_hessian_check_runs_inside_a_read_only_guard_and_matches_the_dense_hessian():
    model = _model().eval()
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), torch.randint(0, 2, (16,))
    seen = []
    base = make_batch_loss(F.cross_entropy)

    def batch_loss(m, batch):
        seen.append(_ACTIVE[id(m)].copied)
        return base(m, batch)

    report = hessian_check(model, [(x, y)], batch_loss=batch_loss, top_k=1, lambda_min=False)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        parts, i = {}, 0
        for n, p in model.named_parameters():
            parts[n] = theta[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return F.cross_entropy(torch.func.functional_call(model, parts, (x,)), y)

    dense = torch.autograd.functional.hessian(loss_of, flat.double().float())
    assert names and seen and not any(seen)
    assert report.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(dense.double())[-1]), rel=1e-4)
