"""LossSurface under DDP: wall time of the same surface on 1 and 2 CPU processes, and the speedup.

    python benchmarks/distributed.py [--repeats 3] [--resolution 21]

The digits CNN (``DigitsClassifier()``, 16 channels) is fitted for one step, then a
``LossSurface(resolution=21, dims=2, num_batches=None)`` over all the training data (1,437
samples, batch 64) is timed around its fit-end analysis (data caching, directions, the grid;
not the figures and files, which rank zero makes once), on 1 process and on 2 processes
(``strategy="ddp"``, gloo), one torch thread per process, each variant in its own process
tree, interleaved, ``--repeats`` times; printed: median and min wall time per variant and
the speedup of the medians, for ``distribute="data"`` (each rank evaluates every grid point on
its shard; one all-reduce per point) and ``distribute="grid"`` (the shards gathered, each rank
evaluates every other point over all the data). Goal: speedup >= 1.8 on 2 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(devices: int, resolution: int, out: Path, distribute: str) -> None:
    import pytorch_lightning as pl
    import torch

    sys.path.insert(0, str(ROOT))
    from examples.digits import DigitsClassifier, DigitsDataModule
    from lightning_landscape import LossSurface

    torch.set_num_threads(1)

    class Timed(LossSurface):
        """Times the analysis without its figures and files (drawn once, on rank zero, whatever the ranks)."""

        def run(self, trainer, pl_module, suffix=""):
            self.publish_s = 0.0
            start = time.perf_counter()
            result = super().run(trainer, pl_module, suffix)
            if trainer.is_global_zero:
                total = time.perf_counter() - start
                out.write_text(json.dumps({"seconds": total - self.publish_s, "publish": self.publish_s}))
            return result

        def publish(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super().publish(*args, **kwargs)
            finally:
                self.publish_s += time.perf_counter() - start

    pl.seed_everything(0, verbose=False)
    surface = Timed(
        resolution=resolution, dims=2, num_batches=None, progress=False, interactive=False, distribute=distribute
    )
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[surface],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(out.parent),
    )
    trainer.fit(DigitsClassifier(), DigitsDataModule())


def measure(devices: int, distribute: str, resolution: int, tmp: Path) -> float:
    out = tmp / f"time-{devices}-{distribute}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", str(devices), "--resolution", str(resolution), "--out", str(out)]
    cmd += ["--distribute", distribute]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=1800)
    return json.loads(out.read_text())["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=21)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--distribute", default="data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.resolution, args.out, args.distribute)
        return
    import tempfile

    variants = [(1, "data"), (2, "data"), (2, "grid")]
    times: dict[tuple[int, str], list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for devices, distribute in variants[r % 3 :] + variants[: r % 3]:  # rotated every repeat
                times[devices, distribute].append(measure(devices, distribute, args.resolution, Path(tmp)))
                print(f"repeat {r}: {devices} process(es), {distribute}: {times[devices, distribute][-1]:.2f} s")
    med = {v: statistics.median(t) for v, t in times.items()}
    print(f"\nsurface {args.resolution}x{args.resolution}, all digits training data")
    for v in variants:
        speedup = med[variants[0]] / med[v]
        print(
            f"  {v[0]} process(es), split {v[1]}: median {med[v]:.2f} s, min {min(times[v]):.2f} s, speedup {speedup:.2f}x"
        )
    print("  goal: speedup >= 1.8 on 2 processes")


if __name__ == "__main__":
    main()
