"""The snapshot store's background thread and the reusable row buffers that bound its queue.

:class:`RowWorker` runs the work a snapshot must not do on the training thread: deferred
copies, file writes, device copies landing, and pre-faulting memory rows ahead of use.
Pre-faulting is *background* work: a copy or write queued after it runs first, so the
optimizer step that waits for a snapshot's copy never waits for pages of later rows
(on a VM whose host backs fresh pages lazily, faulting 8 MB took 12-24 ms here, longer
than a step of a 1M-weight model). :class:`BufferRing` hands out the row buffers that
disk writes and device copies go through.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial

import torch

#: A unit of the writer thread's work.
Task = Callable[[], None]
#: The row of a task whose failure loses no snapshot (pre-faulting): past any real row.
NO_ROW = 2**62


class RowWorker:
    """One background thread running tasks in submission order, ``background`` ones only when no other waits.

    Tasks of each kind run in the order they were submitted; a task submitted without
    ``background`` runs before any background task that has not started. A thread cannot raise
    into the training thread, so a task that raises records its error with its row; the tasks
    after it are skipped (their cleanups still run, so buffers come back) until
    :meth:`take_error` hands the error over, together with the first row not stored.

    Example:
        >>> worker, out = RowWorker(), []
        >>> worker.submit(0, lambda: out.append("written"))
        >>> worker.submit(1, lambda: 1 / 0)
        >>> worker.submit(2, lambda: out.append("skipped"))
        >>> worker.wait()
        >>> row, err = worker.take_error()
        >>> worker.stop()
        >>> out, row, type(err).__name__
        (['written'], 1, 'ZeroDivisionError')
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._lanes: tuple[deque, deque] = (deque(), deque())  # (first, background)
        self._pending = 0  # queued or running
        self._stopping = False
        self._error: BaseException | None = None
        self._error_row = 0
        self._thread: threading.Thread | None = None

    @property
    def failed(self) -> bool:
        """Whether a task failed since the last :meth:`take_error`."""
        return self._error is not None

    @property
    def alive(self) -> bool:
        """Whether the thread runs (it starts with the first task)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, row: int, task: Task, cleanup: Task | None = None, *, background: bool = False) -> None:
        """Run ``task`` (about snapshot ``row``) after the tasks of its kind submitted before, then ``cleanup``."""
        self.submit_all([(row, task, cleanup)], background=background)

    def submit_all(self, items: list[tuple[int, Task, Task | None]], *, background: bool = False) -> None:
        """:meth:`submit` each ``(row, task, cleanup)`` in order, under one lock and with one wake-up.

        The pieces of a row's pre-faulting go together: each wake-up of the waiting thread is a
        system call the training thread pays (eight per step at 1M weights, one at a time).
        """
        with self._cv:
            self._pending += len(items)
            self._lanes[int(background)].extend(items)
            self._cv.notify_all()
        if not self.alive:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="lightning_landscape-snapshots", daemon=True)
            self._thread.start()

    def _next(self) -> tuple[int, Task, Task | None] | None:
        with self._cv:
            while not any(self._lanes):
                if self._stopping:
                    return None
                self._cv.wait()
            return (self._lanes[0] or self._lanes[1]).popleft()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            row, task, cleanup = item
            try:
                if self._error is None:
                    task()
                else:
                    self._error_row = min(self._error_row, row)  # skipped: not stored either
            except BaseException as err:  # any failure must reach the training thread, which sees no other way
                self._error, self._error_row = err, row
            finally:
                try:
                    if cleanup is not None:
                        cleanup()
                finally:
                    # Drop the task before waiting for the next: it holds a one-snapshot buffer.
                    item = task = cleanup = None  # type: ignore[assignment]
                    with self._cv:
                        self._pending -= 1
                        self._cv.notify_all()

    def fail(self, row: int, err: BaseException) -> None:
        """Record ``err`` as a failure of the task about ``row`` found afterwards (the first failure is kept)."""
        with self._cv:
            if self._error is None:
                self._error, self._error_row = err, row
            else:
                self._error_row = min(self._error_row, row)

    def wait(self, until: Callable[[], bool] | None = None) -> None:
        """Wait until every submitted task has run (or, with ``until``, until it returns true or nothing is left)."""
        with self._cv:
            while self._pending and not (until is not None and until()):
                self._cv.wait()

    def take_error(self) -> tuple[int, BaseException] | None:
        """``(first row not stored, error)`` of a failed task, once the queue has run out, or ``None``."""
        if self._error is None:
            return None
        self.wait()
        with self._cv:
            err, self._error = self._error, None
            return self._error_row, err  # type: ignore[return-value]

    def stop(self) -> None:
        """Run what is queued, then end the thread (a later :meth:`submit` starts a new one)."""
        if self._thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify_all()
            self._thread.join()
            self._thread = None


class BufferRing:
    """Up to ``size`` reusable one-snapshot row buffers, handed out in turn: what bounds the writer's queue.

    :meth:`acquire` waits while every buffer is in flight, so a disk slower than the snapshots
    slows the appends (back-pressure) instead of queueing copies without bound. Buffers are made
    at the first :meth:`acquire` (pre-faulted with ``prepare`` on the worker thread, if given) and
    dropped by :meth:`clear`.

    Example:
        >>> worker = RowWorker()
        >>> ring = BufferRing(lambda: torch.empty(3), 2, worker)
        >>> a, b = ring.acquire(), ring.acquire()
        >>> ring.release(a)
        >>> ring.acquire() is a
        True
        >>> worker.stop()
    """

    def __init__(
        self,
        make: Callable[[], torch.Tensor],
        size: int,
        worker: RowWorker,
        prepare: Callable[[torch.Tensor], None] | None = None,
    ) -> None:
        self._make = make
        self.size = size
        self._worker = worker
        self._prepare = prepare
        self._free: queue.SimpleQueue[torch.Tensor] = queue.SimpleQueue()
        self._made = 0

    def acquire(self) -> torch.Tensor:
        """A free buffer, waiting for one while all are in flight."""
        if self._made == 0:
            for _ in range(self.size):
                buf = self._make()
                self._made += 1
                if self._prepare is None:
                    self._free.put(buf)
                else:  # free once prepared
                    self._worker.submit(NO_ROW, partial(self._prepare, buf), partial(self._free.put, buf))
        while True:
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                if not self._worker.alive:  # nothing would ever come back
                    raise RuntimeError("the snapshot writer thread has stopped with every buffer in flight") from None

    def release(self, buf: torch.Tensor) -> None:
        """Hand ``buf`` back."""
        self._free.put(buf)

    def clear(self) -> None:
        """Drop the buffers (all must be back: call after the worker's :meth:`RowWorker.wait`)."""
        while not self._free.empty():
            self._free.get()
        self._made = 0
