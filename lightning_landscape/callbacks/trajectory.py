"""TrajectoryPCA: the optimization path on its top PCA directions, over the loss of that plane."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_landscape import _lightning
from lightning_landscape import _validation as v
from lightning_landscape.batchnorm import BN_POLICIES
from lightning_landscape.callbacks._base import (
    DEFAULT_NUM_BATCHES,
    LandscapeCallback,
    analysis_context,
    check_dirpath_argument,
    has_lazy_parameters,
    misconfigured,
)
from lightning_landscape.callbacks._distributed import Collectives, HandedOff
from lightning_landscape.callbacks._snapshots import (
    may_overlap,
    module_allows_overlap,
    open_store,
    shared_pca,
    warn_changed,
    warn_write_failed,
)
from lightning_landscape.errors import LandscapeWarning
from lightning_landscape.metrics import check_metric_names
from lightning_landscape.plots import pca_axis_labels, plot_contour, plot_path
from lightning_landscape.results import Landscape
from lightning_landscape.surface import surface_from_evaluator
from lightning_landscape.trajectory import (
    DTYPE_CHOICES,
    STORAGES,
    PCAResult,
    SnapshotChangedError,
    SnapshotStore,
    TooFewSnapshotsError,
    check_max_memory_mb,
    path_range,
    pca_directions,
)


class TrajectoryPCA(LandscapeCallback):
    """Snapshot the weights during training; at fit end draw the path on its top two PCA directions.

    Random directions are nearly orthogonal to the optimization path in high
    dimension, so a path projected on them looks like a dot. Following Li et al.
    (2018, section 7), the directions here are the top principal directions of
    M = [θ_0 − θ_n; ...; θ_{n−1} − θ_n] (θ_n the final weights; uncentered by
    default). The loss is then evaluated on that plane around θ_n, over a range
    fitted to the path plus ``margin``, and the path is drawn on its contours.

    Snapshots (trainable parameters, flattened) are taken at fit start and then
    every ``every_n_steps`` optimizer steps or every ``every_n_epochs`` epochs, never
    in validation hooks (where weight-averaging callbacks swap weights in). They
    live in CPU memory or in ``.npy`` files in ``snapshot_dir`` (each opens with
    ``numpy.load(path, mmap_mode="r")``), chosen by ``max_memory_mb``; the PCA
    streams them through the K x K Gram matrix, so disk mode holds about two model
    copies while training and under three during the PCA, however many snapshots
    there are. A snapshot is one copy of the parameters straight into the store
    (file writes on a background thread), made while the next batch's forward and
    backward pass run (``overlap_copy``): on the writer thread on CPU, to pinned
    memory on a side stream on a GPU. The next optimizer step waits for it (on a
    GPU, the training stream does, never the host).

    Logged (rank zero): figures ``trajectory/contour_path`` and ``trajectory/path``,
    scalars ``trajectory/explained_variance_pc1`` and ``_pc2``, and a ``.npz`` with
    ``explained_variance_ratio``, ``path`` (K x 2, last row the origin), ``steps``,
    ``epochs`` (epochs completed when each snapshot was taken, so the path's epoch markers sit
    on epoch boundaries), ``singular_values``, the grid (``coords_0``, ``coords_1``) and the loss.

    Args:
        every_n_steps: snapshot every n optimizer steps (exclusive with ``every_n_epochs``).
        every_n_epochs: snapshot at the end of every n-th epoch.
        resolution: grid points per axis of the loss surface on the PCA plane.
        margin: the surface covers the path's extent plus this fraction on each side.
        storage: ``"auto"`` (memory while within ``max_memory_mb``, then disk),
            ``"memory"`` or ``"disk"``.
        max_memory_mb: memory budget for snapshots in ``"auto"`` storage.
        snapshot_dir: directory for disk snapshots (default: a temporary one);
            give one to resume an interrupted run from a checkpoint. With ``"auto"``
            storage the snapshots move there at the first checkpoint, since a
            checkpoint carries the trajectory only through its files.
        snapshot_dtype: ``"auto"`` (float32 below 500,000 parameters, float16 from there,
            which changes the explained variance by < 1e-3), ``"float32"``, or
            ``"float16"``/``"bfloat16"`` to halve the size.
        center: subtract the mean snapshot before the SVD (sklearn-PCA style).
        data, num_batches, metrics, seed, dirpath, log_scale, progress, loss_fn,
            enabled, on_error: as in :class:`~lightning_landscape.LossSurface`; ``seed``
            seeds the filler direction of a path that spans fewer than two dimensions.
        name: prefix of the logged keys and file names.
        resume: the surface on the PCA plane is saved as it grows and an interrupted one is
            continued, as in :class:`~lightning_landscape.LossSurface` (e.g. a fit resumed with
            ``ckpt_path`` after a failure at fit end evaluates only the missing points).
        bn: BatchNorm statistics at each point of the PCA plane: ``"eval"`` (as stored) or
            ``"recompute"`` (one pass over the data at the point's weights), as in
            :class:`~lightning_landscape.LossSurface`.
        overlap_copy: copy each ``every_n_steps`` snapshot while the next batch's forward and
            backward pass run (on the writer thread, or a side stream on a GPU); the next
            optimizer step waits for the copy. Only where nothing but that batch can come first
            (not at an epoch's last batch, before validation or the fit's end, nor under manual
            optimization). A snapshot whose weights changed in place before that step (seen
            through their version counters) is dropped with a warning, and later copies are made
            before training goes on; ``False`` makes them so from the start (for a module that
            changes its weights outside the optimizer through ``.data``, which no counter sees).

    Raises:
        MisconfigurationException: both or neither of ``every_n_steps`` and
            ``every_n_epochs``, non-positive values, a ``snapshot_dir`` that cannot be
            written, or any other invalid argument.

    Example:
        >>> trajectory = TrajectoryPCA(every_n_steps=10, resolution=15)
        >>> trainer = Trainer(callbacks=[trajectory])  # doctest: +SKIP
        >>> trainer.fit(model, datamodule)  # doctest: +SKIP
        >>> trajectory.pca.explained_variance_ratio  # doctest: +SKIP
        array([0.83, 0.09])
    """

    RESULTS = ("pca", "landscape")
    pca = HandedOff()
    landscape = HandedOff()

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        resolution: int = 21,
        margin: float = 0.25,
        storage: Literal["auto", "memory", "disk"] = "auto",
        max_memory_mb: float = 1024.0,
        snapshot_dir: str | None = None,
        snapshot_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
        center: bool = False,
        data: Literal["train", "val"] = "train",
        num_batches: int | None = DEFAULT_NUM_BATCHES,
        metrics: list[str | Any] | None = None,
        seed: int = 0,
        dirpath: str | None = None,
        log_scale: bool | None = None,
        progress: bool | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        name: str = "trajectory",
        enabled: bool = True,
        on_error: Literal["warn", "raise"] = "warn",
        resume: bool = True,
        bn: Literal["eval", "recompute"] = "eval",
        overlap_copy: bool = True,
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
        if (every_n_steps is None) == (every_n_epochs is None):
            raise MisconfigurationException(
                f"TrajectoryPCA needs exactly one of `every_n_steps`={every_n_steps!r} and "
                f"`every_n_epochs`={every_n_epochs!r}; set one to an integer >= 1 and leave the other None."
            )
        self.every_n_steps = misconfigured(v.check_positive_int, "every_n_steps", every_n_steps, allow_none=True)
        self.every_n_epochs = misconfigured(v.check_positive_int, "every_n_epochs", every_n_epochs, allow_none=True)
        self.resolution = misconfigured(v.check_resolution, "resolution", resolution, 2)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin) or margin < 0:
            raise MisconfigurationException(f"`margin`={margin!r} is not valid; expected a finite number >= 0.")
        self.margin = float(margin)
        self.storage = misconfigured(v.check_choice, "storage", storage, STORAGES)
        self.max_memory_mb = misconfigured(check_max_memory_mb, max_memory_mb)
        # Checked in every storage mode (a path given is a path meant), without creating it here:
        # fully (a file written and deleted) at setup.
        self.snapshot_dir = misconfigured(check_dirpath_argument, "snapshot_dir", snapshot_dir)
        self.snapshot_dtype = misconfigured(v.check_choice, "snapshot_dtype", snapshot_dtype, DTYPE_CHOICES)
        self.center = bool(center)
        self.metrics = misconfigured(check_metric_names, metrics)
        self.seed = misconfigured(v.check_seed, "seed", seed)
        self.bn = misconfigured(v.check_choice, "bn", bn, BN_POLICIES)
        self.log_scale = None if log_scale is None else bool(log_scale)
        self.resume = bool(resume)
        self.overlap_copy = misconfigured(v.check_bool, "overlap_copy", overlap_copy)
        self.store: SnapshotStore | None = None
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []  # what a snapshot copies, in the order of _names
        self._restored: dict[str, Any] | None = None
        self._stopped = ""  # why snapshots stopped (a failing disk), or "" while they go on
        # Under DDP the weights are the same on every rank after each step: only global rank zero
        # records them (one copy, not one per rank); the others only know the store is open.
        self._opened = False
        self._recording = True
        self._last_step: int | None = None
        self._module_overlap = False  # module_allows_overlap(pl_module), read at fit start
        self._validates: bool | None = None  # trainer.enable_validation, read at train start
        #: Results of the last fit: the PCA and the surface on its plane.
        self.pca: PCAResult | None = None
        self.landscape: Landscape | None = None

    # --- checkpointing: counters and paths only ------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.store is None:
            return state
        store = self.store
        if store.storage == "memory" and self.storage == "auto" and self.snapshot_dir is not None:
            self._store_call(store.move_to_disk)  # a checkpoint carries the trajectory only through its files
        self._store_call(store.flush)
        return {**state, "store": store.state_dict(), "names": list(self._names)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = {k: v for k, v in state_dict.items() if k != "output_dir"} or None

    # --- hooks ----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.enabled and stage == "fit" and self.snapshot_dir is not None:
            misconfigured(v.check_writable_dir, "snapshot_dir", self.snapshot_dir, keep=False)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self._stopped = ""
        self.store = None
        self._opened, self._recording, self._last_step = False, trainer.is_global_zero, None
        self._module_overlap = module_allows_overlap(pl_module)
        if has_lazy_parameters(pl_module):
            return  # shapes exist after the first forward: the store opens after the first step
        self.check_metrics_fit(trainer, pl_module, self.metrics)
        self.check_bn(pl_module, self.bn)
        self._open(pl_module)

    def _open(self, pl_module: pl.LightningModule) -> None:
        params = self.check_module(pl_module)
        self._names = list(params)
        self._opened = True
        if not self._recording:
            self._restored = None
            return
        # The store copies each parameter straight into its row: no flat vector per snapshot.
        self._params = list(params.values())
        restored, self._restored = self._restored, None
        self.store = open_store(
            restored,
            sum(p.numel() for p in self._params),
            dtype=self.snapshot_dtype,  # "auto" resolves with the parameter count
            storage=self.storage,
            max_memory_mb=self.max_memory_mb,
            snapshot_dir=self.snapshot_dir,
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The start of the trajectory. Taken here, not at fit start: on a resumed run Lightning
        # restores the step and epoch counters only now. A trajectory continued from a checkpoint
        # already holds its start; the uninterrupted run took no snapshot at the step where the
        # checkpoint was cut, so neither does the resumed one.
        self._validates = trainer.enable_validation  # the validation data is attached by now
        if self.enabled and self._opened and (self.store is None or len(self.store) == 0):
            self._snapshot(trainer, pl_module, epochs_done=trainer.current_epoch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.store is not None and not self._stopped:
            self._store_call(self.store.check_errors, trainer)  # a failed background write surfaces here
        if self.enabled and not self._opened and not has_lazy_parameters(pl_module):
            self._open(pl_module)  # lazy modules: their first snapshot is after the first step
            self._snapshot(
                trainer, pl_module, epochs_done=trainer.current_epoch + int(_lightning.is_last_batch(trainer))
            )
            return
        if self.enabled and self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            if self._last_step != trainer.global_step:
                # (gradient accumulation: one snapshot per optimizer step). After an epoch's last
                # batch that epoch counts as done, so epoch markers fall on epoch boundaries.
                last = _lightning.is_last_batch(trainer)
                overlap = self.overlap_copy and may_overlap(trainer, pl_module, self._module_overlap, self._validates)
                self._snapshot(trainer, pl_module, epochs_done=trainer.current_epoch + int(last), overlap=overlap)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # On a GPU the step waits (on the device) for the snapshot copy of the weights it changes.
        self._fence()

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fence()  # weight-averaging callbacks may swap weights in for validation

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fence()

    def _fence(self) -> None:
        if self.store is not None:
            self.store.fence()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fence()
        if (
            self.enabled
            and self.every_n_epochs
            and self._opened
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        ):
            self._snapshot(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not self._opened:
            return
        if self.store is not None:  # every write done (or its error reported) and the write buffers freed
            self._store_call(self.store.flush, trainer)
        self._params = []
        self.run_safely(trainer, lambda: self._run_or_explain(trainer, pl_module))

    def _run_or_explain(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Landscape | None:
        try:
            return self.run(trainer, pl_module)
        except TooFewSnapshotsError as err:
            rank_zero_warn(
                f"TrajectoryPCA: {err.count} snapshot(s) were taken and the PCA needs at least {err.minimum}; "
                f"no trajectory figure was made. Lower `every_n_steps`/`every_n_epochs` "
                f"(now {self.every_n_steps if self.every_n_steps else self.every_n_epochs}) or train longer.",
                category=LandscapeWarning,
            )
            return None

    # --- work -----------------------------------------------------------------------------------

    def _snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, epochs_done: int, overlap: bool = False
    ) -> None:
        self._last_step = trainer.global_step
        if self._stopped or not self._recording:
            return
        # With ``overlap`` the copy runs during the next forward and backward pass (the writer thread on
        # CPU, a side stream on a GPU) and the next optimizer step waits for it.
        store = self.store
        self._store_call(
            lambda: store.append(
                self._params, step=trainer.global_step, epoch=epochs_done, defer=overlap and self.overlap_copy
            ),  # type: ignore[union-attr]
            trainer,
            retry=True,
        )

    def _store_call(self, action: Callable[[], Any], trainer: pl.Trainer | None = None, retry: bool = False) -> None:
        """Run a store call; a full or failing disk (``OSError``, also from the writer thread) stops the trajectory.

        Training goes on, and the PCA uses the snapshots stored before the failure. A snapshot
        whose weights changed while it was copied (:class:`SnapshotChangedError`, raised by the
        call after it) is dropped: overlapped copies stop, and ``retry`` runs ``action`` again.
        """
        try:
            action()
        except SnapshotChangedError as err:
            self.overlap_copy = False
            warn_changed(err, trainer)
            if retry:
                self._store_call(action, trainer)
        except OSError as err:
            if self._stopped:
                return
            self._stopped = f"{err}"
            warn_write_failed(err, trainer, len(self.store))  # type: ignore[arg-type]

    @property
    @override
    def state_key(self) -> str:
        # Several TrajectoryPCA callbacks in one Trainer (e.g. every step and every epoch) each keep their state.
        return self._generate_state_key(
            name=self.name, every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs
        )

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Landscape:
        """PCA of the snapshots, the surface on that plane (all ranks), then files and logs (rank zero)."""
        self.output_dir(trainer)  # a collective when not resolved at setup: every rank takes part
        with analysis_context(trainer, pl_module):
            pca, count = shared_pca(trainer, pl_module, self.store, self._names, center=self.center, seed=self.seed)
            landscape = self._surface(trainer, pl_module, pca, count)
        self.pca, self.landscape = pca, landscape
        if trainer.is_global_zero:
            self.files = self.publish(trainer, pca, landscape)
        return landscape

    def _surface(self, trainer: pl.Trainer, pl_module: pl.LightningModule, pca: PCAResult, count: int) -> Landscape:
        evaluator, source = self.build_evaluator(trainer, pl_module, self.metrics, bn=self.bn)
        like = {n: p for n, p in pl_module.named_parameters() if n in set(self._names)}
        directions = pca_directions(pca, like)
        coords = [np.linspace(lo, hi, self.resolution) for lo, hi in path_range(pca.path, self.margin)]
        metadata = {
            "kind": "trajectory",
            "axis_labels": pca_axis_labels(pca.explained_variance_ratio),
            "centered": pca.centered,
            "rank": pca.rank,
            "data": self.data,
            "bn": evaluator.bn,
            "loss_source": source,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "num_snapshots": count,
            "snapshot_dtype": pca.metadata.get("storage_dtype", self.snapshot_dtype),
        }
        comm = Collectives(trainer)
        landscape = surface_from_evaluator(
            pl_module,
            evaluator,
            directions,
            coords,
            progress=self.show_progress(trainer),
            metadata=metadata,
            resume=self.output_dir(trainer) / f"{self.name}.npz" if self.resume else None,
            share=comm.broadcast,
            owner=trainer.is_global_zero,
        )
        landscape.extras.update(
            explained_variance_ratio=np.asarray(pca.explained_variance_ratio, dtype=np.float64),
            singular_values=np.asarray(pca.singular_values, dtype=np.float64),
            path=np.asarray(pca.path, dtype=np.float64),
            steps=np.asarray(pca.steps, dtype=np.int64),
            epochs=np.asarray(pca.epochs, dtype=np.int64),
        )
        return landscape

    def publish(self, trainer: pl.Trainer, pca: PCAResult, landscape: Landscape) -> dict[str, Path]:
        """Write the files and log to every logger (rank zero only)."""
        epochs = np.asarray(pca.epochs)
        # One marker where each epoch's snapshots begin.
        epoch_starts = np.flatnonzero(np.r_[True, epochs[1:] != epochs[:-1]])
        figures = {
            "contour_path": plot_contour(
                landscape,
                path=pca.path,
                path_markers=epoch_starts,
                log_scale=self.log_scale,
                title="loss on the PCA plane, with the optimization path",
            ),
            "path": plot_path(pca.path, epochs=epochs, explained_variance_ratio=pca.explained_variance_ratio),
        }
        evr = pca.explained_variance_ratio
        scalars = {"explained_variance_pc1": float(evr[0]), "explained_variance_pc2": float(evr[1])}
        scalars["center_loss"] = float(landscape.metadata["center_loss"])
        files = self.write_and_publish(trainer, self.name, landscape, figures, scalars, artifact_type="trajectory")
        rank_zero_info(
            f"[TrajectoryPCA] {len(pca.path)} points; PC1 {100 * evr[0]:.1f}%, PC2 {100 * evr[1]:.1f}% of the variation"
        )
        return files

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An interrupted fit (Ctrl-C, SIGTERM, an error) still removes the temporary snapshot folder.
        self.teardown(trainer, pl_module, "fit")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Memory snapshots are dropped with the store; disk ones stay where the user put them.
        if self.store is not None and self.snapshot_dir is None:
            store = self.store
            self._store_call(lambda: store.close(delete=True))
            self.store = None
