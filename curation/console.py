"""Console hygiene for datatrove executors: their per-task INFO lines (pipeline listings, stats) already
go to each run's `logs/` folder; on the console they drown the progress a person wants to see."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


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
    if os.environ.get("MIXLAB_VERBOSE"):
        yield
        return
    original = sys.stderr
    sys.stderr = _ConsoleFilter(original)
    try:
        yield
    finally:
        sys.stderr = original
