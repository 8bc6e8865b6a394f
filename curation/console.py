"""Console hygiene for datatrove executors: their per-task INFO lines (pipeline listings, stats) already
go to each run's `logs/` folder; on the console they drown the progress a person wants to see."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

CONSOLE_LEVEL = "WARNING"  # what loguru (datatrove's logger) shows on the console outside MIXLAB_VERBOSE=1


class _ConsoleFilter:
    """A stderr that lets only datatrove's warnings and errors through: its per-task INFO lines
    (pipeline listings, stats) already go to `<logs>/<stage>/logs/`, and on the console they drown the
    progress a person wants to see. MIXLAB_VERBOSE=1 shows everything."""

    KEEP = ("| WARNING", "| ERROR", "| CRITICAL", "Traceback", "Error")
    NOISE = ("empty", "parsed tree length", "discarding data")  # trafilatura's harmless per-page notes

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        lower = text.lower()
        if any(k in text for k in self.KEEP) and not any(n in lower for n in self.NOISE):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


@contextmanager
def quiet_datatrove_console() -> Iterator[None]:
    """Filter stderr while datatrove runs (forked workers inherit the filter); MIXLAB_VERBOSE=1 shows all.

    datatrove's task logger ends with `close_task_logger`, which gives loguru `sys.stderr` (the filter,
    at that moment) as its sink again. On the way out, loguru handlers left writing to the filter are
    replaced by one writing to the real stderr at `CONSOLE_LEVEL`, so nothing writes to the filter after
    the context and datatrove's warnings still show.
    """
    if os.environ.get("MIXLAB_VERBOSE"):
        yield
        return
    original = sys.stderr
    console = _ConsoleFilter(original)
    sys.stderr = console
    try:
        yield
    finally:
        sys.stderr = original
        _move_loguru_off(console, original)


def _move_loguru_off(console: _ConsoleFilter, stream) -> None:
    from loguru import logger

    try:  # loguru has no public way to list its handlers
        handlers = logger._core.handlers  # type: ignore[attr-defined]
        stale = [i for i, h in handlers.items() if getattr(getattr(h, "_sink", None), "_stream", None) is console]
    except AttributeError:  # other loguru internals: reset to the plain console sink to be safe
        logger.remove()
        stale = [None]
    if not stale:
        return
    for handler_id in stale:
        if handler_id is not None:
            logger.remove(handler_id)
    logger.add(stream, level=CONSOLE_LEVEL)
