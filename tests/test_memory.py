"""Twenty analyses in a loop keep resident memory flat: no growth from figures, autograd graphs,
cached batches or logged media."""

from __future__ import annotations

import gc

import numpy as np
import psutil
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape import landscape_figures, loss_surface, random_direction

#: Allowed growth over 15 analyses after a warm-up of 5: the allocator's noise on a small model,
#: far below one analysis' worth of leaked batches (8 MB) or figures (a few MB each).
MAX_GROWTH_MB = 6.0


def test_twenty_surfaces_with_figures_keep_resident_memory_flat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    data = [(torch.randn(512, 64), torch.randint(0, 10, (512,))) for _ in range(8)]  # 8 x 128 kB inputs
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    process = psutil.Process()
    readings = []
    for _ in range(20):
        ls = loss_surface(model, data, dirs, [np.linspace(-1, 1, 5)] * 2, loss_fn=F.cross_entropy, progress=False)
        figures = landscape_figures(ls)
        for fig in figures.values():
            fig.canvas.draw()
        del ls, figures
        gc.collect()
        readings.append(process.memory_info().rss / 2**20)
    growth = max(readings[5:]) - readings[4]
    assert growth < MAX_GROWTH_MB, [round(r, 1) for r in readings]
