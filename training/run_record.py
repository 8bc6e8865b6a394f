"""One place where every run leaves its config, metrics and evals, so that reports and ablations
can query runs without knowing how they were trained.

Layout of a run directory (all plain files):

    <runs_root>/<run_id>/run.json        config, status, paths (schema-versioned)
    <runs_root>/<run_id>/metrics.jsonl   one line per logged training step
    <runs_root>/<run_id>/evals.jsonl     one line per (step, eval source)
    <runs_root>/<run_id>/checkpoints/    written by the training backend
    <runs_root>/<run_id>/run.lock        held (flock) by the process training the run, while it lives

A run whose status says "running" but whose lock nobody holds lost its process (kill -9, a crash, a lost node):
`RunRecord.display_status()` calls it "stale", and the next `train` of it records that it recovered from it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from mixlab.training.errors import RunLockedError

RUN_SCHEMA_VERSION = 1


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
        handle.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a run killed mid-write leaves at most one torn last line; anything else is corruption
            if line_no != len(path.read_text().splitlines()):
                raise ValueError(f"{path}:{line_no}: corrupt JSON line; fix or remove it") from None
    return rows


@dataclass
class RunRecord:
    """Handle on one run directory."""

    path: Path
    run_id: str
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "created"
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    tags: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    # ---- liveness: a lock held by the training process --------------------------------------
    LOCK_NAME = "run.lock"

    def acquire(self) -> None:
        """Take the run's lock for this process (released when it exits, however it dies); refuses a run that a
        live process is training."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / self.LOCK_NAME, "a+")  # noqa: SIM115 - held open for the life of the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            owner = self.summary.get("process", {})
            raise RunLockedError(
                f"run {self.run_id!r} ({self.path}) is being trained by a live process (pid {owner.get('pid', '?')} "
                f"on {owner.get('host', '?')}); wait for it, stop it (SIGTERM checkpoints and exits), or use "
                "another run id") from None
        self._lock = handle
        self.summary["process"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}

    def release(self) -> None:
        handle = getattr(self, "_lock", None)
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
            self._lock = None

    def is_live(self) -> bool | None:
        """Whether a process holds the run's lock: True/False on this host; None when the run was started on
        another host (a lock there cannot be seen from here)."""
        host = self.summary.get("process", {}).get("host")
        if host and host != socket.gethostname():
            return None
        if getattr(self, "_lock", None) is not None:
            return True
        lock = self.path / self.LOCK_NAME
        if not lock.exists():
            return False
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def display_status(self) -> str:
        """The status as a person should read it: "stale" for a "running" run whose process is gone."""
        if self.status == "running" and self.is_live() is False:
            return "stale"
        return self.status

    def save(self) -> None:
        self.updated = _now()
        self.path.mkdir(parents=True, exist_ok=True)
        payload = {
            "schema_version": RUN_SCHEMA_VERSION,
            "run_id": self.run_id,
            "status": self.status,
            "created": self.created,
            "updated": self.updated,
            "tags": self.tags,
            "config": self.config,
            "summary": self.summary,
        }
        tmp = self.path / "run.json.tmp"
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.path / "run.json")

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        path = Path(path)
        meta = path / "run.json"
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: not a mixlab run directory (no run.json)")
        raw = json.loads(meta.read_text())
        if raw.get("schema_version") != RUN_SCHEMA_VERSION:
            raise ValueError(f"{meta}: run schema {raw.get('schema_version')!r} unsupported (expected {RUN_SCHEMA_VERSION})")
        return cls(
            path=path,
            run_id=raw["run_id"],
            config=raw.get("config", {}),
            status=raw.get("status", "unknown"),
            created=raw.get("created", ""),
            updated=raw.get("updated", ""),
            tags=raw.get("tags", {}),
            summary=raw.get("summary", {}),
        )

    # ---- appending ----------------------------------------------------------------------
    def log_metrics(self, step: int, **values: Any) -> None:
        _append_jsonl(self.path / "metrics.jsonl", {"step": step, "time": _now(), **values})

    def log_eval(self, step: int, source: str, **values: Any) -> None:
        _append_jsonl(self.path / "evals.jsonl", {"step": step, "source": source, **values})

    def truncate_after(self, step: int) -> None:
        """On resume, forget metrics and evals logged after the checkpoint we restart from."""
        for name in ("metrics.jsonl", "evals.jsonl"):
            path = self.path / name
            rows = [r for r in _read_jsonl(path) if r["step"] <= step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            os.replace(tmp, path)

    # ---- reading ------------------------------------------------------------------------
    def metrics(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "metrics.jsonl")

    def evals(self) -> list[dict[str, Any]]:
        """One row per (step, source): evaluating the same checkpoint again replaces the earlier row."""
        latest: dict[tuple[int, str], dict[str, Any]] = {}
        for row in _read_jsonl(self.path / "evals.jsonl"):
            latest[(row["step"], row["source"])] = row
        return list(latest.values())

    def metrics_frame(self) -> pl.DataFrame:
        rows = self.metrics()
        return pl.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows]) if rows else pl.DataFrame()

    def evals_frame(self) -> pl.DataFrame:
        rows = self.evals()
        return pl.DataFrame(rows) if rows else pl.DataFrame()


class RunStore:
    """A directory of runs: create new ones, list and query the existing ones."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def create(self, run_id: str, config: dict[str, Any], tags: dict[str, str] | None = None) -> RunRecord:
        """Create a run, or reopen it if it already exists (so that a relaunched job resumes)."""
        path = self.root / run_id
        if (path / "run.json").exists():
            record = RunRecord.load(path)
            record.config = config
            record.save()
            return record
        record = RunRecord(path=path, run_id=run_id, config=config, tags=tags or {})
        record.save()
        return record

    def get(self, run_id: str) -> RunRecord:
        return RunRecord.load(self.root / run_id)

    def runs(self) -> list[RunRecord]:
        if not self.root.exists():
            return []
        return [RunRecord.load(p.parent) for p in sorted(self.root.glob("*/run.json"))]

    def evals_frame(self) -> pl.DataFrame:
        """All eval rows of all runs, with run id and tags as columns: the table ablations start from."""
        frames = []
        for record in self.runs():
            frame = record.evals_frame()
            if frame.is_empty():
                continue
            frame = frame.with_columns(pl.lit(record.run_id).alias("run_id"))
            for key, value in record.tags.items():
                frame = frame.with_columns(pl.lit(str(value)).alias(f"tag_{key}"))
            frames.append(frame)
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
