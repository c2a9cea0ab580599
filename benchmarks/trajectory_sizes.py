"""Helpers of ``benchmarks/trajectory.py`` for real model sizes: the storage-dtype check of ``dtype="auto"``.

``dtype_check`` trains the digits CNN (``digits_cnn(channels)``) at several widths with plain SGD,
records every optimizer step's weights in float32, and computes the trajectory PCA of the same path
stored as float32, float16 and bfloat16: the change of the explained-variance ratios of PC1 and PC2
is what 16-bit storage costs the figure. ``SnapshotStore(dtype="auto")`` stores float16 from the
parameter count where that change stays below 1e-3.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Channels of ``digits_cnn`` and the parameter counts they give (trainable weights, BatchNorm included).
SIZES = {"5k": 16, "1M": 320, "10M": 1050}
EVR_TOLERANCE = 1e-3


def digits_path(channels: int, epochs: int, lr: float, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weights after every SGD step (momentum 0.9, batch 64) of ``digits_cnn(channels)``, as a K x P float32 tensor.

    Row 0 is the initial weights; the last row is the final weights. Also returns the final parameters.
    """
    from torch.nn import functional as F

    from examples.digits import digits_cnn, load_digits_tensors

    torch.manual_seed(seed)
    x, y = load_digits_tensors()
    model = digits_cnn(channels)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    steps_per_epoch = (len(x) + 63) // 64
    rows = torch.empty(epochs * steps_per_epoch + 1, sum(p.numel() for p in params))
    gen = torch.Generator().manual_seed(seed)

    def record(k: int) -> None:
        torch.cat([p.detach().reshape(-1) for p in params], out=rows[k])

    record(0)
    k = 1
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            record(k)
            k += 1
    return rows, params


def evr_by_dtype(rows: torch.Tensor, final: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """Explained-variance ratios of PC1, PC2 of the path ``rows`` stored in each storage dtype."""
    from lightning_landscape.trajectory import SnapshotStore, trajectory_pca

    out = {}
    for dtype in ("float32", "float16", "bfloat16"):
        store = SnapshotStore(rows.shape[1], dtype=dtype, storage="memory")
        for k, row in enumerate(rows[:-1]):  # the final weights come from the parameters, as in the callback
            store.append(row, step=k, epoch=0)
        out[dtype] = np.asarray(trajectory_pca(store, final, 2).explained_variance_ratio, dtype=np.float64)
        store.close()
    return out


def dtype_check(sizes: list[str], epochs: int, lrs: list[float]) -> list[dict]:
    """One row per (size, lr, sampling): |ΔEVR| of float16 and bfloat16 storage against float32."""
    results = []
    for size in sizes:
        for lr in lrs:
            t0 = time.perf_counter()
            rows, final = digits_path(SIZES[size], epochs, lr)
            steps_per_epoch = (rows.shape[0] - 1) // epochs
            for sampling, picked in (
                ("every step", rows),
                ("every epoch", rows[::steps_per_epoch]),
            ):
                evr = evr_by_dtype(picked, final)
                results.append(
                    {
                        "size": size,
                        "num_params": rows.shape[1],
                        "lr": lr,
                        "sampling": sampling,
                        "snapshots": picked.shape[0],
                        "evr32": evr["float32"].tolist(),
                        "d16": float(np.abs(evr["float16"] - evr["float32"]).max()),
                        "dbf16": float(np.abs(evr["bfloat16"] - evr["float32"]).max()),
                        "seconds": time.perf_counter() - t0,
                    }
                )
                print(results[-1], flush=True)
            del rows
    return results


def print_dtype_table(results: list[dict]) -> None:
    """The markdown table of :func:`dtype_check`."""
    print(
        "\n## Explained variance of PC1/PC2: 16-bit storage against float32 (the same path, max over PC1, PC2)\n"
    )
    print("| model | parameters | lr | snapshots | EVR (float32) | abs. change float16 | abs. change bfloat16 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        evr = ", ".join(f"{v:.4f}" for v in r["evr32"])
        print(
            f"| digits_cnn({SIZES[r['size']]}) | {r['num_params']:,} | {r['lr']} | {r['snapshots']} ({r['sampling']}) "
            f"| {evr} | {r['d16']:.1e} | {r['dbf16']:.1e} |"
        )
    worst16 = max(r["d16"] for r in results)
    worstbf = max(r["dbf16"] for r in results)
    print(
        f"\nworst change: float16 {worst16:.1e}, bfloat16 {worstbf:.1e} (tolerance {EVR_TOLERANCE:.0e}): "
        f"float16 {'within' if worst16 < EVR_TOLERANCE else 'OUTSIDE'}, "
        f"bfloat16 {'within' if worstbf < EVR_TOLERANCE else 'OUTSIDE'}"
    )
