"""Off a terminal an analysis says it is alive: log lines with points done, elapsed and time left."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lightning_landscape import loss_surface, random_direction

from .conftest import ROOT


def test_log_lines_every_tenth_of_the_points(caplog):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))] * 3
    with caplog.at_level(logging.INFO, logger="lightning_landscape"):
        loss_surface(model, data, random_direction(model), [np.linspace(-1, 1, 20)], loss_fn=F.cross_entropy)
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_landscape"]
    assert lines[0] == "loss surface: 20 point(s) x 3 forward pass(es)"
    done = [
        int(m.group(1))
        for m in (re.match(r"loss surface: (\d+)/20 points, \d+ s elapsed, about \d+ s left", x) for x in lines[1:])
        if m
    ]
    assert done == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_a_captured_run_prints_progress_to_stderr(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np, torch
        from torch.nn import functional as F
        from lightning_landscape import loss_surface, random_direction
        model = torch.nn.Linear(3, 2)
        data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
        loss_surface(model, data, random_direction(model), [np.linspace(-1, 1, 5)], loss_fn=F.cross_entropy)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "loss surface: 5/5 points" in out.stderr
