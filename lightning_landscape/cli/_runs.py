"""``lightning-landscape interpolate`` and ``connect``: two checkpoints of a LightningModule compared on
the line between them (Goodfellow et al. 2015) or joined by a trained curve (Garipov et al. 2018).

The model and datamodule come from class paths, as in LightningCLI; the loss is the module's own
(``landscape_step`` or ``training_step``, see :func:`~lightning_landscape.callbacks._module_loss.module_batch_loss`),
evaluated on the devices chosen the Lightning way (``--accelerator``, ``--devices``): on one, or under
DDP with one process per device, each evaluating its shard of the data (see :mod:`._launch`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_landscape.callbacks._module_loss import module_batch_loss
from lightning_landscape.checkpoints import load_weights
from lightning_landscape.cli._errors import CLIError
from lightning_landscape.cli._kinds import interpolation_scalars
from lightning_landscape.cli._launch import Processes
from lightning_landscape.cli._options import (
    check_float,
    check_int,
    output_dir,
    parse_alphas,
    parse_formats,
    parse_metrics,
)
from lightning_landscape.cli._plot import save_figure
from lightning_landscape.data import LossFn

#: ``make(flag)``: the instantiated ``--model`` or ``--data`` (a usage error naming the flag when it fails).
Maker = Callable[[str], Any]


def module_loss(pl_module: Any) -> tuple[LossFn, Callable[[Any, Any], tuple[Any, Any]], str]:
    """``(loss_fn, forward_fn, source)``: the module's own loss as the core's ``loss_fn``/``forward_fn`` pair.

    ``forward_fn`` runs the module's step once (loss, outputs and targets from one forward pass,
    as the callbacks do) and hands the loss to ``loss_fn``, which the core calls right after it.

    Example:
        >>> import pytorch_lightning as pl
        >>> class Tiny(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = nn.Linear(2, 3)
        ...     def forward(self, x):
        ...         return self.layer(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return nn.functional.cross_entropy(self(batch[0]), batch[1])
        >>> loss_fn, forward_fn, source = module_loss(Tiny())
        >>> outputs, targets = forward_fn(Tiny(), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
        >>> source, tuple(outputs.shape), loss_fn(outputs, targets).ndim
        ('training_step', (4, 3), 0)
    """
    batch_loss, source = module_batch_loss(pl_module, None, want_outputs=True)
    pending: list[torch.Tensor] = []

    def forward_fn(model: Any, batch: Any) -> tuple[Any, Any]:
        loss, _, outputs, targets = batch_loss(model, batch)
        pending.append(loss)
        return outputs, targets

    def loss_fn(outputs: Any, targets: Any) -> torch.Tensor:
        return pending.pop()

    return loss_fn, forward_fn, source


@contextlib.contextmanager
def _quiet_steps() -> Iterator[None]:
    # The module's step calls self.log(); outside a Trainer loop Lightning warns and drops the value.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`self\.log\(\)`.*")
        yield


def _weights(model: torch.nn.Module, path: str, flag: str) -> dict[str, torch.Tensor]:
    try:
        return load_weights(model, path, flag)
    except ValueError as err:
        raise CLIError(str(err).replace(f"`{flag}`", flag)) from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, KeyError) as err:
        raise CLIError(f"{flag}={path!r} cannot be read ({type(err).__name__}: {err}); expected a .ckpt.") from None


def _loaders(datamodule: Any) -> tuple[Any, Any | None]:
    datamodule.setup("fit")
    train = datamodule.train_dataloader()
    try:
        val = datamodule.val_dataloader()
    except (MisconfigurationException, NotImplementedError):  # a datamodule without validation data
        val = None
    return train, val


def _run_labels(a: str, b: str) -> tuple[str, str]:
    pa, pb = Path(a), Path(b)
    if pa.stem != pb.stem:
        return pa.stem, pb.stem
    return f"{pa.parent.name}/{pa.stem}", f"{pb.parent.name}/{pb.stem}"


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _setup(cfg: Any, make: Maker) -> dict[str, Any]:
    """Everything both commands check and build before any evaluation, in the order a user's mistake shows."""
    directory = output_dir(cfg.output)
    formats = parse_formats(cfg.format)
    metrics = parse_metrics(cfg.metrics)
    check_int("--num-batches", cfg.num_batches)
    for flag, path in (("CKPT_A", cfg.ckpt_a), ("CKPT_B", cfg.ckpt_b)):
        if not Path(path).is_file():
            raise CLIError(
                f"{flag}={path!r} is not a file; expected a .ckpt written by Lightning or a saved state dict."
            )
    procs = Processes(cfg.accelerator, cfg.devices)
    model, datamodule = make("model"), make("data")
    start, end = _weights(model, cfg.ckpt_a, "CKPT_A"), _weights(model, cfg.ckpt_b, "CKPT_B")
    loss_fn, forward_fn, source = module_loss(model)
    procs.launch()  # every check above has passed on this process, so it passes on the others too
    model.to(procs.device)
    start, end = ({k: v.to(procs.device) for k, v in sd.items()} for sd in (start, end))
    facts = {
        "checkpoints": [str(cfg.ckpt_a), str(cfg.ckpt_b)],
        "model": _json_safe(cfg.model.as_dict() if hasattr(cfg.model, "as_dict") else cfg.model),
        "datamodule": _json_safe(cfg.data.as_dict() if hasattr(cfg.data, "as_dict") else cfg.data),
        "loss_source": source,
        "device": str(procs.device),
        "processes": procs.world_size,
    }
    return dict(
        directory=directory,
        formats=formats,
        metrics=metrics,
        model=model,
        datamodule=datamodule,
        start=start,
        end=end,
        loss_fn=loss_fn,
        forward_fn=forward_fn,
        facts=facts,
        procs=procs,
    )


def _write_scalars(directory: Path, scalars: dict[str, float]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "scalars.json"
    path.write_text(json.dumps(scalars, indent=2))
    for name, value in scalars.items():
        print(f"{name} = {value:.6g}")
    return path


def run_interpolate(cfg: Any, make: Maker) -> dict[str, float]:
    """Loss and metrics on the line through two checkpoints, train and val data, into ``cfg.output``:
    ``interpolation.npz``, the figure, and ``scalars.json`` (both ends and the barrier)."""
    from lightning_landscape.plots.interpolation import plot_interpolation
    from lightning_landscape.surface.runs import interpolate_runs

    alphas = parse_alphas(cfg.alphas)
    s = _setup(cfg, make)
    procs: Processes = s["procs"]
    with _quiet_steps():
        train, val = _loaders(s["datamodule"])
        ls = interpolate_runs(
            s["model"],
            s["start"],
            s["end"],
            procs.batches(train, cfg.num_batches),
            val_data=None if val is None else procs.batches(val, cfg.num_batches),
            loss_fn=s["loss_fn"],
            forward_fn=s["forward_fn"],
            metrics=s["metrics"] or None,
            alphas=alphas,
            bn=cfg.bn,
            labels=_run_labels(cfg.ckpt_a, cfg.ckpt_b),
            progress=procs.progress,
            reduce=procs.reduce,
        )
    ls.metadata.update(s["facts"])
    scalars = interpolation_scalars(ls)
    if procs.is_global_zero:  # every process holds the same values; one writes them
        directory = s["directory"]
        written = [ls.save(directory / "interpolation.npz")]
        written += save_figure(plot_interpolation(ls), directory, "interpolation", s["formats"])
        written.append(_write_scalars(directory, scalars))
        for path in written:
            print(path)
    return scalars


def _check_connect(cfg: Any) -> np.ndarray:
    from lightning_landscape.connect import check_ts

    check_int("--num-bends", cfg.num_bends)
    check_int("--epochs", cfg.epochs)
    check_int("--points", cfg.points, minimum=2)
    check_int("--plane", cfg.plane, minimum=0)
    if cfg.plane == 1:
        raise CLIError("--plane=1 is not valid; expected 0 (no plane) or a resolution >= 2.")
    check_float("--lr", cfg.lr)
    check_float("--momentum", cfg.momentum, positive=False)
    check_float("--weight-decay", cfg.weight_decay, positive=False)
    check_int("--seed", cfg.seed, minimum=0)
    return check_ts(int(cfg.points))


def run_connect(cfg: Any, make: Maker) -> dict[str, float]:
    """Fit a curve between two checkpoints and evaluate it and the straight line, into ``cfg.output``:
    ``curve.npz`` (a CurveResult), ``curve.pt`` (the fitted curve), the figure, ``scalars.json``, and with
    ``--plane N`` the loss over the plane through both end points and the bend (``curve_plane.npz``)."""
    from lightning_landscape.connect import curve_plane, evaluate_curve, fit_curve

    ts = _check_connect(cfg)
    s = _setup(cfg, make)
    procs: Processes = s["procs"]
    model, loss = s["model"], {"loss_fn": s["loss_fn"], "forward_fn": s["forward_fn"]}
    model.load_state_dict(s["start"])  # buffers and frozen weights off the curve are the first run's
    with _quiet_steps():
        train, val = _loaders(s["datamodule"])
        data = val if cfg.eval_on == "val" and val is not None else train
        curve = fit_curve(
            model,
            s["start"],
            s["end"],
            procs.shard(train),  # padding kept: every process takes the same number of steps
            curve=cfg.curve,
            num_bends=cfg.num_bends,
            epochs=cfg.epochs,
            optimizer=cfg.optimizer,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            seed=cfg.seed,
            num_batches=cfg.num_batches,
            progress=procs.progress,
            reduce=procs.reduce,
            **loss,
        )
        kw = {"metrics": s["metrics"] or None, "bn": cfg.bn, "progress": procs.progress, "reduce": procs.reduce}
        batches = procs.batches(data, cfg.num_batches)
        result = evaluate_curve(model, curve, batches, ts=ts, **kw, **loss)
        plane = curve_plane(model, curve, batches, resolution=cfg.plane, **kw, **loss) if cfg.plane else None
    result.metadata.update(s["facts"], eval_on="val" if data is val else "train")
    scalars = result.scalars()
    if procs.is_global_zero:
        _write_connection(s, curve, result, plane, scalars)
    return scalars


def _write_connection(s: dict[str, Any], curve: Any, result: Any, plane: Any, scalars: dict[str, float]) -> None:
    from lightning_landscape.plots.curves import plot_connection, plot_curve_plane

    directory, formats = s["directory"], s["formats"]
    written = [result.save(directory / "curve.npz"), curve.save(directory / "curve.pt")]
    written += save_figure(plot_connection(result), directory, "curve_connection", formats)
    if plane is not None:
        plane.metadata.update(s["facts"])
        written.append(plane.save(directory / "curve_plane.npz"))
        written += save_figure(plot_curve_plane(plane), directory, "curve_plane", formats)
    written.append(_write_scalars(directory, scalars))
    for path in written:
        print(path)
