"""Mode connectivity (Garipov et al. 2018, figures 1-2 and the curve tables).

The paper: two independently trained networks are separated by a high loss barrier on the straight
line between them, yet a simple curve (a quadratic Bezier curve or a two-segment polygonal chain,
one trainable bend, fitted by minimizing E_{t~U(0,1)} L(φ_θ(t))) joins them along which the train
loss stays about as low as at the end points and the test error about as low as theirs. Here: two
ReLU MLPs from different seeds on digits, saved as Lightning checkpoints, both curve types fitted
between the checkpoints, the train loss and test error (the digits validation split) along curve
and line, and the loss on the plane through w₁, the bend and w₂ (the paper's figure 1).

    python examples/papers/mode_connectivity.py [--quick]
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import Classifier, digits, evaluate, fit, mlp, output_dir, parse_args, write_results
from torch.nn import functional as F
from torch.utils.data import DataLoader

import lightning_landscape as ll


def train_end_points(dm, args, out, epochs: int) -> tuple[list, list[float]]:
    """Two runs from different seeds, saved with ``trainer.save_checkpoint``; their paths and test errors."""
    paths, errors = [], []
    for k in range(2):
        seed = args.seed + k
        torch.manual_seed(seed)  # the initialization differs between the runs, not only the batch order
        module = Classifier(mlp(64, 2), lr=0.05)
        trainer = fit(module, dm, epochs, seed=seed, root=out)
        path = out / f"end_point_{k + 1}.ckpt"
        trainer.save_checkpoint(path)
        paths.append(path)
        errors.append(evaluate(module, dm.val_dataloader())["error"])
    return paths, errors


def connect_pair(kind: str, paths, batches, train, test, args, out, epochs: int) -> dict[str, float]:
    """Fit one curve between the checkpoints on ``batches``; evaluate it on ``train`` and ``test``; figures, plane.

    ``ll.connect`` is ``fit_curve`` then ``evaluate_curve``, but returns only the result; the plane and
    the evaluation on the test split need the fitted ``Curve``, so the two steps are called here.
    """
    template = Classifier(mlp(64, 2))  # the architecture only: its own weights are never used
    options = {"loss_fn": F.cross_entropy, "metrics": ["accuracy"], "bn": "eval", "progress": False}
    # No BatchNorm in this MLP: bn="eval" (the model has no statistics to recompute).
    curve = ll.fit_curve(
        template, paths[0], paths[1], batches, loss_fn=F.cross_entropy, curve=kind, num_bends=1,
        epochs=epochs, lr=0.05, seed=args.seed, progress=False,
    )  # fmt: skip
    curve.save(out / f"{kind}_curve.pt")
    ts = 11 if args.quick else 61
    on_train = ll.evaluate_curve(template, curve, train, ts=ts, **options)
    on_test = ll.evaluate_curve(template, curve, test, ts=ts, **options)
    on_train.save(out / f"{kind}_train.npz")
    on_test.save(out / f"{kind}_test.npz")
    ll.plot_connection(on_train, title=f"train split: {kind} curve vs line").savefig(out / f"{kind}_train.png", dpi=120)
    ll.plot_connection(on_test, title=f"test split: {kind} curve vs line").savefig(out / f"{kind}_test.png", dpi=120)
    plane = ll.curve_plane(template, curve, train, resolution=5 if args.quick else 25, **options)
    plane.save(out / f"{kind}_plane.npz")
    ll.plot_curve_plane(plane, title=f"train loss on the plane of the {kind} curve").savefig(
        out / f"{kind}_plane.png", dpi=120
    )
    train_s, test_s = on_train.scalars(), on_test.scalars()
    return {
        "barrier_line": train_s["barrier_line"],
        "barrier_curve": train_s["barrier_curve"],
        "test_barrier_line": test_s["barrier_line"],
        "test_barrier_curve": test_s["barrier_curve"],
        "max_train_error_line": train_s["max_error_line"],
        "max_train_error_curve": train_s["max_error_curve"],
        "max_test_error_line": test_s["max_error_line"],
        "max_test_error_curve": test_s["max_error_curve"],
        "test_error_ends": [test_s["error_start"], test_s["error_end"]],
        "train_loss_ends": [train_s["loss_start"], train_s["loss_end"]],
        "fit_loss_last_epoch": train_s["fit_loss"],
        "bend_offset_from_line": float(plane.extras["points"][1, 1]),
        "distance_w1_w2": float(plane.extras["points"][2, 0]),
        "max_curve_offset_from_plane": float(np.max(plane.extras["curve_offset"])),
    }


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    out = output_dir(args, "mode_connectivity")
    started = time.time()
    dm = digits(batch_size=32, num_train=128 if args.quick else None)
    paths, end_errors = train_end_points(dm, args, out, epochs=2 if args.quick else 30)
    batches = list(dm.train_dataloader())  # the curve is fitted with the end points' batch size
    # Evaluated in batches of 512: the same values, a fraction of the per-batch overhead (~10x faster here).
    train, test = list(DataLoader(dm.train_set, batch_size=512)), list(dm.val_dataloader())
    results: dict = {"quick": args.quick, "end_point_test_errors": end_errors, "curves": {}}
    curve_epochs = 2 if args.quick else 40
    for kind in ("bezier", "polychain"):
        results["curves"][kind] = connect_pair(kind, paths, batches, train, test, args, out, curve_epochs)
    write_results(out, results, started)


if __name__ == "__main__":
    main()
