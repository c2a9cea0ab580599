"""Train the digits CNN with LightningCLI and look at its loss landscape.

    python examples/train.py fit --config examples/configs/digits.yaml

W&B runs offline by default (no account, no network); the script prints where the
figures and the offline run are, and the `wandb sync` command to upload them.
Any callback of lightning_landscape can be added from the command line, e.g.

    python examples/train.py fit --trainer.max_epochs=2 \
        --trainer.callbacks+=lightning_landscape.LossSurface --trainer.callbacks.resolution=11
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Lightning's own use of a torch API that torch deprecated: nothing a user of the example can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402


def report(cli: LightningCLI) -> None:
    """Print where the results are."""
    trainer = cli.trainer
    print("\n=== lightning_landscape results ===")
    for callback in trainer.callbacks:
        files = getattr(callback, "files", None)
        if files:
            print(f"{type(callback).__name__}: {Path(files['npz']).parent}")
            for key, path in files.items():
                if not key.endswith(".pdf"):
                    print(f"  {key:>16}: {path}")
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            run_dir = Path(logger.experiment.dir).parent
            print(f"W&B offline run: {run_dir}\n  upload it with: wandb sync {run_dir}")
        elif getattr(logger, "log_dir", None):
            print(f"{type(logger).__name__}: {logger.log_dir}")


def package_message(err: BaseException) -> str | None:
    """The lightning_landscape message inside a jsonargparse error, if there is one.

    jsonargparse reports a callback's ValueError as one of several "Union subtypes" errors;
    the package's own message (it starts with the argument's name in backticks) is the one
    that says what to fix.
    """
    for line in str(err).splitlines():
        text = line.strip().lstrip("- ").strip()
        if text.startswith("`") and ("expected" in text or "accepted" in text):
            return text
    return None


def main() -> None:
    try:
        cli = build_cli()
    except ValueError as err:
        message = package_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    if cli.subcommand == "fit":
        report(cli)


def build_cli() -> LightningCLI:
    """The example's LightningCLI: digits model and data, W&B offline by default."""
    return LightningCLI(
        DigitsClassifier,
        DigitsDataModule,
        seed_everything_default=0,
        trainer_defaults={
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"project": "lightning-landscape", "save_dir": "runs", "offline": True},
            },
            "default_root_dir": "runs",
        },
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
