"""What the paper reproductions share: digits data, small nets, one Lightning fit, test error, results.json.

Every example trains with a real ``pl.Trainer`` and reads its numbers off the package's
callbacks and functions, as a user would; ``--quick`` shrinks the settings so the test
suite can run each one in seconds (the numbers then mean little; README quotes full runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from examples.digits import DigitsDataModule  # noqa: E402


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``--quick`` (a reduced setting for the tests) and ``--out DIR`` (default ``examples/papers/out/<name>``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a reduced setting that runs in seconds (for tests)")
    parser.add_argument("--out", type=Path, default=None, help="where the figures and results.json go")
    parser.add_argument("--seed", type=int, default=0, help="the base seed")
    return parser.parse_args(argv)


def output_dir(args: argparse.Namespace, name: str) -> Path:
    out = args.out or Path(__file__).resolve().parent / "out" / name
    out.mkdir(parents=True, exist_ok=True)
    return out


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` classifier trained by SGD with momentum and weight decay on cross-entropy."""

    def __init__(self, net: nn.Module, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


def mlp(width: int = 64, depth: int = 2, batchnorm: bool = False) -> nn.Sequential:
    """A ReLU MLP on the flattened 8x8 digits."""
    layers: list[nn.Module] = [nn.Flatten()]
    size = 64
    for _ in range(depth):
        layers += [nn.Linear(size, width), *([nn.BatchNorm1d(width)] if batchnorm else []), nn.ReLU()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 10))


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input when ``skip`` (He et al.'s basic block), then ReLU."""

    def __init__(self, width: int, skip: bool) -> None:
        super().__init__()
        self.skip = skip
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return torch.relu(out + x if self.skip else out)


def resnet(depth: int, skip: bool, width: int = 16) -> nn.Sequential:
    """A small ResNet (``skip=True``) or its plain twin for 8x8 digits: ``depth`` basic blocks."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width, skip) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 4, 10),
    )


def digits(batch_size: int, seed: int = 0, num_train: int | None = None) -> DigitsDataModule:
    """The digits split every example uses (the validation split serves as the test set)."""
    dm = DigitsDataModule(batch_size=batch_size, num_train=num_train, seed=0)
    dm.setup("fit")
    return dm


def fit(
    module: pl.LightningModule,
    dm: DigitsDataModule,
    epochs: int,
    callbacks: Sequence[pl.Callback] = (),
    seed: int = 0,
    root: Path | None = None,
) -> pl.Trainer:
    """One seeded CPU fit with the given callbacks; no logger, no checkpoints, no bar."""
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
        default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    return trainer


def evaluate(module: nn.Module, loader: Any) -> dict[str, float]:
    """Eval-mode mean cross-entropy and error (1 - accuracy) over a loader."""
    module.eval()
    loss, wrong, count = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = module(x)
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            wrong += (logits.argmax(1) != y).sum().item()
            count += len(y)
    return {"loss": loss / count, "error": wrong / count}


def write_results(out: Path, results: dict[str, Any], started: float) -> Path:
    """``results.json`` with the numbers and the wall time; prints them."""
    results = {**results, "seconds": round(time.time() - started, 1)}
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True, default=float))
    print(json.dumps(results, indent=2, sort_keys=True, default=float))
    print(f"wrote {path}")
    return path
