"""SGD vs stochastic weight averaging (Izmailov et al. 2018, figures 4 and 5 and the error tables).

The paper: averaging the SGD iterates of a constant (or cyclical) learning-rate phase finds a
wider optimum than SGD and generalizes better. On the line through θ_SGD and θ_SWA the train loss
is flat around SWA while SGD sits near the edge of that flat region, and the test error is lower
at SWA (figure 5); along random directions the loss rises more slowly around SWA (figure 4);
SWA's test error is below SGD's for the same budget (tables 1-2). SWA needs the BatchNorm
statistics recomputed for the averaged weights. Here: a ReLU MLP with BatchNorm on digits,
Lightning's ``StochasticWeightAveraging`` over the second half of training at a constant
learning rate, and the package's ``SWAComparison`` at fit end. "SGD" is the last SGD iterate of
the same run (the weights SWA's average is compared with), not a separately tuned SGD run with a
decaying schedule as in the paper's tables; the test set is the digits validation split.

    python examples/papers/swa.py [--quick]
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from common import Classifier, digits, evaluate, mlp, output_dir, parse_args, write_results
from pytorch_lightning.callbacks import StochasticWeightAveraging
from torch.nn import functional as F

from lightning_landscape import SWAComparison


class ValClassifier(Classifier):
    """``Classifier`` with a validation step: SWAComparison reads the val loader of the fit."""

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/error", (logits.argmax(1) != y).float().mean())


def fit_with_val(module: pl.LightningModule, dm, epochs: int, callbacks, seed: int, root) -> pl.Trainer:
    """As ``common.fit``, but the datamodule's val loader goes to ``fit`` too (``common.fit`` passes only
    the train loader, and SWAComparison needs val data for the test error)."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    return trainer


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], argv)
    out = output_dir(args, "swa")
    started = time.time()
    epochs = 2 if args.quick else 40
    dm = digits(batch_size=32, num_train=64 if args.quick else None)
    # Averaging over the second half at a constant learning rate (swa_lrs), reached after a short
    # anneal; SGD runs at the higher lr before it, as the paper's SWA schedule.
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=0.5, annealing_epochs=1 if args.quick else 2)
    compare = SWAComparison(
        extend=0.5,
        resolution=5 if args.quick else 21,
        num_directions=1 if args.quick else 5,
        span=1.0,
        direction_resolution=5 if args.quick else 21,
        rise=0.1,
        num_batches=None,  # every train and val batch: the whole split at each point
        dirpath=str(out),
        progress=False,
        name="swa",
    )
    torch.manual_seed(args.seed)
    # An MLP rather than common.resnet: every analysis point is a BatchNorm pass plus two evaluations
    # over the splits; with common.resnet(2, True) the full run took 16 min on 2 shared cores.
    module = ValClassifier(mlp(64, 2, batchnorm=True), lr=0.1, weight_decay=5e-4)
    fit_with_val(module, dm, epochs, [swa, compare], seed=args.seed, root=out)
    scalars = compare.scalars
    # Independent of the callback: the module now holds SWA's average with Lightning's recomputed
    # BatchNorm statistics; common.evaluate on the val split should give the callback's swa_val_error.
    swa_direct = evaluate(module, dm.val_dataloader())
    results = {
        "quick": args.quick,
        "epochs": epochs,
        "swa_start_epoch": swa.swa_start,
        "sgd_epoch": compare.sgd_epoch,
        "test_error": {"sgd": scalars["sgd_val_error"], "swa": scalars["swa_val_error"]},
        "test_loss": {"sgd": scalars["sgd_val_loss"], "swa": scalars["swa_val_loss"]},
        "train_loss": {"sgd": scalars["sgd_train_loss"], "swa": scalars["swa_train_loss"]},
        "width": {"sgd": scalars["sgd_width"], "swa": scalars["swa_width"]},
        "width_censored": {"sgd": scalars["sgd_width_censored"], "swa": scalars["swa_width_censored"]},
        "loss_rise_at_span": {"sgd": scalars["sgd_loss_rise"], "swa": scalars["swa_loss_rise"]},
        "distance_sgd_swa": scalars["distance"],
        "swa_test_error_common_evaluate": swa_direct["error"],
        "files": {k: str(v) for k, v in compare.files.items()},
    }
    write_results(out, results, started)


if __name__ == "__main__":
    main()
