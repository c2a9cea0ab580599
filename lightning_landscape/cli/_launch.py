"""The processes ``interpolate`` and ``connect`` run on: one device, or one process per device under DDP.

``--accelerator``/``--devices`` go to Lightning Fabric (Lightning's launcher for loops of one's own):
``--devices 1`` runs here; more devices run the same command once per device under DDP (Fabric
re-runs it in child processes, as ``pl.Trainer(strategy="ddp")`` does), each process evaluating its
own shard of the data. Per-point sums and the curve fit's gradients are summed over the processes
through the same health-checked collectives the callbacks use, so every process holds the same
results; only global rank zero prints and writes files.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lightning_landscape.cli._errors import CLIError
from lightning_landscape.data import Reduce, cache_batches


@contextmanager
def _lightning_info_hidden() -> Iterator[None]:
    # Fabric's "GPU available: ..." lines are not this command's output.
    loggers = [logging.getLogger(name) for name in ("lightning.fabric", "lightning_fabric", "pytorch_lightning")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _close_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Processes:
    """Where a command runs: ``device``, ``reduce`` (a sum over all processes, or None on one),
    ``is_global_zero`` (the process that prints and writes) and the data sharding.

    Build it (which checks ``--accelerator``/``--devices``) before anything slow, then call
    :meth:`launch` once, after every argument check: under DDP it starts the other processes.

    Example:
        >>> procs = Processes("cpu", "1")
        >>> procs.launch()
        >>> procs.device, procs.world_size, procs.reduce is None, procs.is_global_zero
        (device(type='cpu'), 1, True, True)
    """

    def __init__(self, accelerator: str, devices: str | int) -> None:
        from lightning_fabric import Fabric

        count = int(devices) if str(devices).isdigit() else devices
        flags = f"--accelerator={accelerator!r} --devices={devices!r}"
        if count == 0:
            raise CLIError(f"{flags} selects no device; expected --devices >= 1 (or a device list).")
        try:
            with _lightning_info_hidden():
                # Off a notebook, more than one device means DDP with one process per device, started
                # by re-running this command.
                self.fabric = Fabric(accelerator=accelerator, devices=count)
        except (ValueError, RuntimeError, TypeError) as err:
            raise CLIError(f"{flags} cannot be used: {' '.join(str(err).split())}") from None
        self._comm: Any = None

    @property
    def world_size(self) -> int:
        """The number of processes."""
        return int(self.fabric.world_size)

    def launch(self) -> None:
        """Start the other processes (DDP) and join the process group; a no-op on one device."""
        from lightning_landscape.callbacks._distributed import Collectives

        with _lightning_info_hidden():
            self.fabric.launch()
        if self.world_size > 1:
            # A process group left to the interpreter's teardown can abort it ("terminate called without
            # an active exception") after the work is done; this command owns it, so it closes it.
            atexit.register(_close_process_group)
        # Collectives needs a `strategy` and a `world_size`, which a Fabric has as a Trainer does.
        self._comm = Collectives(self.fabric)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        """This process's device."""
        return self.fabric.device

    @property
    def is_global_zero(self) -> bool:
        """Whether this process prints and writes the results."""
        return bool(self.fabric.is_global_zero)

    @property
    def reduce(self) -> Reduce | None:
        """A health-checked sum over all processes, or None on one process."""
        return self._comm.reduce if self.world_size > 1 else None

    @property
    def progress(self) -> bool | None:
        """The progress setting for this process: the default on rank zero, nothing elsewhere."""
        return None if self.is_global_zero else False

    def shard(self, loader: Any) -> Any:
        """``loader`` with a DistributedSampler (this process's shard), or as it is on one process."""
        if loader is None or self.world_size == 1:
            return loader
        return self.fabric.setup_dataloaders(loader, use_distributed_sampler=True, move_to_device=False)

    def batches(self, loader: Any, num_batches: int | None) -> list[Any]:
        """This process's shard of ``loader`` read onto the device, DistributedSampler padding dropped
        (so no sample is evaluated twice); ``num_batches`` is per process."""
        from lightning_landscape.callbacks._distributed import drop_padding

        sharded = self.shard(loader)
        return drop_padding(cache_batches(sharded, self.device, num_batches), sharded)
