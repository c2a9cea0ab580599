"""TrajectoryPCA cost, measured side by side in one run: training slowdown and snapshot memory.

    python benchmarks/trajectory.py [--repeats 21] [--epochs 20] [--threads 1] [--snapshots 50 100 200]

1. Training slowdown. The digits example (``DigitsClassifier()``, 16 channels, BatchNorm, 5,114
   weights; ``DigitsDataModule()``, batch 64, 23 steps per epoch, validation every epoch) is
   trained for ``--epochs`` epochs without a landscape callback, with
   ``TrajectoryPCA(every_n_steps=1)`` and with ``TrajectoryPCA(every_n_epochs=1)`` (default
   storage "auto": memory for this model), one torch thread (``--threads``), no DataLoader workers.
   Only training is timed: a timing callback records on_train_start -> on_train_end, so the
   fit-end analysis (PCA, surface, figures; run with a 3x3 grid on one batch here only to keep
   the benchmark short) and the one snapshot taken at fit start are not counted. The three
   variants run interleaved, their order rotated every repeat, after one untimed warm-up run of
   each; every run reseeds (``seed_everything(0)``, ``deterministic=True``). Two clocks: wall
   time and the training thread's CPU time (``time.thread_time``, blind to preemption).
   Printed: median and min training time per variant, the slowdown of the medians, the median
   over repeats of the paired slowdown (variant / plain run of the same repeat - 1), and the
   CPU time spent inside the callback's snapshot hooks (timed around every call) as a share of
   its run's training CPU time: in total, and as median call x number of calls (robust to the
   preempted or interrupted call). A control variant with 10 no-op ``Callback()``s measures
   what Lightning charges for dispatching its hooks to any one callback (its paired CPU
   slowdown / 10). On a shared machine the run-to-run spread (printed) can exceed the targets,
   so the verdict adds the robust hook share and the per-callback dispatch cost; the end-to-end
   slowdowns are printed to check it. Targets: <= 3 % (every step), <= 1 % (every epoch).

2. Snapshot memory. An MLP of 5 x Linear(1000, 1000) (5,005,000 float32 parameters, one
   "model copy" = 20.0 MB) and a ``SnapshotStore(P, storage="disk")`` in a temporary directory;
   K snapshots are taken as the callback takes them (the parameters' flat views concatenated into
   one reused P-sized buffer, allocated at the first snapshot and counted, then ``append``), each
   after a simulated optimizer step (every parameter += 1e-3 x a slice of a white-noise buffer at
   a random offset; the buffer exists before the baseline), then, as the callback's fit-end run
   does, the snapshot buffer is dropped and ``trajectory_pca(store, parameters, 2)`` runs with the
   list of parameters as the final weights. One fresh subprocess per (storage, K), one torch
   thread (``--memory-threads``). Baseline: the resident set (RSS) once the model, the noise
   buffer and the empty store exist. The peak of each phase is the kernel's high-water mark
   (VmHWM, what ``ru_maxrss`` reports, reset through /proc/self/clear_refs when the phase
   starts), cross-checked by a psutil thread sampling RSS every 2 ms; both are given above the
   baseline, in MB and in model copies. The PCA peak is above the same baseline, so it includes
   what the append phase left resident. Target (disk): <= 3 model copies, independent of K.
   Memory storage is shown for comparison (about K copies). Diagnostic rows rerun disk storage
   with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, which turns off glibc's dynamic mmap
   threshold: a difference to the plain rows would be heap fragmentation by P-sized allocations
   (there was one before snapshots went through one reused buffer).

Needs psutil (the ``bench`` extra) and scikit-learn (the digits data); the memory part reads
/proc and is Linux (glibc) only. Takes about 4 minutes on 2 cores (2 for each part).
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

MB = 1e6
MEMORY_LAYERS, MEMORY_WIDTH = 5, 1000
TARGET_STEP, TARGET_EPOCH, TARGET_COPIES = 0.03, 0.01, 3.0
FIXED_MMAP_THRESHOLD = 2**20
NOOP_CALLBACKS = 10


# --------------------------------------------------------------------------------------------
# 1. training slowdown


def quiet_lightning() -> None:
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def train_once(variant: str, epochs: int, tmp: str) -> dict:
    """One fit of the digits example: training time (wall and CPU) and the per-call times of the snapshot hooks."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    from examples.digits import DigitsClassifier, DigitsDataModule
    from lightning_landscape import TrajectoryPCA

    class TrainTimer(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.start = {k: clock() for k, clock in CLOCKS.items()}

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = {k: clock() - self.start[k] for k, clock in CLOCKS.items()}

    timer = TrainTimer()
    callbacks: list = [timer]
    calls: dict[str, list[float]] = {k: [] for k in CLOCKS}
    trajectory = None
    if variant == "noop":  # control: Lightning's cost of dispatching every hook to a callback, x NOOP_CALLBACKS
        callbacks += [Callback() for _ in range(NOOP_CALLBACKS)]
    elif variant != "none":
        every = {"every_n_steps": 1} if variant == "step" else {"every_n_epochs": 1}
        # A 3x3 grid on one batch: the fit-end analysis is not timed, only kept short.
        trajectory = TrajectoryPCA(**every, resolution=3, num_batches=1, dirpath=tmp, progress=False)
        for hook in ("on_train_batch_end", "on_train_epoch_end"):
            original = getattr(trajectory, hook)

            def timed(*args, _original=original, **kwargs):
                w, c = time.perf_counter(), time.thread_time()
                try:
                    return _original(*args, **kwargs)
                finally:
                    calls["cpu"].append(time.thread_time() - c)
                    calls["wall"].append(time.perf_counter() - w)

            setattr(trajectory, hook, timed)
        callbacks.append(trajectory)

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
        default_root_dir=tmp,
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsDataModule())
    snapshots = 0 if trajectory is None or trajectory.pca is None else len(trajectory.pca.steps)
    return {"train": timer.seconds, "calls": calls, "steps": trainer.global_step, "points": snapshots}


def training_benchmark(repeats: int, epochs: int) -> dict[str, list[dict]]:
    quiet_lightning()
    variants = ["none", "step", "epoch", "noop"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:  # warm-up: imports, first-call allocations, data loading
            train_once(v, 1, tmp)
        for r in range(repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]  # no variant always runs first
            for v in order:
                runs[v].append(train_once(v, epochs, tmp))
    return runs


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
    views = [p.detach().view(-1) for p in params]
    buffer: list[torch.Tensor] = []

    def snapshot(store: SnapshotStore, step: int) -> None:  # what TrajectoryPCA._snapshot does
        if not buffer:  # the callback allocates it once, before the first snapshot
            buffer.append(torch.empty(num_params))
        store.append(torch.cat(views, out=buffer[0]), step=step, epoch=0)

    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"snapshot_dir": tmp} if storage == "disk" else {}
        store = SnapshotStore(num_params, storage=storage, **kwargs)
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

        buffer.clear()  # the callback drops its snapshot buffer at fit end, before the PCA
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
    # A plain 5-epoch run takes 0.3 s here, too short against run-to-run noise: 20 epochs, 21 repeats.
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--epochs", type=int, default=20)
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
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
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

    if not args.skip_training:
        t0 = time.perf_counter()
        runs = training_benchmark(args.repeats, args.epochs)
        steps = int(runs["none"][0]["steps"])
        print(
            f"\n## Training slowdown: digits CNN (16 channels), {args.epochs} epochs, {steps} optimizer steps, "
            f"{args.repeats} interleaved repeats ({time.perf_counter() - t0:.0f} s)\n"
        )
        print(
            "| variant | snapshots | wall: median (s) | wall: slowdown of medians | wall: median paired slowdown "
            "| CPU: median (s) | CPU: slowdown of medians | CPU: median paired slowdown "
            "| snapshot hooks, CPU share: total | snapshot hooks, CPU share: median call x calls | target | met (hooks) |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        base = {c: np.array([r["train"][c] for r in runs["none"]]) for c in CLOCKS}
        print(
            f"| no callback | 0 | {np.median(base['wall']):.3f} | - | - | {np.median(base['cpu']):.3f} | - | - | - | - | - | - |"
        )
        verdicts = {}
        for key, label, target in (
            ("step", "every_n_steps=1", TARGET_STEP),
            ("epoch", "every_n_epochs=1", TARGET_EPOCH),
            ("noop", f"control: {NOOP_CALLBACKS} no-op Callbacks", None),
        ):
            cells = []
            for clock in CLOCKS:
                t = np.array([r["train"][clock] for r in runs[key]])
                cells += [
                    f"{np.median(t):.3f}",
                    f"{100 * (np.median(t) / np.median(base[clock]) - 1):+.2f} %",
                    f"{100 * np.median(t / base[clock] - 1):+.2f} %",
                ]
            if target is None:
                print(f"| {label} | 0 | " + " | ".join(cells) + " | - | - | - | - |")
                continue
            total = float(np.median([sum(r["calls"]["cpu"]) / r["train"]["cpu"] for r in runs[key]]))
            robust = float(
                np.median(
                    [np.median(r["calls"]["cpu"]) * len(r["calls"]["cpu"]) / r["train"]["cpu"] for r in runs[key]]
                )
            )
            verdicts[label] = (robust, target)
            print(
                f"| TrajectoryPCA({label}) | {int(runs[key][0]['points'])} | "
                + " | ".join(cells)
                + f" | {100 * total:.2f} % | {100 * robust:.2f} % | <= {100 * target:.0f} % | {'yes' if robust <= target else 'no'} |"
            )
        noop = np.array([r["train"]["cpu"] for r in runs["noop"]])
        dispatch = float(np.median(noop / base["cpu"] - 1)) / NOOP_CALLBACKS
        print()
        for clock in CLOCKS:
            spread = float((np.percentile(base[clock], 75) - np.percentile(base[clock], 25)) / np.median(base[clock]))
            print(
                f"{clock} clock: spread of the plain runs (IQR / median) {100 * spread:.1f} %; per-run times (s): "
                + "; ".join(f"{k}: " + " ".join(f"{r['train'][clock]:.3f}" for r in v) for k, v in runs.items())
            )
        per_call = np.median([np.median(r["calls"]["cpu"]) for r in runs["step"]])
        per_step = np.median(base["cpu"]) / steps
        print(
            f"one snapshot (every_n_steps=1, median call, CPU): {1e6 * per_call:.0f} us; plain training CPU per optimizer "
            f"step (validation included): {1e6 * per_step:.0f} us"
        )
        print(
            f"Lightning's dispatch cost of any one callback (control, CPU paired / {NOOP_CALLBACKS}): {100 * dispatch:+.2f} %"
        )
        for label, (robust, target) in verdicts.items():
            est = robust + max(dispatch, 0.0)
            print(
                f"TrajectoryPCA({label}): snapshot hooks {100 * robust:.2f} % + dispatch {100 * max(dispatch, 0.0):.2f} % "
                f"= {100 * est:.2f} % of training, target <= {100 * target:.0f} %: {'MET' if est <= target else 'MISSED'}"
            )

    if not args.skip_memory:
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
