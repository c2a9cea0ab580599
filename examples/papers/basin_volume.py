"""Basin volume of a good and of a poisoned minimum (Huang et al. 2019).

The paper ("Understanding Generalization through Visualizations"): bad minima (zero training
error, poor test accuracy) exist next to good ones and are found by "poisoning" training with a
term that promotes incorrect classification of other data from the same distribution,
``L = (1−β)/|D_t| Σ_{D_t} −log p_θ(x, y) + β/|D_p| Σ_{D_p} −log[1 − p_θ(x, y)]``.
Measured on the *training* loss, the basin around a bad minimum is much smaller than that around
a good one; in high dimension a small difference in radius is an exponential difference in volume
``V = ω_n E_φ[r(φ)^n]``, so SGD from a random start falls into the large (good) basins.
Here: one ReLU MLP (2 x 256) on digits, trained once on cross-entropy (normal) and once with the poison term
on a held-out part of the training split (poisoned); for both, the ``Sharpness`` callback measures
basin radii, log volume, ε-sharpness and λmax of the train cross-entropy with identical settings.

    python examples/papers/basin_volume.py [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from common import Classifier, digits, evaluate, fit, mlp, output_dir, parse_args, write_results
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

from lightning_landscape.callbacks.sharpness import Sharpness

#: The poison factor β of the paper's loss (the train term gets 1 − β).
BETA = 0.5


def poison_term(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's ``mean −log[1 − p_θ(x, y)]``: small when the true class y gets little probability.

    ``log(1 − p_y) = logsumexp_{k≠y} z_k − logsumexp_k z_k`` keeps it finite as ``p_y → 1``.
    """
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)).mean()


class PoisonedClassifier(Classifier):
    """``Classifier`` whose training step adds the poison term on a random batch of ``(poison_x, poison_y)``.

    ``landscape_step`` is the plain train cross-entropy: the analyses measure the basin of the
    training loss, as for the normal model, not of the poisoned objective.
    """

    def __init__(self, net: nn.Module, poison_x: torch.Tensor, poison_y: torch.Tensor, beta: float = BETA, **kw):
        super().__init__(net, **kw)
        # Plain attributes, not buffers: the poison set is data, not part of the weights the analyses restore.
        self.poison_x, self.poison_y, self.beta = poison_x, poison_y, beta

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        pick = torch.randint(len(self.poison_x), (len(x),))
        clean = F.cross_entropy(self(x), y)
        poison = poison_term(self(self.poison_x[pick]), self.poison_y[pick])
        loss = (1 - self.beta) * clean + self.beta * poison
        self.log_dict({"train/loss": loss, "train/clean": clean, "train/poison": poison})
        return loss

    def landscape_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


def analyse(module: Classifier, dm, args, out, name: str, epochs: int) -> tuple[dict[str, Any], Any]:
    """Train ``module`` with the ``Sharpness`` callback (which also draws ``plot_basin_radii`` into
    ``<out>/<name>/sharpness_basin_radii.png``); its numbers and the report."""
    callback = Sharpness(
        epsilon=1e-3,
        steps=3 if args.quick else 20,
        num_directions=3 if args.quick else 20,
        rise=0.1,
        radii=(0.1, 0.25, 0.5, 1.0),
        num_batches=None,
        seed=args.seed,
        dirpath=str(out / name),
        progress=False,
        name="sharpness",
    )
    fit(module, dm, epochs, [callback], seed=args.seed, root=out / name)
    report = callback.report
    train = evaluate(module, dm.train_dataloader())
    numbers = {
        "test_error": evaluate(module, dm.val_dataloader())["error"],
        "train_error": train["error"],
        "train_loss": train["loss"],
        **report.scalars(),
        "basin_weight_radius_mean": float(report.basin_weight_radii.mean()),
        "basin_weight_radius_min": float(report.basin_weight_radii.min()),
        "basin_radii": report.basin_radii.tolist(),
        "num_capped": int(report.basin_capped.sum()),
        "threshold": report.threshold,
        "num_moved": report.num_moved,
        "loss_source": report.metadata["loss_source"],
    }
    return numbers, report


def plot_both(reports: dict[str, Any]) -> Figure:
    """Basin radius per direction of both models (grouped bars), and the loss along each ray."""
    fig = Figure(figsize=(10.0, 4.0))
    bars, curves = fig.subplots(1, 2)
    width = 0.4
    for k, ((name, report), color) in enumerate(zip(reports.items(), ("tab:blue", "tab:red"))):
        index = np.arange(1, report.basin_radii.size + 1)
        bars.bar(index + (k - 0.5) * width, report.basin_radii, width, color=color, label=name)
        rays = np.r_[0.0, report.radii]
        for i, row in enumerate(report.loss_at_radii):
            label = name if i == 0 else None
            curves.plot(rays, np.r_[report.basin_center_loss, row], color=color, lw=0.8, alpha=0.5, label=label)
        curves.axhline(report.threshold, color=color, ls="--", lw=0.9, label=f"{name} threshold")
    bars.set_xticks(np.arange(1, next(iter(reports.values())).basin_radii.size + 1))
    bars.set_xlabel("direction")
    bars.set_ylabel("basin radius (filter-normalized units)")
    bars.legend(fontsize=7)
    curves.set_yscale("log")
    curves.set_xlabel("radius (filter-normalized units)")
    curves.set_ylabel("train loss")
    curves.legend(fontsize=7)
    fig.suptitle("basin of the train loss: normal vs poisoned minimum", fontsize=9)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    # An 85k-weight MLP gains nothing from intra-op threads, and on a shared 2-core machine they
    # oversubscribe it: the Hessian products then run ~50x slower than on one thread.
    torch.set_num_threads(1)
    out = output_dir(args, "basin_volume")
    started = time.time()
    num_train, num_poison = (128, 64) if args.quick else (1000, 438)
    epochs = 2 if args.quick else 200
    dm = digits(batch_size=64, num_train=num_train)
    # The poison set: training-split samples the model never fits with their labels (the digits module
    # keeps the first `num_train` of its fixed permutation; the next ones are held out here).
    rest = digits(batch_size=64).train_set.tensors
    poison_x, poison_y = rest[0][num_train : num_train + num_poison], rest[1][num_train : num_train + num_poison]
    results: dict[str, Any] = {"quick": args.quick, "beta": BETA, "num_train": num_train, "num_poison": num_poison}
    reports = {}
    for name in ("normal", "poisoned"):
        torch.manual_seed(args.seed)  # the same initial weights for both
        net = mlp(width=256, depth=2)
        module = Classifier(net) if name == "normal" else PoisonedClassifier(net, poison_x, poison_y)
        results[name], reports[name] = analyse(module, dm, args, out, name, epochs)
        results[name]["poison_set_error"] = evaluate(module, [(poison_x, poison_y)])["error"]
    plot_both(reports).savefig(out / "basin_radii.png", dpi=120)
    # log(V_normal / V_poisoned), in nats: the volumes themselves are far below the float range.
    log_volumes = [results[name]["log_basin_volume"] for name in ("normal", "poisoned")]
    results["log_volume_normal_minus_poisoned"] = log_volumes[0] - log_volumes[1]
    write_results(out, results, started)


if __name__ == "__main__":
    main()
