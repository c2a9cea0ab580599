"""A small CNN with BatchNorm on scikit-learn's digits (ships with scikit-learn: no download).

Used by ``examples/train.py``, the tests and the benchmarks.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 1, 8, 8)`` float images in [0, 1] and integer labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    return x, y


class DigitsDataModule(pl.LightningDataModule):
    """Digits split into train/val with a fixed generator.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the data held out for validation.
        num_train: keep only the first ``num_train`` training samples (None = all).
        seed: seed of the split.
        shuffle: shuffle the training batches every epoch.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        num_train: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.num_train = num_train
        self.seed = seed
        self.shuffle = shuffle

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits_tensors()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(x) * self.val_fraction)
        val, train = perm[:n_val], perm[n_val:]
        if self.num_train is not None:
            train = train[: self.num_train]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def digits_cnn(channels: int = 16) -> nn.Sequential:
    """Conv-BN-ReLU x2, pooling, and a linear classifier for 8x8 digits."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, 10),
    )


class DigitsClassifier(pl.LightningModule):
    """The example LightningModule: a small CNN with BatchNorm trained with SGD.

    Args:
        channels: convolution channels.
        lr: learning rate.
        momentum: SGD momentum.
    """

    def __init__(self, channels: int = 16, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = digits_cnn(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
