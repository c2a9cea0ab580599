"""Peak memory of ``hessian_check`` on a 5M-weight MLP, in model copies, one child process per run.

    python benchmarks/hessian_memory.py [--batch 64]      # the table alone; benchmarks/hessian.py prints it too

Method: each measurement runs in a fresh child process (``python benchmarks/hessian_memory.py
--child ...``), so no allocation of an earlier run is counted or reused. The child builds the
MLP (1000-2000-1500-10, tanh: 5,018,510 float32 weights, 20.1 MB = one model copy) and one batch
of random inputs, takes one plain gradient (as training would have; libraries' lazy state is then
allocated, and the gradient freed), collects garbage,
returns freed heap to the system (glibc ``malloc_trim(0)``), resets the kernel's peak-RSS mark
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads its RSS as the baseline; after
``hessian_check`` it reads the peak mark (``VmHWM`` in ``/proc/self/status``). Peak extra memory
= VmHWM - baseline, in model copies = that / (weights × 4 bytes). It counts everything the call
allocates: the Lanczos vectors, the products' autograd buffers, numpy/scipy work arrays. The
page cache holding a disk basis is the kernel's, not the process's, and is not counted (the file
is unnamed and goes away with the run); its size is printed beside. One more row repeats the
first with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): then every large
block returns to the system when freed, which separates what the call holds live from what the
allocator keeps. ``hessian_check`` guards the model read-only
(``preserved_state(read_only=True)``: the weights are checked on exit, not copied).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (1000, 2000, 1500, 10)
#: (label, hessian_check keyword arguments) of the rows measured.
RUNS = (
    ("λmax alone", {"top_k": 1, "lambda_min": False}),
    ("λmax and λmin (defaults)", {"top_k": 1, "lambda_min": True}),
    ("top-3 and λmin", {"top_k": 3, "lambda_min": True}),
)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(basis: str, kwargs: dict, batch: int, threads: int) -> dict:
    """One measurement in this (fresh) process: the peak extra RSS of one hessian_check call."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    sys.path.insert(0, str(ROOT))
    from lightning_landscape.hessian import hessian_check

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1]).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(batch, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (batch,), generator=g))]
    num_params = sum(p.numel() for p in model.parameters())
    # One gradient first, as a training run would have taken: libraries' lazy state is not the call's memory.
    torch.autograd.grad(F.cross_entropy(model(data[0][0]), data[0][1]), list(model.parameters()))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    report = hessian_check(model, data, F.cross_entropy, basis=basis, **kwargs)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    extra = (peak - baseline) * 1024
    copies = extra / (num_params * 4)
    steps = report.num_hvp
    return {
        "basis": report.metadata["basis"],
        "num_params": num_params,
        "hvp": report.num_hvp,
        "seconds": seconds,
        "extra_mb": extra / 1e6,
        "copies": copies,
        "file_mb": steps * num_params * 4 / 1e6 if basis == "disk" else 0.0,
        "lambda_max": report.lambda_max,
        "converged": report.metadata["converged"],
        "solver": report.metadata["eigensolver"],
    }


def measure(basis: str, kwargs: dict, batch: int = 64, threads: int = 2, extra_env: dict | None = None) -> dict:
    """Run :func:`child` in a fresh interpreter (with ``extra_env``) and return its figures."""
    args = [sys.executable, __file__, "--child", basis, json.dumps(kwargs), str(batch), str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(extra_env or {})}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(batch: int = 64, threads: int = 2, old_rows: int = 1) -> list[str]:
    """The markdown table: disk (new default) against the in-memory float64 basis (the old default)."""
    lines = [
        f"\n## hessian_check peak memory: MLP {'-'.join(map(str, WIDTHS))} (tanh), 5.0M float32 weights, "
        f"1 batch of {batch}, {threads} threads; peak extra RSS in model copies (1 copy = 20.1 MB)\n",
        "| run | basis | HVPs | peak extra MB | model copies | basis file MB | λmax | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # The last variant: glibc's mmap threshold fixed (not raised as blocks are freed), so every large
    # block goes back to the system at free: what the call holds live, without the allocator's keep.
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    for i, (label, kwargs) in enumerate(RUNS):
        variants = [("disk", None), ("memory", None), ("disk", fixed)] if i < old_rows else [("disk", None)]
        for basis, extra_env in variants:
            r = measure(basis, kwargs, batch, threads, extra_env)
            name = f"{basis} ({'new default' if basis == 'disk' else 'old default'})"
            name += ", MALLOC_MMAP_THRESHOLD_=131072" if extra_env else ""
            lines.append(
                f"| {label} | {name} | {r['hvp']} | {r['extra_mb']:.0f} | {r['copies']:.2f} | "
                f"{r['file_mb']:.0f} | {r['lambda_max']:.6g} | {r['seconds']:.1f} |"
            )
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        basis, kwargs, batch, threads = sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(child(basis, kwargs, batch, threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--old-rows", type=int, default=1, help="rows also measured with the old in-memory basis")
    args = parser.parse_args()
    print("\n".join(memory_table(args.batch, args.threads, args.old_rows)))


if __name__ == "__main__":
    main()
