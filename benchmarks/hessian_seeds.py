"""λmax over 8 seeds: HVPs of ``hessian_check`` at its defaults against PyHessian tightened to the same accuracy.

Used by ``benchmarks/hessian.py`` (which builds the models and the exact spectra). Per seed:

- ours: ``hessian_check(model, batches, F.cross_entropy, lambda_min=False, seed=seed)``, every
  other argument at its default (``tol=1e-3``), once with ``basis="memory"`` (the old default,
  a float64 basis in RAM) and once with ``basis="disk"`` (the bounded-memory core, the default
  beyond 168k weights); the HVPs it used and the relative error of its λmax against the exact one;
- PyHessian 0.1: ``torch.manual_seed(seed)`` (its start vector comes from the global RNG), one
  power-iteration run with ``tol=0`` (never stops early) records the Rayleigh quotients; PyHessian's
  own stopping rule (stop at the first i with |e_i − e_{i−1}| / (|e_{i−1}| + 1e-6) < tol, return
  e_{i−1}, i + 1 HVPs) is then applied for tol = 1e-1, 3e-2, …, 1e-6 and the loosest tol whose
  returned value is within 1e-3 of the exact λmax is reported, with its HVPs. The sequence does
  not depend on tol, so this equals running PyHessian at that tol.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from lightning_landscape.hessian import hessian_check

TARGET = 1e-3
SEEDS = tuple(range(8))


def ours(model, batches, lmax: float, seed: int, basis: str) -> tuple[int, float]:
    """HVPs and relative error of hessian_check's λmax at its defaults (λmax alone)."""
    report = hessian_check(model, batches, F.cross_entropy, lambda_min=False, seed=seed, basis=basis)
    return report.num_hvp, abs(report.lambda_max - lmax) / abs(lmax)


def pyhessian_to_target(ph, lmax: float, seed: int, tols, rule, max_iter: int) -> tuple[int | None, float | None]:
    """HVPs PyHessian needs to return λmax within TARGET (its loosest tol that gets there), and that tol."""
    ph.eigenvalue(0.0, max_iter, seed=seed)
    for tol in tols:
        stop = rule(ph.estimates, tol)
        if stop is not None and abs(stop[1] - lmax) / abs(lmax) <= TARGET:
            return stop[0], tol
    return None, None


def seed_table(models: dict, tols, rule, pyhessian_factory, max_iter: int = 400) -> list[str]:
    """Markdown: per model, HVPs per seed (ours old/new, PyHessian) and the medians.

    ``models``: name -> (model, batches, exact λmax); ``pyhessian_factory(model, batches)`` gives a
    counted PyHessian object (``benchmarks/hessian.py``'s ``CountedPyHessian``).
    """
    lines = [
        "\n## λmax to 1e-3 over 8 seeds: ours at its defaults (tol=1e-3, lambda_min=False) vs PyHessian tightened\n",
        "| model | weights | seed | ours memory: HVPs (rel. error) | ours disk: HVPs (rel. error) | PyHessian: HVPs (tol) |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for name, (model, batches, lmax) in models.items():
        num_params = sum(p.numel() for p in model.parameters())
        ph = pyhessian_factory(model, batches)
        old, new, theirs = [], [], []
        for seed in SEEDS:
            (h_old, e_old), (h_new, e_new) = (
                ours(model, batches, lmax, seed, "memory"),
                ours(model, batches, lmax, seed, "disk"),
            )
            h_ph, tol = pyhessian_to_target(ph, lmax, seed, tols, rule, max_iter)
            old.append(h_old), new.append(h_new), theirs.append(np.inf if h_ph is None else h_ph)
            ph_text = f"not within {max_iter}" if h_ph is None else f"{h_ph} (tol={tol:g})"
            lines.append(
                f"| {name} | {num_params} | {seed} | {h_old} ({e_old:.1e}) | {h_new} ({e_new:.1e}) | {ph_text} |"
            )
        summary.append(
            f"| {name} | {float(np.median(old)):g} | {float(np.median(new)):g} | {float(np.median(theirs)):g} | "
            f"{'met' if np.median(new) <= np.median(theirs) else 'NOT met'} |"
        )
    lines += ["\n| model | median HVPs, ours memory (old) | ours disk (new) | PyHessian | ours <= PyHessian |"]
    lines += ["|---|---|---|---|---|", *summary]
    return lines


def digits_mlp(x: torch.Tensor, y: torch.Tensor, epochs: int = 15) -> torch.nn.Module:
    """The 64-24-10 tanh MLP on the flattened digits, trained as the CNN is (Adam 3e-3, batches of 64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
