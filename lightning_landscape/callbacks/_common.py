"""What every landscape callback shares: where the data and the loss come from,
how the module is prepared for an analysis, and where the files go."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_landscape.data import BatchLoss, cache_batches, count_samples, default_forward, model_device
from lightning_landscape.state import preserved_state
from lightning_landscape.surface import GridEvaluator

#: ``loss_fn(module, batch) -> Tensor``: the batch-mean loss of a LightningModule.
ModuleLossFn = Callable[[pl.LightningModule, Any], torch.Tensor]

DATA_SOURCES = ("train", "val")
METRIC_NAMES = ("accuracy", "mse", "mae")


def misconfigured(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a core validator and re-raise its ``ValueError`` as Lightning's ``MisconfigurationException``."""
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise MisconfigurationException(str(err)) from err


def check_metric_names(metrics: Sequence[Any] | None) -> list[Any]:
    """Validate ``metrics``: names from :data:`METRIC_NAMES` or torchmetrics objects."""
    out = []
    for m in metrics or []:
        if isinstance(m, str):
            if m not in METRIC_NAMES:
                raise ValueError(
                    f"`metrics` holds {m!r}; accepted names: {', '.join(map(repr, METRIC_NAMES))}, or torchmetrics objects."
                )
        elif not all(hasattr(m, a) for a in ("update", "compute", "reset")):
            raise ValueError(f"`metrics` holds {m!r}; expected metric names or torchmetrics.Metric objects.")
        out.append(m)
    return out


def build_metrics(metrics: Sequence[Any], outputs: Any) -> dict[str, Any]:
    """Turn metric names into torchmetrics objects sized from a sample of the model's ``outputs``."""
    import torchmetrics

    built: dict[str, Any] = {}
    for m in metrics:
        if not isinstance(m, str):
            built[type(m).__name__.lower()] = m
        elif m == "accuracy":
            if not torch.is_tensor(outputs):
                raise ValueError("metric 'accuracy' needs tensor outputs (logits); pass a torchmetrics object instead.")
            classes = int(outputs.shape[-1]) if outputs.ndim > 1 else 1
            built[m] = (
                torchmetrics.Accuracy(task="binary")
                if classes == 1
                else torchmetrics.Accuracy(task="multiclass", num_classes=classes)
            )
        elif m == "mse":
            built[m] = torchmetrics.MeanSquaredError()
        elif m == "mae":
            built[m] = torchmetrics.MeanAbsoluteError()
    return built


def check_data_source(trainer: pl.Trainer, data: str, owner: str) -> None:
    """Fail at fit start, not at fit end, when the requested data cannot be had."""
    if data == "val" and not trainer.fit_loop.epoch_loop.val_loop._data_source.is_defined():
        raise MisconfigurationException(
            f"{owner}(data='val') needs validation data, but this fit has no val_dataloader; "
            "pass val_dataloaders to fit(), define val_dataloader(), or use data='train'."
        )


def select_dataloader(trainer: pl.Trainer, data: str) -> Any:
    """The train or (first) val dataloader of the current fit."""
    loaders = trainer.train_dataloader if data == "train" else trainer.val_dataloaders
    if loaders is None:
        loop = trainer.fit_loop if data == "train" else trainer.fit_loop.epoch_loop.val_loop
        loaders = loop._data_source.dataloader()
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()))
    elif (
        isinstance(loaders, (list, tuple))
        and loaders
        and not torch.is_tensor(loaders[0])
        and hasattr(loaders[0], "__iter__")
    ):
        loaders = loaders[0]  # several val loaders: the first, as dataloader_idx 0
    if loaders is None:
        raise MisconfigurationException(f"no {data} dataloader is available at this point of the fit.")
    return loaders


def _loss_from(output: Any, source: str) -> tuple[torch.Tensor, Any, Any]:
    if torch.is_tensor(output):
        return output, None, None
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"], output.get("outputs"), output.get("targets")
    raise MisconfigurationException(
        f"{source} returned {type(output).__name__}; expected a loss tensor or a dict with a 'loss' entry."
    )


def resolve_batch_loss(
    pl_module: pl.LightningModule, loss_fn: ModuleLossFn | None, want_outputs: bool
) -> tuple[BatchLoss, str]:
    """The loss used by every callback, in this order: ``loss_fn(module, batch)``;
    the module's ``landscape_step(batch)``; its ``training_step(batch, batch_idx)``.

    Each may return a tensor or a dict with ``"loss"`` (and optionally ``"outputs"`` and
    ``"targets"`` for metrics). When metrics need outputs the loss did not give, they
    come from ``module(inputs)`` on an ``(inputs, targets)`` batch.
    """
    if loss_fn is not None:
        source, step = "loss_fn", lambda module, batch, idx: loss_fn(module, batch)
    elif callable(getattr(pl_module, "landscape_step", None)):
        source, step = "landscape_step", lambda module, batch, idx: module.landscape_step(batch)
    else:
        source, step = "training_step", lambda module, batch, idx: module.training_step(batch, idx)

    def batch_loss(model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int, Any, Any]:
        # batch_idx is 0: the analysis is not a training step, and the index only feeds logging there.
        loss, outputs, targets = _loss_from(step(model, batch, 0), source)
        if want_outputs and outputs is None:
            outputs, targets = default_forward(model, batch)
        return loss, count_samples(targets, batch), outputs, targets

    return batch_loss, source


@contextlib.contextmanager
def analysis_context(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Prepare ``pl_module`` for an analysis and leave everything as it was.

    The state guard wraps the whole block: the module is moved to the strategy's
    device (Lightning moves it to CPU before ``on_fit_end``), run under the
    precision plugin's forward context, with ``self.log`` silenced (it raises in
    fit-end hooks), then moved back and restored bit for bit.
    """
    original_device = model_device(pl_module)
    with preserved_state(pl_module):
        saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
        pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
        try:
            pl_module.to(trainer.strategy.root_device)
            with trainer.precision_plugin.forward_context(), torch.inference_mode(False):
                yield
        finally:
            for name, value in saved.items():
                if value is None:
                    pl_module.__dict__.pop(name, None)
                else:
                    pl_module.__dict__[name] = value
            pl_module.to(original_device)


def default_dirpath(trainer: pl.Trainer, dirpath: str | None) -> Path:
    """``dirpath`` if given, else ``<trainer.log_dir or default_root_dir>/landscape``."""
    if dirpath is not None:
        return Path(dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir) / "landscape"


def strategy_reduce(trainer: pl.Trainer) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum per-point sums over all processes (identity on one)."""

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        if trainer.world_size == 1:
            return sums
        return trainer.strategy.reduce(sums, reduce_op="sum")

    return reduce


def build_evaluator(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    data: str,
    num_batches: int | None,
    loss_fn: ModuleLossFn | None,
    metrics: Sequence[Any],
) -> tuple[GridEvaluator, str]:
    """The grid evaluator every callback uses: the fit's batches cached on the strategy's device,
    the module's loss (see :func:`resolve_batch_loss`), metrics sized from one forward pass, and
    per-point sums reduced across processes. Returns it with the name of the loss source."""
    device = trainer.strategy.root_device
    batches = cache_batches(select_dataloader(trainer, data), device, num_batches)
    batch_loss, source = resolve_batch_loss(pl_module, loss_fn, want_outputs=bool(metrics))
    built = {}
    if metrics:
        pl_module.eval()
        with torch.no_grad():
            built = build_metrics(metrics, batch_loss(pl_module, batches[0])[2])
    return GridEvaluator(batches, batch_loss, metrics=built, device=device, reduce=strategy_reduce(trainer)), source


def check_seed(seed: Any) -> int:
    """``seed`` must be an int (not a bool)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MisconfigurationException(f"`seed`={seed!r} is not valid; expected an integer.")
    return seed


def check_loss_fn(loss_fn: Any) -> Any:
    """``loss_fn`` must be None or a callable ``loss_fn(module, batch) -> Tensor``."""
    if loss_fn is not None and not callable(loss_fn):
        raise MisconfigurationException(
            f"`loss_fn`={loss_fn!r} is not callable; expected loss_fn(module, batch) -> Tensor."
        )
    return loss_fn
