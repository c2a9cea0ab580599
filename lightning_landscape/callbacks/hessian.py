"""HessianSpectrum: curvature checks of the trained weights at fit end."""

from __future__ import annotations

from collections.abc import Callable
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
from lightning_landscape.hessian import HessianReport, hessian_check
from lightning_landscape.plots import plot_density, plot_eigenvalues


class HessianSpectrum(LandscapeCallback):
    """At fit end: the Hessian's top eigenvalues, λmin, |λmin/λmax|, trace and spectral density.

    A 2-D slice can look convex while the full loss is not; Li et al. (2018,
    section 6.6) check it with the extreme eigenvalues: a small |λmin/λmax| means
    the apparent convexity is real, a large one means strong negative curvature.
    λmax and the trace are the sharpness numbers compared across batch sizes and
    optimizers (Keskar et al. 2017).

    The Hessian is that of the sample-weighted mean loss over ``num_batches``
    batches of the train (or val) data, in eval mode (BatchNorm running
    statistics, no dropout), w.r.t. the trainable parameters; the loss comes from
    ``loss_fn``, ``landscape_step`` or ``training_step`` as in
    :class:`~lightning_landscape.LossSurface`. Eigenvalues by Lanczos, the trace by
    Hutch++, the density by stochastic Lanczos quadrature.

    Logged (rank zero): scalars ``hessian/lambda_max``, ``hessian/lambda_min``,
    ``hessian/ratio``, ``hessian/trace``; the top-k eigenvalues as a W&B table;
    figures ``hessian/density`` (log-scale y) and ``hessian/eigenvalues``; the
    ``.npz`` as an artifact of type ``hessian`` and in ``dirpath``.

    Args:
        top_k: how many of the largest eigenvalues (>= 1, at most the number of parameters).
        lambda_min: also compute λmin and the ratio |λmin/λmax|.
        trace: estimate the trace (with a standard error).
        density: estimate the spectral density.
        tol: relative accuracy of the eigenvalues (> 0).
        seed: seeds the Lanczos start vector and the random probes.
        data: ``"train"`` or ``"val"``.
        num_batches: use at most this many batches (default 16; None = all); each Hessian-vector
            product costs about three gradient evaluations over them.
        dirpath: where files go (default ``<trainer.log_dir>/landscape``).
        loss_fn: ``loss_fn(module, batch) -> Tensor`` (Python only).
        name: prefix of the logged keys and file names.
        enabled: turn the callback off without removing it.
        on_error: ``"warn"``: an analysis that fails (the loss raising, out of memory, a logger
            failing) becomes a warning with its traceback and a text entry in the loggers, and
            the fit goes on; ``"raise"``: re-raised. The model is restored either way.

    Raises:
        MisconfigurationException: on an invalid argument (``__init__``), ``data="val"``
            without validation data (``setup``), or a ``top_k`` larger than the number of
            trainable parameters (``on_fit_start``, after ``configure_model``, before training).

    Example:
        >>> spectrum = HessianSpectrum(top_k=3, trace=True, num_batches=4)
        >>> trainer = Trainer(callbacks=[spectrum])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> spectrum.report.ratio  # doctest: +SKIP
        0.0048
    """

    RESULTS = ("report",)
    report = HandedOff()

    def __init__(
        self,
        top_k: int = 1,
        lambda_min: bool = True,
        trace: bool = True,
        density: bool = True,
        tol: float = 1e-3,
        seed: int = 0,
        data: Literal["train", "val"] = "train",
        num_batches: int | None = DEFAULT_HESSIAN_BATCHES,
        dirpath: str | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        name: str = "hessian",
        enabled: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        super().__init__()
        self.init_common(
            data=data,
            num_batches=num_batches,
            loss_fn=loss_fn,
            dirpath=dirpath,
            progress=None,
            name=name,
            enabled=enabled,
            on_error=on_error,
        )
        self.top_k = misconfigured(v.check_positive_int, "top_k", top_k)
        self.lambda_min = bool(lambda_min)
        self.trace = bool(trace)
        self.density = bool(density)
        self.tol = misconfigured(v.check_positive_float, "tol", tol)
        self.seed = misconfigured(v.check_seed, "seed", seed)
        #: The last report (every rank).
        self.report: HessianReport | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or has_lazy_parameters(pl_module):
            return  # lazy modules: shapes exist after the first forward; top_k is checked when the analysis runs
        num_params = sum(p.numel() for p in self.check_module(pl_module).values())
        if self.top_k > num_params:
            raise MisconfigurationException(
                f"`top_k`={self.top_k} is larger than the model's {num_params} trainable parameters; "
                f"expected an integer from 1 to {num_params}."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module))

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> HessianReport:
        """Compute the report now (all ranks), then write and log it (rank zero)."""
        self.output_dir(trainer)  # a collective when not resolved at setup: every rank takes part
        with analysis_context(trainer, pl_module, read_only=True):
            evaluator, source = self.build_evaluator(trainer, pl_module)
            report = hessian_check(
                pl_module,
                evaluator.batches,
                batch_loss=evaluator.batch_loss,
                top_k=self.top_k,
                lambda_min=self.lambda_min,
                trace=self.trace,
                density=self.density,
                tol=self.tol,
                seed=self.seed,
                reduce=evaluator.reduce,
                agree=Collectives(trainer).broadcast,
            )
        report.metadata.update(loss_source=source, data=self.data, global_step=trainer.global_step)
        self.report = report
        if trainer.is_global_zero:
            self.files = self.publish(trainer, report)
        return report

    def publish(self, trainer: pl.Trainer, report: HessianReport) -> dict[str, Path]:
        """Write the files and log to every logger (rank zero only)."""
        figures = {"eigenvalues": plot_eigenvalues(report)}
        if report.density is not None:
            figures["density"] = plot_density(report)
        rows = [[i + 1, float(value)] for i, value in enumerate(report.eigenvalues)]
        files = self.write_and_publish(
            trainer,
            self.name,
            report,
            figures,
            report.scalars(),
            artifact_type="hessian",
            tables={"top_eigenvalues": (["rank", "eigenvalue"], rows)},
        )
        ratio = f", |λmin/λmax| = {report.ratio:.3g}" if report.ratio is not None else ""
        rank_zero_info(f"[HessianSpectrum] λmax = {report.lambda_max:.4g}{ratio}")
        return files
