"""Progress of a long analysis: a tqdm bar on a terminal, log lines everywhere else.

Off a terminal (a cluster job's log file, a notebook's captured output) a bar prints
nothing useful, so the run would look hung for as long as the analysis takes; instead a
line goes through Python's logging (logger ``lightning_landscape``) at the start, at
least every tenth of the points or every :data:`LOG_EVERY_S` seconds, and at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("lightning_landscape")
T = TypeVar("T")
#: Longest silence between two log lines: long enough not to flood a log, short enough to look alive.
LOG_EVERY_S = 30.0
#: A line at least every this share of the points.
LOG_EVERY_FRACTION = 0.1


def _ensure_handler() -> None:
    # As Lightning does for its own logger: INFO lines reach stderr unless the user set up logging.
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)


def _is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def track(
    items: Iterable[T], total: int, *, description: str, progress: bool | None, unit_cost: str = ""
) -> Iterator[T]:
    """Iterate ``items`` showing progress: a bar (``progress=True``, or ``None`` on a terminal),
    log lines (``None`` off a terminal), or nothing (``False``).

    ``unit_cost`` (e.g. ``"6 forward passes"``) is stated in the first line with the total.

    Example:
        >>> list(track(range(3), 3, description="demo", progress=False))
        [0, 1, 2]
    """
    if progress is False:
        yield from items
        return
    _ensure_handler()
    cost = f" x {unit_cost}" if unit_cost else ""
    log.info("%s: %d point(s)%s", description, total, cost)  # what the analysis will cost, before it starts
    if progress is True or (progress is None and _is_terminal()):
        yield from tqdm(items, total=total, desc=description, leave=False)
        return
    yield from _logged(items, total, description)


def _logged(items: Iterable[T], total: int, description: str) -> Iterator[Any]:
    start = last = time.monotonic()
    step = max(1, int(total * LOG_EVERY_FRACTION))
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done == total or done % step == 0 or now - last >= LOG_EVERY_S:
            elapsed = now - start
            left = elapsed / done * (total - done)
            log.info("%s: %d/%d points, %.0f s elapsed, about %.0f s left", description, done, total, elapsed, left)
            last = now
