"""A 2-process CPU (gloo) fit of the digits CNN with all three landscape callbacks, for tests/test_ddp.py.

    python tests/scripts/ddp_fit.py OUT --strategy ddp|ddp_spawn|ddp_fork [--fail-rank 1] [--on-error raise|warn]

Writes, from the main process after ``fit()``: OUT/result.json (the callbacks' numbers), OUT/final.pt
(the final weights) and OUT/path.pt (the weights after every optimizer step, recorded independently
on global rank zero), so the test can recompute everything on one process.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from examples.digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from lightning_landscape import HessianSpectrum, LossSurface, TrajectoryPCA  # noqa: E402
from tests.helpers import StoppingLoss  # noqa: E402

NUM_TRAIN = 193  # odd: DistributedSampler pads rank 1's shard with one sample of rank 0's


class PathRecorder(pl.Callback):
    """The weights after every optimizer step (and at the start), on global rank zero: an independent record."""

    def __init__(self) -> None:
        self.path: list[torch.Tensor] = []

    def _take(self, pl_module: pl.LightningModule) -> None:
        flat = torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()])
        self.path.append(flat)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self._take(pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            out = Path(os.environ["DDP_TEST_OUT"])
            torch.save(torch.stack(self.path), out / "path.pt")
            torch.save({k: v.cpu() for k, v in pl_module.state_dict().items()}, out / "final.pt")


class FailingClassifier(DigitsClassifier):
    """Raises inside the analysis (eval mode, outside validation) on one rank only."""

    def __init__(self, fail_rank: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_rank = fail_rank

    def training_step(self, batch, batch_idx):
        at_fit_end = self.trainer.global_step > 0 and not self.trainer.validating
        if not self.training and at_fit_end and self.global_rank == self.fail_rank:
            raise ValueError(f"boom on rank {self.global_rank}")
        return super().training_step(batch, batch_idx)


def resume_check(out: Path, strategy: str) -> None:
    """A surface interrupted on every rank at its 11th point, then run again: only the missing points
    are evaluated, on every rank, and the result equals the uninterrupted one bit for bit."""
    loss_fn = StoppingLoss(KeyboardInterrupt)
    surface = LossSurface(resolution=5, num_batches=2, loss_fn=loss_fn, dirpath=str(out / "surface"), progress=False)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[surface],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = DigitsClassifier(channels=4)
    trainer.fit(model, DigitsDataModule(batch_size=32, num_train=NUM_TRAIN, seed=0))
    full = surface.landscape.loss.copy()
    file = out / "surface" / "loss_surface.npz"
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        file.unlink()
    trainer.strategy.barrier()
    loss_fn.restart(stop_at=2 * 10 + 1)
    try:
        surface.run(trainer, model)
    except KeyboardInterrupt:
        pass
    trainer.strategy.barrier()
    from lightning_landscape import Landscape

    partial = int(Landscape.load(file).evaluated.sum())
    loss_fn.restart(stop_at=None)
    surface.run(trainer, model)
    calls = trainer.strategy.reduce(torch.tensor([float(loss_fn.calls)]), reduce_op="sum").item()
    if trainer.is_global_zero:
        result = {"partial": partial, "calls_both_ranks": calls, "equal": bool((surface.landscape.loss == full).all())}
        (out / "resume.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--on-error", default="raise")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--distribute", default="data")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["DDP_TEST_OUT"] = str(out)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    if args.resume:
        resume_check(out, args.strategy)
        return
    if args.fail_rank is None:
        model = DigitsClassifier(channels=4)
    else:
        model = FailingClassifier(args.fail_rank, channels=4)
    datamodule = DigitsDataModule(batch_size=32, num_train=NUM_TRAIN, seed=0, shuffle=True)
    on_error = args.on_error
    surface = LossSurface(
        resolution=5, dims=2, num_batches=None, metrics=["accuracy"], on_error=on_error, distribute=args.distribute
    )
    trajectory = TrajectoryPCA(every_n_steps=1, resolution=4, num_batches=None, on_error=on_error)
    hessian = HessianSpectrum(num_batches=None, density=False, on_error=on_error)
    logger = pl.loggers.WandbLogger(save_dir=str(out), offline=True, project="ddp-test")
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy=args.strategy,
        callbacks=[surface, trajectory, hessian, PathRecorder()],
        logger=logger,
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule)
    if not trainer.is_global_zero:
        return
    result = {
        "world_size": trainer.world_size,
        "surface": None if surface.landscape is None else surface.landscape.loss.tolist(),
        "surface_accuracy": None if surface.landscape is None else surface.landscape.values["accuracy"].tolist(),
        "num_samples": None if surface.landscape is None else surface.landscape.metadata["num_samples"],
        "evr": None if trajectory.pca is None else trajectory.pca.explained_variance_ratio.tolist(),
        "pca_path": None if trajectory.pca is None else trajectory.pca.path.tolist(),
        "trajectory_center": None if trajectory.landscape is None else trajectory.landscape.metadata["center_loss"],
        "lambda_max": None if hessian.report is None else hessian.report.lambda_max,
        "lambda_min": None if hessian.report is None else hessian.report.lambda_min,
        "trace": None if hessian.report is None else hessian.report.trace,
        "files": {
            name: {k: str(p) for k, p in cb.files.items()}
            for name, cb in [("surface", surface), ("trajectory", trajectory), ("hessian", hessian)]
        },
    }
    (out / "result.json").write_text(json.dumps(result))


def _close_process_group() -> None:
    # A process group left to the interpreter's teardown can abort it ("terminate called without
    # an active exception") after all the work is done; close it as torch's docs ask.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# At module level: ddp_spawn's children import this file without running __main__, and close theirs too.
atexit.register(_close_process_group)

if __name__ == "__main__":
    main()
