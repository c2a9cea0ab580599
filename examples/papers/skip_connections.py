"""Depth with and without skip connections, and width (Li et al. 2018, Figs. 5-7 and the wide-vs-thin panels).

The paper: without skip connections the landscape of deep nets turns chaotic (sharp, non-convex,
large |λmin/λmax|) and test error rises; with them it stays smooth and nearly convex at every depth;
wider nets have flatter, more convex minima. Here: small ResNets and their plain twins on digits.

    python examples/papers/skip_connections.py [--quick]
"""

from __future__ import annotations

import time

import numpy as np
from common import Classifier, digits, evaluate, fit, output_dir, parse_args, resnet, write_results

from lightning_landscape import HessianSpectrum, LossSurface


def analyse(net, dm, args, out, name: str, epochs: int, resolution: int) -> dict[str, float]:
    """Train ``net``; its surface, |λmin/λmax| map, λmax and test error."""
    surface = LossSurface(
        resolution=resolution,
        span=1.0,
        num_batches=1 if args.quick else 4,
        ratio_map=True,
        ratio_resolution=2 if args.quick else 3,
        dirpath=str(out / name),
        interactive=False,
        progress=False,
        name="surface",
    )
    hessian = HessianSpectrum(
        top_k=1, trace=False, density=False, num_batches=1 if args.quick else 4, dirpath=str(out / name)
    )
    module = Classifier(net, lr=0.05)
    fit(module, dm, epochs, [surface, hessian], seed=args.seed, root=out / name)
    ratios = surface.ratio_landscape.loss
    test = evaluate(module, dm.val_dataloader())
    summary = surface.landscape.summary(radii=(0.5, 1.0))
    return {
        "test_error": test["error"],
        "train_loss": summary["center_loss"],
        "loss_rise@0.5": summary["loss_rise@0.5"],
        "loss_rise@1": summary["loss_rise@1"],
        "lambda_max": hessian.report.lambda_max,
        "ratio_at_minimum": float(hessian.report.ratio),
        "ratio_map_mean": float(np.nanmean(ratios)),
    }


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    out = output_dir(args, "skip_connections")
    started = time.time()
    depths = (1,) if args.quick else (1, 4, 8)
    epochs = 1 if args.quick else 15
    resolution = 3 if args.quick else 21
    dm = digits(batch_size=64, num_train=64 if args.quick else None)
    results: dict[str, dict[str, float]] = {}
    for depth in depths:
        for skip in (True, False):
            name = f"{'resnet' if skip else 'plain'}{depth}"
            results[name] = analyse(resnet(depth, skip), dm, args, out, name, epochs, resolution)
    for width in (4,) if args.quick else (4, 32):
        name = f"resnet{depths[-1]}_width{width}"
        results[name] = analyse(resnet(depths[-1], True, width), dm, args, out, name, epochs, resolution)
    write_results(out, {"models": results, "quick": args.quick, "depths": list(depths)}, started)


if __name__ == "__main__":
    main()
