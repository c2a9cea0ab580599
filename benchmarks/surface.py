"""Loss-surface speed and page faults per grid point, each variant in its own process, interleaved.

    python benchmarks/surface.py [--repeats 5] [--threads 1 2] [--steps 21] [--channels 16]

For the digits CNN with BatchNorm, a --steps x --steps grid and 1,024 samples, runs each variant in
a fresh interpreter (the C allocator's state is process-wide, so variants cannot share one), in
interleaved order, --repeats times, and prints per grid point the wall time (min and median), the
CPU time and the minor page faults, then the ratios the issue sets targets for:
- ours: `loss_surface` as it ships (the allocator keeps its memory between points);
- ours, allocator untouched: the same with LIGHTNING_LANDSCAPE_RETAIN_MEMORY=0;
- plain eager loop: one eval forward (+ loss) per point over the same batches, as a user writes it;
- plain loop, memory kept: the same inside `retained_memory()`, to separate the two effects;
- loss-landscapes (`random_plane`, filter normalization) as it ships and under torch.no_grad().
Rows: one cached batch of 1,024, and a DataLoader of 8 batches (loss-landscapes re-reads it per point).
Needs the `bench` extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 1024
VARIANTS = {
    "ours": "ours",
    "ours_untouched": "ours, allocator untouched",
    "plain": "plain eager loop",
    "plain_kept": "plain loop, memory kept",
    "theirs": "loss-landscapes",
    "theirs_nograd": "loss-landscapes, no_grad",
}
DATA = {"one": "1 cached batch of 1024", "loader": "DataLoader, 8 batches"}


def _setup(channels: int):
    import torch
    from torch.nn import functional as F

    from examples.digits import digits_cnn, load_digits_tensors

    torch.manual_seed(0)
    x, y = load_digits_tensors()
    x, y = x[:SAMPLES], y[:SAMPLES]
    model = digits_cnn(channels)
    # A few SGD steps: a realistic trained state (BatchNorm statistics, non-zero biases). loss-landscapes'
    # filter normalization divides by zero on a zero bias (e.g. BatchNorm's initial one) and crashes.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        for i in range(0, SAMPLES, 128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            optimizer.step()
    return model.eval(), x, y


def _plain(model, batches, points: int) -> None:
    import torch
    from torch.nn import functional as F

    with torch.no_grad():
        for _ in range(points):
            total = torch.zeros((), dtype=torch.float64)
            for bx, by in batches:
                total = total + F.cross_entropy(model(bx), by).double() * len(by)
            total.item()


def _theirs(model, x, y, loader, steps: int, no_grad: bool) -> None:
    import loss_landscapes
    import torch
    from loss_landscapes.metrics import Loss, Metric
    from torch.nn import functional as F

    class LoaderLoss(Metric):
        """What a loss-landscapes user writes for a DataLoader: iterate it at every point."""

        def __call__(self, wrapper) -> float:
            total, count = 0.0, 0
            for bx, by in loader:
                total += F.cross_entropy(wrapper.forward(bx), by).item() * len(by)
                count += len(by)
            return total / count

    metric = LoaderLoss() if loader is not None else Loss(F.cross_entropy, x, y)
    with torch.no_grad() if no_grad else torch.enable_grad():
        loss_landscapes.random_plane(
            model, metric, distance=1, steps=steps, normalization="filter", deepcopy_model=True
        )


def worker(variant: str, data: str, steps: int, channels: int) -> dict:
    """One variant, timed in this process; returns seconds, CPU seconds and minor faults for the grid."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_landscape import loss_surface, random_direction
    from lightning_landscape.allocator import retained_memory

    model, x, y = _setup(channels)
    loader = DataLoader(TensorDataset(x, y), batch_size=SAMPLES // 8)
    batches = [(x, y)] if data == "one" else list(loader)
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    coords = [np.linspace(-1, 1, steps)] * 2
    points = steps * steps
    given = loader if data == "loader" else None  # ours caches a loader once; loss-landscapes re-reads it

    def ours() -> None:  # "ours_untouched" is the same call in a process with the retention switched off
        loss_surface(model, given or batches, dirs, coords, loss_fn=F.cross_entropy, progress=False)

    def kept() -> None:
        with retained_memory():
            _plain(model, batches, points)

    run = {
        "ours": ours,
        "ours_untouched": ours,
        "plain": lambda: _plain(model, batches, points),
        "plain_kept": kept,
        "theirs": lambda: _theirs(model, x, y, given, steps, no_grad=False),
        "theirs_nograd": lambda: _theirs(model, x, y, given, steps, no_grad=True),
    }
    _plain(model, batches, 2)  # warm-up: first-call costs (kernels, lazy init) are not per point
    usage = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    run[variant]()
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    return {"wall": wall / points, "cpu": cpu / points, "faults": (after.ru_minflt - usage.ru_minflt) / points}


def _spawn(variant: str, data: str, threads: int, steps: int, channels: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if variant == "ours_untouched":
        env["LIGHTNING_LANDSCAPE_RETAIN_MEMORY"] = "0"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--data",
        data,
        "--steps",
        str(steps),
        "--channels",
        str(channels),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} on {data} with {threads} thread(s) failed:\n{proc.stderr[-3000:]}")
    print(f"  {variant}, {data}, {threads} thread(s): done", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--data", choices=list(DATA), default="one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(worker(args.worker, args.data, args.steps, args.channels)))
        return

    import torch

    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every variant alike
        for threads in args.threads:
            for data in DATA:
                for variant in args.variants:
                    runs.setdefault((threads, data, variant), []).append(
                        _spawn(variant, data, threads, args.steps, args.channels)
                    )
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}; digits CNN, {args.channels} channels, BatchNorm; {SAMPLES} samples; "
        f"{args.steps}x{args.steps} grid; {args.repeats} interleaved runs, one process each\n"
    )
    print("| threads | data | variant | ms/point min | ms/point median | CPU ms/point median | faults/point median |")
    print("|---|---|---|---|---|---|---|")
    for (threads, data, variant), rows in runs.items():
        wall = [r["wall"] * 1e3 for r in rows]
        print(
            f"| {threads} | {DATA[data]} | {VARIANTS[variant]} | {min(wall):.2f} | {np.median(wall):.2f} | "
            f"{np.median([r['cpu'] * 1e3 for r in rows]):.2f} | {np.median([r['faults'] for r in rows]):.0f} |"
        )
    print(
        "\n| threads | data | ours / plain eager loop (min, median) | ours / loss-landscapes | ours / loss-landscapes no_grad |"
    )
    print("|---|---|---|---|---|")
    for threads in args.threads:
        for data in DATA:

            def ratio(other: str, pick, t=threads, d=data) -> str:
                if (t, d, other) not in runs or (t, d, "ours") not in runs:
                    return "-"
                return f"{pick([r['wall'] for r in runs[(t, d, 'ours')]]) / pick([r['wall'] for r in runs[(t, d, other)]]):.2f}"

            print(
                f"| {threads} | {DATA[data]} | {ratio('plain', min)}, {ratio('plain', np.median)} | "
                f"{ratio('theirs', min)}, {ratio('theirs', np.median)} | {ratio('theirs_nograd', min)}, {ratio('theirs_nograd', np.median)} |"
            )
    print("\ntargets: ours <= 0.6x the plain eager loop and <= 0.6x loss-landscapes; faults per point <= 100")


if __name__ == "__main__":
    main()
