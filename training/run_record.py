"""One place where every run leaves its config, metrics and evals, so that reports and ablations
can query runs without knowing how they were trained.

Layout of a run directory (all plain files):

    <runs_root>/<run_id>/run.json        config, status, paths (schema-versioned)
    <runs_root>/<run_id>/metrics.jsonl   one line per logged training step
    <runs_root>/<run_id>/evals.jsonl     one line per (step, eval source)
    <runs_root>/<run_id>/tasks.jsonl     one line per (step, downstream task): accuracy, margin, items, chance
    <runs_root>/<run_id>/alerts.jsonl    one line per training alert (loss / grad-norm spike, throughput drop, ...)
    <runs_root>/<run_id>/checkpoints/    written by the training backend
    <runs_root>/<run_id>/run.lock        held (flock) by the process training the run, while it lives
    <runs_root>/<run_id>/tb/             TensorBoard events of the same scalars (train.tensorboard), for a live view

A run whose status says "running" but whose lock nobody holds lost its process (kill -9, a crash, a lost node):
`RunRecord.display_status()` calls it "stale", and the next `train` of it records that it recovered from it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from numbers import Real
from pathlib import Path
from typing import Any

import polars as pl
from mixlab.curation import name_problem, outside_problem
from mixlab.training.errors import RunLockedError, TrainingError

RUN_SCHEMA_VERSION = 1
RUN_FILE = "run.json"
# every file and folder mixlab reads or writes in a run directory; none may resolve (through a symlink) outside it
RUN_DIR_ENTRIES = ("run.json", "run.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp", "evals.jsonl", "evals.jsonl.tmp",
                   "tasks.jsonl", "tasks.jsonl.tmp", "alerts.jsonl", "alerts.jsonl.tmp", "mixture.jsonl", "mixture.jsonl.tmp", "run.lock", "checkpoints", "tb")
LOG_FILES = ("metrics.jsonl", "evals.jsonl", "tasks.jsonl", "alerts.jsonl", "mixture.jsonl")  # step-keyed logs, truncated together on resume
# run.json fields and the types they must have (the summary's keys that commands format)
_RUN_FIELDS: dict[str, tuple[type, ...]] = {"run_id": (str,), "status": (str,), "created": (str,), "updated": (str,),
                                            "tags": (dict,), "config": (dict,), "summary": (dict,)}
_SUMMARY_FIELDS: dict[str, tuple[type, ...]] = {"step": (int,), "total_steps": (int,), "final_loss": (int, float),
                                                "tokens": (int,), "eval": (dict,), "process": (dict,),
                                                "tokens_by_source": (dict,), "restarts": (list,)}
logger = logging.getLogger("mixlab.runs")
TENSORBOARD_DIR = "tb"
# metrics whose values are nested lists: the names of their levels in TensorBoard tags (else the index alone)
_LIST_LEVELS: dict[str, tuple[str, ...]] = {"moe_tokens_per_expert": ("layer", "expert")}
_NOT_SCALARS = frozenset({"step", "time"})
_tensorboard_missing_warned = False


def _summary_writer_class() -> Any:
    """torch's SummaryWriter, or None (with one warning per process) when the tensorboard package is missing:
    the JSONL logs are the record, the events only a view of them."""
    global _tensorboard_missing_warned
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        if not _tensorboard_missing_warned:
            _tensorboard_missing_warned = True
            warnings.warn(f"train.tensorboard is on but TensorBoard cannot be imported ({err}); metrics go to the "
                          "JSONL logs only: `pip install 'tensorboard>=2.14'` or set train.tensorboard=false",
                          stacklevel=3)
        return None
    return SummaryWriter


def tensorboard_scalars(values: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in a log row: nested dicts as `name/key`, lists as `name/<level><i>`;
    strings, booleans and the row's step/time are not scalars."""
    for key, value in values.items():
        if not prefix and key in _NOT_SCALARS:
            continue
        yield from _scalars_of(f"{prefix}{key}", value, _LIST_LEVELS.get(str(key), ()))


def _scalars_of(tag: str, value: Any, levels: tuple[str, ...]) -> Iterator[tuple[str, float]]:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, Real):
        yield tag, float(value)
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _scalars_of(f"{tag}/{key}", inner, ())
    elif isinstance(value, list | tuple):
        level, rest = (levels[0], levels[1:]) if levels else ("", ())
        for i, inner in enumerate(value):
            yield from _scalars_of(f"{tag}/{level}{i}", inner, rest)


def _type_problem(value: Any, expected: tuple[type, ...]) -> str | None:
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        return f"is a {type(value).__name__}, not {' or '.join(t.__name__ for t in expected)}"
    return None


def run_dir_problem(path: Path) -> str | None:
    """Why a run directory's own files cannot be used safely (one of them a symlink pointing out of it), or None."""
    for name in RUN_DIR_ENTRIES:
        if problem := outside_problem(path, path / name):
            return f"{path / name} {problem}"
    return None


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

    def __post_init__(self) -> None:
        if problem := name_problem(self.run_id):
            raise TrainingError(f"run id {self.run_id!r} {problem}: it is the name of the run's folder; pick another",
                                fields=("run_id",))
        self._read_only = False
        self._tb_enabled: bool | None = None  # None: as the run's config says (train.tensorboard)
        self._tb_writer: Any = None
        self._tb_purge_step: int | None = None

    def follower(self) -> RunRecord:
        """A read-only twin of this record for a data-parallel rank other than 0: it holds the same config and
        summary (in memory, changeable) but never writes a file, takes the lock or opens TensorBoard."""
        twin = RunRecord(path=self.path, run_id=self.run_id, config=dict(self.config), status=self.status,
                         created=self.created, updated=self.updated, tags=dict(self.tags),
                         summary=dict(self.summary))
        twin._read_only = True
        return twin

    @property
    def read_only(self) -> bool:
        return self._read_only

    # ---- TensorBoard: the JSONL rows again, as event files for a live view --------------------------
    def use_tensorboard(self, enabled: bool = True) -> None:
        """Write (or stop writing) TensorBoard events beside the JSONL logs; without a call the run's config
        decides (`config["train"]["tensorboard"]`)."""
        self._tb_enabled = bool(enabled)
        if not enabled:
            self._close_tensorboard()

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    def _tensorboard(self) -> Any:
        if self._read_only:
            return None
        enabled = self._tb_enabled
        if enabled is None:
            train = self.config.get("train") if isinstance(self.config, dict) else None
            enabled = bool(train.get("tensorboard", False)) if isinstance(train, dict) else False
        if not enabled:
            return None
        if self._tb_writer is None:
            writer_class = _summary_writer_class()
            if writer_class is None:
                self._tb_enabled = False
                return None
            self._tb_writer = writer_class(log_dir=str(self.tensorboard_dir), purge_step=self._tb_purge_step)
            self._tb_purge_step = None  # purged once; a writer reopened later must not drop what this one wrote
        return self._tb_writer

    def _write_scalars(self, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        writer = self._tensorboard()
        if writer is None:
            return
        for tag, value in tensorboard_scalars(values, prefix):
            writer.add_scalar(tag, value, global_step=step)
        if self._tb_enabled is None:  # a row logged outside a training loop (e.g. evaluate_checkpoint): nobody
            writer.flush()            # will call save/release on this record, so push it now

    def flush(self) -> None:
        """Push buffered TensorBoard events to disk (the JSONL logs are written through already)."""
        if self._tb_writer is not None:
            self._tb_writer.flush()

    def _close_tensorboard(self) -> None:
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    # ---- liveness: a lock held by the training process --------------------------------------
    LOCK_NAME = "run.lock"

    def acquire(self) -> None:
        """Take the run's lock for this process (released when it exits, however it dies); refuses a run that a
        live process is training."""
        if self._read_only:
            return
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
        self._close_tensorboard()
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
        if self._read_only:
            return
        self.flush()
        if problem := run_dir_problem(self.path):
            raise TrainingError(f"{self.path}: {problem}; nothing is written there: replace the symlink with a real "
                                "file or folder inside the run directory")
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
        tmp.unlink(missing_ok=True)
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, self.path / "run.json")

    @classmethod
    def load(cls, path: str | Path) -> RunRecord:
        """Read run.json and check it before anything else of the run is touched: valid JSON, this schema, the type
        of each field, a `run_id` that is a plain name equal to the folder's, and no file of the run directory
        resolving (through a symlink) outside it. Anything else is a TrainingError naming the file and the fix."""
        path = Path(path)
        meta = path / RUN_FILE
        if not meta.exists():
            raise FileNotFoundError(f"{meta}: not a mixlab run directory (no run.json)")
        fix = f"restore run.json, or remove {path} if the run is not needed"
        if problem := run_dir_problem(path):
            raise TrainingError(f"{path}: {problem}; nothing there is read or written: replace the symlink with a "
                                "real file or folder inside the run directory")
        try:
            raw = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TrainingError(f"{meta}: unreadable ({type(err).__name__}: {err}); {fix}") from err
        if not isinstance(raw, dict):
            raise TrainingError(f"{meta}: holds a JSON {type(raw).__name__}, not an object; {fix}")
        version = raw.get("schema_version")
        if version != RUN_SCHEMA_VERSION or isinstance(version, bool):
            newer = isinstance(version, int) and not isinstance(version, bool) and version > RUN_SCHEMA_VERSION
            raise TrainingError(
                f"{meta}: run schema {version!r} unsupported (expected {RUN_SCHEMA_VERSION})"
                + ("; it was written by a newer mixlab: read it with that version" if newer else f"; {fix}"))
        for name, expected in _RUN_FIELDS.items():
            if name in raw and (problem := _type_problem(raw[name], expected)):
                raise TrainingError(f"{meta}: {name} = {raw[name]!r:.80} {problem}; {fix}", fields=(name,))
        for name, expected in _SUMMARY_FIELDS.items():
            value = raw.get("summary", {}).get(name)
            if value is not None and (problem := _type_problem(value, expected)):
                raise TrainingError(f"{meta}: summary.{name} = {value!r:.80} {problem}; {fix}")
        run_id = raw.get("run_id")
        folder = Path(os.path.abspath(path)).name
        if run_id is None or (problem := name_problem(run_id)) or run_id != folder:
            why = "is missing" if run_id is None else problem or f"differs from its folder {folder!r}"
            raise TrainingError(f"{meta}: run_id = {run_id!r:.80} {why}; a run's id is the name of its folder "
                                f"({fix})", fields=("run_id",))
        return cls(
            path=path,
            run_id=run_id,
            config=raw.get("config", {}),
            status=raw.get("status", "unknown"),
            created=raw.get("created", ""),
            updated=raw.get("updated", ""),
            tags=raw.get("tags", {}),
            summary=raw.get("summary", {}),
        )

    # ---- appending ----------------------------------------------------------------------
    def log_metrics(self, step: int, **values: Any) -> None:
        if self._read_only:
            return
        _append_jsonl(self.path / "metrics.jsonl", {"step": step, "time": _now(), **values})
        self._write_scalars(step, values)

    def log_eval(self, step: int, source: str, **values: Any) -> None:
        if self._read_only:
            return
        _append_jsonl(self.path / "evals.jsonl", {"step": step, "source": source, **values})
        self._write_scalars(step, values, prefix=f"eval/{source}/")

    def log_task(self, step: int, task: str, **values: Any) -> None:
        if self._read_only:
            return
        _append_jsonl(self.path / "tasks.jsonl", {"step": step, "task": task, **values})
        self._write_scalars(step, values, prefix=f"task/{task}/")

    def log_alert(self, alert: dict[str, Any]) -> None:
        """A training alert (`training.monitor.Alert.to_dict()`: step, kind, message, value, threshold, action)."""
        if self._read_only:
            return
        _append_jsonl(self.path / "alerts.jsonl", dict(alert))

    def alerts(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.path / "alerts.jsonl")

    def log_mixture(self, step: int, weights: dict[str, float], cause: str, policy: str | None = None) -> None:
        """A change of the sampling weights, in force from step `step` on (0-based: the batch after `step` steps),
        and why. No wall time in the row: a resumed run writes exactly the rows of an uninterrupted one."""
        if self._read_only:
            return
        _append_jsonl(self.path / "mixture.jsonl", {"step": step, "weights": dict(sorted(weights.items())),
                                                    "cause": cause, "policy": policy})

    def truncate_after(self, step: int, keep: tuple[str, ...] = ()) -> None:
        """On resume, forget metrics, evals and mixture changes logged after the checkpoint we restart from.
        TensorBoard events cannot be cut; the next writer marks them purged from step + 1 on (`purge_step`), so a
        viewer shows one line through the restart."""
        if self._read_only:
            return
        if self.tensorboard_dir.is_dir() and any(self.tensorboard_dir.glob("events.out.tfevents.*")):
            self._close_tensorboard()
            self._tb_purge_step = step + 1
        for name in LOG_FILES:
            if name in keep:  # e.g. a rewind keeps the alerts that caused it
                continue
            if name in ("mixture.jsonl", "tasks.jsonl", "alerts.jsonl") and not (self.path / name).exists():
                continue  # only runs with a mixture policy / downstream tasks / alerts have one
            path = self.path / name
            rows = [r for r in _read_jsonl(path) if r["step"] <= step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.unlink(missing_ok=True)
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

    def tasks(self) -> list[dict[str, Any]]:
        """One row per (step, downstream task); scoring the same step again replaces the earlier row."""
        latest: dict[tuple[int, str], dict[str, Any]] = {}
        for row in _read_jsonl(self.path / "tasks.jsonl"):
            latest[(row["step"], row["task"])] = row
        return list(latest.values())

    def mixture_changes(self) -> list[dict[str, Any]]:
        """Rows of mixture.jsonl (step, weights, cause, policy), oldest first; [] for a run without a policy."""
        return _read_jsonl(self.path / "mixture.jsonl")

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
        path = self.run_path(run_id)
        if (path / "run.json").exists():
            record = RunRecord.load(path)
            record.config = config
            record.save()
            return record
        record = RunRecord(path=path, run_id=run_id, config=config, tags=tags or {})
        record.save()
        return record

    def run_path(self, run_id: str) -> Path:
        """`root/run_id`, refused when the id is not a plain name or the folder is a symlink pointing out of root."""
        if problem := name_problem(run_id):
            raise TrainingError(f"run id {run_id!r} {problem}: it is the name of the run's folder under {self.root}; "
                                "pick another", fields=("run_id",))
        path = self.root / run_id
        if problem := outside_problem(self.root, path):
            raise TrainingError(f"{path}: {problem}; a run folder must be a real folder inside {self.root}")
        return path

    def get(self, run_id: str) -> RunRecord:
        return RunRecord.load(self.run_path(run_id))

    def runs(self) -> list[RunRecord]:
        """Every readable run, by folder name. A run directory that cannot be read (corrupt or newer run.json, a
        symlink pointing out) is skipped with a warning naming it, and listed by `unreadable()`: one bad run never
        hides the others."""
        return self._scan()[0]

    def unreadable(self) -> list[tuple[Path, str]]:
        """(run directory, why) for each run directory that `runs()` skips."""
        return self._scan()[1]

    def _scan(self) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
        if not self.root.exists():
            return [], []
        good, bad = [], []
        for meta in sorted(self.root.glob(f"*/{RUN_FILE}")):
            try:
                good.append(RunRecord.load(self.run_path(meta.parent.name)))
            except (TrainingError, FileNotFoundError, OSError) as err:
                logger.warning("skipping unreadable run %s: %s", meta.parent, err)
                bad.append((meta.parent, str(err)))
        return good, bad

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
