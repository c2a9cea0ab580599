"""Where a snapshot's cost goes, in a plain PyTorch loop (no Lightning): the store's calls timed one by one.

Trains the 0.97M-weight MLP of ``benchmarks/trajectory.py`` (64-950-950-10, SGD with momentum, one
batch of 64) for 1,200 steps with ``SnapshotStore.append`` after every optimizer step in every other
block of 4 steps, deferred (the copy on the writer thread, ``store.fence()`` before the next step)
or synchronous, and prints the median time of each phase of a step with and without a snapshot:
the forward and backward pass, the fence, the optimizer step and the append. The first step of
each block and the first 80 steps are not counted.

Blocks with and without snapshots let the writer thread catch up in the blocks without, so they
show the cost on the training thread but not a writer that cannot keep up. ``--continuous`` measures
that too: a snapshot after every step, 600 steps timed after 100, each variant in a fresh process
(fresh pages cost what a new training run pays), interleaved, ``--repeats`` runs each: plain, memory
rows (deferred copy, the default; synchronous; the pre-faulting in the old 4 MiB pieces) and disk.
Printed: the median (min) wall time and the training thread's CPU time per step, and their ratio to
the plain runs' median.

Run: ``OMP_NUM_THREADS=1 python benchmarks/trajectory_phases.py`` (about a minute), ``... --continuous
--repeats 6`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from lightning_landscape.trajectory import SnapshotStore, blocks

STEPS = 1200
#: --continuous variants: label -> (snapshots, storage, deferred copy, pre-faulting piece bytes).
VARIANTS = {
    "plain": (False, "memory", True, blocks.PREFAULT_PIECE_BYTES),
    "memory, deferred (default)": (True, "memory", True, blocks.PREFAULT_PIECE_BYTES),
    "memory, synchronous": (True, "memory", False, blocks.PREFAULT_PIECE_BYTES),
    "memory, deferred, 4 MiB pieces": (True, "memory", True, 4 << 20),
    "disk, deferred": (True, "disk", True, blocks.PREFAULT_PIECE_BYTES),
}


def _problem() -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 950), nn.ReLU(), nn.Linear(950, 950), nn.ReLU(), nn.Linear(950, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    return net, opt, torch.randn(64, 64), torch.randint(0, 10, (64,))


def phases(deferred: bool) -> dict[str, np.ndarray]:
    """Median (forward+backward, fence, optimizer step, append) in ms, for steps with ("on") and without ("off")."""
    net, opt, x, y = _problem()
    params = list(net.parameters())
    store = SnapshotStore(sum(p.numel() for p in params), dtype="float16", storage="memory", block_rows=STEPS)
    times: dict[str, list[list[float]]] = {"on": [], "off": []}
    for k in range(STEPS):
        on = (k // 4) % 2 == 0
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        t1 = time.perf_counter()
        store.fence()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        if on:
            store.append(params, step=k, epoch=0, defer=deferred)
        t4 = time.perf_counter()
        if k > 80 and k % 4:
            times["on" if on else "off"].append([t1 - t0, t2 - t1, t3 - t2, t4 - t3])
    store.close()
    return {kind: 1e3 * np.median(np.array(v), axis=0) for kind, v in times.items()}


def continuous_child(label: str) -> tuple[float, float]:
    """Wall and training-thread CPU ms per step, a snapshot after every step (``VARIANTS[label]``)."""
    snap, storage, deferred, piece = VARIANTS[label]
    blocks.PREFAULT_PIECE_BYTES = piece
    net, opt, x, y = _problem()
    params = list(net.parameters())
    store = SnapshotStore(sum(p.numel() for p in params), dtype="float16", storage=storage, block_rows=256)
    for k in range(700):
        if k == 100:
            wall, cpu = time.perf_counter(), time.thread_time()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        store.fence()
        opt.step()
        if snap:
            store.append(params, step=k, epoch=0, defer=deferred)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    store.close(delete=True)
    return 1e3 * wall / 600, 1e3 * cpu / 600


def continuous(repeats: int) -> None:
    """The --continuous table: every variant in a fresh process, interleaved, ``repeats`` runs each."""
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in VARIANTS}
    for _ in range(repeats):
        for label in VARIANTS:
            cmd = [sys.executable, __file__, "--child", label]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout.split()
            runs[label].append((float(out[0]), float(out[1])))
    base = np.median(np.array(runs["plain"]), axis=0)
    print(
        f"| snapshots at every step ({repeats} runs each) | wall per step, median (min) | vs plain | training-thread CPU | vs plain |"
    )
    print("|---|---|---|---|---|")
    for label, values in runs.items():
        v = np.array(values)
        wall, cpu = np.median(v, axis=0)
        print(
            f"| {label} | {wall:.2f} ms ({v[:, 0].min():.2f}) | {100 * (wall / base[0] - 1):+.1f} % "
            f"| {cpu:.2f} ms | {100 * (cpu / base[1] - 1):+.1f} % |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--continuous", action="store_true", help="snapshots at every step, one process per run")
    parser.add_argument("--repeats", type=int, default=6, help="runs per variant with --continuous")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(*continuous_child(args.child))
        return
    if args.continuous:
        continuous(args.repeats)
        return
    print("| copy | steps | forward+backward | fence | optimizer step | append | step |")
    print("|---|---|---|---|---|---|---|")
    for deferred in (True, False, True, False):
        for kind, m in phases(deferred).items():
            copy = "deferred" if deferred else "synchronous"
            print(f"| {copy} | {kind} | " + " | ".join(f"{v:.3f} ms" for v in m) + f" | {m.sum():.3f} ms |")


if __name__ == "__main__":
    main()
