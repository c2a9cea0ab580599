"""ModeConnectivity: a low-loss curve from the trained weights to another run's (Garipov et al., 2018)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_landscape import _validation as v
from lightning_landscape.batchnorm import BN_POLICIES
from lightning_landscape.callbacks._base import (
    DEFAULT_NUM_BATCHES,
    LandscapeCallback,
    analysis_context,
    has_lazy_parameters,
    misconfigured,
)
from lightning_landscape.callbacks._distributed import HandedOff
from lightning_landscape.callbacks._module_loss import module_batch_loss
from lightning_landscape.checkpoints import load_weights
from lightning_landscape.connect import Curve, check_ts, curve_plane, curve_result_from_evaluator, fit_curve
from lightning_landscape.connect.fit import check_fit_options
from lightning_landscape.metrics import check_metric_names
from lightning_landscape.plots import plot_connection, plot_curve_plane
from lightning_landscape.results import CurveResult, Landscape
from lightning_landscape.trackers import write_files


def check_other(other: Any) -> Any:
    """``other`` if it names an existing file (a ``.ckpt`` or a saved state dict) or is a state dict or module.

    Example:
        >>> check_other("no/run.ckpt")
        Traceback (most recent call last):
            ...
        ValueError: `other`='no/run.ckpt' does not exist; expected the path of a Lightning .ckpt or a saved state dict.
    """
    if isinstance(other, (str, os.PathLike)):
        path = Path(other)
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "does not exist"
            raise ValueError(
                f"`other`={str(other)!r} {why}; expected the path of a Lightning .ckpt or a saved state dict."
            )
        return str(other)
    if isinstance(other, (Mapping, torch.nn.Module)):
        return other
    raise ValueError(
        f"`other` is a {type(other).__name__}; expected the path of a Lightning .ckpt or a saved state dict "
        "(or, from Python, a state dict or a module of the same architecture)."
    )


def check_points(points: Any) -> np.ndarray:
    """The curve parameters t: ``points`` evenly spaced from 0 to 1 (>= 2), or increasing values from 0 to 1.

    Example:
        >>> check_points(3).tolist()
        [0.0, 0.5, 1.0]
    """
    try:
        return check_ts(points)
    except ValueError as err:  # the core names its own argument `ts`
        raise ValueError(str(err).replace("`ts`", "`points`", 1)) from err


class ModeConnectivity(LandscapeCallback):
    """At fit end: fit a low-loss curve from the trained weights to ``other``'s and measure its barrier.

    Garipov et al. (2018) showed that two independently trained minima, separated by a high
    barrier along the straight line, are joined by simple curves along which the loss stays
    low. This callback connects w₁, the module's weights at fit end, with w₂, the weights in
    ``other`` (a Lightning ``.ckpt`` of the same LightningModule, or a saved state dict; read and
    checked against the module's architecture at ``on_fit_start``, before training):

    1. fits a ``"bezier"`` (φ(t) = (1−t)² w₁ + 2t(1−t) θ + t² w₂ for one bend) or ``"polychain"``
       curve with ``num_bends`` trainable bends, minimizing E_{t~U(0,1)} L(φ_θ(t)) for ``epochs``
       passes over ``num_batches`` cached batches of the fit's train (or val) data, one random t
       per step (:func:`~lightning_landscape.connect.fit_curve`: train mode, as in the paper);
    2. evaluates the loss (and ``metrics``) along the curve and the straight line at ``points``
       values of t, in eval mode with the BatchNorm policy ``bn`` (``"recompute"``: statistics
       recomputed at every point over the same batches, as a curve point has none of its own);
    3. with ``plane=True``, the loss over Garipov's plane through w₁, the bend (the middle one)
       and w₂, on a ``plane_resolution`` x ``plane_resolution`` grid with ``margin`` around them.

    The loss is the module's own (``loss_fn``, ``landscape_step`` or ``training_step``, as in
    :class:`~lightning_landscape.LossSurface`). Only the trainable parameters lie on the curve;
    the module comes out of the analysis exactly as it went in (weights, statistics, modes, RNG).

    Logged (global rank zero), under ``<name>/``: while the curve trains, ``fit_loss`` (the step's
    batch loss) at step k = 0, 1, ..., ``epochs`` · steps per epoch − 1: **the x axis of this key is
    the curve fit's own step, not the trainer's global step** (a separate key, so it never mixes
    with the fit's own series; in W&B the rows carry ``trainer/global_step`` = k). Then, at the
    trainer's global step: the scalars of :meth:`CurveResult.scalars
    <lightning_landscape.results.CurveResult.scalars>` (``barrier_curve``, ``barrier_line``,
    ``loss_start``, ``loss_end``, ``max_loss_curve``, ``max_loss_line``, with ``"accuracy"`` the
    errors), the mean loss of the fit's last epoch as ``fit_loss_final``; figures ``connection``
    (:func:`~lightning_landscape.plots.plot_connection`) and ``plane``
    (:func:`~lightning_landscape.plots.plot_curve_plane`); a W&B table ``path`` (t, loss_curve,
    loss_line and each metric on both paths); ``<name>.npz`` (the CurveResult) and
    ``<name>_plane.npz`` (the plane's :class:`~lightning_landscape.Landscape`) in ``dirpath`` and as
    a W&B artifact of type ``curve``.

    Under DDP every process fits on its own shard of the data and the bends' gradients (and the
    logged loss) are averaged over the processes at every step, as DDP does for the model: all
    processes take the same steps and hold the same curve. Evaluations count every sample once
    (the DistributedSampler's padding is dropped from them; the fit keeps it, so every process
    takes the same number of steps). ``num_batches`` is per process.

    Args:
        other: w₂: the path of a Lightning ``.ckpt`` of the same LightningModule or of a
            ``torch.save``-d state dict (from Python also a state dict or a module).
        curve: ``"bezier"`` or ``"polychain"``.
        num_bends: trainable bends (>= 1).
        epochs: passes of the curve fit over the cached batches (one step per batch).
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"``.
        lr, momentum, weight_decay: the curve optimizer's settings.
        points: values of t along both paths (>= 2, evenly spaced), or increasing values from 0 to 1.
        bn: ``"recompute"`` or ``"eval"`` (the stored statistics of w₁ everywhere).
        plane: also evaluate Garipov's plane.
        plane_resolution: grid points per axis of the plane (>= 2).
        margin: the plane's grid extends this fraction of the points' extent beyond them (>= 0).
        metrics: metric names (``"accuracy"``, ``"mse"``, ``"mae"``) or torchmetrics objects.
        seed: seeds the draws of t, the batch order and dropout of the curve fit.
        data: ``"train"`` or ``"val"``: the data the curve is fitted and evaluated on.
        num_batches: batches cached for the fit and every evaluation (default 32; None = all, all of
            them held on the device).
        dirpath, progress, loss_fn, name, enabled, on_error: as in :class:`~lightning_landscape.LossSurface`.

    Raises:
        MisconfigurationException: an invalid argument or a missing ``other`` file (``__init__``);
            ``other`` of another architecture, metrics that do
            not fit the outputs (``on_fit_start``, before any training step).

    Example:
        >>> try:
        ...     ModeConnectivity(other="no/such/run.ckpt")  # checked at once, before any training
        ... except MisconfigurationException as err:
        ...     print(err)
        `other`='no/such/run.ckpt' does not exist; expected the path of a Lightning .ckpt or a saved state dict.
        >>> connect = ModeConnectivity(other="runs/seed1.ckpt", epochs=20, lr=0.02)  # doctest: +SKIP
        >>> Trainer(callbacks=[connect]).fit(model, datamodule)  # doctest: +SKIP
        >>> connect.result.barrier_curve < connect.result.barrier_line  # doctest: +SKIP
        True
    """

    RESULTS = ("result", "plane")
    result = HandedOff()
    plane = HandedOff()

    def __init__(
        self,
        other: str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module,
        curve: Literal["bezier", "polychain"] = "bezier",
        num_bends: int = 1,
        epochs: int = 10,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        points: int | Sequence[float] = 61,
        bn: Literal["eval", "recompute"] = "recompute",
        plane: bool = True,
        plane_resolution: int = 21,
        margin: float = 0.2,
        metrics: list[str | Any] | None = None,
        seed: int = 0,
        data: Literal["train", "val"] = "train",
        num_batches: int | None = DEFAULT_NUM_BATCHES,
        dirpath: str | None = None,
        progress: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        name: str = "connect",
        enabled: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        super().__init__()
        self.init_common(
            data=data,
            num_batches=num_batches,
            loss_fn=loss_fn,
            dirpath=dirpath,
            progress=progress,
            name=name,
            enabled=enabled,
            on_error=on_error,
        )
        self.other = misconfigured(check_other, other)
        #: The checked options of :func:`~lightning_landscape.connect.fit_curve`.
        self.fit_options = {
            "curve": curve,
            "num_bends": num_bends,
            "epochs": epochs,
            "optimizer": optimizer,
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "seed": seed,
        }
        misconfigured(check_fit_options, **self.fit_options, num_batches=None, on_step=None)
        self.ts = misconfigured(check_points, points)
        self.bn = misconfigured(v.check_choice, "bn", bn, BN_POLICIES)
        self.with_plane = bool(plane)
        self.plane_resolution = misconfigured(v.check_resolution, "plane_resolution", plane_resolution, 2)
        self.margin = misconfigured(v.check_nonnegative_float, "margin", margin)
        self.metrics = misconfigured(check_metric_names, metrics)
        #: w₂ as read at fit start (CPU copies), keyed like the module's state dict.
        self.other_state: dict[str, torch.Tensor] | None = None
        #: The fitted curve of the last analysis (this process only; not handed back from ``ddp_spawn``).
        self.curve: Curve | None = None
        self.result: CurveResult | None = None
        self.plane: Landscape | None = None

    # --- hooks --------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if not self.enabled:
            return
        self.check_bn(pl_module, self.bn)
        self.check_metrics_fit(trainer, pl_module, self.metrics)
        # Read now, before any training time is spent: a wrong file fails here, not after the fit.
        # Lazy modules have no shapes yet: their `other` is read when the analysis runs.
        self.other_state = None if has_lazy_parameters(pl_module) else self.read_other(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module))

    # --- work ---------------------------------------------------------------------------------

    def read_other(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """``other``'s weights checked against ``pl_module`` (CPU copies); ``MisconfigurationException`` naming it."""
        try:
            state = load_weights(pl_module, self.other, "other")
        except ValueError as err:
            raise MisconfigurationException(f"{type(self).__name__}(other={self._other_label()!r}): {err}") from err
        return {k: t.detach().to("cpu", copy=True) for k, t in state.items()}

    def _other_label(self) -> str:
        return self.other if isinstance(self.other, str) else type(self.other).__name__

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> CurveResult:
        """Fit the curve and evaluate it now, then write and log (rank zero)."""
        self.output_dir(trainer)
        other = self.other_state if self.other_state is not None else self.read_other(pl_module)
        progress = self.show_progress(trainer)
        with analysis_context(trainer, pl_module):
            evaluator, source = self.build_evaluator(trainer, pl_module, self.metrics, bn=self.bn)
            # The fit needs only the loss: no forward hook, no second forward for outputs.
            curve = fit_curve(
                pl_module,
                pl_module,  # w₁: the module's weights now (the core copies them)
                other,
                self._fit_batches(trainer, evaluator.batches),
                batch_loss=module_batch_loss(pl_module, self.loss_fn, want_outputs=False)[0],
                **self.fit_options,
                progress=progress,
                on_step=self._step_logger(trainer),
                reduce=evaluator.reduce if trainer.world_size > 1 else None,
            )
            result = curve_result_from_evaluator(pl_module, curve, evaluator, self.ts, progress=progress)
            plane = self._plane(pl_module, curve, evaluator, progress) if self.with_plane else None
        meta = {"loss_source": source, "data": self.data, "global_step": trainer.global_step}
        result.metadata.update(meta, other=self._other_label())
        if plane is not None:
            plane.metadata.update(meta)
        self.curve, self.result, self.plane = curve, result, plane
        if trainer.is_global_zero:
            self.files = self.publish(trainer, result, plane)
        return result

    def _fit_batches(self, trainer: pl.Trainer, evaluated: list[Any]) -> list[Any]:
        """The fit's batches: the evaluator's, or under DDP this shard with its padding (see ``cached_batches``),
        as the padding can leave a process one batch short and every process must take the same steps."""
        return evaluated if trainer.world_size == 1 else self.cached_batches(trainer)

    def _plane(self, pl_module: pl.LightningModule, curve: Curve, evaluator: Any, progress: bool | None) -> Landscape:
        return curve_plane(
            pl_module,
            curve,
            evaluator.batches,  # already cached on the device: not copied again
            batch_loss=evaluator.batch_loss,
            metrics=self.metrics,
            resolution=self.plane_resolution,
            margin=self.margin,
            bn=evaluator.bn,  # "eval" for a module without BatchNorm (warned about at fit start)
            curve_points=len(self.ts),
            progress=progress,
            reduce=evaluator.reduce,
        )

    def _step_logger(self, trainer: pl.Trainer) -> Callable[[int, float], None] | None:
        """``on_step`` for the curve fit: ``<name>/fit_loss`` at the fit's own step k, to every logger."""
        loggers = trainer.loggers if trainer.is_global_zero else []
        if not loggers:
            return None
        key = f"{self.name}/fit_loss"

        def on_step(step: int, loss: float) -> None:
            for logger in loggers:
                logger.log_metrics({key: loss}, step=step)

        return on_step

    def publish(self, trainer: pl.Trainer, result: CurveResult, plane: Landscape | None) -> dict[str, Path]:
        """Write the files and log to every logger (global rank zero only)."""
        scalars = result.scalars()
        if "fit_loss" in scalars:  # `<name>/fit_loss` is the per-step series of the curve fit
            scalars["fit_loss_final"] = scalars.pop("fit_loss")
        figures = {"connection": plot_connection(result)}
        extra_files: dict[str, Path] = {}
        if plane is not None:
            figures["plane"] = plot_curve_plane(plane)
            extra_files["plane_npz"] = write_files(self.output_dir(trainer), f"{self.name}_plane", plane, {})["npz"]
        columns = ["t", "loss_curve", "loss_line"]
        values = [result.curve["loss"], result.line["loss"]]
        for metric in (n for n in result.names if n != "loss"):
            columns += [f"{metric}_curve", f"{metric}_line"]
            values += [result.curve[metric], result.line[metric]]
        rows = [[float(t), *(float(vals[i]) for vals in values)] for i, t in enumerate(result.ts)]
        files = self.write_and_publish(
            trainer,
            self.name,
            result,
            figures,
            scalars,
            extra_files=extra_files,
            artifact_type="curve",
            tables={"path": (columns, rows)},
        )
        rank_zero_info(
            f"[ModeConnectivity] barrier along the {result.settings.get('curve')} curve = {result.barrier_curve:.4g}, "
            f"along the line = {result.barrier_line:.4g}"
        )
        return files
