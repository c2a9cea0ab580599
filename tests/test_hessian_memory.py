"""A Hessian-vector product frees the first-order gradient before its second pass, and stays exact."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape.data import make_batch_loss
from lightning_landscape.hessian import operator
from lightning_landscape.hessian.operator import HessianOperator


def test_the_gradient_is_gone_while_the_second_pass_runs(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    op = HessianOperator(model, [(x, y)], make_batch_loss(F.cross_entropy))
    grads: list[weakref.ref] = []
    original = operator._StartFrom.apply

    def watched(count, *tensors):
        grads.extend(weakref.ref(g) for g in tensors[:count])
        return original(count, *tensors)

    monkeypatch.setattr(operator._StartFrom, "apply", watched)
    alive_during_second_pass = []

    def hook(block):  # fires in both passes; in the second (after the seed) when the first layer's block is made
        if grads:
            gc.collect()
            alive_during_second_pass.append(sum(r() is not None for r in grads))

    handle = model[0].weight.register_hook(hook)
    v = torch.randn(sum(p.numel() for p in model.parameters()))
    try:
        hv = op.product(v)
    finally:
        handle.remove()
    assert len(grads) == 4 and alive_during_second_pass == [0]

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def loss_of(theta):
        parts, i = {}, 0
        for name, shape, numel in shapes:
            parts[name] = theta[i : i + numel].view(shape)
            i += numel
        return F.cross_entropy(torch.func.functional_call(model.double(), parts, (x.double(),)), y)

    dense = torch.autograd.functional.hessian(loss_of, flat)
    model.float()
    torch.testing.assert_close(hv.double(), dense @ v.double(), rtol=1e-4, atol=1e-6)
