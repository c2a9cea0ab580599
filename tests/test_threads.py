"""Analyses do not oversubscribe the CPU: at most one torch thread per usable CPU, restored after."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape import loss_surface, random_direction


def test_threads_capped_at_the_usable_cpus_during_an_analysis_and_restored(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    seen = []

    def loss_fn(outputs, targets):
        seen.append(torch.get_num_threads())
        return F.cross_entropy(outputs, targets)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = nn.Linear(3, 2)
        data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
        loss_surface(model, data, random_direction(model), [np.linspace(-1, 1, 3)], loss_fn=loss_fn, progress=False)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
