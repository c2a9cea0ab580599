"""Mode-connectivity speed, measured side by side in one run.

    python benchmarks/curves.py [--repeats 3] [--channels 16] [--epochs 5] [--threads N]

For the digits CNN with BatchNorm (and a 64-32-10 MLP for the fit), 1,024 samples in 8 batches of 128, prints:
- (a) the curve fit's wall time per step (fit_curve, Bezier, one bend) / one plain SGD training step of
  the same model on one batch (forward, backward, step);
- (b) a 61-point evaluation with bn="recompute" (evaluate_curve: 61 points on the curve and 61 on the
  line) / the same 122 points done by hand: load the weights, torch.optim.swa_utils.update_bn, one
  eval pass computing the loss.
Each timing is the minimum over --repeats runs, the runs interleaved so drift hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.digits import digits_cnn, load_digits_tensors
from lightning_landscape.connect import Curve, evaluate_curve, fit_curve

SAMPLES = 1024
BATCH = 128
POINTS = 61


def plain_steps(model: nn.Module, batches, epochs: int) -> float:
    """Wall time per plain SGD step (train mode, forward, backward, step), over epochs x batches steps."""
    work = copy.deepcopy(model)
    opt = torch.optim.SGD(work.parameters(), lr=0.01, momentum=0.9)
    work.train()
    t = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(work(x), y).backward()
            opt.step()
    return (time.perf_counter() - t) / (epochs * len(batches))


def fit_steps(model: nn.Module, a: nn.Module, b: nn.Module, batches, epochs: int) -> float:
    """Wall time per step of fit_curve (setup included, amortized over the steps)."""
    t = time.perf_counter()
    fit_curve(model, a, b, batches, loss_fn=F.cross_entropy, epochs=epochs, lr=0.01, progress=False)
    return (time.perf_counter() - t) / (epochs * len(batches))


def ours_eval(model: nn.Module, curve: Curve, batches) -> float:
    t = time.perf_counter()
    evaluate_curve(model, curve, batches, loss_fn=F.cross_entropy, ts=POINTS, bn="recompute", progress=False)
    return time.perf_counter() - t


def by_hand_eval(model: nn.Module, curve: Curve, batches) -> float:
    """What a user writes: at each point, load the weights, update_bn, then one eval pass for the loss."""
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    inputs = [x for x, _ in batches]
    t = time.perf_counter()
    for weights_at in (curve.weights, curve.line_weights):
        for s in np.linspace(0.0, 1.0, POINTS):
            with torch.no_grad():
                for name, value in weights_at(float(s)).items():
                    params[name].copy_(value)
            update_bn(inputs, work)
            work.eval()
            with torch.no_grad():
                total = torch.zeros((), dtype=torch.float64)
                for x, y in batches:
                    total = total + F.cross_entropy(work(x), y).double() * len(y)
                total.item()
    return time.perf_counter() - t


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y = load_digits_tensors()
    x, y = x[:SAMPLES], y[:SAMPLES]
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, SAMPLES, BATCH)]
    torch.manual_seed(0)
    cnn = [digits_cnn(args.channels) for _ in range(3)]  # the model, w1, w2
    mlps = [mlp(s) for s in range(3)]
    curve = fit_curve(cnn[0], cnn[1], cnn[2], batches, loss_fn=F.cross_entropy, epochs=1, progress=False)

    rows: dict[str, float] = {}
    for _ in range(args.repeats):
        for key, fn in {
            "cnn_plain": lambda: plain_steps(cnn[0], batches, args.epochs),
            "cnn_fit": lambda: fit_steps(*cnn, batches, args.epochs),
            "mlp_plain": lambda: plain_steps(mlps[0], batches, args.epochs),
            "mlp_fit": lambda: fit_steps(*mlps, batches, args.epochs),
            "eval_ours": lambda: ours_eval(cnn[0], curve, batches),
            "eval_hand": lambda: by_hand_eval(cnn[0], curve, batches),
        }.items():
            rows[key] = min(rows.get(key, np.inf), fn())

    n_cnn = sum(p.numel() for p in cnn[0].parameters())
    n_mlp = sum(p.numel() for p in mlps[0].parameters())
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    print(
        f"data: digits, {SAMPLES} samples in {len(batches)} batches of {BATCH}; fit: Bezier, 1 bend, SGD, "
        f"{args.epochs} epochs ({args.epochs * len(batches)} steps); min of {args.repeats} runs\n"
    )
    print("(a) curve fit vs plain training, per step")
    print("| model | fit_curve per step (ms) | plain SGD step (ms) | ratio |")
    print("|---|---|---|---|")
    for label, fit, plain in (
        (f"digits CNN, {args.channels} channels, BatchNorm, {n_cnn} params", rows["cnn_fit"], rows["cnn_plain"]),
        (f"MLP 64-32-10, {n_mlp} params", rows["mlp_fit"], rows["mlp_plain"]),
    ):
        print(f"| {label} | {1e3 * fit:.2f} | {1e3 * plain:.2f} | {fit / plain:.2f} |")
    print(f"\n(b) evaluation, {POINTS} points on the curve + {POINTS} on the line, bn='recompute'")
    print("| model | evaluate_curve (s) | by hand: update_bn + eval per point (s) | ratio |")
    print("|---|---|---|---|")
    ours, hand = rows["eval_ours"], rows["eval_hand"]
    print(f"| digits CNN, {args.channels} channels | {ours:.3f} | {hand:.3f} | {ours / hand:.3f} |")


if __name__ == "__main__":
    main()
