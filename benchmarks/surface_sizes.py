"""Loss surfaces at real model sizes: per-point cost against one forward, peak memory in model copies.

    python benchmarks/surface_sizes.py [--repeats 3] [--steps 5] [--models resnet20 mlp-5M]

For a ResNet-20-like CNN on 32x32 inputs (~270k weights, batch 128) and a 5M-weight MLP (20 layers
of 500x500, batch 256), each in a fresh process per mode and repeat (interleaved), prints:
- per grid point: the surface's wall time / one plain eval forward (+ loss) of the same batch;
- the peak extra resident memory during the surface beyond one plain forward's working memory, in
  model copies (Linux: the peak is reset just before; the stored directions are counted for the
  default mode, since they are what it holds);
for memory="default" (θ*, δ, η) and memory="low" (θ* only, directions drawn again per point), and
with --modes bf16 / compile: the default mode with dtype="bf16" or compile=True (inductor), timed
after a one-point surface that pays the compilation, with the loss error at θ* against fp32; with
--modes ppf4 / ppf16: points_per_forward=4 or 16 (the last line prints each mode's time over the
default's). --models mlp-2k adds the digits-sized MLP (64-32-10, batch 64), overhead-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _resnet20():
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                nn.BatchNorm2d(cout),
            )
            self.skip = (
                nn.Sequential()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(3):
            layers.append(Block(cin, cout, stride if b == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def _problem(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "resnet20":
        model = _resnet20()
        x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    elif name == "mlp-2k":  # the digits MLP: a forward of 64 samples is mostly per-call overhead
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
        x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    else:
        model = nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(500, 500), nn.Tanh(), nn.Linear(500, 500))])
        x, y = torch.randn(256, 500), torch.randint(0, 500, (256,))
    return model.eval(), [(x, y)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident size


#: Evaluation modes: memory="default"/"low", dtype="bf16", compile=True, points_per_forward=4/16 (ppf4, ppf16).
MODES = ["default", "low", "bf16", "compile", "ppf4", "ppf16"]


def worker(name: str, memory: str, steps: int) -> dict:
    import torch
    from torch.nn import functional as F

    from lightning_landscape import SeededDirection, loss_surface

    model, data = _problem(name)
    copy = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        for _ in range(3):
            F.cross_entropy(model(data[0][0]), data[0][1]).item()
        t = time.perf_counter()
        for _ in range(5):
            F.cross_entropy(model(data[0][0]), data[0][1]).item()
        forward = (time.perf_counter() - t) / 5
    first = SeededDirection(seed=0)
    dirs = [first, SeededDirection(seed=1, orthogonal_to=first)]
    coords = [np.linspace(-1, 1, steps)] * 2
    extra = {"bf16": {"dtype": "bf16"}, "compile": {"compile": True}, "ppf4": {"points_per_forward": 4}}.get(memory, {})
    extra = {"points_per_forward": 16} if memory == "ppf16" else extra
    if extra:  # a small surface first: compiling (autocast's, vmap's first call) is not a per-point cost
        warm = [np.array([-1e-3, 0.0]), np.array([-1e-3, 0.0])] if "points_per_forward" in extra else [np.zeros(1)] * 2
        loss_surface(model, data, dirs, warm, loss_fn=F.cross_entropy, progress=False, **extra)
    error = None
    # One plain forward's working memory (activations), measured the same way: an analysis needs
    # it too, and the allocator keeps it between points; the copies counted are beyond it.
    with torch.no_grad():
        before = _rss()
        _reset_peak()
        F.cross_entropy(model(data[0][0]), data[0][1]).item()
        working = _peak() - before
    before = _rss()
    _reset_peak()
    if memory != "low":
        dirs = [d.materialize(model) for d in dirs]
    t = time.perf_counter()
    ls = loss_surface(
        model,
        data,
        dirs,
        coords,
        loss_fn=F.cross_entropy,
        progress=False,
        memory="low" if memory == "low" else "default",
        **extra,
    )
    per_point = (time.perf_counter() - t) / steps**2
    error = ls.metadata.get("center_loss_rel_error")
    return {
        "ratio": per_point / forward,
        "copies": (_peak() - before - working) / copy,
        "params": copy // 4,
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mlp-5M"], choices=["resnet20", "mlp-5M", "mlp-2k"])
    parser.add_argument("--modes", nargs="+", default=["default", "low"], choices=MODES)
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    import torch

    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeats):
        for name in args.models:
            for memory in args.modes:
                cmd = [sys.executable, __file__, "--worker", name, memory, "--steps", str(args.steps)]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
                runs.setdefault((name, memory), []).append(json.loads(out.strip().splitlines()[-1]))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}; {args.steps}x{args.steps} grid, 2 directions (the second orthogonal); "
        f"median of {args.repeats} interleaved runs, one process each\n"
    )
    print("| model | weights | mode | per point / one forward | peak extra memory (model copies) | loss error at θ* |")
    print("|---|---|---|---|---|---|")
    for (name, memory), rows in runs.items():
        error = rows[0]["error"]
        print(
            f"| {name} | {rows[0]['params']:,} | {memory} | {np.median([r['ratio'] for r in rows]):.2f} | "
            f"{np.median([r['copies'] for r in rows]):.2f} | {'-' if error is None else f'{error:.1e}'} |"
        )
    for (name, memory), rows in runs.items():
        if memory != "default" and (name, "default") in runs:
            base = np.median([r["ratio"] for r in runs[(name, "default")]])
            print(f"{name}: {memory} time / default time = {np.median([r['ratio'] for r in rows]) / base:.2f}")
    print("\ntargets: per point / one forward <= 1.0; copies <= 3 (default) and <= 1 (low); low <= 1.15x default time")


if __name__ == "__main__":
    main()
