"""Console hygiene and progress for datatrove executors.

datatrove logs through loguru to `sys.stderr`: per task a pipeline listing, warnings (e.g. "No files found
for rank=1") and a stats block, and at the end of `LocalPipelineExecutor.run` a merged stats block. All of it
is also written to `<logging_dir>/logs/task_NNNNN.log`; on the console it drowns what a person wants to see.
`quiet_datatrove_console` keeps it off the console (forked workers inherit the filter) and lets only errors
through, shortened to one line that names the log folder. `DocumentProgress` shows a tqdm bar of the
documents a stage has read, fed by a counter that forked workers update in shared memory.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, TextIO

from datatrove.data import DocumentsPipeline

CONSOLE_LEVEL = "WARNING"  # what loguru (datatrove's logger) shows on the console after a quiet run
ERROR_MARKS = ("| ERROR", "| CRITICAL")


class CurationError(ValueError):
    """A datatrove stage failed; the message names the source, the stage and the log with the traceback."""


class _ConsoleFilter:
    """A stderr that swallows datatrove's output and lets its errors through as one short line.

    A record with a traceback is skipped: it comes from a task that raised, and the exception itself
    reaches the caller (as a `CurationError` naming the log file). Lines are written with `os.write` on
    the real stderr's descriptor: a forked worker must not take a buffered-stream lock that another
    thread of the parent (the progress bar) may have held at fork time.
    """

    def __init__(self, stream: TextIO, logs: Path | None):
        self.stream = stream
        self.logs = logs
        try:
            self.fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # e.g. pytest's capture: no real descriptor
            self.fd = None

    def write(self, text: str) -> int:
        if any(mark in text for mark in ERROR_MARKS) and "Traceback" not in text:
            first = text.strip().splitlines()[0] if text.strip() else text
            message = first.split(" - ", 1)[-1].strip()
            where = f" (log: {self.logs / 'logs'})" if self.logs else ""
            self._emit(f"datatrove error: {message}{where}\n")
        return len(text)

    def _emit(self, line: str) -> None:
        if self.fd is not None:
            os.write(self.fd, line.encode("utf-8", "replace"))
        else:
            self.stream.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextmanager
def quiet_datatrove_console(logging_dir: Path | str | None = None) -> Iterator[None]:
    """Keep datatrove's logs off the console while it runs (they stay in `logging_dir/logs/`).

    Inside: `sys.stderr` is a filter and loguru's only handler writes to it, so the final stats block of
    `LocalPipelineExecutor.run` in the parent, and every forked worker's lines, go through the filter. On
    the way out loguru gets one handler on the real stderr at `CONSOLE_LEVEL` (datatrove replaces loguru's
    handlers with every task anyway). MIXLAB_VERBOSE=1 shows everything.
    """
    if os.environ.get("MIXLAB_VERBOSE"):
        yield
        return
    from loguru import logger

    original = sys.stderr
    console = _ConsoleFilter(original, Path(logging_dir) if logging_dir else None)
    sys.stderr = console  # type: ignore[assignment]
    logger.remove()
    logger.add(console, level="DEBUG")
    try:
        yield
    finally:
        sys.stderr = original
        logger.remove()
        logger.add(original, level=CONSOLE_LEVEL)


def failed_task_log(logging_dir: Path) -> Path | None:
    """The first task log of a stage that holds an error (where the traceback of a failed task is)."""
    for path in sorted((logging_dir / "logs").glob("task_*.log")):
        text = path.read_text(errors="replace")
        if any(mark in text for mark in ERROR_MARKS):
            return path
    return None


# ---- progress of the documents a stage reads -------------------------------------------------------
_COUNTERS: dict[str, Any] = {}  # key -> RawArray with one slot per rank; forked workers inherit it


class ProgressCounter:
    """A pipeline callable (not a PipelineStep: it has no stats, so datatrove's stats and mixlab's accounting
    do not see it) that counts the documents passing through into the shared slot of its rank.

    It holds only a key: the shared array is found in this module's `_COUNTERS`, which a forked worker
    inherits; where it is not there (another executor, a spawned process) the counter passes documents on.
    """

    EVERY = 32  # documents between two writes of the shared slot

    def __init__(self, key: str):
        self.key = key

    def __repr__(self) -> str:
        return "mixlab: progress counter"

    def __call__(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        slots = _COUNTERS.get(self.key)
        count = 0
        for doc in data or ():
            count += 1
            if slots is not None and count % self.EVERY == 0:
                slots[rank % len(slots)] = count
            yield doc
        if slots is not None:
            slots[rank % len(slots)] = count


class DocumentProgress:
    """A tqdm bar (on `stream`, default stderr) of the documents read by a stage's ranks, out of `total`.

    The parent polls the shared slots from a thread; each slot has one writer (its rank), so no lock is
    needed. `enabled=None` shows the bar only on a terminal (no `\\r` lines in CI logs).
    """

    POLL_S = 0.25

    def __init__(self, label: str, total: int | None, tasks: int, initial: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None):
        self.key = f"{label}:{id(self)}"
        self.label, self.total, self.initial = label, total, initial
        self.slots = RawArray("q", max(1, tasks))
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def counter(self) -> ProgressCounter:
        return ProgressCounter(self.key)

    def read(self) -> int:
        """Documents read so far, the ranks done before this run (`initial`) included."""
        return self.initial + sum(self.slots)

    def __enter__(self) -> DocumentProgress:
        from tqdm import tqdm

        _COUNTERS[self.key] = self.slots
        self.bar = tqdm(total=self.total, initial=self.initial, desc=self.label, unit="doc", file=self.stream,
                        leave=False, disable=False if self.enabled else None if self.enabled is None else True,
                        dynamic_ncols=True)
        if not self.bar.disable:
            self._thread = threading.Thread(target=self._poll, name=f"progress {self.label}", daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._refresh()

    def _refresh(self) -> None:
        done = self.read()
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._refresh()
        self.bar.refresh()  # the final count, even when the last update came within tqdm's mininterval
        self.bar.close()
        _COUNTERS.pop(self.key, None)
