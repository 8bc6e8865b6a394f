"""What the ablation protocols leave on disk, written safely: JSON reports written atomically (NaN and inf as
null, which JSON readers accept), and one writer at a time for a folder that parallel proxies may fill at once."""

from __future__ import annotations

import fcntl
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """Strict-JSON data: a non-finite float becomes null, a path or any other unknown object its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


def report_dict(report: Any) -> dict[str, Any]:
    """A protocol's report dataclass as strict-JSON data (paths as strings, NaN as None)."""
    return json_safe(asdict(report))


def write_report_json(path: Path, data: Mapping[str, Any]) -> None:
    """JSON with NaN/inf as null, written atomically (a report is never half-written)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2) + "\n")
    tmp.replace(path)


@contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Hold an flock on `lock_file` (created with its folder): the second caller waits, then finds the work done."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
