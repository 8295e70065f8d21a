"""Progress of long runs (calibration, benchmarks, decompositions).

On an interactive terminal: a bar on stderr. Elsewhere (CI logs, a pipe): a plain line through
the ``onnx_squeeze.progress`` logger every ``PLAIN_EVERY_S`` seconds while a step runs and one
when it ends, so a long step is never silent and a short one adds no noise. The CLI sends that
logger to stderr (``-q`` silences it); a library user who configured no logging sees nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

logger = logging.getLogger("onnx_squeeze.progress")

PLAIN_EVERY_S = 10.0  # seconds between plain progress lines


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Yield ``items``, showing progress as a bar on a terminal, else as periodic lines."""
    if not sys.stderr.isatty():
        yield from _plain(items, description, total)
        return
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def _plain(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= PLAIN_EVERY_S:
            last = now
            logger.info("%s: %s (%.0f s)", description, _count(done, total), now - start)
    if last != start:  # a line was written: close the step
        logger.info("%s: done, %d in %.0f s", description, done, time.monotonic() - start)


def _count(done: int, total: int | None) -> str:
    return f"{done}/{total}" if total else str(done)
