"""Snapshots off the training path: straight copies into the store, the background writer, dtype="auto".

The snapshots TrajectoryPCA stores are compared bit for bit with weights recorded by hand after each
optimizer step, for every storage, dtype and schedule; the store's writer thread is checked for
back-pressure, for reusing its buffers, and for surfacing its errors with the store left consistent.
"""

from __future__ import annotations

import errno
import mmap
import resource
import sys
import threading
import warnings
from functools import partial

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_landscape import LandscapeWarning, TrajectoryPCA
from lightning_landscape.trajectory import AUTO_FLOAT16_PARAMS, SnapshotStore, _npy, blocks, checks

from .helpers import small_fit


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float32 tensor (so -0.0 != 0.0 and NaNs compare)."""
    return t.contiguous().view(torch.int32)


class HandRecorder(Callback):
    """Records the trainable weights by hand where TrajectoryPCA should snapshot, and reads its store at fit end.

    Listed after the TrajectoryPCA callback, so its ``on_fit_end`` runs after the PCA, with the store still open.
    """

    def __init__(self, trajectory: TrajectoryPCA, every_n_steps: int | None, every_n_epochs: int | None) -> None:
        self.trajectory = trajectory
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.rows: dict[int, torch.Tensor] = {}
        self.stored: list[torch.Tensor] = []
        self.steps: list[int] = []

    def _take(self, trainer, module) -> None:
        flat = [p.detach().reshape(-1).clone() for p in module.parameters() if p.requires_grad]
        self.rows[trainer.global_step] = torch.cat(flat)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._take(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._take(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        store = self.trajectory.store
        self.dtype, self.storage = store.torch_dtype, store.storage
        self.stored = [store.get(i) for i in range(len(store))]
        self.steps = store.steps


@pytest.mark.parametrize("schedule", [{"every_n_steps": 2}, {"every_n_epochs": 1}])
@pytest.mark.parametrize("dtype", ["float32", "float16", "auto-small", "auto-large"])
@pytest.mark.parametrize("storage", ["memory", "disk", "auto-spill"])
def test_snapshots_are_the_hand_recorded_weights_bit_for_bit(tmp_path, monkeypatch, storage, dtype, schedule):
    kwargs: dict = {"storage": storage}
    if storage == "auto-spill":  # 1 float32 row of the 854-weight model in memory, then all of them on disk
        kwargs = {"storage": "auto", "max_memory_mb": 854 * 4 / 2**20, "snapshot_dir": str(tmp_path / "snaps")}
    if dtype == "auto-large":  # the threshold lowered below this model: "auto" is float16 here
        monkeypatch.setattr(checks, "AUTO_FLOAT16_PARAMS", 100)
    cb = TrajectoryPCA(
        **schedule, resolution=3, num_batches=1, progress=False, snapshot_dtype=dtype.split("-")[0], **kwargs
    )
    recorder = HandRecorder(cb, schedule.get("every_n_steps"), schedule.get("every_n_epochs"))
    small_fit(tmp_path, [cb, recorder], max_epochs=2)
    expected_dtype = {"float32": torch.float32, "float16": torch.float16, "auto": torch.float32}[dtype.split("-")[0]]
    if dtype == "auto-large":
        expected_dtype = torch.float16
    assert recorder.dtype == expected_dtype
    assert recorder.storage == ("memory" if storage == "memory" else "disk")
    expected_steps = [0, 2, 4, 6, 8, 10, 12] if "every_n_steps" in schedule else [0, 6, 12]
    assert recorder.steps == expected_steps == sorted(recorder.rows)
    for step, row in zip(recorder.steps, recorder.stored):
        want = recorder.rows[step].to(expected_dtype).to(torch.float32)
        assert torch.equal(bits(row), bits(want)), f"snapshot at step {step} differs from the weights after it"


def test_parameter_lists_are_copied_exactly_as_the_flat_vector_straight_into_the_row(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(3, 4, generator=gen).t(),
        torch.randn(5, dtype=torch.float64, generator=gen),
        torch.tensor(0.3),
    ]
    flat = torch.cat([p.reshape(-1).to(torch.float32) for p in parts])
    for dtype in ("float32", "float16", "bfloat16"):
        store = SnapshotStore(18, dtype=dtype, storage="memory")
        with monkeypatch.context() as m:
            real_cat = torch.cat

            def cat(tensors, *args, out=None, _cat=real_cat, _blocks=store._blocks, **kwargs):
                # allowed only straight into one of the store's rows
                block = _blocks.blocks[0].tensor
                assert out is not None and out.untyped_storage().data_ptr() == block.untyped_storage().data_ptr()
                return _cat(tensors, *args, out=out, **kwargs)

            m.setattr(torch, "cat", cat)
            store.append(parts, step=0, epoch=0)
            store.append([p.contiguous() for p in parts], step=0, epoch=0)
        store.append(flat, step=2, epoch=0)
        torch_dtype = store.torch_dtype
        # float64 -> 16 bits rounds once in the list case; for these values both roundings agree.
        for k in range(3):  # non-contiguous parts (one copy_ each), contiguous (one cat into the row), flat
            assert torch.equal(bits(store.get(k)), bits(flat.to(torch_dtype).float())), (dtype, k)
        store.close()


class BlockingWrites:
    """Replaces BlockWriter.write: each write waits for ``release``, and records the buffers it was given."""

    def __init__(self, monkeypatch, fail_at: int | None = None, error: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.buffers: list[int] = []
        self.rows: list[int] = []
        self.fail_at, self.error = fail_at, error
        real = _npy.BlockWriter.write
        outer = self

        def write(writer, index, block, row, vec):
            outer.started.set()
            outer.release.wait()
            outer.buffers.append(id(vec))
            outer.rows.append(len(outer.rows))
            if outer.fail_at is not None and len(outer.rows) - 1 == outer.fail_at:
                raise outer.error
            return real(writer, index, block, row, vec)

        monkeypatch.setattr(_npy.BlockWriter, "write", write)


def test_a_slow_disk_holds_appends_back_at_max_pending_and_reuses_the_buffers(tmp_path, monkeypatch):
    writes = BlockingWrites(monkeypatch)
    store = SnapshotStore(1000, dtype="float32", storage="disk", snapshot_dir=tmp_path, block_rows=4, max_pending=2)
    rows = torch.randn(10, 1000, generator=torch.Generator().manual_seed(1))
    store.append(rows[0], step=0, epoch=0)
    store.append(rows[1], step=1, epoch=0)  # both buffers now in flight: the writer is held
    third = threading.Thread(target=store.append, args=(rows[2],), kwargs={"step": 2, "epoch": 0})
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third append must wait for a buffer while two snapshots are in flight"
    assert len(store) == 2 and writes.buffers == []
    writes.release.set()
    third.join()
    for k in range(3, 10):
        store.append(rows[k], step=k, epoch=0)
    store.flush()
    assert len(set(writes.buffers)) == 2 and len(writes.buffers) == 10  # two reused buffers, no fresh one per snapshot
    assert store.steps == list(range(10))
    for k in range(10):
        assert torch.equal(store.get(k), rows[k])
    store.close()


@pytest.mark.parametrize("when", ["append", "flush", "check_errors", "close"])
def test_a_failed_background_write_surfaces_and_leaves_the_store_consistent(tmp_path, monkeypatch, when):
    writes = BlockingWrites(monkeypatch, fail_at=3, error=OSError(errno.ENOSPC, "No space left on device"))
    store = SnapshotStore(
        500, dtype="float16", storage="disk", snapshot_dir=tmp_path, block_rows=2, prefix="run", max_pending=8
    )
    rows = torch.randn(8, 500, generator=torch.Generator().manual_seed(2))
    for k in range(5):  # all queued while the writer is held, so none fails before the loop ends
        store.append(rows[k], step=10 * k, epoch=k)
    writes.release.set()
    store._blocks._worker.wait()  # snapshot 3's write has failed and snapshot 4's was skipped
    with pytest.raises(OSError, match="No space left on device") as info:
        if when == "append":
            store.append(rows[5], step=50, epoch=5)
        elif when == "flush":
            store.flush()
        elif when == "check_errors":
            store.check_errors()
        else:
            store.close()
    assert "snapshot writer thread" in "".join(getattr(info.value, "__notes__", ["snapshot writer thread"]))
    # Rolled back to the snapshots written before the failure: count, steps, epochs; the files stay.
    assert len(store) == 3 and store.steps == [0, 10, 20] and store.epochs == [0, 1, 2]
    if when == "close":
        return
    store.check_errors()  # raised once
    assert all(p.exists() for p in store.files) and len(store.files) == 3
    for k in range(3):
        assert torch.equal(store.get(k), rows[k].half().float())
    state = store.state_dict()
    assert state["count"] == 3 and state["steps"] == [0, 10, 20]
    writes.fail_at = None
    store.append(rows[6], step=30, epoch=3)  # goes on where the trajectory stopped
    again = SnapshotStore.from_state_dict(store.state_dict())
    assert len(again) == 4 and torch.equal(again.get(3), rows[6].half().float())
    again.close()
    store.close()


def test_an_error_of_another_kind_in_the_writer_is_raised_as_it_is(tmp_path, monkeypatch):
    BlockingWrites(monkeypatch, fail_at=0, error=RuntimeError("disk driver bug")).release.set()
    store = SnapshotStore(10, storage="disk", snapshot_dir=tmp_path)
    store.append(torch.ones(10), step=0, epoch=0)
    with pytest.raises(RuntimeError, match="disk driver bug"):
        store.flush()
    assert len(store) == 0
    store.close()


def test_a_writer_failure_during_training_stops_the_trajectory_and_training_goes_on(tmp_path, monkeypatch):
    writes = BlockingWrites(monkeypatch, fail_at=4, error=OSError(errno.ENOSPC, "No space left on device"))
    writes.release.set()
    cb = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False, storage="disk")
    with pytest.warns(LandscapeWarning, match=r"No space left on device.*training goes on.*4 snapshot"):
        trainer, _, _ = small_fit(tmp_path, [cb], max_epochs=2)
    assert trainer.global_step == 12  # the whole fit ran
    assert cb.pca is not None and cb.pca.steps == [0, 1, 2, 3, 12]  # 4 snapshots + the final weights


def test_memory_rows_are_prefaulted_ahead_on_the_writer_thread():
    store = SnapshotStore(1000, dtype="float32", storage="memory", block_rows=8)
    seen: list[str] = []
    real = _npy.prefault

    def spy(tensor):
        seen.append(threading.current_thread().name)
        return real(tensor)

    blocks = store._blocks
    with pytest.MonkeyPatch.context() as m:
        m.setattr("lightning_landscape.trajectory.blocks.prefault", spy)
        store.append(torch.ones(1000), step=0, epoch=0)
        blocks._worker.wait()
    assert seen and set(seen) == {"lightning_landscape-snapshots"}
    assert blocks._faulted > len(store)  # the next snapshot's row is ready before it is taken
    store.close()


def test_big_rows_are_prefaulted_two_ahead_in_background_pieces(monkeypatch):
    monkeypatch.setattr(blocks, "PREFAULT_BYTES", 20000)  # a row of 5000 float32 is "big": two ahead
    monkeypatch.setattr(blocks, "PREFAULT_PIECE_BYTES", 8192)  # two pages per piece: three pieces per row
    store = SnapshotStore(5000, dtype="float32", storage="memory", block_rows=8)
    pieces: dict[int, list[list[int]]] = {}
    real = blocks.SnapshotBlocks._prefault_piece

    def spy(self, row, views):
        pieces.setdefault(row, []).append([v.numel() for v in views])
        return real(self, row, views)

    monkeypatch.setattr(blocks.SnapshotBlocks, "_prefault_piece", spy)
    for k in range(5):
        store.append(torch.full((5000,), float(k)), step=k, epoch=0)
        assert store._blocks._fault_asked >= len(store) + 2  # the next two rows are queued or ready
    store._blocks._worker.wait()
    # One zero per page (5 pages of a 20,000-byte row, 1024 float32 apart) and the last element, two
    # pages per piece: a copy queued behind them waits for one piece at most.
    assert pieces and all(p == [[2], [2], [1, 1]] for p in pieces.values())
    assert store._blocks._faulted == store._blocks._fault_asked <= 5 + 2 + 1
    assert [store.get(k)[0].item() for k in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    store.close()


def test_the_worker_runs_copies_and_writes_before_queued_background_work():
    worker, order, gate = blocks.RowWorker(), [], threading.Event()
    worker.submit(blocks.NO_ROW, gate.wait, background=True)  # holds the thread while the rest is queued
    for k in range(3):
        worker.submit(blocks.NO_ROW, lambda k=k: order.append(f"fault {k}"), background=True)
    worker.submit(0, lambda: order.append("copy 0"))
    worker.submit(1, lambda: order.append("write 1"))
    gate.set()
    worker.wait()
    worker.stop()
    assert order == ["copy 0", "write 1", "fault 0", "fault 1", "fault 2"]


def test_tasks_submitted_together_run_in_order_with_their_cleanups_and_count_as_pending():
    worker, order, gate = blocks.RowWorker(), [], threading.Event()
    worker.submit(blocks.NO_ROW, gate.wait)  # holds the thread while the rest is queued
    pieces = [(blocks.NO_ROW, lambda k=k: order.append(f"piece {k}"), None) for k in range(3)]
    pieces[-1] = (blocks.NO_ROW, pieces[-1][1], lambda: order.append("row ready"))
    worker.submit_all(pieces, background=True)
    worker.submit(0, lambda: order.append("copy 0"))
    assert worker._pending == 5  # the gate, three pieces, the copy
    gate.set()
    worker.wait()
    worker.stop()
    assert order == ["copy 0", "piece 0", "piece 1", "piece 2", "row ready"]


def test_a_deferred_copy_overtakes_the_pre_faulting_of_its_row_and_keeps_its_values(monkeypatch):
    """The copy runs first; the row's pre-faulting (which writes zeros) then leaves that row alone."""
    store = SnapshotStore(4096, dtype="float32", storage="memory", block_rows=4)
    worker, gate, order = store._blocks._worker, threading.Event(), []
    real, prefault_rows = blocks.row_copy, blocks.SnapshotBlocks._prefault_rows
    monkeypatch.setattr(blocks, "row_copy", lambda *a, **k: partial(_then, order.append, "copy", real(*a, **k)))
    monkeypatch.setattr(
        blocks.SnapshotBlocks, "_prefault_rows", lambda self, *a: (order.append(a[0]), prefault_rows(self, *a))
    )
    worker.submit(blocks.NO_ROW, gate.wait)  # holds the thread while the pre-faulting and the copy are queued
    values = [torch.full((4096,), 1.5)]
    store.append(values, step=0, epoch=0, defer=True)
    gate.set()
    store.fence()
    store.flush()
    assert order[0] == "copy" and order[1] == 0  # the copy first, then the pre-faulting from row 0 on
    assert torch.equal(store.get(0), values[0])
    store.close()


def _then(first, arg, copy):
    first(arg)
    return copy()


def _fresh_pages(num_pages: int) -> tuple[mmap.mmap, torch.Tensor]:
    """A float32 tensor over a new anonymous mapping (and the mapping): no page of it has been touched yet."""
    buf = mmap.mmap(-1, num_pages * mmap.PAGESIZE)
    return buf, torch.frombuffer(buf, dtype=torch.float32)


def _minor_faults_of(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
def test_prefault_leaves_no_page_fault_for_the_copy_into_the_row():
    pages = 2048  # 8 MiB with 4 KiB pages
    _, control = _fresh_pages(pages)
    assert _minor_faults_of(lambda: control.fill_(1.0)) >= pages // 2  # a fresh row does fault
    _, row = _fresh_pages(pages)
    _npy.prefault(row)
    assert _minor_faults_of(lambda: row.fill_(2.0)) < pages // 20
    assert bool((row == 2.0).all())


def _zero_in_pieces(row):
    pieces = _npy.page_pieces(row, 2 * mmap.PAGESIZE)
    assert [len(views) for views in pieces][-1] == 2 and all(v.numel() <= 2 for p in pieces for v in p)
    for views in pieces:  # as the writer runs them: one call per piece
        torch._foreach_zero_(views)


@pytest.mark.parametrize("fault", [_npy.prefault, _zero_in_pieces], ids=["whole row", "in pieces"])
@pytest.mark.parametrize("start", [0, 3], ids=["page-aligned", "unaligned"])
def test_prefault_writes_one_zero_in_every_page_of_the_row_and_nothing_else(start, fault):
    per_page = mmap.PAGESIZE // 4
    base = torch.ones(10 * per_page + 8)
    row = base[start : start + 4 * per_page + 5]  # 4 pages and a bit, starting at element `start`
    fault(row)
    zeros = (row == 0).nonzero().flatten().tolist()
    pages = {(row.data_ptr() + 4 * i) // mmap.PAGESIZE for i in zeros}
    first, last = row.data_ptr() // mmap.PAGESIZE, (row.data_ptr() + 4 * row.numel() - 1) // mmap.PAGESIZE
    assert pages == set(range(first, last + 1))  # every page the row spans, the last too
    assert len(zeros) <= last - first + 2
    assert bool((base[:start] == 1).all() and (base[start + row.numel() :] == 1).all())  # nothing outside it


def test_auto_dtype_is_float32_for_small_models_and_float16_from_the_threshold():
    assert SnapshotStore(5_000, storage="memory").dtype == "float32"
    assert SnapshotStore(AUTO_FLOAT16_PARAMS - 1, dtype="auto", storage="memory").dtype == "float32"
    big = SnapshotStore(AUTO_FLOAT16_PARAMS, dtype="auto", storage="memory")
    assert big.dtype == "float16" and big.state_dict()["dtype"] == "float16"  # resumes as what it stored
    with pytest.raises(ValueError, match=r"`dtype`='half'.*'auto', 'float32', 'float16', 'bfloat16'"):
        SnapshotStore(4, dtype="half")
    with pytest.raises(ValueError, match=r"`max_pending`=0"):
        SnapshotStore(4, max_pending=0)
    with pytest.raises(ValueError, match=r"`vec` has 2 tensors of 5 elements"):
        SnapshotStore(4, storage="memory").append([torch.zeros(2), torch.zeros(3)], step=0, epoch=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_deferred_device_copies_are_the_weights_before_the_fenced_change(tmp_path, storage):
    params = [torch.randn(300, 7, device="cuda"), torch.randn(11, device="cuda")]
    expected = []
    store = SnapshotStore(2111, dtype="float16", storage=storage, snapshot_dir=tmp_path, block_rows=2)
    for k in range(5):
        expected.append(torch.cat([p.reshape(-1) for p in params]).cpu().half().float())
        store.append(params, step=k, epoch=0, defer=True)
        store.fence()  # what TrajectoryPCA does before the optimizer step
        with warnings.catch_warnings():
            for p in params:
                p.mul_(-1.5).add_(1.0)  # the "optimizer step", on the training stream
    for k in range(5):
        assert torch.equal(bits(store.get(k)), bits(expected[k]))
    store.close()


class HeldCopies:
    """Makes the writer thread's copies of deferred snapshots wait for ``go`` (the training thread's copies do not)."""

    def __init__(self, monkeypatch) -> None:
        self.go = threading.Event()
        self.started = threading.Event()
        real = blocks.row_copy

        def row_copy(row, tensors, **kwargs):
            copy = real(row, tensors, **kwargs)

            def held():
                if threading.current_thread() is not threading.main_thread():
                    self.started.set()
                    assert self.go.wait(10)
                return copy()

            return held

        monkeypatch.setattr(blocks, "row_copy", row_copy)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_deferred_cpu_copies_run_on_the_writer_and_are_the_weights_before_the_fenced_change(
    tmp_path, monkeypatch, storage
):
    held = HeldCopies(monkeypatch)
    params = [torch.randn(300, 7), torch.randn(11)]
    expected = []
    store = SnapshotStore(2111, dtype="float16", storage=storage, snapshot_dir=tmp_path, block_rows=2)
    for k in range(5):
        expected.append(torch.cat([p.reshape(-1) for p in params]).half().float())
        store.append(params, step=k, epoch=0, defer=True)  # returns while the writer's copy waits
        assert held.started.wait(10)
        held.started.clear()
        held.go.set()
        store.fence()  # what TrajectoryPCA does before the optimizer step
        held.go.clear()
        with torch.no_grad():
            for p in params:
                p.mul_(-1.5).add_(1.0)  # the "optimizer step"
    store.flush()
    for k in range(5):
        assert torch.equal(bits(store.get(k)), bits(expected[k]))
    store.close()


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_a_change_before_the_fence_drops_the_deferred_snapshot_and_rolls_the_store_back(tmp_path, monkeypatch, storage):
    held = HeldCopies(monkeypatch)
    params = [torch.randn(40), torch.randn(3, 3)]
    store = SnapshotStore(49, storage=storage, snapshot_dir=tmp_path)
    store.append(params, step=0, epoch=0)
    kept = store.get(0).clone() if storage == "memory" else None
    store.append(params, step=1, epoch=0, defer=True)
    assert held.started.wait(10)
    with torch.no_grad():
        params[1].add_(1.0)  # in place, before the copy is done and before any fence
    held.go.set()
    store.fence()
    with pytest.raises(checks.SnapshotChangedError, match=r"snapshot 1: 1 of its 2 tensors \(the first at index 1\)"):
        store.append(params, step=2, epoch=0)
    assert len(store) == 1 and store.steps == [0]
    store.append(params, step=2, epoch=0)  # goes on from the snapshots kept
    assert store.steps == [0, 2]
    assert torch.equal(store.get(1), torch.cat([p.reshape(-1) for p in params]))
    if kept is not None:
        assert torch.equal(store.get(0), kept)
    store.close()


class DeferSpy:
    """Records the ``defer`` argument of every SnapshotStore.append."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[int, bool]] = []
        real = SnapshotStore.append
        spy = self

        def append(store, vec, *, step, epoch, defer=False):
            spy.calls.append((step, defer))
            return real(store, vec, step=step, epoch=epoch, defer=defer)

        monkeypatch.setattr(SnapshotStore, "append", append)

    @property
    def deferred(self) -> list[int]:
        return [step for step, defer in self.calls if defer]


def test_copies_overlap_only_where_another_training_batch_surely_follows(tmp_path, monkeypatch):
    # 6 batches an epoch, validation after the 3rd and the 6th, stopped at step 11 (5th batch of epoch 2).
    spy = DeferSpy(monkeypatch)
    cb = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False)
    small_fit(tmp_path, [cb], max_epochs=3, max_steps=11, val_check_interval=3)
    assert [s for s, _ in spy.calls] == list(range(12))
    assert spy.deferred == [1, 2, 4, 5, 7, 8, 10]  # not at fit start, before validation, at epoch ends, at the end


def test_no_overlap_when_turned_off_or_the_module_has_batch_hooks_or_optimizes_manually(tmp_path, monkeypatch):
    from .helpers import DigitsClassifier, DigitsDataModule

    class Clamped(DigitsClassifier):
        def on_train_batch_end(self, *args):  # runs after the callbacks' hook: may change the weights
            pass

    class Manual(DigitsClassifier):
        def __init__(self) -> None:
            super().__init__(channels=4)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            return loss

        def landscape_step(self, batch):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    import pytorch_lightning as pl

    spy = DeferSpy(monkeypatch)
    for model, kwargs in [
        (DigitsClassifier(channels=4), {"overlap_copy": False}),
        (Clamped(channels=4), {}),
        (Manual(), {}),
        (DigitsClassifier(channels=4), {}),
    ]:
        spy.calls.clear()
        cb = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False, **kwargs)
        trainer = pl.Trainer(
            max_epochs=1, accelerator="cpu", logger=False, callbacks=[cb], enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(model, DigitsDataModule(batch_size=32, num_train=192))
        assert len(spy.calls) == 7
        assert spy.deferred == ([] if type(model) is not DigitsClassifier or kwargs else [1, 2, 3, 4, 5]), model


class Touch(Callback):
    """After TrajectoryPCA's hook at step ``at``: an in-place write that leaves the values as they are."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(1.0)


def test_a_weight_change_during_an_overlapped_copy_drops_that_snapshot_and_later_ones_are_copied_at_once(
    tmp_path, monkeypatch
):
    real = blocks.row_copy

    def slow_on_the_writer(row, tensors, **kwargs):
        copy = real(row, tensors, **kwargs)

        def slow():
            threading.Event().wait(0.2)  # the copy is still running when the next hook changes the weights
            return copy()

        return slow

    monkeypatch.setattr(blocks, "row_copy", slow_on_the_writer)
    spy = DeferSpy(monkeypatch)
    cb = TrajectoryPCA(every_n_steps=1, resolution=3, num_batches=1, progress=False, snapshot_dtype="float32")
    recorder = HandRecorder(cb, 1, None)
    with pytest.warns(LandscapeWarning, match=r"snapshot 2: .*changed in place.*dropped.*overlap_copy=False"):
        small_fit(tmp_path, [cb, Touch(at=2), recorder], max_epochs=1)
    assert spy.deferred == [1, 2]  # then no more
    assert recorder.steps == [0, 1, 3, 4, 5, 6]
    for step, row in zip(recorder.steps, recorder.stored):
        assert torch.equal(bits(row), bits(recorder.rows[step])), step
    assert cb.pca is not None
