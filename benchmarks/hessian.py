"""Hessian eigenvalues and trace: this package against PyHessian and the exact spectrum, in one run.

    python benchmarks/hessian.py [--channels 8] [--samples 1024] [--max-power-iters 1500] [--memory-batch 64]

Model and data: the digits CNN with BatchNorm of ``examples/digits.py`` (``--channels 8``:
1,986 weights, so the exact Hessian fits in memory), briefly trained with Adam, and the first
``--samples`` digits in batches of 256, in eval mode, float32.

Printed, side by side:
- the exact λmax, λmin and trace: the dense float64 Hessian, built batch by batch with plain
  batched double backward (``torch.autograd.grad(..., is_grads_batched=True)`` on the identity,
  no code shared with the package), and ``numpy.linalg.eigvalsh``;
- for this package (one Lanczos run for both ends on :class:`HessianOperator`) and PyHessian 0.1
  (power iteration, ``hessian(...).eigenvalues``): the Hessian-vector products (HVPs, full passes
  over the data) and wall time to reach 1e-3 relative accuracy for λmax and 1e-2 for λmin.
  Each method's own stopping rule is swept over its ``tol`` and the loosest tol that reaches the
  target is reported; "oracle" rows give the first HVP after which the estimate stays within the
  target (our Lanczos's Ritz values / PyHessian's power-iteration Rayleigh quotients), i.e. the
  algorithm's speed independent of any stopping rule;
- the trace estimates (ours Hutch++ and Hutchinson, PyHessian's Hutchinson with its default
  stopping rule) with their error against the exact trace;
- the cost of one HVP in gradient evaluations: median time of one HVP / median time of one
  gradient, over the same cached batches.

Then two more tables (helpers in ``benchmarks/hessian_seeds.py`` and
``benchmarks/hessian_memory.py``, whose docstrings give the methods):
- λmax over 8 seeds on the digits CNN and on a 64-24-10 tanh MLP (flattened digits, trained the
  same way; exact λmax from its dense Hessian too): HVPs of ``hessian_check`` at its defaults
  (λmax alone), with the old in-memory basis and the bounded-memory disk basis, against the
  HVPs PyHessian needs with its tol tightened until it returns λmax within 1e-3; medians;
- peak extra memory of ``hessian_check`` on a 5M-weight MLP in model copies (peak RSS of a fresh
  child process above its baseline), disk basis (new default at that size) and memory basis (old).

PyHessian has no λmin. Negating the loss does not give it to power iteration (which finds the
eigenvalue of largest magnitude, λmax here); what is done here is the standard shift: PyHessian's
own power iteration run on H - σI with σ = PyHessian's λmax estimate, by wrapping its
``dataloader_hv_product`` so it returns (H - σI)v; λmin = result + σ. The HVPs of that λmax
estimate are added to its λmin count. HVPs of PyHessian are counted by wrapping
``dataloader_hv_product`` (one call = one pass over all batches, the same unit as ours).
Needs the ``bench`` extra (``pip install pyhessian==0.1``; it needs only numpy and torch).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.digits import digits_cnn, load_digits_tensors  # noqa: E402
from lightning_landscape.hessian import (  # noqa: E402
    HessianOperator,
    hessian_check,
    lanczos_extremes,
    seed_streams,
    trace_estimate,
)
from lightning_landscape.surface import make_batch_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hessian_memory import memory_table  # noqa: E402
from hessian_seeds import digits_mlp, seed_table  # noqa: E402

TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6)
TARGET_MAX, TARGET_MIN = 1e-3, 1e-2


def trained_model(channels: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> torch.nn.Module:
    """A briefly trained CNN: curvature at a point a training run would visit, not at initialization."""
    torch.manual_seed(0)
    model = digits_cnn(channels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def exact_hessian(model: torch.nn.Module, batches, chunk: int = 128) -> np.ndarray:
    """Dense float64 Hessian of the sample-weighted mean loss, rows in chunks of ``chunk``.

    (curvlinops' HessianLinearOperator applied to the identity gives the same matrix but was much
    slower in a trial: 713 s on a busy machine, where this takes about 140 s on a quiet one.)
    """
    model = copy.deepcopy(model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    total = sum(len(yb) for _, yb in batches)
    eye = torch.eye(n, dtype=torch.float64)
    hess = torch.zeros(n, n, dtype=torch.float64)
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb.double()), yb) * (len(yb) / total)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for i in range(0, n, chunk):
            rows = torch.autograd.grad(
                flat, params, grad_outputs=eye[i : i + chunk], retain_graph=True, is_grads_batched=True
            )
            hess[i : i + chunk] += torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1)
    hess = hess.numpy()
    return (hess + hess.T) / 2


def interleaved_median_times(fns: dict, repeats: int = 21) -> dict[str, float]:
    """Median wall time of each function, the calls interleaved so that load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def gradient_fn(model, batches):
    """One gradient of the sample-weighted mean loss over the batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(yb) for _, yb in batches)

    def grad():
        for xb, yb in batches:
            torch.autograd.grad(F.cross_entropy(model(xb), yb) * (len(yb) / total), params)

    return grad


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- ours --------------------------------------------------------------------------------------


def ours_sweep(op: HessianOperator, lambda_min: bool, exact_max: float, exact_min: float, seed: int = 0) -> list[dict]:
    """hessian_check's eigensolver (one Lanczos run, both ends when ``lambda_min``) for each tol.

    Per tol: HVPs, seconds, and the relative errors of λmax and (``lambda_min``) λmin. The start
    vector is the one ``hessian_check(seed=seed)`` uses. Stops after the first tol <= 1e-3 whose
    run meets both targets.
    """
    rows = []
    for tol in TOLS:
        op.num_hvp = 0
        t = time.perf_counter()
        result = lanczos_extremes(op, 1, lambda_min, tol, seed_streams(seed)[0])
        row = {"tol": tol, "hvp": op.num_hvp, "s": time.perf_counter() - t, "max": float(result.top[0])}
        row["err_max"] = rel(row["max"], exact_max)
        row["err_min"] = rel(result.low, exact_min) if lambda_min else None
        rows.append(row)
        if tol <= 1e-3 and row["err_max"] <= TARGET_MAX and (not lambda_min or row["err_min"] <= TARGET_MIN):
            break
    return rows


def lanczos_oracle(
    op: HessianOperator, exact_max: float, exact_min: float, steps: int, seed: int = 0
) -> tuple[int | None, int | None]:
    """First Lanczos step after which the extreme Ritz values stay within the targets (our Lanczos, no stopping rule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tol=1e-15 is not meant to be reached
        result = lanczos_extremes(op, 1, True, 1e-15, seed_streams(seed)[0], maxiter=steps)
    tops, bottoms = [h[0] for h in result.history], [h[2] for h in result.history]
    return first_staying(tops, exact_max, TARGET_MAX), first_staying(bottoms, exact_min, TARGET_MIN)


# --- PyHessian ---------------------------------------------------------------------------------


class CountedPyHessian:
    """PyHessian's ``hessian`` object with its HVPs counted and optionally shifted by -σI."""

    def __init__(self, model, batches):
        from pyhessian import hessian

        self.comp = hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        self.original = self.comp.dataloader_hv_product
        self.shift = 0.0
        self.count = 0
        self.estimates: list[float] = []
        self.comp.dataloader_hv_product = self.hv_product  # instance attribute shadows the method

    def hv_product(self, v):
        self.count += 1
        eigenvalue, hv = self.original(v)
        if self.shift:
            hv = [h - self.shift * vi for h, vi in zip(hv, v)]
            eigenvalue = float(sum((h * vi).sum() for h, vi in zip(hv, v)))
        self.estimates.append(eigenvalue)
        return eigenvalue, hv

    def eigenvalue(self, tol: float, max_iter: int, seed: int = 0) -> tuple[float, int, float]:
        torch.manual_seed(seed)  # PyHessian draws its start vector from the global RNG
        self.count, self.estimates = 0, []
        t = time.perf_counter()
        values, _ = self.comp.eigenvalues(top_n=1, maxIter=max_iter, tol=tol)
        return float(values[0]) + self.shift, self.count, time.perf_counter() - t


def power_rule_stop(estimates: list[float], tol: float) -> tuple[int, float] | None:
    """Where PyHessian's stopping rule stops on a recorded sequence: (HVPs, returned value).

    Its loop breaks at the first i with |e_i - e_{i-1}| / (|e_{i-1}| + 1e-6) < tol and returns e_{i-1}.
    """
    for i in range(1, len(estimates)):
        if abs(estimates[i] - estimates[i - 1]) / (abs(estimates[i - 1]) + 1e-6) < tol:
            return i + 1, estimates[i - 1]
    return None


def first_staying(values: list[float], exact: float, target: float) -> int | None:
    ok = [rel(x, exact) <= target for x in values]
    for i in range(len(ok)):
        if all(ok[i:]):
            return i + 1
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--max-power-iters", type=int, default=1500)
    parser.add_argument("--memory-batch", type=int, default=64, help="samples of the 5M-MLP memory run (0: skip)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's backward(create_graph=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    x, y = load_digits_tensors()
    x, y = x[: args.samples], y[: args.samples]
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    model = trained_model(args.channels, x, y)
    num_params = sum(p.numel() for p in model.parameters())
    load_start = os.getloadavg()[0]

    t = time.perf_counter()
    hess = exact_hessian(model, batches)
    spectrum = np.linalg.eigvalsh(hess)
    exact_seconds = time.perf_counter() - t
    lmax, lmin, trace = float(spectrum[-1]), float(spectrum[0]), float(np.trace(hess))

    # Ours, float32, the model as is.
    op = HessianOperator(model, batches, make_batch_loss(F.cross_entropy))
    ours_max = ours_sweep(op, False, lmax, lmin)
    ours_both = ours_sweep(op, True, lmax, lmin)
    oracle_max, oracle_min = lanczos_oracle(op, lmax, lmin, steps=200)
    full = hessian_check(model, batches, F.cross_entropy, top_k=1, lambda_min=True, tol=1e-3)
    ours_traces = {}
    for method in ("hutch++", "hutchinson"):
        op.num_hvp = 0
        t = time.perf_counter()
        value, stderr = trace_estimate(op, 60, method, np.random.default_rng(0))
        ours_traces[method] = (value, stderr, op.num_hvp, time.perf_counter() - t)

    # PyHessian, on its own copy (it leaves graphs in .grad).
    ph_model = copy.deepcopy(model)
    ph = CountedPyHessian(ph_model, batches)
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    v_list = [torch.randn_like(p) for p in ph.comp.params]
    costs = interleaved_median_times(
        {
            "ours": lambda: op.matvec(v),
            "pyhessian": lambda: ph.original(v_list),
            "gradient": gradient_fn(model, batches),
        }
    )
    ours_hvp, ph_hvp, grad_s = costs["ours"], costs["pyhessian"], costs["gradient"]
    op_check = float(np.linalg.norm(op @ v - hess @ v) / np.linalg.norm(hess @ v))
    ph_max = []
    for tol in TOLS:
        value, count, seconds = ph.eigenvalue(tol, args.max_power_iters)
        ph_max.append({"tol": tol, "hvp": count, "s": seconds, "value": value, "err": rel(value, lmax)})
        if ph_max[-1]["err"] <= TARGET_MAX and tol <= 1e-3:
            break
    sigma_row = ph_max[-1]
    ph.eigenvalue(0.0, 200)  # tol=0 never stops early: the whole power-iteration sequence, for the oracle
    ph_oracle_max = first_staying(ph.estimates, lmax, TARGET_MAX)
    ph.shift = sigma_row["value"]
    # One long shifted run (tol=0 never stops early) records the sequence; PyHessian's rule is then
    # applied to it for every tol (the sequence does not depend on tol), timed at the run's rate.
    _, count, seconds = ph.eigenvalue(0.0, args.max_power_iters)
    shifted = [e + ph.shift for e in ph.estimates]
    per_hvp = seconds / count
    ph_min = []
    for tol in TOLS:
        stop = power_rule_stop(ph.estimates, tol)
        if stop is None:
            ph_min.append({"tol": tol, "hvp": None})
            continue
        hvps, value = stop
        value += ph.shift
        ph_min.append(
            {
                "tol": tol,
                "hvp": hvps + sigma_row["hvp"],
                "s": (hvps * per_hvp) + sigma_row["s"],
                "value": value,
                "err": rel(value, lmin),
            }
        )
    ph_oracle_min = first_staying(shifted, lmin, TARGET_MIN)
    ph.shift = 0.0
    torch.manual_seed(0)
    ph.count = 0
    t = time.perf_counter()
    samples = ph.comp.trace()  # defaults: maxIter=100, tol=1e-3
    ph_trace = (
        float(np.mean(samples)),
        float(np.std(samples, ddof=1) / np.sqrt(len(samples))),
        ph.count,
        time.perf_counter() - t,
    )
    x_flat = x.reshape(len(x), -1)
    mlp = digits_mlp(x_flat, y)
    mlp_batches = [(x_flat[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)]
    mlp_lmax = float(np.linalg.eigvalsh(exact_hessian(mlp, mlp_batches))[-1])
    seeds = seed_table(
        {"digits CNN": (model, batches, lmax), "64-24-10 tanh MLP": (mlp, mlp_batches, mlp_lmax)},
        TOLS,
        power_rule_stop,
        lambda m, b: CountedPyHessian(copy.deepcopy(m), b),
    )
    memory = memory_table(args.memory_batch) if args.memory_batch else []
    load_end = os.getloadavg()[0]

    def reached(rows, key, target):
        good = [r for r in rows if r.get("hvp") is not None and r[key] <= target]
        return good[0] if good else None

    def at_tol(rows, tol):
        return next((r for r in rows if r["tol"] == tol and r.get("hvp") is not None), None)

    def cells(r, key, show_tol=False, note=""):
        """HVPs | rel. error | wall s of one run, or 'not reached'."""
        if r is None:
            return f"not reached{note} | – | –"
        tol = f" (tol={r['tol']:g})" if show_tol else ""
        return f"{r['hvp']}{tol}{note} | {r[key]:.1e} | {r['s']:.2f}"

    ph_count_note = f" (≤ {args.max_power_iters} iters)"
    print(
        f"\n## Hessian benchmark: digits CNN ({args.channels} channels, BatchNorm), {num_params} weights, {len(x)} samples in batches of 256, float32, eval mode"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); load average {load_start:.1f} at start, {load_end:.1f} at end"
    )
    print(
        f"\nexact (dense float64 Hessian + eigvalsh, {exact_seconds:.1f} s): "
        f"λmax = {lmax:.6g}, λmin = {lmin:.6g}, |λmin/λmax| = {abs(lmin / lmax):.4g}, trace = {trace:.6g}; "
        f"our float32 operator: ‖Hv − op(v)‖/‖Hv‖ = {op_check:.1e}\n"
    )
    print(
        "ours: one Lanczos run (full reorthogonalization, residual test at every step) for both ends, as in "
        "`hessian_check(seed=0)`; PyHessian: power iteration, λmin by power iteration on H − σI with σ its λmax "
        "(HVPs of the σ run included). Targets: 1e-3 relative for λmax, 1e-2 for λmin.\n"
    )
    print(
        "| quantity | stopping | ours: HVPs | ours: rel. error | ours: wall s | PyHessian: HVPs | PyHessian: rel. error | PyHessian: wall s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| λmax | default tol=1e-3 | {cells(at_tol(ours_max, 1e-3), 'err_max')} | {cells(at_tol(ph_max, 1e-3), 'err')} |"
    )
    print(
        f"| λmax | to 1e-3: loosest tol that gets there | {cells(reached(ours_max, 'err_max', TARGET_MAX), 'err_max', True)} | "
        f"{cells(reached(ph_max, 'err', TARGET_MAX), 'err', True)} |"
    )
    print(
        f"| λmax | to 1e-3: oracle (first HVP after which it stays within) | {oracle_max} | – | – | {ph_oracle_max} | – | – |"
    )
    print(
        f"| λmin | default tol=1e-3 (ours: the same run gives λmax) | {cells(at_tol(ours_both, 1e-3), 'err_min')} | "
        f"{cells(at_tol(ph_min, 1e-3), 'err')} |"
    )
    print(
        f"| λmin | to 1e-2: loosest tol that gets there | {cells(reached(ours_both, 'err_min', TARGET_MIN), 'err_min', True)} | "
        f"{cells(reached(ph_min, 'err', TARGET_MIN), 'err', True, ph_count_note)} |"
    )
    ph_oracle_min_text = f"not within {count}" if ph_oracle_min is None else str(ph_oracle_min)
    print(
        f"| λmin | to 1e-2: oracle | {oracle_min} | – | – | {ph_oracle_min_text} (+{sigma_row['hvp']} for σ) | – | – |"
    )
    print(
        f"| λmax, λmin | `hessian_check(top_k=1, lambda_min=True)` end to end, tol=1e-3 | {full.num_hvp} | "
        f"{rel(full.lambda_max, lmax):.1e}, {rel(full.lambda_min, lmin):.1e} | {full.seconds:.2f} | – | – | – |"
    )
    print("\n| method | trace ± s.e. | HVPs | wall s | error / exact | error / s.e. |")
    print("|---|---|---|---|---|---|")
    for name, (value, stderr, count_, seconds_) in (
        ("ours: Hutch++ (60)", ours_traces["hutch++"]),
        ("ours: Hutchinson (60)", ours_traces["hutchinson"]),
        ("PyHessian: Hutchinson (maxIter=100, tol=1e-3)", ph_trace),
    ):
        print(
            f"| {name} | {value:.5g} ± {stderr:.2g} | {count_} | {seconds_:.2f} | {rel(value, trace):.1e} | {abs(value - trace) / stderr:.1f} |"
        )
    print("\n| cost of one HVP | HVP ms | gradient ms | HVP / gradient |")
    print("|---|---|---|---|")
    print(f"| ours (double backward) | {ours_hvp * 1e3:.1f} | {grad_s * 1e3:.1f} | {ours_hvp / grad_s:.2f} |")
    print(
        f"| PyHessian (backward(create_graph) + grad) | {ph_hvp * 1e3:.1f} | {grad_s * 1e3:.1f} | {ph_hvp / grad_s:.2f} |"
    )
    print(f"\nexact λmax of the MLP (dense float64 Hessian): {mlp_lmax:.6g}")
    print("\n".join(seeds + memory))


if __name__ == "__main__":
    main()
