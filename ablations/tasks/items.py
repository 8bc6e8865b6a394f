"""Cloze items and tasks, and their files: one JSONL per task plus a `tasks.json` index with checksums.

A task file is plain JSONL (one item a line, keys sorted, UTF-8) so that two builds from the same inputs are
byte-identical and a checksum in the index proves a file is the one that was built. Every reader checks each
record and names the file and line of the first bad one, with the fix (rebuild the tasks).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS_FORMAT = "mixlab.tasks/1"
INDEX_NAME = "tasks.json"
TASKS_DIR = "tasks"  # <curated>/tasks/: the default home of a dataset's tasks
REBUILD_HINT = "rebuild them with `mixlab.ablations.tasks.build_tasks(<curated dir>)` (or delete the folder)"


class TaskFileError(ValueError):
    """A task file or index that cannot be read, is malformed, or changed since it was built."""


@dataclass(frozen=True)
class ClozeItem:
    """One cloze question: a context and candidate continuations, exactly one of them (`answer`) correct.

    `doc_id` is the held-out document the context and the correct continuation come from; `choice_docs`
    names the document of each choice (None for a choice made up by the builder, e.g. a wrong number), so
    that a check can prove no item text comes from a document the model trained on.
    """

    context: str
    choices: tuple[str, ...]
    answer: int
    doc_id: str
    choice_docs: tuple[str | None, ...] = ()

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why this item cannot be scored, or None."""
        if not isinstance(self.context, str):
            return f"context must be a string, got {type(self.context).__name__}"
        if len(self.choices) < 2 or not all(isinstance(c, str) and c for c in self.choices):
            return f"needs at least 2 non-empty string choices, got {list(self.choices)!r}"
        if len(set(self.choices)) != len(self.choices):
            return f"choices must be distinct, got {list(self.choices)!r}"
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or not 0 <= self.answer < len(self.choices):
            return f"answer must be an index into the {len(self.choices)} choices, got {self.answer!r}"
        if not isinstance(self.doc_id, str) or not self.doc_id:
            return f"doc_id must be a non-empty string, got {self.doc_id!r}"
        if self.choice_docs and len(self.choice_docs) != len(self.choices):
            return f"choice_docs has {len(self.choice_docs)} entries for {len(self.choices)} choices"
        if not all(d is None or isinstance(d, str) for d in self.choice_docs):
            return f"choice_docs must be strings or null, got {list(self.choice_docs)!r}"
        return None

    @property
    def correct(self) -> str:
        return self.choices[self.answer]

    @property
    def distractors(self) -> list[str]:
        return [c for i, c in enumerate(self.choices) if i != self.answer]

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "choices": list(self.choices), "answer": self.answer, "doc_id": self.doc_id,
                "choice_docs": list(self.choice_docs)}

    @classmethod
    def from_dict(cls, raw: Any) -> ClozeItem:
        if not isinstance(raw, dict):
            raise ValueError(f"an item is a JSON object, got {type(raw).__name__}")
        missing = sorted({"context", "choices", "answer", "doc_id"} - set(raw))
        unknown = sorted(set(raw) - {"context", "choices", "answer", "doc_id", "choice_docs"})
        if missing or unknown:
            raise ValueError(f"missing keys {missing}, unknown keys {unknown}" if unknown else f"missing keys {missing}")
        choices, choice_docs = raw["choices"], raw.get("choice_docs", [])
        if not isinstance(choices, list) or not isinstance(choice_docs, list):
            raise ValueError("choices and choice_docs must be lists")
        return cls(context=raw["context"], choices=tuple(choices), answer=raw["answer"], doc_id=raw["doc_id"],
                   choice_docs=tuple(choice_docs))


@dataclass
class ClozeTask:
    """A named set of cloze items from one source of a curated dataset (`kind` says how they were made)."""

    name: str
    kind: str  # gsm8k | code-completion | next-sentence | dialogue-response
    source: str
    items: list[ClozeItem] = field(default_factory=list)

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing: mean of 1 / number of choices."""
        return sum(1.0 / len(item.choices) for item in self.items) / len(self.items) if self.items else 0.0

    def to_jsonl(self) -> bytes:
        """The task file's exact bytes (deterministic: sorted keys, fixed separators)."""
        lines = (json.dumps(item.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                 for item in self.items)
        return "".join(f"{line}\n" for line in lines).encode("utf-8")

    def checksum(self) -> str:
        return hashlib.sha256(self.to_jsonl()).hexdigest()

    def head(self, max_items: int) -> ClozeTask:
        """The first `max_items` items: items are stored in a seeded random order, so a prefix is a sample."""
        return ClozeTask(self.name, self.kind, self.source, self.items[:max_items])

    def index_entry(self, file: str) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "items": len(self.items),
                "chance": round(self.chance, 6), "file": file, "sha256": self.checksum()}


def read_task_file(path: Path, name: str, kind: str, source: str) -> ClozeTask:
    """One task's JSONL, every record checked; a bad one is refused naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TaskFileError(f"{path}: cannot be read ({err}); {REBUILD_HINT}") from err
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(ClozeItem.from_dict(json.loads(line)))
        except (json.JSONDecodeError, ValueError, TypeError) as err:
            raise TaskFileError(f"{path}:{number}: not a valid cloze item ({err}); {REBUILD_HINT}") from err
    return ClozeTask(name=name, kind=kind, source=source, items=items)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file (proxies build in parallel)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tasks(tasks: Sequence[ClozeTask], out_dir: Path, extra: dict[str, Any] | None = None) -> Path:
    """`<out_dir>/<name>.jsonl` per task, then the index `tasks.json` (written last: it is what readers trust)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for task in tasks:
        file = f"{task.name}.jsonl"
        write_atomic(out_dir / file, task.to_jsonl())
        entries.append(task.index_entry(file))
    index = {"format": TASKS_FORMAT, **(extra or {}), "tasks": entries}
    path = out_dir / INDEX_NAME
    write_atomic(path, (json.dumps(index, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))
    return path


def read_index(tasks_dir: Path) -> dict[str, Any]:
    """The index of a task folder, its format and entries checked."""
    path = tasks_dir / INDEX_NAME
    if not path.is_file():
        raise TaskFileError(f"{path}: no task index here; build the tasks first with build_tasks(<curated dir>)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskFileError(f"{path}: not a readable JSON index ({err}); {REBUILD_HINT}") from err
    if not isinstance(index, dict) or index.get("format") != TASKS_FORMAT or not isinstance(index.get("tasks"), list):
        raise TaskFileError(f"{path}: not a {TASKS_FORMAT} task index; {REBUILD_HINT}")
    for i, entry in enumerate(index["tasks"]):
        keys = {"name", "kind", "source", "file", "sha256"}
        if not isinstance(entry, dict) or not keys <= set(entry) or not all(isinstance(entry[k], str) for k in keys):
            raise TaskFileError(f"{path}: tasks[{i}] needs string fields {sorted(keys)}; {REBUILD_HINT}")
        file = Path(entry["file"])
        if file.is_absolute() or len(file.parts) != 1 or file.name in (".", ".."):
            raise TaskFileError(f"{path}: tasks[{i}].file = {entry['file']!r} must be a file name in {tasks_dir}")
    return index


def load_tasks(tasks_dir: str | Path, names: Iterable[str] | None = None) -> list[ClozeTask]:
    """The tasks of a folder written by `build_tasks` (or of a curated dir's `tasks/`), in index order, each
    file checked against the checksum in the index. `names` keeps only those tasks (unknown ones are an error)."""
    tasks_dir = Path(tasks_dir)
    if not (tasks_dir / INDEX_NAME).is_file() and (tasks_dir / TASKS_DIR / INDEX_NAME).is_file():
        tasks_dir = tasks_dir / TASKS_DIR
    index = read_index(tasks_dir)
    entries = index["tasks"]
    if names is not None:
        wanted = list(names)
        known = [e["name"] for e in entries]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise TaskFileError(f"{tasks_dir / INDEX_NAME}: no task {unknown}; the tasks here are {known}")
        entries = [e for e in entries if e["name"] in wanted]
    tasks = []
    for entry in entries:
        path = tasks_dir / entry["file"]
        task = read_task_file(path, entry["name"], entry["kind"], entry["source"])
        if task.checksum() != entry["sha256"]:
            raise TaskFileError(
                f"{path}: content checksum {task.checksum()[:12]} differs from {entry['sha256'][:12]} in "
                f"{tasks_dir / INDEX_NAME} (the file changed after it was built); {REBUILD_HINT}")
        tasks.append(task)
    return tasks
