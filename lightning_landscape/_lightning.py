"""Every use of a Lightning internal, in one place, so a Lightning upgrade breaks one file.

Each function says which internal it reads and why no public API does the job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch


def has_val_data(trainer: pl.Trainer) -> bool:
    """Whether this fit has validation data, known at ``setup`` (before any loader is built).

    Internal: ``fit_loop.epoch_loop.val_loop._data_source``; ``trainer.val_dataloaders``
    is only filled once the validation loop has run.
    """
    return bool(trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined())


def fit_dataloader(trainer: pl.Trainer, data: str) -> Any:
    """The train or (first) val dataloader of the current fit, or ``None``.

    Internal: ``_data_source.dataloader()`` when the loop has not set up its loader yet
    (e.g. at the end of a fit whose validation never ran).
    """
    loaders = trainer.train_dataloader if data == "train" else trainer.val_dataloaders
    if loaders is None:
        loop = trainer.fit_loop if data == "train" else trainer.fit_loop.epoch_loop.val_loop
        loaders = loop._data_source.dataloader()
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()))
    elif isinstance(loaders, (list, tuple)) and loaders and _is_loader(loaders[0]):
        loaders = loaders[0]  # several val loaders: the first, as dataloader_idx 0
    return loaders


def _is_loader(obj: Any) -> bool:
    return not torch.is_tensor(obj) and hasattr(obj, "__iter__")


def is_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the training batch just finished is the last of its epoch.

    Internal: ``fit_loop.epoch_loop.batch_progress.is_last_batch``; no hook argument says it.
    """
    progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


def training_batch_follows(trainer: pl.Trainer, validates: bool | None = None) -> bool:
    """Whether the fit loop surely goes on to another training batch (of this epoch) after this one's hooks.

    Conservative: ``False`` whenever this batch may be the last, a stop was asked for, the step
    limit is reached, or validation may run before the next batch (Lightning's own rule, by batch
    count; any time-based validation interval counts as "may"). A snapshot copy left running past
    this batch is only safe while nothing but the next forward and backward pass follows: epoch-end,
    validation and fit-end hooks of other callbacks may change the weights in place.

    ``validates``: ``trainer.enable_validation`` when the caller read it once for the fit (it checks
    the module's ``validation_step`` and the validation data every time: a third of this call, on
    the cold caches right after an optimizer step).

    Internal: ``fit_loop.epoch_loop`` (``batch_progress``, ``batch_idx``, ``total_batch_idx``) and
    ``trainer._val_check_time_interval``; no hook argument says what comes next.

    Example:
        >>> training_batch_follows(pl.Trainer(accelerator="cpu", devices=1, logger=False))
        False
    """
    loop = getattr(trainer.fit_loop, "epoch_loop", None)
    progress = getattr(loop, "batch_progress", None)
    if not trainer.training or loop is None or progress is None or getattr(progress, "is_last_batch", True):
        return False
    if trainer.should_stop or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps):
        return False
    if not (trainer.enable_validation if validates is None else validates):
        return True
    every_n = trainer.check_val_every_n_epoch
    if every_n is not None and (trainer.current_epoch + 1) % every_n != 0:
        return True  # no validation in this epoch
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    val_check_batch = trainer.val_check_batch
    if not isinstance(val_check_batch, int) or val_check_batch < 1:
        return False  # an iterable without a length validates at its (unknown) end
    iteration = getattr(loop, "total_batch_idx" if every_n is None else "batch_idx", None)
    return isinstance(iteration, int) and (iteration + 1) % val_check_batch != 0


def spawned(trainer: pl.Trainer) -> bool:
    """Whether this process is a child that ``ddp_spawn``/``ddp_fork`` started (its results die with it).

    Internal: the strategy's ``launcher`` type; no public API says how the processes were started.

    Example:
        >>> spawned(pl.Trainer(accelerator="cpu", devices=1, logger=False))
        False
    """
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher) and trainer.world_size > 1


def swa_average_model(swa: Any) -> torch.nn.Module | None:
    """The running average a ``StochasticWeightAveraging`` callback keeps (``None`` before it starts).

    Internal: ``StochasticWeightAveraging._average_model``; no public API exposes the average.
    """
    return getattr(swa, "_average_model", None)
