"""What every landscape callback shares: argument checks, setup checks, the analysis context,
the evaluator over the fit's data, where the files go, and publishing on rank zero.

A callback's analysis is ``run()``: prepare (data, loss, guard) -> compute (the core) ->
publish (files, then every logger, on global rank zero only).
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.seed import isolate_rng
from typing_extensions import override

from lightning_landscape import _lightning
from lightning_landscape import _validation as v
from lightning_landscape.batchnorm import has_batchnorm
from lightning_landscape.callbacks._distributed import (
    Collectives,
    HandedOff,
    PeerFailure,
    drop_padding,
    hand_off,
    new_handoff,
)
from lightning_landscape.callbacks._module_loss import ModuleLossFn, module_batch_loss
from lightning_landscape.data import cache_batches, model_device
from lightning_landscape.errors import LandscapeWarning
from lightning_landscape.params import trainable_parameters
from lightning_landscape.state import ModelState, preserved_state
from lightning_landscape.surface import GridEvaluator
from lightning_landscape.trackers import Publication, SavableResult, publish, publish_text, write_files

DATA_SOURCES = ("train", "val")
#: What an analysis that fails does: warn (the run goes on) or raise (after restoring the model).
ON_ERROR = ("warn", "raise")
#: Default batches per evaluation point: a surface's loss estimate settles with a few thousand
#: samples (2,048 at batch size 64), and every grid point costs one pass over these batches.
DEFAULT_NUM_BATCHES = 32
#: Default batches for the Hessian: each Hessian-vector product costs about three gradient passes.
DEFAULT_HESSIAN_BATCHES = 16
#: Strategies whose parameters are sharded or wrapped so that a full-model analysis cannot see them.
UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def misconfigured(check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a core validator and re-raise its ``ValueError`` as Lightning's ``MisconfigurationException``.

    Example:
        >>> misconfigured(v.check_positive_int, "resolution", 5)
        5
    """
    try:
        return check(*args, **kwargs)
    except ValueError as err:
        raise MisconfigurationException(str(err)) from err


def check_dirpath_argument(name: str, dirpath: str | os.PathLike | None) -> str | None:
    """Reject a path that can never be a writable directory, without creating anything.

    The nearest existing ancestor must be a directory this process may write into; the
    full check (creating and deleting a file) runs at ``setup``.

    Example:
        >>> check_dirpath_argument("dirpath", None) is None
        True
    """
    if dirpath is None:
        return None
    path = Path(dirpath)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a directory" if not probe.is_dir() else "is not writable"
        raise ValueError(f"`{name}`={str(dirpath)!r} cannot be written ({probe} {why}); expected a writable directory.")
    return str(dirpath)


@contextlib.contextmanager
def analysis_context(
    trainer: pl.Trainer, pl_module: pl.LightningModule, *, read_only: bool = False
) -> Iterator[ModelState]:
    """Prepare ``pl_module`` for an analysis and leave everything as it was.

    The module is moved to the strategy's device (Lightning moves it to CPU before
    ``on_fit_end``) and only then recorded by the state guard, so the guard's copy lives
    where the analysis runs and the engines' own guards reuse it (one copy of the model).
    Inside: the precision plugin's forward context, ``self.log`` silenced (it raises in
    fit-end hooks). On exit the module is restored bit for bit and moved back. ``read_only``:
    the analysis never writes the weights, which are then checked instead of copied (see
    :func:`~lightning_landscape.preserved_state`).
    """
    original_device = model_device(pl_module)
    try:
        pl_module.to(trainer.strategy.root_device)
        # isolate_rng: Lightning's own guard of the global RNGs (CUDA included) around the whole
        # analysis; preserved_state records the model (and, for the Lightning-free core, the RNGs).
        with isolate_rng(), preserved_state(pl_module, read_only=read_only) as state, _silenced_logging(pl_module):
            with trainer.precision_plugin.forward_context(), torch.inference_mode(False):
                yield state
    finally:
        pl_module.to(original_device)


@contextlib.contextmanager
def _silenced_logging(pl_module: pl.LightningModule) -> Iterator[None]:
    saved = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value


def has_lazy_parameters(module: torch.nn.Module) -> bool:
    """Whether ``module`` still has lazy parameters (``nn.LazyLinear`` before its first forward).

    Example:
        >>> has_lazy_parameters(torch.nn.LazyLinear(2)), has_lazy_parameters(torch.nn.Linear(2, 2))
        (True, False)
    """
    return any(torch.nn.parameter.is_lazy(p) for p in module.parameters())


def default_output_dir(trainer: pl.Trainer) -> Path:
    """``<save_dir>/<name>/<version>/landscape`` of the first logger, else ``<default_root_dir>/landscape``.

    The folder ModelCheckpoint uses for ``checkpoints``, so each run (each TensorBoard/CSV
    version, each W&B run) has its own.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir) / "landscape"
    logger = trainer.loggers[0]
    version = logger.version
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "landscape")


def _holds_results(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.npz"))


#: The run stamp chosen for each Trainer, so all its callbacks share one subfolder.
_RUN_STAMPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run_stamp(trainer: pl.Trainer, parent: Path) -> str:
    if trainer not in _RUN_STAMPS:
        stamp = time.strftime("run-%Y%m%d-%H%M%S")
        candidate, k = stamp, 1
        while (parent / candidate).exists():
            k += 1
            candidate = f"{stamp}-{k}"
        _RUN_STAMPS[trainer] = candidate
    return _RUN_STAMPS[trainer]


class LandscapeCallback(Callback):
    """The base of every landscape callback: shared arguments, checks, data, files and logging.

    Subclasses call :meth:`init_common` from ``__init__`` and implement their hooks with
    :meth:`build_evaluator`, :func:`analysis_context` and :meth:`write_and_publish`.

    Example:
        >>> class Nothing(LandscapeCallback):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.init_common(data="train", num_batches=None, loss_fn=None, dirpath=None,
        ...                          progress=None, name="nothing", enabled=True, on_error="warn")
        >>> Nothing().name
        'nothing'
    """

    #: The names of the results an analysis leaves on the callback (handed back from ``ddp_spawn``).
    RESULTS: tuple[str, ...] = ()
    #: The files written by the last analysis (global rank zero; the main process after ``ddp_spawn``).
    files = HandedOff()

    def init_common(
        self,
        *,
        data: str,
        num_batches: int | None,
        loss_fn: ModuleLossFn | None,
        dirpath: str | None,
        progress: bool | None,
        name: str,
        enabled: bool,
        on_error: str = "warn",
    ) -> None:
        """Check and store the arguments every callback has (see the subclasses' Args)."""
        self.on_error = misconfigured(v.check_choice, "on_error", on_error, ON_ERROR)
        self.data = misconfigured(v.check_choice, "data", data, DATA_SOURCES)
        self.num_batches = misconfigured(v.check_positive_int, "num_batches", num_batches, allow_none=True)
        self.loss_fn = misconfigured(v.check_callable, "loss_fn", loss_fn, "loss_fn(module, batch) -> Tensor")
        self.dirpath = misconfigured(check_dirpath_argument, "dirpath", dirpath)
        self.progress = progress
        if not isinstance(name, str) or not name or "/" in name:
            raise MisconfigurationException(f"`name`={name!r} is not valid; expected a non-empty string without '/'.")
        self.name = name
        self.enabled = bool(enabled)
        self._output_dir: Path | None = None
        self.files: dict[str, Path] = {}
        #: Where spawned rank zero leaves the results for the main process (see ``_distributed``).
        self.handoff = new_handoff()

    # --- checks --------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not (self.enabled and stage == "fit"):
            return
        owner = type(self).__name__
        strategy = type(trainer.strategy).__name__
        if strategy in UNSUPPORTED_STRATEGIES:
            raise MisconfigurationException(
                f"{owner} does not support strategy {strategy}: it shards or wraps the parameters. "
                "Supported: single-device, DDP ('ddp', 'ddp_spawn', 'ddp_fork')."
            )
        if self.data == "val" and not _lightning.has_val_data(trainer):
            raise MisconfigurationException(
                f"{owner}(data='val') needs validation data, but this fit has no val_dataloader; "
                "pass val_dataloaders to fit(), define val_dataloader(), or use data='train'."
            )
        self._output_dir = self.resolve_output_dir(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model(): a module that builds its layers there has them only now
        # (lazy modules get their shapes at the first forward: checked when the analysis runs).
        if self.enabled and not has_lazy_parameters(pl_module):
            self.check_module(pl_module)

    def check_bn(self, pl_module: pl.LightningModule, bn: str) -> None:
        """Warn (rank zero) when ``bn="recompute"`` meets a module without BatchNorm: nothing to recompute."""
        if bn == "recompute" and not has_batchnorm(pl_module):
            rank_zero_warn(
                f"{type(self).__name__}(bn='recompute'): {type(pl_module).__name__} has no BatchNorm layer with "
                "running statistics, so there is nothing to recompute; it is evaluated as with bn='eval'.",
                category=LandscapeWarning,
            )

    def check_module(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        """The module's trainable parameters; ``MisconfigurationException`` when there are none,
        or when the loss would come from a manual-optimization ``training_step`` (which steps the
        optimizers itself: calling it would train the model during the analysis)."""
        manual = not pl_module.automatic_optimization
        if manual and self.loss_fn is None and not callable(getattr(pl_module, "landscape_step", None)):
            raise MisconfigurationException(
                f"{type(self).__name__}: {type(pl_module).__name__} uses manual optimization "
                "(automatic_optimization=False), so its training_step steps the optimizers and cannot be "
                "the analysis' loss; define landscape_step(batch) returning the loss, or pass "
                "loss_fn(module, batch) -> Tensor."
            )
        return misconfigured(trainable_parameters, pl_module)

    def check_metrics_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, metrics: Sequence[Any]) -> None:
        """Evaluate the loss and ``metrics`` once on one batch, before training, so that metrics that
        do not fit the outputs (accuracy on a regression output) fail now, not after the fit."""
        if not metrics or has_lazy_parameters(pl_module):
            return
        comm = Collectives(trainer)
        try:
            try:
                with analysis_context(trainer, pl_module):
                    evaluator, _ = self.build_evaluator(trainer, pl_module, metrics, num_batches=1)
                    evaluator.evaluate(pl_module)
                comm.check()
            except Exception as err:
                comm.fail(err)  # every rank raises, none waits for the others in a collective
                raise
        except (ValueError, RuntimeError, TypeError) as err:
            raise MisconfigurationException(
                f"`metrics`={list(metrics)!r} do not fit {type(pl_module).__name__}'s outputs on one batch of the "
                f"{self.data} data: {err}. Pass metrics that match the outputs (e.g. 'mse' for a regression), "
                "or a torchmetrics object."
            ) from err

    @property
    @override
    def state_key(self) -> str:
        # Two instances of one callback (e.g. two LossSurface with different names) keep their own state.
        return self._generate_state_key(name=self.name)

    @override
    def state_dict(self) -> dict[str, Any]:
        # Where this run writes: a fit resumed from the checkpoint goes on in the same folder (and
        # resumes a partial surface there). ``setup`` runs before Lightning restores the checkpoint,
        # so it cannot know the fit is a resumed one; load_state_dict, called after it, can.
        return {"output_dir": str(self._output_dir)} if self._output_dir is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("output_dir"):
            self._output_dir = Path(state_dict["output_dir"])

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """Where this run's files go, decided on global rank zero and broadcast; checked writable.

        ``dirpath``, or the run's own folder as ModelCheckpoint picks it (the first logger's
        ``<save_dir>/<name>/<version>``, e.g. ``lightning_logs/version_3`` or a W&B run id; without
        a logger ``default_root_dir``) with ``landscape`` appended. A folder that already holds
        results of another run gets a run-stamped subfolder ``run-YYYYmmdd-HHMMSS`` (the same for
        every callback of this Trainer), so runs never mix files; a fit resumed from a checkpoint
        keeps writing where it was. Called on every rank: the broadcasts are collectives.
        """
        path = Path(self.dirpath) if self.dirpath is not None else default_output_dir(trainer)
        error = None
        if trainer.is_global_zero:
            if trainer.ckpt_path is None and _holds_results(path):
                path = path / _run_stamp(trainer, path)
            try:
                v.check_writable_dir("dirpath", path, keep=False)
            except ValueError as err:
                error = str(err)
        path, error = trainer.strategy.broadcast((str(path), error))
        if error:
            raise MisconfigurationException(error)
        return Path(path)

    def show_progress(self, trainer: pl.Trainer) -> bool | None:
        """The ``progress`` setting on global rank zero; no progress output on the other ranks."""
        return self.progress if trainer.is_global_zero else False

    def output_dir(self, trainer: pl.Trainer) -> Path:
        """Where this callback's files go (resolved at ``setup``, or now for a direct ``run``)."""
        if self._output_dir is None:
            self._output_dir = self.resolve_output_dir(trainer)
        return self._output_dir

    def run_safely(self, trainer: pl.Trainer, analysis: Callable[[], Any]) -> Any:
        """Run ``analysis`` under the ``on_error`` policy, with the same outcome on every rank.

        An exception (the user's loss raising, out of memory, a logger failing) has already
        left the model restored by the analysis context; with ``"warn"`` it becomes a
        :class:`~lightning_landscape.LandscapeWarning` with the traceback and a text entry in
        the run's loggers, and the fit, its checkpoints and the other callbacks go on;
        ``"raise"`` re-raises it. ``KeyboardInterrupt`` and ``SystemExit`` always propagate.
        Under DDP a failure on one rank reaches every rank (see ``_distributed.Collectives``):
        the failing rank raises its error, the others :class:`~._distributed.PeerFailure` naming it,
        and all take the same branch; a final check catches a failure in rank zero's publishing.
        """
        comm = Collectives(trainer)
        try:
            result = analysis()
            if trainer.is_global_zero and _lightning.spawned(trainer):  # this process dies after fit
                hand_off(self.handoff, {name: getattr(self, name) for name in self.RESULTS}, self.files)
            comm.check()
            return result
        except Exception as err:
            comm.fail(err)
            if self.on_error == "raise":
                raise
            text = "".join(traceback.format_exception(err))
            owner = f"{type(self).__name__}({self.name!r})"
            message = f"{owner} failed and was skipped (on_error='warn'); the fit goes on.\n{text}"
            if isinstance(err, PeerFailure):  # the rank that failed reports its own traceback
                rank_zero_warn(message, category=LandscapeWarning)
            else:
                warnings.warn(message, LandscapeWarning, stacklevel=2)
            if trainer.is_global_zero:
                with contextlib.suppress(Exception):  # the report of a failure must not fail the run
                    publish_text(trainer.loggers, f"{self.name}/error", text, trainer.global_step)
            return None

    # --- data and loss -------------------------------------------------------------------------

    def build_evaluator(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        metrics: Sequence[Any] = (),
        num_batches: int | None = -1,
        bn: str = "eval",
        dtype: str = "model",
        points_per_forward: int = 1,
    ) -> tuple[GridEvaluator, str]:
        """The grid evaluator over this fit's data: batches cached on the strategy's device once
        (converted by the precision plugin, as for training), the module's loss (see
        :func:`module_batch_loss`), metrics built from the first outputs, per-point sums reduced
        across processes (``num_batches`` is per process, as Lightning's ``limit_*_batches``), the
        BatchNorm policy ``bn`` (``"recompute"`` averages the statistics over all processes' batches;
        a module without BatchNorm was warned about at fit start), the evaluation ``dtype`` and
        ``points_per_forward``. Returns it with the name of the loss source."""
        batches = self.cached_batches(trainer, num_batches)
        # DistributedSampler's padding repeats samples of other shards: each sample is counted once.
        batches = drop_padding(batches, _lightning.fit_dataloader(trainer, self.data))
        batch_loss, source = module_batch_loss(pl_module, self.loss_fn, want_outputs=bool(metrics))
        evaluator = GridEvaluator(
            batches,
            batch_loss,
            metrics=list(metrics),
            device=trainer.strategy.root_device,
            reduce=Collectives(trainer).reduce,
            bn=bn if has_batchnorm(pl_module) else "eval",
            dtype=dtype,
            points_per_forward=points_per_forward,
        )
        return evaluator, source

    def cached_batches(self, trainer: pl.Trainer, num_batches: int | None = -1) -> list[Any]:
        """This process's batches of the fit's ``self.data`` loader (DistributedSampler padding included),
        on the strategy's device and through the precision plugin's input conversion, as Lightning
        feeds ``training_step`` (under ``"64-true"``/``"bf16-true"`` the model's dtype is not the loader's)."""
        loader = _lightning.fit_dataloader(trainer, self.data)
        if loader is None:
            raise MisconfigurationException(f"no {self.data} dataloader is available at this point of the fit.")
        convert = trainer.precision_plugin.convert_input
        limit = self.num_batches if num_batches == -1 else num_batches
        return [convert(batch) for batch in cache_batches(loader, trainer.strategy.root_device, limit)]

    # --- output --------------------------------------------------------------------------------

    def write_and_publish(
        self,
        trainer: pl.Trainer,
        stem: str,
        result: SavableResult,
        figures: Mapping[str, Figure],
        scalars: Mapping[str, float],
        extra_files: Mapping[str, Path] | None = None,
        extra_figures: Mapping[str, Figure] | None = None,
        **publication: Any,
    ) -> dict[str, Path]:
        """Write ``<stem>.npz`` and the figures to :meth:`output_dir`, then send them to every logger.

        Global rank zero only (files and loggers are written once). ``extra_files`` and
        ``extra_figures`` (already written, e.g. a second result) are logged with them; ``publication`` holds the
        :class:`~lightning_landscape.trackers.Publication` extras (``artifact_type``, ``tables``, ...).
        """
        dirpath = self.output_dir(trainer)
        bad = getattr(result, "num_nonfinite", 0)
        if bad:
            total = result.loss.size  # type: ignore[attr-defined]
            all_bad = " (all of them: the loss is NaN or Inf everywhere on this grid)" if bad == total else ""
            rank_zero_warn(
                f"{type(self).__name__}({self.name!r}): {bad} of {total} grid points have a non-finite loss"
                f"{all_bad}; they are stored as NaN and left blank in the figures. A smaller span keeps the grid "
                "where the loss is finite.",
                category=LandscapeWarning,
            )
        files = {**write_files(dirpath, stem, result, figures), **(extra_files or {})}
        logged = {**figures, **(extra_figures or {})}
        pub = Publication(self.name, trainer.global_step, scalars, logged, files, **publication)
        publish(trainer.loggers, pub)
        rank_zero_info(f"[{type(self).__name__}] wrote {files['npz']} and {len(figures)} figure(s) to {dirpath}")
        return files
