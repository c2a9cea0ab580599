"""Small vs large batch, without and with weight decay (Keskar et al. 2017; Li et al. 2018, Fig. 3).

The papers: large-batch SGD lands in sharper minima (larger λmax and ε-sharpness, a narrower
1-D interpolation valley) that generalize worse; with filter-normalized directions the
sharpness follows the test error also with weight decay. Here: the digits CNN, batch 16 vs 512.

    python examples/papers/batch_size.py [--quick]
"""

from __future__ import annotations

import time

from common import Classifier, digits, evaluate, fit, output_dir, parse_args, write_results
from torch.nn import functional as F

from examples.digits import digits_cnn
from lightning_landscape import LossSurface, hessian_check
from lightning_landscape.plots.interpolation import plot_interpolation
from lightning_landscape.sharpness import sharpness
from lightning_landscape.surface.runs import interpolate_runs


def train(batch_size: int, weight_decay: float, args, out, epochs: int, resolution: int):
    """One run; returns the module, its data and its numbers."""
    name = f"batch{batch_size}_wd{weight_decay:g}"
    dm = digits(batch_size=batch_size, num_train=128 if args.quick else None)
    batches = 1 if args.quick else 8
    common = {"num_batches": batches, "dirpath": str(out / name), "interactive": False, "progress": False}
    curve = LossSurface(dims=1, resolution=2 * resolution + 1, span=1.0, name="curve", **common)
    surface = LossSurface(dims=2, resolution=resolution, span=1.0, name="surface", **common)
    # The large batch gets the linearly scaled learning rate, as Keskar et al. tune both.
    module = Classifier(
        digits_cnn(4 if args.quick else 16), lr=0.01 * max(1.0, batch_size / 128), weight_decay=weight_decay
    )
    fit(module, dm, epochs, [curve, surface], seed=args.seed, root=out / name)
    train_batches = list(dm.train_dataloader())[:batches]
    report = sharpness(
        module,
        train_batches,
        loss_fn=F.cross_entropy,
        epsilon=1e-3,
        steps=2 if args.quick else 20,
        num_directions=2 if args.quick else 10,
        hessian=False,  # λmax below; the trace (60 Hessian-vector products) is not quoted
        progress=False,
    )
    lambda_max = hessian_check(module, train_batches, F.cross_entropy, lambda_min=False).lambda_max
    report.save(out / name / "sharpness.npz")
    scalars = report.scalars()
    numbers = {
        "test_error": evaluate(module, dm.val_dataloader())["error"],
        "train_loss": evaluate(module, dm.train_dataloader())["loss"],
        "curve_loss_rise@0.5": curve.landscape.summary(radii=(0.5,))["loss_rise@0.5"],
        "surface_loss_rise@0.5": surface.landscape.summary(radii=(0.5,))["loss_rise@0.5"],
        "lambda_max": lambda_max,
        "eps_sharpness": scalars["eps_sharpness"],
        "log_basin_volume": scalars["log_basin_volume"],
    }
    return name, module, dm, numbers


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    out = output_dir(args, "batch_size")
    started = time.time()
    epochs = 1 if args.quick else 20
    resolution = 3 if args.quick else 21
    small, large = (32, 128) if args.quick else (16, 512)
    results: dict = {"runs": {}, "interpolation": {}, "quick": args.quick}
    for weight_decay in (0.0, 5e-4):
        name_s, module_s, dm_s, num_s = train(small, weight_decay, args, out, epochs, resolution)
        name_l, module_l, _, num_l = train(large, weight_decay, args, out, epochs, resolution)
        results["runs"][name_s], results["runs"][name_l] = num_s, num_l
        line = interpolate_runs(
            Classifier(digits_cnn(4 if args.quick else 16)),
            module_s.state_dict(),
            module_l.state_dict(),
            list(dm_s.train_dataloader())[: 1 if args.quick else 8],
            val_data=dm_s.val_dataloader(),
            loss_fn=lambda logits, y: F.cross_entropy(logits, y),
            metrics=["accuracy"],
            alphas=[-0.5 + k * 0.1 for k in range(21)] if not args.quick else [-0.5, 0.0, 0.5, 1.0, 1.5],
            bn="recompute",
            labels=(f"batch {small}", f"batch {large}"),
            progress=False,
        )
        key = f"wd{weight_decay:g}"
        line.save(out / f"interpolation_{key}.npz")
        plot_interpolation(line, title=f"batch {small} → batch {large}, weight decay {weight_decay:g}").savefig(
            out / f"interpolation_{key}.png", dpi=120
        )
        results["interpolation"][key] = {"max_train_loss": float(line.loss.max())}
    write_results(out, results, started)


if __name__ == "__main__":
    main()
