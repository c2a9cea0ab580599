"""Loss-surface speed, measured side by side in one run.

    python benchmarks/surface.py [--repeats 3] [--channels 16]

For the digits CNN with BatchNorm, a 21x21 grid and 1,024 samples, prints:
- overhead: loss_surface wall time / (441 x one plain eval forward pass over the same cached batches);
- ratio to the PyPI package `loss-landscapes` (`random_plane`, filter normalization, same model,
  grid and samples), both as it ships (autograd on) and run under torch.no_grad();
- the same with the data coming from a DataLoader of 8 batches.
Each timing is the minimum over --repeats runs, the runs interleaved so drift hits all alike.
Needs the `bench` extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.digits import digits_cnn, load_digits_tensors  # noqa: E402
from lightning_landscape import loss_surface, random_direction  # noqa: E402

STEPS = 21
SAMPLES = 1024


def plain_forward_time(model, batches, repeats: int = 50) -> float:
    """Median wall time of one eval forward pass (+ loss) over the cached batches."""
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            total = torch.zeros((), dtype=torch.float64)
            for x, y in batches:
                total = total + F.cross_entropy(model(x), y).double() * len(y)
            total.item()
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def ours(model, data) -> float:
    dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
    coords = [np.linspace(-1, 1, STEPS)] * 2
    t = time.perf_counter()
    loss_surface(model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False)
    return time.perf_counter() - t


def theirs(model, x, y, *, no_grad: bool, loader=None) -> float:
    import loss_landscapes
    from loss_landscapes.metrics import Loss, Metric

    class LoaderLoss(Metric):
        """What a loss-landscapes user writes for a DataLoader: iterate it at every point."""

        def __call__(self, wrapper) -> float:
            total, count = 0.0, 0
            for bx, by in loader:
                total += F.cross_entropy(wrapper.forward(bx), by).item() * len(by)
                count += len(by)
            return total / count

    metric = LoaderLoss() if loader is not None else Loss(F.cross_entropy, x, y)
    model.eval()
    t = time.perf_counter()
    if no_grad:
        with torch.no_grad():
            loss_landscapes.random_plane(
                model, metric, distance=1, steps=STEPS, normalization="filter", deepcopy_model=True
            )
    else:
        loss_landscapes.random_plane(
            model, metric, distance=1, steps=STEPS, normalization="filter", deepcopy_model=True
        )
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    x, y = load_digits_tensors()
    x, y = x[:SAMPLES], y[:SAMPLES]
    model = digits_cnn(args.channels)
    # A few SGD steps: a realistic trained state (BatchNorm statistics, non-zero biases). loss-landscapes'
    # filter normalization divides by zero on a zero bias (e.g. BatchNorm's initial one) and crashes.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        for i in range(0, SAMPLES, 128):
            optimizer.zero_grad()
            F.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            optimizer.step()
    model.eval()
    one_batch = [(x, y)]
    loader = DataLoader(TensorDataset(x, y), batch_size=SAMPLES // 8)
    eight_batches = list(loader)
    n_params = sum(p.numel() for p in model.parameters())

    rows = {}
    for _ in range(args.repeats):
        for key, fn in {
            "fwd_1": lambda: plain_forward_time(model, one_batch),
            "fwd_8": lambda: plain_forward_time(model, eight_batches),
            "ours_1": lambda: ours(model, one_batch),
            "ours_loader": lambda: ours(model, loader),
            "theirs_1": lambda: theirs(model, x, y, no_grad=False),
            "theirs_1_nograd": lambda: theirs(model, x, y, no_grad=True),
            "theirs_loader": lambda: theirs(model, x, y, no_grad=False, loader=loader),
            "theirs_loader_nograd": lambda: theirs(model, x, y, no_grad=True, loader=loader),
        }.items():
            rows[key] = min(rows.get(key, np.inf), fn())

    points = STEPS * STEPS
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(
        f"model: digits CNN, {args.channels} channels, BatchNorm, {n_params} parameters; {SAMPLES} samples; "
        f"{STEPS}x{STEPS} grid; min of {args.repeats} runs\n"
    )
    print(
        "| data | ours (s) | 441 plain forwards (s) | overhead | loss-landscapes (s) | ratio | loss-landscapes no_grad (s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, o, f, t, tn in (
        ("1 cached batch of 1024", rows["ours_1"], rows["fwd_1"], rows["theirs_1"], rows["theirs_1_nograd"]),
        (
            "DataLoader, 8 batches",
            rows["ours_loader"],
            rows["fwd_8"],
            rows["theirs_loader"],
            rows["theirs_loader_nograd"],
        ),
    ):
        print(
            f"| {label} | {o:.3f} | {points * f:.3f} | {o / (points * f):.3f} | {t:.3f} | {o / t:.3f} | {tn:.3f} | {o / tn:.3f} |"
        )
    print("\noverhead target <= 1.05; ratio (ours / loss-landscapes) target <= 1.0")


if __name__ == "__main__":
    main()
