"""Where a snapshot's cost goes, in a plain PyTorch loop (no Lightning): the store's calls timed one by one.

Trains the 0.97M-weight MLP of ``benchmarks/trajectory.py`` (64-950-950-10, SGD with momentum, one
batch of 64) for 1,200 steps with ``SnapshotStore.append`` after every optimizer step in every other
block of 4 steps, deferred (the copy on the writer thread, ``store.fence()`` before the next step)
or synchronous, and prints the median time of each phase of a step with and without a snapshot:
the forward and backward pass, the fence, the optimizer step and the append. The first step of
each block and the first 80 steps are not counted.

Run: ``OMP_NUM_THREADS=1 python benchmarks/trajectory_phases.py`` (about a minute).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from lightning_landscape.trajectory import SnapshotStore

STEPS = 1200


def phases(deferred: bool) -> dict[str, np.ndarray]:
    """Median (forward+backward, fence, optimizer step, append) in ms, for steps with ("on") and without ("off")."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 950), nn.ReLU(), nn.Linear(950, 950), nn.ReLU(), nn.Linear(950, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
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


def main() -> None:
    torch.set_num_threads(1)
    print("| copy | steps | forward+backward | fence | optimizer step | append | step |")
    print("|---|---|---|---|---|---|---|")
    for deferred in (True, False, True, False):
        for kind, m in phases(deferred).items():
            copy = "deferred" if deferred else "synchronous"
            print(f"| {copy} | {kind} | " + " | ".join(f"{v:.3f} ms" for v in m) + f" | {m.sum():.3f} ms |")


if __name__ == "__main__":
    main()
