"""Small, fast fits of the digits example for the callback tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape.state import capture_state


def small_fit(
    tmp_path,
    callbacks=(),
    *,
    logger: Any = False,
    max_epochs: int = 2,
    seed: int = 0,
    shuffle: bool = True,
    ckpt_path: str | None = None,
    **trainer_kwargs,
):
    """Fit the digits CNN for a few steps on CPU; returns (trainer, model, datamodule)."""
    pl.seed_everything(seed, verbose=False)
    model = DigitsClassifier(channels=4)
    datamodule = DigitsDataModule(batch_size=32, num_train=192, seed=seed, shuffle=shuffle)
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule, ckpt_path=ckpt_path)
    return trainer, model, datamodule


class StoppingLoss:
    """A cross-entropy ``loss_fn(module, batch)`` that counts its calls and raises ``error`` at call ``stop_at``."""

    def __init__(self, error: BaseException | type[BaseException] = KeyboardInterrupt) -> None:
        self.error = error
        self.calls = 0
        self.stop_at: int | None = None

    def restart(self, stop_at: int | None = None) -> None:
        """Count from zero again; raise at call ``stop_at`` (never with ``None``)."""
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, module: torch.nn.Module, batch: Any) -> torch.Tensor:
        self.calls += 1
        if self.stop_at is not None and self.calls == self.stop_at:
            raise self.error
        return F.cross_entropy(module(batch[0]), batch[1])


def eval_loss(model: torch.nn.Module, loader) -> float:
    """Independent reference: eval-mode sample-weighted mean cross-entropy over a loader."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            total += F.cross_entropy(model(x), y, reduction="sum").double().item()
            count += len(y)
    model.train(was_training)
    return total / count


def assert_state_equal(model: torch.nn.Module, before) -> None:
    """``model`` holds exactly what ``before`` (a :func:`capture_state`) recorded: values, grads, modes, RNG."""
    after = capture_state(model)
    for group in ("parameters", "buffers"):
        a, b = getattr(before, group), getattr(after, group)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype, (group, k)
    assert before.requires_grad == after.requires_grad
    assert before.training == after.training
    for k, g in before.grads.items():
        assert after.grads[k] is g
    assert torch.equal(before.rng["torch"], after.rng["torch"])
