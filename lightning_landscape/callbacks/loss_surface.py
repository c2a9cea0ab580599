"""LossSurface: the filter-normalized loss landscape around the trained weights."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
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
from lightning_landscape.callbacks._distributed import Collectives, HandedOff
from lightning_landscape.data import move_to_device
from lightning_landscape.directions import IGNORES, NORMS, random_direction
from lightning_landscape.hessian import hessian_directions, ratio_map
from lightning_landscape.metrics import check_metric_names
from lightning_landscape.plots import landscape_figures, plot_ratio_map, plotly_surface
from lightning_landscape.results import Landscape
from lightning_landscape.seeded import SeededDirection
from lightning_landscape.surface import GridEvaluator, surface_from_evaluator
from lightning_landscape.surface.evaluator import EVAL_DTYPES
from lightning_landscape.surface.plane import MEMORY_MODES
from lightning_landscape.surface.stacked import check_low_memory_points, check_points_per_forward
from lightning_landscape.trackers import write_files

#: Where the plane's directions come from.
DIRECTIONS = ("random", "hessian")

#: How a surface is split across DDP processes.
DISTRIBUTE = ("data", "grid")


class LossSurface(LandscapeCallback):
    """Evaluate the loss landscape around the final weights and log it everywhere.

    At the end of ``fit`` (and every ``every_n_epochs`` epochs if set) the loss,
    and optional metrics, are evaluated on a ``resolution``-point grid per axis
    along one or two random directions normalized filter by filter (Li et al.,
    "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018). The model is
    evaluated in eval mode on the strategy's device and left exactly as it was,
    so training continues bit for bit as without the callback.

    The loss is, in this order: ``loss_fn(module, batch)``; the module's
    ``landscape_step(batch)``; its ``training_step(batch, 0)`` with ``self.log``
    silenced. Each may return a tensor or a dict with ``"loss"``.

    Results go to every logger on global rank zero (W&B: images, an interactive
    3-D plotly surface, an artifact of type ``landscape`` and summary scalars;
    TensorBoard: figures and scalars; CSV and others: scalars) and always to
    ``dirpath`` as ``.npz``, PNG and PDF files.

    Args:
        dims: 1 for a curve, 2 for a surface.
        resolution: grid points per axis (>= 2; at most a million points in all).
        span: the grid covers [-span, span] on each axis (in units of the
            filter-normalized direction).
        axis_ranges: ``[lo, hi]`` per axis, overriding ``span``.
        norm: direction normalization: ``"filter"``, ``"layer"``, ``"model"`` or ``"none"``.
        ignore: ``"biasbn"`` gives biases and norm-layer affine weights a zero
            direction; ``"none"`` normalizes them too.
        seed: seed of the first direction (the second uses ``seed + 1``).
        orthogonal: make the second direction exactly orthogonal to the first.
        data: ``"train"`` or ``"val"``: which dataloader of the fit to evaluate on.
        num_batches: use at most this many batches (default 32: a surface's loss settles with a few
            thousand samples, and every point costs one pass over them; None = all).
        metrics: metric names (``"accuracy"``, ``"mse"``, ``"mae"``) or, from
            Python, torchmetrics objects.
        every_n_epochs: also run at the end of every n-th training epoch (None =
            only at fit end).
        dirpath: where files go (default ``<trainer.log_dir>/landscape``).
        log_scale: draw the 2-D figures on a logarithmic loss scale (None: when the loss spans more
            than two decades; curves stay linear unless True).
        interactive: log an interactive plotly surface to W&B (needs plotly).
        progress: show a progress bar (None = only on a terminal).
        loss_fn: ``loss_fn(module, batch) -> Tensor`` (Python only).
        ratio_map: also compute |λmin/λmax| of the Hessian at every point of a coarse
            ``ratio_resolution`` x ``ratio_resolution`` grid over the same plane (Li et al.
            2018, Fig. 7) and draw it beside the loss contours (2-D only; each point costs
            a Lanczos run, dozens of Hessian-vector products).
        ratio_resolution: grid points per axis of the ratio map.
        name: prefix of the logged keys and file names.
        enabled: turn the callback off without removing it (e.g. from the CLI).
        on_error: ``"warn"``: an analysis that fails (the loss raising, out of memory, a logger
            failing) becomes a warning with its traceback and a text entry in the loggers, and
            the fit goes on; ``"raise"``: re-raised. The model is restored either way.
        resume: save the surface as it grows (marked partial; every 30 s and when interrupted,
            SIGTERM included) and continue a partial surface of the same analysis found in the
            output folder (same weights, directions, grid, data), evaluating only the missing
            points (under DDP rank zero keeps the file and every rank resumes from it; with
            ``distribute="grid"`` the surface starts over).
        distribute: under DDP, split the ``"data"`` across processes (default: every rank
            evaluates every point on its shard, one all-reduce per point; the memory of one
            shard) or the ``"grid"`` (the paper's scheme: the shards are gathered so every rank
            holds all the data, and each evaluates every world-th point; no collective per point,
            for evaluation data small against the grid). The result is the same.
        directions: ``"random"``: filter-normalized random directions (the paper's, comparable
            across networks); ``"hessian"``: the top eigenvectors of the Hessian at the trained
            weights (unit norm, from the Lanczos run of :func:`~lightning_landscape.hessian_directions`),
            where the loss curves most. Hessian planes are not comparable across networks the way
            filter-normalized ones are (their scale follows the parameterization); ``norm`` and
            ``ignore`` do not apply to them and must stay at their defaults.
        bn: BatchNorm statistics at each grid point: ``"eval"`` (as stored, the paper's choice)
            or ``"recompute"`` (reset and recomputed with one pass over the evaluation data at the
            point's weights, as Garipov et al. and ``torch.optim.swa_utils.update_bn``; one more
            pass per point). The module's own statistics come back either way.
        memory: ``"default"`` holds θ* and the two directions during the analysis;
            ``"low"`` holds θ* only and draws the directions again at every grid point from
            their seeds (the same values bit for bit; see ``loss_surface(memory=...)``). Needs
            ``directions="random"``; a ``ratio_map`` builds the stored directions for its own run.
        dtype: ``"model"`` evaluates the grid as the fit runs the module; ``"bf16"`` runs each
            grid point's forward passes under bfloat16 autocast (faster on GPUs with bf16 units,
            slower on most CPUs); the result's metadata then holds the loss at θ* evaluated
            exactly and the relative error, ``center_loss_rel_error``.
        points_per_forward: grid points evaluated per forward pass, their weights stacked and
            the module's loss ``vmap``-ed (that many model copies; see
            ``loss_surface(points_per_forward=...)``). Needs ``bn="eval"`` and ``memory="default"``;
            a loss ``vmap`` cannot trace warns once and is evaluated one point at a time.

    Raises:
        MisconfigurationException: for an invalid argument (in ``__init__``), or
            ``data="val"`` in a fit without validation data (at ``setup``, before training).

    Example:
        >>> from pytorch_lightning import Trainer
        >>> surface = LossSurface(resolution=11, span=0.5, metrics=["accuracy"])
        >>> trainer = Trainer(max_epochs=1, callbacks=[surface], logger=False)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> surface.landscape.loss.shape  # doctest: +SKIP
        (11, 11)
    """

    RESULTS = ("landscape", "ratio_landscape")
    landscape = HandedOff()
    ratio_landscape = HandedOff()

    def __init__(
        self,
        dims: Literal[1, 2] = 2,
        resolution: int = 21,
        span: float = 1.0,
        axis_ranges: list[list[float]] | None = None,
        norm: Literal["filter", "layer", "model", "none"] = "filter",
        ignore: Literal["biasbn", "none"] = "biasbn",
        seed: int = 0,
        orthogonal: bool = False,
        data: Literal["train", "val"] = "train",
        num_batches: int | None = DEFAULT_NUM_BATCHES,
        metrics: list[str | Any] | None = None,
        every_n_epochs: int | None = None,
        dirpath: str | None = None,
        log_scale: bool | None = None,
        interactive: bool = True,
        progress: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        ratio_map: bool = False,
        ratio_resolution: int = 5,
        name: str = "loss_surface",
        enabled: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
        resume: bool = True,
        distribute: Literal["data", "grid"] = "data",
        bn: Literal["eval", "recompute"] = "eval",
        directions: Literal["random", "hessian"] = "random",
        memory: Literal["default", "low"] = "default",
        dtype: Literal["model", "bf16"] = "model",
        points_per_forward: int = 1,
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
        self.dims = misconfigured(v.check_choice, "dims", dims, (1, 2))
        self.resolution = misconfigured(v.check_resolution, "resolution", resolution, self.dims)
        self.span = misconfigured(v.check_positive_float, "span", span)
        self.axis_ranges = misconfigured(_check_axis_ranges, axis_ranges, self.dims)
        self.norm = misconfigured(v.check_choice, "norm", norm, NORMS)
        self.ignore = misconfigured(v.check_choice, "ignore", ignore, IGNORES)
        self.seed = misconfigured(v.check_seed, "seed", seed)
        self.orthogonal = bool(orthogonal)
        self.metrics = misconfigured(check_metric_names, metrics)
        self.every_n_epochs = misconfigured(v.check_positive_int, "every_n_epochs", every_n_epochs, allow_none=True)
        self.log_scale = None if log_scale is None else bool(log_scale)
        self.interactive = bool(interactive)
        self.ratio_map = bool(ratio_map)
        if self.ratio_map and self.dims != 2:
            raise MisconfigurationException(f"`ratio_map`=True needs a 2-D surface; got `dims`={self.dims}.")
        self.resume = bool(resume)
        self.distribute = misconfigured(v.check_choice, "distribute", distribute, DISTRIBUTE)
        self.bn = misconfigured(v.check_choice, "bn", bn, BN_POLICIES)
        self.directions = misconfigured(v.check_choice, "directions", directions, DIRECTIONS)
        if self.directions == "hessian" and (self.norm, self.ignore) != ("filter", "biasbn"):
            raise MisconfigurationException(
                f"`directions`='hessian' takes the Hessian's unit eigenvectors as they are, so `norm`={self.norm!r} "
                f"and `ignore`={self.ignore!r} cannot apply; leave them at 'filter' and 'biasbn', or use "
                "directions='random'."
            )
        self.memory = misconfigured(v.check_choice, "memory", memory, MEMORY_MODES)
        self.dtype = misconfigured(v.check_choice, "dtype", dtype, EVAL_DTYPES)
        self.points_per_forward = misconfigured(check_points_per_forward, points_per_forward, self.bn, False)
        _check_low_memory(self.memory, self.directions, self.points_per_forward)
        self.ratio_resolution = misconfigured(v.check_resolution, "ratio_resolution", ratio_resolution, 2)
        #: The last computed landscape and ratio map (on every rank).
        self.landscape: Landscape | None = None
        self.ratio_landscape: Landscape | None = None

    # --- hooks ------------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.enabled:
            self.check_metrics_fit(trainer, pl_module, self.metrics)
            self.check_bn(pl_module, self.bn)
            if self.directions == "hessian" and not has_lazy_parameters(pl_module):
                count = sum(p.numel() for p in self.check_module(pl_module).values())
                if count < self.dims:
                    raise MisconfigurationException(
                        f"`directions`='hessian' with `dims`={self.dims} needs {self.dims} eigenvectors, but "
                        f"{type(pl_module).__name__} has {count} trainable parameter(s)."
                    )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module, suffix=f"_epoch{trainer.current_epoch}"))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module))

    # --- work ---------------------------------------------------------------------------------

    def coordinates(self) -> list[np.ndarray]:
        """The grid coordinates, one array per axis."""
        ranges = self.axis_ranges or [[-self.span, self.span]] * self.dims
        return [np.linspace(lo, hi, self.resolution) for lo, hi in ranges]

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, suffix: str = "") -> Landscape:
        """Compute the landscape now (all ranks), then write and log it (rank zero)."""
        self.output_dir(trainer)  # a collective when not resolved at setup: every rank takes part
        comm = Collectives(trainer)
        with analysis_context(trainer, pl_module):
            evaluator, directions, metadata = self._prepare(trainer, pl_module)
            if self.memory == "default":  # recipes are the same on every rank by construction
                comm.same_on_every_rank("directions", [d[n] for d in directions for n in sorted(d)])
            # Rank zero reads and writes the partial file; every rank resumes from its copy of it.
            partial = self.output_dir(trainer) / f"{self.name}{suffix}.npz"
            split_grid = comm.distributed and self.distribute == "grid"
            if split_grid:
                evaluator = self._all_data_evaluator(comm, evaluator)
            landscape = surface_from_evaluator(
                pl_module,
                evaluator,
                directions,
                self.coordinates(),
                progress=self.show_progress(trainer),
                metadata={**metadata, "distribute": self.distribute if comm.distributed else "none"},
                resume=partial if self.resume and not split_grid else None,
                share=comm.broadcast,
                owner=trainer.is_global_zero,
                grid_share=(trainer.global_rank, trainer.world_size) if split_grid else None,
                combine=comm.sum_array if split_grid else None,
                memory=self.memory,
            )
            ratio = self._ratio_map(trainer, pl_module, evaluator, directions) if self.ratio_map else None
        self.landscape, self.ratio_landscape = landscape, ratio
        if trainer.is_global_zero:
            self.files = self.publish(trainer, landscape, suffix, ratio)
        return landscape

    def _prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> tuple[GridEvaluator, list, dict[str, Any]]:
        """The evaluator over cached batches, the directions and the metadata (inside :func:`analysis_context`)."""
        evaluator, source = self.build_evaluator(
            trainer, pl_module, self.metrics, bn=self.bn, dtype=self.dtype, points_per_forward=self.points_per_forward
        )
        if self.directions == "hessian":
            found = hessian_directions(
                pl_module,
                evaluator.batches,
                batch_loss=evaluator.batch_loss,
                num=self.dims,
                seed=self.seed,
                reduce=evaluator.reduce,
                agree=Collectives(trainer).broadcast,
            )
            directions = found.directions
            extra = {"hessian_" + k: found.metadata[k] for k in ("eigenvalues", "num_hvp", "converged")}
            extra["axis_labels"] = [f"v{k + 1} (λ={lam:.3g})" for k, lam in enumerate(found.eigenvalues)]
        else:
            directions, extra = self._random_directions(pl_module), {}
        metadata = {
            "directions": self.directions,
            **extra,
            "norm": self.norm,
            "ignore": self.ignore,
            "seed": self.seed,
            "orthogonal": self.orthogonal,
            "data": self.data,
            "bn": evaluator.bn,
            "loss_source": source,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
        return evaluator, directions, metadata

    def _random_directions(self, pl_module: pl.LightningModule) -> list:
        if self.memory == "low":
            recipe = SeededDirection(seed=self.seed, norm=self.norm, ignore=self.ignore)
            orth = recipe if self.orthogonal else None
            second = SeededDirection(seed=self.seed + 1, norm=self.norm, ignore=self.ignore, orthogonal_to=orth)
            return [recipe] if self.dims == 1 else [recipe, second]
        first = random_direction(pl_module, norm=self.norm, ignore=self.ignore, seed=self.seed)
        if self.dims == 1:
            return [first]
        orth = first if self.orthogonal else None
        return [
            first,
            random_direction(pl_module, norm=self.norm, ignore=self.ignore, seed=self.seed + 1, orthogonal_to=orth),
        ]

    def _all_data_evaluator(self, comm: Collectives, evaluator: GridEvaluator) -> GridEvaluator:
        """An evaluator over every rank's batches (gathered in rank order), without any reduce or metric sync."""
        device = evaluator.device
        local = [move_to_device(batch, torch.device("cpu")) for batch in evaluator.batches]
        batches = [batch for shard in comm.all_gather(local) for batch in shard]
        return GridEvaluator(
            batches, evaluator.batch_loss, metrics=self.metrics, device=device, sync_metrics=False, bn=evaluator.bn
        )

    def _ratio_map(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, evaluator: GridEvaluator, directions: list
    ) -> Landscape:
        ranges = self.axis_ranges or [[-self.span, self.span]] * self.dims
        coarse = [np.linspace(lo, hi, self.ratio_resolution) for lo, hi in ranges]
        return ratio_map(
            pl_module,
            evaluator.batches,
            [d.materialize(pl_module) if isinstance(d, SeededDirection) else d for d in directions],
            coarse,
            batch_loss=evaluator.batch_loss,
            seed=self.seed,
            progress=self.show_progress(trainer),
            reduce=evaluator.reduce,
            agree=Collectives(trainer).broadcast,
        )

    def summary_scalars(self, landscape: Landscape) -> dict[str, float]:
        """Loss at the centre and the mean loss rise at radius 0.25·span and span."""
        reach = self.span if self.axis_ranges is None else min(max(abs(lo), abs(hi)) for lo, hi in self.axis_ranges)
        s = landscape.summary(radii=(0.25 * reach, reach))
        return {
            "center_loss": s["center_loss"],
            "loss_rise_quarter_span": s[f"loss_rise@{0.25 * reach:g}"],
            "loss_rise_span": s[f"loss_rise@{reach:g}"],
        }

    def publish(
        self, trainer: pl.Trainer, landscape: Landscape, suffix: str = "", ratio: Landscape | None = None
    ) -> dict[str, Path]:
        """Write the files and log to every logger (global rank zero only)."""
        stem = f"{self.name}{suffix}"
        figures = landscape_figures(landscape, log_scale=self.log_scale)
        scalars = self.summary_scalars(landscape)
        extra_files, extra_figures = {}, {}
        if ratio is not None:
            extra_figures["ratio_map"] = plot_ratio_map(ratio)
            written = write_files(self.output_dir(trainer), f"{stem}_ratio_map", ratio, extra_figures)
            extra_files.update(ratio_map=written["ratio_map"], ratio_npz=written["npz"])
            center = tuple(int(np.argmin(np.abs(c))) for c in ratio.coords)
            scalars["ratio_at_center"] = float(ratio.values["ratio"][center])
        plotly_fig = None
        if self.interactive and landscape.dims == 2:
            with contextlib.suppress(ImportError):  # plotly is an optional extra
                plotly_fig = plotly_surface(landscape)
        return self.write_and_publish(
            trainer,
            stem,
            landscape,
            figures,
            scalars,
            extra_files=extra_files,
            extra_figures=extra_figures,
            plotly_figure=plotly_fig,
        )


def _check_low_memory(memory: str, directions: str, points_per_forward: int) -> None:
    """``memory="low"`` needs seeded directions and one point per forward pass."""
    if memory == "low" and directions == "hessian":
        raise MisconfigurationException(
            "`memory`='low' draws the directions again from their seeds at every point, which Hessian "
            "eigenvectors do not have; use directions='random' or memory='default'."
        )
    misconfigured(check_low_memory_points, memory, points_per_forward)


def _check_axis_ranges(axis_ranges: Any, dims: int) -> list[list[float]] | None:
    if axis_ranges is None:
        return None
    try:
        ranges = [[float(lo), float(hi)] for lo, hi in axis_ranges]
    except (TypeError, ValueError) as err:
        raise ValueError(f"`axis_ranges`={axis_ranges!r} is not valid; expected one [lo, hi] pair per axis.") from err
    if len(ranges) != dims or any(not (np.isfinite(lo) and np.isfinite(hi) and lo < hi) for lo, hi in ranges):
        raise ValueError(
            f"`axis_ranges`={axis_ranges!r} is not valid; expected {dims} finite [lo, hi] pair(s) with lo < hi."
        )
    return ranges
