"""Sharpness: ε-sharpness, basin radius, log basin volume (and λmax, trace) of the trained weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_landscape import _validation as v
from lightning_landscape.callbacks._base import (
    DEFAULT_HESSIAN_BATCHES,
    LandscapeCallback,
    analysis_context,
    has_lazy_parameters,
    misconfigured,
)
from lightning_landscape.callbacks._distributed import Collectives, HandedOff
from lightning_landscape.plots.sharpness import plot_basin_radii
from lightning_landscape.results import SharpnessReport
from lightning_landscape.sharpness import check_sharpness_args, sharpness


class Sharpness(LandscapeCallback):
    """At fit end (and every ``every_n_epochs`` epochs if set): the sharpness numbers of the weights.

    * ε-sharpness (Keskar et al., ICLR 2017): ``100 · (max_{δ ∈ C_ε} L(θ+δ) − L(θ)) / (1 + L(θ))``
      over the box ``|δ_i| <= ε(|θ_i| + 1)`` (or a random ``subspace_dim``-dimensional one), by
      ``steps`` projected sign-gradient ascent steps: a lower bound of the true maximum.
    * Basin radius along ``num_directions`` filter-normalized random directions: where the loss first
      exceeds ``threshold`` (default: the centre loss + ``rise``), by doubling and bisection; the mean
      loss rise at ``radii``; and the log basin volume ``log ω_n + log mean r_i^n`` of Huang et al.
      (2019) over the weight-space radii, n the number of weights the directions move.
    * λmax and the trace of the Hessian (``hessian=True``), as :class:`HessianSpectrum` computes them.

    See :func:`~lightning_landscape.sharpness.sharpness` for the definitions and caveats.

    A callback of its own rather than options of :class:`LossSurface` or :class:`HessianSpectrum`:
    its cost (``steps`` gradient passes plus ~20 evaluations per direction, no grid) and its settings
    (ε, the threshold, the number of directions) are its own, and a sweep that compares sharpness
    across batch sizes wants these scalars without paying for a surface or a spectral density.

    The loss is that of the LightningModule (``loss_fn``, ``landscape_step`` or ``training_step``,
    as in :class:`LossSurface`) over ``num_batches`` batches of the train (or val) data; the model is
    left exactly as it was. Logged on rank zero: the scalars ``<name>/eps_sharpness``,
    ``<name>/basin_radius_mean``, ``<name>/basin_radius_min``, ``<name>/log_basin_volume``,
    ``<name>/loss_rise@<r>``, ``<name>/lambda_max``, ``<name>/trace``, ``<name>/loss`` (W&B summary,
    TensorBoard, CSV, any logger), a figure ``<name>/basin_radii``, a W&B table of the radii, and
    ``<name>.npz`` (artifact of type ``sharpness``) in ``dirpath``.

    Under DDP (``strategy="ddp"``) every rank evaluates its shard and the loss, its gradient and the
    Hessian products are summed across ranks, so the numbers are those of all ranks' data.
    Under ``ddp_spawn``/``ddp_fork`` the report is handed back to the main process, like the other callbacks'.

    Args:
        epsilon: the ε of the box (> 0).
        steps: ascent steps (>= 1), one gradient pass over the data each.
        step_size: the step as a fraction of the box (default ``2.5 / steps``).
        subspace_dim: ascend in a random subspace of this dimension (None: the full space).
        num_directions: random directions of the basin radius (>= 1).
        threshold: the loss that bounds the basin (None: the centre loss + ``rise``).
        rise: the rise above the centre loss that bounds the basin (> 0).
        radii: the radii (direction units) of the logged loss rise ``loss_rise@<r>``.
        initial_radius, max_radius, rtol: the doubling start, its cap, the bisection's relative tolerance.
        norm, ignore: the directions' normalization (see :func:`~lightning_landscape.random_direction`).
        hessian: also compute λmax and the trace.
        bn: ``"eval"`` or ``"recompute"``: the BatchNorm statistics of the basin's evaluations.
        seed: seeds the subspace, the ascent's start, the directions (``seed + i``), the Hessian probes.
        every_n_epochs: also run at the end of every n-th training epoch (None: only at fit end).
        data: ``"train"`` or ``"val"``.
        num_batches: use at most this many batches (default 16; None = all).
        dirpath: where files go (default ``<log_dir>/landscape``).
        progress: a progress bar (None = only on a terminal).
        loss_fn: ``loss_fn(module, batch) -> Tensor`` (Python only).
        name: prefix of the logged keys and file names.
        enabled: turn the callback off without removing it.
        on_error: ``"warn"`` (the fit goes on) or ``"raise"``; the model is restored either way.

    Raises:
        MisconfigurationException: on an invalid argument (``__init__``), ``data="val"`` without
            validation data (``setup``), a ``subspace_dim`` larger than the
            number of trainable parameters (``on_fit_start``, before training).

    Example:
        >>> cb = Sharpness(epsilon=1e-3, num_directions=5, hessian=False)
        >>> trainer = Trainer(callbacks=[cb])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> cb.report.scalars()["eps_sharpness"]  # doctest: +SKIP
        0.81
    """

    RESULTS = ("report",)
    report = HandedOff()

    def __init__(
        self,
        epsilon: float = 1e-3,
        steps: int = 20,
        step_size: float | None = None,
        subspace_dim: int | None = None,
        num_directions: int = 10,
        threshold: float | None = None,
        rise: float = 0.1,
        radii: Sequence[float] = (0.25, 0.5, 1.0),
        initial_radius: float = 0.05,
        max_radius: float = 10.0,
        rtol: float = 1e-3,
        norm: Literal["filter", "layer", "model", "none"] = "filter",
        ignore: Literal["biasbn", "none"] = "biasbn",
        hessian: bool = True,
        bn: Literal["eval", "recompute"] = "eval",
        seed: int = 0,
        every_n_epochs: int | None = None,
        data: Literal["train", "val"] = "train",
        num_batches: int | None = DEFAULT_HESSIAN_BATCHES,
        dirpath: str | None = None,
        progress: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        name: str = "sharpness",
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
        #: The checked settings of :func:`~lightning_landscape.sharpness.sharpness`.
        self.settings = misconfigured(
            check_sharpness_args,
            epsilon=epsilon,
            steps=steps,
            step_size=step_size,
            subspace_dim=subspace_dim,
            num_directions=num_directions,
            threshold=threshold,
            rise=rise,
            radii=radii,
            initial_radius=initial_radius,
            max_radius=max_radius,
            rtol=rtol,
            norm=norm,
            ignore=ignore,
            bn=bn,
            seed=seed,
        )
        self.hessian = bool(hessian)
        self.every_n_epochs = misconfigured(v.check_positive_int, "every_n_epochs", every_n_epochs, allow_none=True)
        #: The last report (every rank).
        self.report: SharpnessReport | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or has_lazy_parameters(pl_module):
            return  # lazy modules: checked when the analysis runs
        num_params = sum(p.numel() for p in self.check_module(pl_module).values())
        dim = self.settings["subspace_dim"]
        if dim is not None and dim > num_params:
            raise MisconfigurationException(
                f"`subspace_dim`={dim} is larger than the model's {num_params} trainable parameters; "
                f"expected an integer from 1 to {num_params}, or None for the full space."
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module, suffix=f"_epoch{trainer.current_epoch}"))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module))

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, suffix: str = "") -> SharpnessReport:
        """Compute the report now (all ranks), then write and log it (rank zero)."""
        self.output_dir(trainer)  # a collective when not resolved at setup: every rank takes part
        comm = Collectives(trainer)
        with analysis_context(trainer, pl_module):
            evaluator, source = self.build_evaluator(trainer, pl_module)
            report = sharpness(
                pl_module,
                evaluator.batches,
                batch_loss=evaluator.batch_loss,
                **self.settings,
                hessian=self.hessian,
                progress=self.show_progress(trainer),
                reduce=evaluator.reduce,
                agree=comm.broadcast,
            )
        report.metadata.update(
            loss_source=source, data=self.data, global_step=trainer.global_step, epoch=trainer.current_epoch
        )
        self.report = report
        if trainer.is_global_zero:
            self.files = self.publish(trainer, report, suffix)
        return report

    def publish(self, trainer: pl.Trainer, report: SharpnessReport, suffix: str = "") -> dict[str, Path]:
        """Write the files and log to every logger (rank zero only)."""
        rows = [
            [i + 1, float(r), float(w), bool(c)]
            for i, (r, w, c) in enumerate(zip(report.basin_radii, report.basin_weight_radii, report.basin_capped))
        ]
        files = self.write_and_publish(
            trainer,
            f"{self.name}{suffix}",
            report,
            {"basin_radii": plot_basin_radii(report)},
            report.scalars(),
            artifact_type="sharpness",
            tables={"basin_radii": (["direction", "radius", "weight_space_radius", "capped"], rows)},
        )
        volume = f", log V = {report.log_basin_volume:.4g}" if report.log_basin_volume is not None else ""
        rank_zero_info(
            f"[Sharpness] ε-sharpness = {report.eps_sharpness:.4g}, "
            f"basin radius mean = {float(report.basin_radii.mean()):.4g}{volume}"
        )
        return files
