"""TrajectoryPCA cost at real model sizes, measured side by side: training slowdown, snapshot memory, 16-bit storage.

    python benchmarks/trajectory.py [--parts training marginal memory dtype] [--models mlp-1M mlp-10M cnn-1M cnn-10M]
                                    [--repeats 5] [--threads 1] [--snapshots 50 100 200]
                                    [--marginal-repeats 6] [--marginal-epochs 4]

1. Training slowdown (``training``). Models of ``benchmarks/trajectory_sizes.py``: MLPs 64 -> w -> w -> 10
   of 0.97M and 9.8M weights (the fewest FLOPs per weight: the harshest case for a per-step
   snapshot) and the digits CNN widened to 0.98M and 10.1M weights (5k: the README's digits
   model), SGD (lr 0.05, momentum 0.9), batch 64 on the digits, validation every epoch, one torch
   thread, no DataLoader workers. Each model is trained without a landscape callback, with
   ``TrajectoryPCA(every_n_steps=1)`` and with ``TrajectoryPCA(every_n_epochs=1)``, default storage
   ("auto": memory up to 1024 MiB, then disk) and dtype ("auto": float16 from 500,000 weights). Only
   training is timed (on_train_start -> on_train_end): the fit-end analysis is not. The three
   variants run interleaved, their order rotated every repeat, after a one-epoch warm-up of each;
   every run reseeds. Clocks: wall time, the training thread's CPU time (``time.thread_time``,
   blind to preemption) and the process's CPU time (all threads: includes the background writer).
   Printed per model and schedule: the median over repeats of the paired slowdown (variant / plain
   run of the same repeat - 1) on each clock, the training-thread CPU time inside every hook of the
   callback as a share of its run's training CPU time, and the median snapshot call. On a shared
   machine the run-to-run spread of the plain runs (printed) can exceed the targets, so the verdict
   is given for the hook share and, separately, for the paired wall slowdown. Targets: <= 3 %
   (every step), <= 0.5 % (every epoch).

2. A snapshot's cost within one run (``marginal``): on a shared machine the speed of whole runs
   moves by more than the targets, so each fit here takes ``TrajectoryPCA(every_n_steps=1)``
   snapshots in every other block of 4 steps and compares, cycle by cycle, the median step time
   of a block with snapshots to that of the block after it without (the first step of each block,
   which carries the block before, is left out): the machine's drift cancels within a cycle.
   Printed: the median over all cycles of the fits, with a bootstrap 95 % interval, for memory
   rows with the copy made during the next step (``overlap_copy=True``, the default) or before
   training goes on (``False``), and for ``storage="disk"``; the median step with and without
   snapshots on the wall clock and the training thread's CPU clock; and, for every epoch, one
   synchronous snapshot's cost over an epoch's steps (validation left out, so an upper bound).
   Targets as above.

3. Snapshot memory (``memory``). An MLP of 5 x Linear(1000, 1000) (5,005,000 float32 parameters, one
   "model copy" = 20.0 MB) and a ``SnapshotStore(P, dtype="float32", storage="disk")`` in a temporary
   directory; K snapshots are taken as the callback takes them (``append`` of the parameter list:
   copied straight into one of the store's two reused write buffers, which the writer thread
   writes to disk), each after a simulated optimizer step (every parameter += 1e-3 x a slice of a
   white-noise buffer at a random offset; the buffer exists before the baseline), then
   ``trajectory_pca(store, parameters, 2)`` runs with the list of parameters as the final weights.
   One fresh subprocess per (storage, K), one torch thread (``--memory-threads``). Baseline: the
   resident set (RSS) once the model, the noise buffer and the empty store exist. The peak of each
   phase is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs when the phase
   starts), cross-checked by a psutil thread sampling RSS every 2 ms; both are given above the
   baseline, in MB and in model copies. Target (disk): <= 3 model copies, independent of K.
   Memory storage is shown for comparison (about K copies). Diagnostic rows rerun disk storage
   with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB (heap fragmentation would show there).

4. 16-bit storage (``dtype``). The check behind ``dtype="auto"``: see ``trajectory_sizes.dtype_check``.
   About 10 minutes; not run by default.

Needs psutil (the ``bench`` extra) and scikit-learn (the digits data); the memory part reads
/proc and is Linux (glibc) only.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import trajectory_sizes as sizes  # noqa: E402

MB = 1e6
MEMORY_LAYERS, MEMORY_WIDTH = 5, 1000
TARGET_COPIES = 3.0
FIXED_MMAP_THRESHOLD = 2**20


# --------------------------------------------------------------------------------------------
# 1. training slowdown: benchmarks/trajectory_sizes.py


def quiet_lightning() -> None:
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------
# 2. snapshot memory (child process)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))  # type: ignore[union-attr]


class PeakRSS:
    """Peak resident set of a phase: VmHWM reset via clear_refs, plus a psutil sampling thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sampled = 0
        self.hwm: int | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._hwm_ok = True
        except OSError:
            self._hwm_ok = False
        self.sampled = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()  # type: ignore[union-attr]
        self.sampled = max(self.sampled, self._proc.memory_info().rss)
        self.hwm = _status_kb("VmHWM") * 1024 if self._hwm_ok else None

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm or 0)


def memory_child(storage: str, count: int, threads: int) -> dict:
    from torch import nn

    from lightning_landscape.trajectory import SnapshotStore, trajectory_pca

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(MEMORY_WIDTH, MEMORY_WIDTH) for _ in range(MEMORY_LAYERS)])
    num_params = sum(p.numel() for p in model.parameters())
    # Simulated optimizer steps: every parameter += 1e-3 x a slice of white noise at a random offset (slices at
    # different offsets are nearly orthogonal, so the path spans many directions); the buffer exists before the baseline.
    largest = max(p.numel() for p in model.parameters())
    noise = torch.randn(2 * largest, generator=torch.Generator().manual_seed(1))
    offsets = np.random.default_rng(2)

    def optimizer_step() -> None:
        with torch.no_grad():
            for p in model.parameters():
                o = int(offsets.integers(0, largest))
                p.add_(noise[o : o + p.numel()].view_as(p), alpha=1e-3)

    params = [p for p in model.parameters() if p.requires_grad]

    def snapshot(store: SnapshotStore, step: int) -> None:  # what TrajectoryPCA._snapshot does
        store.append(params, step=step, epoch=0)

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"snapshot_dir": tmp} if storage == "disk" else {}
        store = SnapshotStore(num_params, dtype="float32", storage=storage, **kwargs)
        optimizer_step()
        gc.collect()
        baseline = PeakRSS()._proc.memory_info().rss

        t = time.perf_counter()
        with PeakRSS() as append_peak:
            for step in range(count):
                if step:
                    optimizer_step()
                snapshot(store, step)
            store.flush()
        append_seconds = time.perf_counter() - t
        gc.collect()
        after_append = PeakRSS()._proc.memory_info().rss

        gc.collect()
        t = time.perf_counter()
        with PeakRSS() as pca_peak:
            result = trajectory_pca(store, params, 2)
        pca_seconds = time.perf_counter() - t
        evr = result.explained_variance_ratio.tolist()
        files = len(store.files)
        del result
        store.close(delete=True)

    return {
        "storage": storage,
        "count": count,
        "num_params": num_params,
        "model_bytes": num_params * 4,
        "baseline": baseline,
        "append_peak": append_peak.peak - baseline,
        "append_sampled": append_peak.sampled - baseline,
        "after_append": after_append - baseline,
        "pca_peak": pca_peak.peak - baseline,
        "pca_sampled": pca_peak.sampled - baseline,
        "append_seconds": append_seconds,
        "pca_seconds": pca_seconds,
        "files": files,
        "evr": evr,
        "hwm": append_peak.hwm is not None,
    }


def memory_benchmark(counts: list[int], threads: int, memory_counts: list[int], fixed_counts: list[int]) -> list[dict]:
    rows = []
    jobs = [("disk", k, False) for k in counts] + [("disk", k, True) for k in fixed_counts]
    jobs += [("memory", k, False) for k in memory_counts]
    for storage, k, fixed in jobs:
        env = dict(os.environ)
        if fixed:  # glibc: a fixed mmap threshold turns off its dynamic raise (and so heap fragmentation by big blocks)
            env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
        out = subprocess.run(
            [sys.executable, __file__, "--child", storage, str(k), "--memory-threads", str(threads)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), fixed=fixed))
    return rows


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["training", "marginal", "memory", "dtype"],
        default=["training", "marginal", "memory"],
    )
    parser.add_argument(
        "--models", nargs="+", choices=list(sizes.MODELS), default=["mlp-1M", "mlp-10M", "cnn-1M", "cnn-10M"]
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--marginal-repeats", type=int, default=6, help="alternating fits per model and variant")
    parser.add_argument("--marginal-epochs", type=int, default=4, help="epochs of each alternating fit")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training runs")
    parser.add_argument("--memory-threads", type=int, default=1, help="torch threads of the memory runs")
    parser.add_argument("--snapshots", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument(
        "--memory-snapshots",
        type=int,
        nargs="*",
        default=[50, 200],
        help="snapshot counts for the memory-storage comparison",
    )
    parser.add_argument(
        "--fixed-threshold-snapshots",
        type=int,
        nargs="*",
        default=[50, 200],
        help="snapshot counts for the diagnostic disk rows run with glibc's MALLOC_MMAP_THRESHOLD_ fixed",
    )
    parser.add_argument("--child", nargs=2, metavar=("STORAGE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(memory_child(args.child[0], int(args.child[1]), args.memory_threads)))
        return

    torch.set_num_threads(args.threads)
    import pytorch_lightning as pl

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"thread(s), torch {torch.__version__}, Lightning {pl.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )

    if "training" in args.parts:
        quiet_lightning()
        t0 = time.perf_counter()
        runs = sizes.training_benchmark(args.models, args.repeats)
        print(f"\n## Training slowdown, {args.repeats} interleaved repeats ({time.perf_counter() - t0:.0f} s)\n")
        sizes.print_training_table(runs)

    if "marginal" in args.parts:
        quiet_lightning()
        t0 = time.perf_counter()
        rows = sizes.marginal_benchmark(args.models, args.marginal_repeats, args.marginal_epochs)
        print(
            f"\n## A snapshot's cost within one run: snapshots in alternating blocks of {sizes.BLOCK} steps, "
            f"{args.marginal_repeats} fits of {args.marginal_epochs} epochs per row ({time.perf_counter() - t0:.0f} s)\n"
        )
        sizes.print_marginal_table(rows)

    if "dtype" in args.parts:
        sizes.print_dtype_table(sizes.dtype_check(["5k", "1M", "10M"], 3, [0.05, 0.005]))

    if "memory" in args.parts:
        t0 = time.perf_counter()
        rows = memory_benchmark(
            args.snapshots, args.memory_threads, args.memory_snapshots, args.fixed_threshold_snapshots
        )
        copy = rows[0]["model_bytes"]
        print(
            f"\n## Peak resident memory above baseline: MLP of {rows[0]['num_params']:,} float32 parameters "
            f"(1 model copy = {copy / MB:.1f} MB), one fresh process per row ({time.perf_counter() - t0:.0f} s)\n"
        )
        print(
            "| storage | snapshots | append peak (MB) | append peak (copies) | retained after append (copies) "
            "| PCA peak (MB) | PCA peak (copies) | sampled append / PCA (copies) | append (s) | PCA (s) | target | met |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            disk = r["storage"] == "disk"
            worst = max(r["append_peak"], r["pca_peak"]) / copy
            met = ("yes" if worst <= TARGET_COPIES else "no") if disk else "-"
            label = r["storage"] + (
                f", MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD} (diagnostic)" if r["fixed"] else ""
            )
            print(
                f"| {label} | {r['count']} | {r['append_peak'] / MB:.1f} | {r['append_peak'] / copy:.2f} | "
                f"{r['after_append'] / copy:.2f} | {r['pca_peak'] / MB:.1f} | {r['pca_peak'] / copy:.2f} | "
                f"{r['append_sampled'] / copy:.2f} / {r['pca_sampled'] / copy:.2f} | {r['append_seconds']:.1f} | "
                f"{r['pca_seconds']:.1f} | {'<= 3 copies' if disk else 'about K copies'} | {met} |"
            )
        print(
            f"\nbaseline RSS (model, noise buffer, empty store): {rows[0]['baseline'] / MB:.0f} MB; "
            f"peaks from VmHWM: {all(r['hwm'] for r in rows)}"
        )
        disk = [r for r in rows if r["storage"] == "disk" and not r["fixed"]]
        worst = max(max(r["append_peak"], r["pca_peak"]) for r in disk) / copy
        print(
            f"disk storage, worst peak over K = {', '.join(str(r['count']) for r in disk)}: {worst:.2f} model copies, "
            f"target <= {TARGET_COPIES:.0f}: {'MET' if worst <= TARGET_COPIES else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
