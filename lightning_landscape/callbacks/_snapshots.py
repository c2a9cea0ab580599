"""How TrajectoryPCA opens its snapshot store, when a snapshot's copy may overlap training, and its shared PCA."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_landscape import _lightning
from lightning_landscape.callbacks._distributed import Collectives
from lightning_landscape.errors import LandscapeWarning
from lightning_landscape.trajectory import PCAResult, SnapshotStore, TooFewSnapshotsError, trajectory_pca


def open_store(restored: dict[str, Any] | None, num_params: int, **options: Any) -> SnapshotStore:
    """The checkpoint's store where it belongs to this model, else a new one built with ``options``.

    A trajectory that cannot be continued (another model, missing snapshot files) warns and
    starts again: losing the earlier path must not stop the training that resumed.
    """
    if restored and restored.get("store"):
        try:
            store = SnapshotStore.from_state_dict(restored["store"], strict=True)
            if store.num_params == num_params:
                return store
            rank_zero_warn(
                "TrajectoryPCA: the checkpoint's snapshots belong to another model; starting a new trajectory.",
                category=LandscapeWarning,
            )
        except (ValueError, OSError) as err:
            rank_zero_warn(
                f"TrajectoryPCA: cannot continue the checkpoint's trajectory ({err}); starting a new one.",
                category=LandscapeWarning,
            )
    return SnapshotStore(num_params, **options)


def module_allows_overlap(pl_module: pl.LightningModule) -> bool:
    """The module's part of :func:`may_overlap`, fixed for a fit (``TrajectoryPCA`` reads it once, at fit start).

    A manually optimized module and the module's own batch hooks (they run after the callbacks',
    e.g. a weight clamp) may change the weights in place before the optimizer step.
    """
    return pl_module.automatic_optimization and not any(
        is_overridden(hook, pl_module) for hook in ("on_train_batch_end", "on_train_batch_start")
    )


def may_overlap(
    trainer: pl.Trainer, pl_module: pl.LightningModule, module_allows: bool | None = None, validates: bool | None = None
) -> bool:
    """Whether the snapshot after this batch may be copied while the next batch runs (``overlap_copy``).

    Only where nothing but the next forward and backward pass comes before the optimizer step
    that waits for it: epoch-end, validation and fit-end hooks of other callbacks, and the
    module's own (:func:`module_allows_overlap`, or ``module_allows`` when the caller has it:
    right after an optimizer step the check costs 4x its warm time, 20-40 us) may change the
    weights in place. ``validates``: ``trainer.enable_validation``, read once for the fit.
    """
    allowed = module_allows_overlap(pl_module) if module_allows is None else module_allows
    return allowed and _lightning.training_batch_follows(trainer, validates)


def warn_changed(err: Exception, trainer: pl.Trainer | None) -> None:
    """Warn that an overlapped snapshot copy was dropped because the weights changed during it."""
    where = f" (raised at step {trainer.global_step})" if trainer is not None else ""
    rank_zero_warn(
        f"TrajectoryPCA: {err}{where}, so that snapshot was dropped. Something changed the weights in "
        "place after `on_train_batch_end` and before the next optimizer step (another callback's or "
        "the module's hook?). Snapshots are copied before training goes on from now on; pass "
        "`overlap_copy=False` to do so from the start.",
        category=LandscapeWarning,
    )


def warn_write_failed(err: OSError, trainer: pl.Trainer | None, stored: int) -> None:
    """Warn that a snapshot write failed and the trajectory stops with the ``stored`` snapshots."""
    where = f" at step {trainer.global_step}" if trainer is not None else ""
    rank_zero_warn(
        f"TrajectoryPCA: writing a snapshot failed{where} ({err}); no more snapshots are taken, training goes "
        f"on, and the PCA uses the {stored} snapshot(s) stored so far.",
        category=LandscapeWarning,
    )


def shared_pca(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    store: SnapshotStore | None,
    names: list[str],
    *,
    center: bool,
    seed: int,
) -> tuple[PCAResult, int]:
    """The PCA of ``store``'s snapshots (of the parameters ``names``) on global rank zero, broadcast to every rank.

    Rank zero holds the snapshots; the others pass ``store=None``. Raises
    :class:`~lightning_landscape.trajectory.TooFewSnapshotsError` on every rank alike.
    """
    found: tuple[PCAResult | None, int] = (None, 0)
    if store is not None:
        params = dict(pl_module.named_parameters())
        try:
            pca = trajectory_pca(
                store,
                [params[name] for name in names],  # read block by block: no flat copy of the weights
                2,
                center=center,
                final_step=trainer.global_step,
                final_epoch=trainer.current_epoch,
                seed=seed,
            )
            found = (pca, len(store))
        except TooFewSnapshotsError as err:
            found = (None, err.count)
    pca, count = Collectives(trainer).broadcast(found)
    if pca is None:
        raise TooFewSnapshotsError(count)
    return pca, count
