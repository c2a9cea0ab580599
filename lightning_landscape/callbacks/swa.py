"""SWAComparison: the last SGD weights against the SWA average (Izmailov et al., UAI 2018).

Lightning's :class:`~pytorch_lightning.callbacks.StochasticWeightAveraging` averages the weights
at the *start* of epochs ``swa_start .. swa_end`` (0-based; ``swa_end = max_epochs - 1``), so the
last SGD epoch is not in the average. It puts the average into the module (parameters only):
for a BatchNorm network at the start of one extra epoch (``max_epochs`` is raised by one), which
resets the running statistics and recomputes them with a forward pass over the train loader and
no optimizer update (``momentum=None``, as ``torch.optim.swa_utils.update_bn``); without BatchNorm
at ``on_train_end``. Either way every callback's ``on_fit_end`` (LossSurface, TrajectoryPCA,
HessianSpectrum, this one) runs after it, whatever the callback order, and sees the averaged
weights with their recomputed statistics. The SGD weights are kept here at ``on_train_epoch_end``
of epoch ``swa_end``: after its last optimizer step, before the swap; SWA's own
``on_train_epoch_end`` touches no weight, so the order does not matter there either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import StochasticWeightAveraging
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_landscape import _lightning
from lightning_landscape import _validation as v
from lightning_landscape.batchnorm import BN_POLICIES, has_batchnorm, recompute_bn
from lightning_landscape.callbacks._base import DEFAULT_NUM_BATCHES, LandscapeCallback, analysis_context, misconfigured
from lightning_landscape.callbacks._distributed import HandedOff
from lightning_landscape.directions import random_direction
from lightning_landscape.params import trainable_parameters
from lightning_landscape.plots import plot_swa_directions, plot_swa_line
from lightning_landscape.results import Landscape
from lightning_landscape.surface import GridEvaluator, interpolation_from_evaluator
from lightning_landscape.trackers import write_files

#: How the random directions are scaled: by the SWA weights for both points, or by each point's own.
DIRECTION_SCALES = ("shared", "own")
#: The two points, as labelled in the files and figures.
SGD, SWA = "SGD", "SWA"


def rise_crossings(alphas: Any, losses: Any, center_loss: float, rise: float) -> np.ndarray:
    """``[left, right]``: how far from α = 0 the loss first reaches ``center_loss + rise`` on each side.

    Walking out from α = 0 (where the loss is ``center_loss``) over the grid, linearly interpolated
    between the last point below and the first at or above; a non-finite loss counts as reached at
    its grid point. NaN on a side where the loss never reaches it within the grid.

    Example:
        >>> a = np.linspace(-2, 2, 5)
        >>> rise_crossings(a, a**2, 0.0, 2.0).tolist()  # 1 -> 4 between |α| = 1 and 2: 2 at 1 + 1/3
        [1.3333333333333333, 1.3333333333333333]
        >>> rise_crossings(a, np.zeros(5), 0.0, 1.0).tolist()
        [nan, nan]
    """
    alphas, losses = np.asarray(alphas, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    target = center_loss + rise
    out = np.full(2, np.nan)
    for side, sign in enumerate((-1.0, 1.0)):
        mask = sign * alphas > 0
        order = np.argsort(sign * alphas[mask])
        xs = np.concatenate([[0.0], (sign * alphas[mask])[order]])
        ys = np.concatenate([[center_loss], losses[mask][order]])
        for j in range(1, len(xs)):
            if not np.isfinite(ys[j]):
                out[side] = xs[j]
                break
            if ys[j] >= target:
                slope = (ys[j] - ys[j - 1]) / (xs[j] - xs[j - 1])
                out[side] = xs[j - 1] + (target - ys[j - 1]) / slope if slope > 0 else xs[j]
                break
    return out


def grid(lo: float, hi: float, num: int, exact: tuple[float, ...]) -> np.ndarray:
    """``num`` points over [lo, hi] with the values ``exact`` among them exactly (added, or snapped onto).

    Example:
        >>> grid(-0.5, 1.5, 3, (0.0, 1.0)).tolist()
        [-0.5, 0.0, 0.5, 1.0, 1.5]
    """
    points = np.linspace(lo, hi, num)
    for value in exact:  # linspace's lo + i·step can miss 1.0 by an ulp: α = 1 must be SWA itself
        points = np.where(np.isclose(points, value, rtol=0.0, atol=1e-9), value, points)
    return np.unique(np.concatenate([points, exact]))


class TrainStatsEvaluator:
    """Train loss, and val loss and error, at one point, the BatchNorm statistics from the train data.

    ``GridEvaluator(bn="recompute")`` recomputes the statistics over its own batches, which for the
    val evaluator would be the val data; here they are recomputed once per point over the train
    batches and both sets are then evaluated with them (as Izmailov et al. and Garipov et al. do).
    Values: ``loss``, the train metrics, ``val_loss`` and ``val_<metric>``; ``error`` and
    ``val_error`` are ``1 - accuracy``.
    """

    # The engine's point loop, reused as is: it only calls evaluate() and reads batches and num_samples.
    run = GridEvaluator.run

    def __init__(self, train: GridEvaluator, val: GridEvaluator | None, bn: str) -> None:
        self.train, self.val, self.bn = train, val, bn
        self.batches = train.batches
        self.num_samples: int | None = None
        names = [*train.metrics, *(["error"] if "accuracy" in train.metrics else [])]
        self.metrics = names + (["val_loss", *(f"val_{n}" for n in names)] if val is not None else [])

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """The values at the model's current weights (BatchNorm statistics left recomputed)."""
        if self.bn == "recompute":
            recompute_bn(model, self.train.batches, self.train.batch_loss, reduce=self.train.reduce)
        out = self.train.evaluate(model)
        if self.val is not None:
            out.update({f"val_{k}": value for k, value in self.val.evaluate(model).items()})
        for prefix in ("", "val_"):
            if f"{prefix}accuracy" in out:
                out[f"{prefix}error"] = 1.0 - out[f"{prefix}accuracy"]
        self.num_samples = self.train.num_samples
        return out


def find_swa(trainer: pl.Trainer, owner: str) -> StochasticWeightAveraging:
    """The fit's one :class:`StochasticWeightAveraging` callback; ``MisconfigurationException`` otherwise."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, StochasticWeightAveraging)]
    if len(found) != 1:
        what = "no StochasticWeightAveraging callback" if not found else f"{len(found)} of them"
        raise MisconfigurationException(
            f"{owner} compares SGD with SWA weights and needs exactly one "
            f"pytorch_lightning.callbacks.StochasticWeightAveraging in Trainer(callbacks=...); found {what}. "
            "Add StochasticWeightAveraging(swa_lrs=...) to the callbacks."
        )
    return found[0]


class SWAComparison(LandscapeCallback):
    """At fit end: the last SGD weights against the SWA average, along the line and random directions.

    Izmailov et al. (2018, figures 4 and 5) show that SWA finds a wider optimum than SGD: along
    the line through θ_SGD and θ_SWA, SWA sits near the centre of a flat region of the train loss
    while SGD sits near its edge, and the test error is lower at SWA; along random directions the
    loss rises more slowly around SWA. This callback measures both for the fit it is in.

    * The line θ(α) = (1−α)·θ_SGD + α·θ_SWA over α in [−``extend``, 1 + ``extend``] (every
      floating-point tensor interpolated, so α = 0 and 1 are the two models exactly): the train
      loss, and the val loss and error (``1 − accuracy``); the figure's x axis is the distance
      α·‖θ_SWA − θ_SGD‖ (trainable parameters) from SGD.
    * ``num_directions`` random filter-normalized directions (seeds ``seed .. seed + k − 1``) through
      both points over [−``span``, ``span``]: with ``direction_scale="shared"`` each direction is
      normalized to the SWA weights' filters and the same vector is used at both points, so the
      distances compare directly; ``"own"`` normalizes it to each point's own weights (Li et al.'s
      convention, which credits a point with smaller weights with a wider basin).
    * Width: at each point and direction, how far (in weight-space distance) the train loss first
      rises by ``rise`` above the point's own loss on each side; the mean over directions and sides
      (a side that never reaches it counts at the grid's end, a lower bound, and is counted).

    BatchNorm: interpolated and displaced weights have no statistics of their own, so by default
    (``bn="recompute"``) they are recomputed at every point over the train batches, and the train
    and val values are evaluated with them; ``"eval"`` uses the stored ones (interpolated on the
    line). With ``"recompute"`` the two points' statistics are recomputed too (over ``num_batches``
    train batches), so SGD and SWA are judged alike. The SGD weights are the module's state at the
    end of SWA's last training epoch; the SWA weights are the module's state at fit end (the
    averaged parameters and the statistics SWA recomputed). The module is left exactly as it was.

    Logged (rank zero), under ``<name>/``: ``sgd_train_loss``, ``swa_train_loss``, ``sgd_val_error``,
    ``swa_val_error`` (and ``*_val_loss``), ``distance``, ``sgd_width``, ``swa_width`` (and
    ``*_width_censored``), ``sgd_loss_rise``, ``swa_loss_rise`` (the mean rise at ±``span``);
    figures ``line`` and ``directions``; ``<name>.npz`` (the line), ``<name>_sgd_directions.npz`` and
    ``<name>_swa_directions.npz`` (:class:`~lightning_landscape.Landscape`; the directions as
    2-D results over (direction, α)).

    Args:
        extend: the line goes this far beyond both points, in units of the SGD→SWA segment (> 0).
        resolution: points on the line (>= 2); α = 0 and 1 are always among them.
        num_directions: random directions through both points (>= 1).
        span: the directions' coordinates cover [−span, span] (filter-normalized units, > 0).
        direction_resolution: points per direction (>= 2); 0 is always among them.
        direction_scale: ``"shared"`` or ``"own"`` (see above).
        rise: the loss rise that bounds the width (> 0, in loss units).
        bn: ``"recompute"`` or ``"eval"``.
        val: evaluate the val data too (needs a val dataloader; checked at ``setup``).
        error: also the error ``1 − accuracy`` (classification).
        seed, num_batches, dirpath, progress, loss_fn, name, enabled, on_error: as in
            :class:`~lightning_landscape.LossSurface`; ``num_batches`` limits both data sets.

    Raises:
        MisconfigurationException: an invalid argument (``__init__``); no (or more than one)
            ``StochasticWeightAveraging`` callback, or ``val=True`` without val data (``setup``).

    Example:
        >>> from pytorch_lightning.callbacks import StochasticWeightAveraging
        >>> compare = SWAComparison(num_directions=2, resolution=11)
        >>> swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.5)
        >>> trainer = Trainer(max_epochs=10, callbacks=[swa, compare])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> compare.scalars["swa_width"] > compare.scalars["sgd_width"]  # doctest: +SKIP
        True
    """

    RESULTS = ("line", "sgd_directions", "swa_directions")
    line = HandedOff()
    sgd_directions = HandedOff()
    swa_directions = HandedOff()

    def __init__(
        self,
        extend: float = 0.5,
        resolution: int = 21,
        num_directions: int = 3,
        span: float = 1.0,
        direction_resolution: int = 21,
        direction_scale: Literal["shared", "own"] = "shared",
        rise: float = 0.1,
        bn: Literal["eval", "recompute"] = "recompute",
        val: bool = True,
        error: bool = True,
        seed: int = 0,
        num_batches: int | None = DEFAULT_NUM_BATCHES,
        dirpath: str | None = None,
        progress: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        name: str = "swa",
        enabled: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
    ) -> None:
        super().__init__()
        self.init_common(
            data="train",
            num_batches=num_batches,
            loss_fn=loss_fn,
            dirpath=dirpath,
            progress=progress,
            name=name,
            enabled=enabled,
            on_error=on_error,
        )
        self.extend = misconfigured(v.check_positive_float, "extend", extend)
        self.resolution = misconfigured(v.check_resolution, "resolution", resolution, 1)
        self.num_directions = misconfigured(v.check_positive_int, "num_directions", num_directions)
        self.span = misconfigured(v.check_positive_float, "span", span)
        self.direction_resolution = misconfigured(v.check_resolution, "direction_resolution", direction_resolution, 1)
        self.direction_scale = misconfigured(v.check_choice, "direction_scale", direction_scale, DIRECTION_SCALES)
        self.rise = misconfigured(v.check_positive_float, "rise", rise)
        self.bn = misconfigured(v.check_choice, "bn", bn, BN_POLICIES)
        self.val, self.error = bool(val), bool(error)
        self.seed = misconfigured(v.check_seed, "seed", seed)
        self._swa: StochasticWeightAveraging | None = None
        #: The module's state (CPU copies) at the end of the last SGD epoch, and that epoch.
        self.sgd_state: dict[str, torch.Tensor] | None = None
        self.sgd_epoch: int | None = None
        self.line: Landscape | None = None
        self.sgd_directions: Landscape | None = None
        self.swa_directions: Landscape | None = None

    @property
    def scalars(self) -> dict[str, float]:
        """The logged numbers of the last analysis (empty before it)."""
        return dict(self.line.metadata.get("scalars", {})) if self.line is not None else {}

    # --- hooks --------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (self.enabled and stage == "fit"):
            return
        self._swa = find_swa(trainer, type(self).__name__)
        if self.val and not _lightning.has_val_data(trainer):
            raise MisconfigurationException(
                f"{type(self).__name__}(val=True) evaluates the val error, but this fit has no val_dataloader; "
                "pass val_dataloaders to fit(), define val_dataloader(), or use val=False."
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.enabled:
            self.check_bn(pl_module, self.bn)
            try:
                self.check_metrics_fit(trainer, pl_module, ["accuracy"] if self.error else [])
            except MisconfigurationException as err:
                raise MisconfigurationException(
                    f"{err} The error (`error`=True) needs class scores; pass error=False for other outputs."
                ) from err
            self.sgd_state, self.sgd_epoch = None, None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        swa = self._swa
        if not self.enabled or swa is None:
            return
        end = swa.swa_end  # known once SWA's on_fit_start ran (max_epochs - 1; inf for max_epochs=-1)
        # Epoch swa_end is the last one with SGD steps; the BatchNorm epoch after it runs on the average.
        # With max_epochs=-1 the last epoch is not known in advance: every epoch's state is kept.
        if trainer.current_epoch == end or (math.isinf(end) and trainer.current_epoch >= swa.swa_start):
            self.sgd_state = {k: t.detach().to("cpu", copy=True) for k, t in pl_module.state_dict().items()}
            self.sgd_epoch = trainer.current_epoch

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            self.run_safely(trainer, lambda: self.run(trainer, pl_module))

    # --- work ---------------------------------------------------------------------------------

    def check_swapped(self, pl_module: pl.LightningModule) -> None:
        """Raise ``RuntimeError`` unless the SGD weights were kept and the module now holds SWA's average."""
        swa = self._swa
        average = _lightning.swa_average_model(swa) if swa is not None else None
        if self.sgd_state is None or average is None:
            raise RuntimeError(
                f"{type(self).__name__}: the fit ended before StochasticWeightAveraging's last SGD epoch "
                f"(epoch {getattr(swa, 'swa_end', '?')}, 0-based), so SWA never put its average into the module "
                "(stopped early, by max_steps or max_time?); there is nothing to compare."
            )
        pairs = zip(pl_module.parameters(), average.parameters())
        if not all(torch.equal(p.detach().cpu(), a.detach().cpu()) for p, a in pairs):
            raise RuntimeError(
                f"{type(self).__name__}: the module's parameters at fit end are not StochasticWeightAveraging's "
                f"average (the SGD weights were kept at epoch {self.sgd_epoch}); did training stop before SWA's "
                "last epoch?"
            )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Landscape:
        """Compare now (all ranks), then write and log (rank zero)."""
        self.check_swapped(pl_module)
        self.output_dir(trainer)  # a collective when not resolved at setup: every rank takes part
        with analysis_context(trainer, pl_module):
            evaluator, source = self._evaluator(trainer, pl_module)
            swa_state = {k: t.detach().clone() for k, t in pl_module.state_dict().items()}
            meta = {"loss_source": source, "bn": evaluator.bn, "global_step": trainer.global_step}
            line = self._line(trainer, pl_module, evaluator, swa_state, meta)
            sgd_curves, swa_curves = self._direction_curves(trainer, pl_module, evaluator, swa_state, meta)
        line.metadata["scalars"] = self.summary_scalars(line, sgd_curves, swa_curves)
        self.line, self.sgd_directions, self.swa_directions = line, sgd_curves, swa_curves
        if trainer.is_global_zero:
            self.files = self.publish(trainer, line, sgd_curves, swa_curves)
        return line

    def _evaluator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[TrainStatsEvaluator, str]:
        metrics = ["accuracy"] if self.error else []
        # bn="eval" inside: TrainStatsEvaluator recomputes the statistics itself, over the train batches.
        train, source = self.build_evaluator(trainer, pl_module, metrics)
        val = None
        if self.val:
            self.data = "val"  # build_evaluator reads the loader named by self.data
            try:
                val, _ = self.build_evaluator(trainer, pl_module, metrics)
            finally:
                self.data = "train"
        bn = self.bn if has_batchnorm(pl_module) else "eval"
        return TrainStatsEvaluator(train, val, bn), source

    def _line(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        evaluator: TrainStatsEvaluator,
        swa_state: dict[str, torch.Tensor],
        meta: dict[str, Any],
    ) -> Landscape:
        params = trainable_parameters(pl_module)
        sgd = self.sgd_state or {}
        squares = (float(((swa_state[n].double() - sgd[n].to(p).double()) ** 2).sum()) for n, p in params.items())
        distance = math.sqrt(sum(squares))
        metadata = {**meta, "start_label": SGD, "end_label": SWA, "distance": distance, "extend": self.extend}
        metadata.update(sgd_epoch=self.sgd_epoch, axis_labels=["α (SGD → SWA)"])
        line = interpolation_from_evaluator(
            pl_module,
            evaluator,  # type: ignore[arg-type]  # a GridEvaluator in all the engine uses
            self.sgd_state,
            swa_state,
            grid(-self.extend, 1.0 + self.extend, self.resolution, (0.0, 1.0)),
            progress=self.show_progress(trainer),
            metadata=metadata,
        )
        line.extras["distance"] = line.coords[0] * distance
        return line

    def _direction_curves(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        evaluator: TrainStatsEvaluator,
        swa_state: dict[str, torch.Tensor],
        meta: dict[str, Any],
    ) -> tuple[Landscape, Landscape]:
        """Both points' curves along the same seeds (inside the analysis context: the module is restored)."""
        seeds = [self.seed + k for k in range(self.num_directions)]
        shared = [random_direction(pl_module, seed=s) for s in seeds]  # at the SWA weights
        out = []
        for label, state in ((SGD, self.sgd_state or {}), (SWA, swa_state)):
            directions = shared
            if self.direction_scale == "own":
                pl_module.load_state_dict(state)
                directions = [random_direction(pl_module, seed=s) for s in seeds]
            curves = [self._along(trainer, pl_module, evaluator, state, d) for d in directions]
            norms = [math.sqrt(sum(float((t.double() ** 2).sum()) for t in d.values())) for d in directions]
            out.append(self._stack(label, curves, norms, seeds, meta))
        pl_module.load_state_dict(swa_state)
        return out[0], out[1]

    def _along(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        evaluator: TrainStatsEvaluator,
        state: dict[str, torch.Tensor],
        direction: dict[str, torch.Tensor],
    ) -> Landscape:
        """The curve θ + α·d as the line from θ to θ + d (buffers equal at both ends, so unchanged).

        Not ``surface_from_evaluator``: inside the callback's guard its centre would be the guard's
        record (the SWA weights), whatever the module was set to.
        """
        end = {k: t + direction[k].to(t) if k in direction else t for k, t in state.items()}
        curve = interpolation_from_evaluator(
            pl_module,
            evaluator,  # type: ignore[arg-type]  # a GridEvaluator in all the engine uses
            state,
            end,
            grid(-self.span, self.span, self.direction_resolution, (0.0,)),
            progress=self.show_progress(trainer),
        )
        curve.metadata["center_loss"] = float(curve.loss[int(np.flatnonzero(curve.coords[0] == 0.0)[0])])
        return curve

    def _stack(
        self, label: str, curves: list[Landscape], norms: list[float], seeds: list[int], meta: dict[str, Any]
    ) -> Landscape:
        """One point's curves as a 2-D result over (direction, α), with widths and distances as extras."""
        coords = curves[0].coords[0]
        values = {name: np.stack([c.values[name] for c in curves]) for name in curves[0].values}
        centers = np.array([c.metadata["center_loss"] for c in curves])
        crossings = np.stack([rise_crossings(coords, c.loss, c.metadata["center_loss"], self.rise) for c in curves])
        metadata = {**meta, "kind": "swa_directions", "point": label, "seeds": seeds, "norm": "filter"}
        metadata.update(ignore="biasbn", direction_scale=self.direction_scale, rise=self.rise, span=self.span)
        metadata.update(center_loss=float(centers.mean()), num_samples=curves[0].metadata.get("num_samples"))
        metadata["axis_labels"] = ["direction", "α (filter-normalized units)"]
        norms_array = np.asarray(norms, dtype=np.float64)
        extras = {
            "direction_norms": norms_array,
            "distance": coords[None, :] * norms_array[:, None],
            "center_losses": centers,
            "crossings": crossings,  # (direction, side) in α units; NaN where the rise is never reached
        }
        return Landscape(
            coords=[np.arange(len(curves), dtype=np.float64), coords], values=values, metadata=metadata, extras=extras
        )

    def summary_scalars(self, line: Landscape, sgd: Landscape, swa: Landscape) -> dict[str, float]:
        """The logged numbers: both points' values on the line, their distance, widths and loss rises."""
        alphas = line.coords[0]
        at = {SGD: int(np.flatnonzero(alphas == 0.0)[0]), SWA: int(np.flatnonzero(alphas == 1.0)[0])}
        out: dict[str, float] = {"distance": float(line.metadata["distance"])}
        names = {"error": "train_error", "val_loss": "val_loss", "val_error": "val_error"}
        for label, idx in at.items():
            key = label.lower()
            out[f"{key}_train_loss"] = float(line.loss[idx])
            for name, logged in names.items():
                if name in line.values:
                    out[f"{key}_{logged}"] = float(line.values[name][idx])
        edge = self.span
        for label, curves in ((SGD, sgd), (SWA, swa)):
            key = label.lower()
            crossings = curves.extras["crossings"]
            censored = ~np.isfinite(crossings)
            reach = np.where(censored, edge, crossings) * curves.extras["direction_norms"][:, None]
            out[f"{key}_width"] = float(reach.mean())
            out[f"{key}_width_censored"] = float(censored.sum())
            ends = np.isin(curves.coords[1], [curves.coords[1].min(), curves.coords[1].max()])
            rises = curves.loss[:, ends] - curves.extras["center_losses"][:, None]
            out[f"{key}_loss_rise"] = float(np.nanmean(rises)) if np.isfinite(rises).any() else math.nan
        return out

    def publish(self, trainer: pl.Trainer, line: Landscape, sgd: Landscape, swa: Landscape) -> dict:
        """Write the three results and both figures, and log everything (global rank zero only)."""
        dirpath = self.output_dir(trainer)
        extra_files = {}
        for label, result in ((SGD, sgd), (SWA, swa)):
            written = write_files(dirpath, f"{self.name}_{label.lower()}_directions", result, {})
            extra_files[f"{label.lower()}_directions_npz"] = written["npz"]
        figures = {"line": plot_swa_line(line), "directions": plot_swa_directions(sgd, swa)}
        return self.write_and_publish(
            trainer, self.name, line, figures, line.metadata["scalars"], extra_files=extra_files
        )
