"""Examples of what curation dropped, per step and reason, for the data card.

Counts say how much a filter dropped; only examples say whether it was right to. `DropSampleWriter` is a
datatrove `DiskWriter` set as the `exclusion_writer` of a filter (`attach_drop_samples` does it for every
filter of a source): it keeps the first `per_reason` dropped documents of each reason per rank, their text
cut to `max_chars`, in `curated/work/<source>/dropped/<step>_<rank>.jsonl`. That folder lives under the
source's work folder, so it is cleared with it when the source is curated again. Quarantined records (the
reader's drops, in `curated/quarantine/<source>/`) are read as examples too (`quarantine_samples`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from datatrove.data import Document
from datatrove.io import DataFolderLike
from datatrove.pipeline.dedup import MinhashDedupFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from mixlab.curation.accounting import step_name
from mixlab.curation.extract import QuarantiningTrafilatura
from mixlab.curation.manifest import ManifestError
from mixlab.curation.paths import outside_problem
from mixlab.curation.readers import QUARANTINE_PREFIX
from mixlab.curation.stages import SourceLayout, SourcePipelines

DROPPED_DIR = "dropped"  # under curated/work/<source>/
DEFAULT_PER_REASON = 3
SAMPLE_CHARS = 500  # text kept per example
QUARANTINE_LINES_READ = 20_000  # per source: quarantine files can be large, the examples need only a few lines
KEPT_METADATA = ("path", "url", "origin", "language", "language_score", "lang_hint", "filepath", "line", "file",
                 "error", "size")


# steps that are not BaseFilters but write what they drop to an `exclusion_writer`, and the reason the manifest
# counts their drops under (they set no `filter_reason`). Sentence dedup is not here: its exclusion writer gets
# every document it shortened, kept ones too.
EXCLUDING_STEPS: list[tuple[type, str]] = [(MinhashDedupFilter, "minhash_duplicate"),
                                           (QuarantiningTrafilatura, "empty_extraction")]


def dropped_dir(layout: SourceLayout) -> Path:
    return layout.work / DROPPED_DIR


@dataclass
class DropSample:
    """One dropped document as the card shows it: which step dropped it and why, its id and where it came
    from, its text cut to `SAMPLE_CHARS` and how long it was."""

    step: str
    reason: str
    id: str
    text: str
    text_chars: int
    metadata: dict[str, Any]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit]


class DropSampleWriter(DiskWriter):
    """Exclusion writer that keeps the first `per_reason` dropped documents per reason and rank.

    The reason is `metadata["filter_reason"]` (set by `BaseFilter` before it writes a dropped document), or
    `default_reason` for steps that drop without one. Writes nothing to the pipeline's stats: the filter itself
    counts its drops, and the manifest takes them from there."""

    default_output_filename = "${rank}.jsonl"
    name = "🗒 drop samples"

    def __init__(self, output_folder: DataFolderLike, step: str, per_reason: int = DEFAULT_PER_REASON,
                 max_chars: int = SAMPLE_CHARS, default_reason: str = "unspecified"):
        if per_reason < 1:
            raise ValueError(f"per_reason={per_reason!r}: keep at least one example per reason")
        super().__init__(output_folder, output_filename=f"{step}_${{rank}}.jsonl", compression=None)
        self.step, self.per_reason, self.max_chars, self.default_reason = step, per_reason, max_chars, default_reason
        self._taken: Counter = Counter()  # (rank, reason) -> examples written

    def write(self, document: Document, rank: int = 0, **kwargs) -> None:
        reason = str(document.metadata.get("filter_reason") or self.default_reason)
        if self._taken[(rank, reason)] >= self.per_reason:
            return
        self._taken[(rank, reason)] += 1
        super().write(document, rank, **kwargs)

    def _default_adapter(self, document: Document) -> dict:
        meta = document.metadata
        return {"step": self.step, "reason": str(meta.get("filter_reason") or self.default_reason),
                "id": str(document.id), "text": _cut(document.text, self.max_chars), "text_chars": len(document.text),
                "metadata": {k: meta[k] for k in KEPT_METADATA if meta.get(k) is not None}}

    def _write(self, document: dict, file_handler: IO, filename: str) -> None:
        file_handler.write(json.dumps(document, ensure_ascii=False, default=str) + "\n")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}{n}"
    taken.add(candidate)
    return candidate


def attach_drop_samples(pipelines: SourcePipelines, layout: SourceLayout, per_reason: int = DEFAULT_PER_REASON,
                        max_chars: int = SAMPLE_CHARS) -> list[str]:
    """Set a `DropSampleWriter` as the `exclusion_writer` of every `BaseFilter` (and MinHash dedup filter) of the
    source's stages that has none (a filter that already writes its drops elsewhere is left alone); returns the
    step names sampled.

    Call it before running the stages (`run_source`); a step named twice gets `name2`, `name3` files."""
    if problem := outside_problem(layout.curated_dir, dropped_dir(layout)):
        raise ManifestError(f"{dropped_dir(layout)}: {problem}; drop samples are written there, so it must be a real "
                            f"folder inside {layout.curated_dir}: replace the symlink", source=layout.source,
                            field="path", value=str(dropped_dir(layout)))
    folder = str(dropped_dir(layout))
    names: set[str] = set()
    for stage in pipelines.stages:
        for step in stage.pipeline:
            default = next((reason for cls, reason in EXCLUDING_STEPS if isinstance(step, cls)), None)
            if not (isinstance(step, BaseFilter) or default) or getattr(step, "exclusion_writer", None) is not None:
                continue
            name = _unique(step_name(step) or type(step).__name__, names)
            step.exclusion_writer = DropSampleWriter(folder, step=name, per_reason=per_reason, max_chars=max_chars,
                                                     default_reason=default or "unspecified")
    return sorted(names)


def _add(samples: dict[tuple[str, str], list[DropSample]], sample: DropSample, per_reason: int) -> None:
    kept = samples.setdefault((sample.step, sample.reason), [])
    if len(kept) < per_reason:
        kept.append(sample)


def read_drop_samples(folder: Path, per_reason: int = DEFAULT_PER_REASON) -> dict[tuple[str, str], list[DropSample]]:
    """The examples a source's `DropSampleWriter`s wrote, by (step, reason): the first `per_reason` over its
    ranks in rank order. A line that is not a sample (a file cut short by a crash) is skipped."""
    samples: dict[tuple[str, str], list[DropSample]] = {}
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else ():
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    sample = DropSample(step=str(row["step"]), reason=str(row["reason"]), id=str(row["id"]),
                                        text=str(row["text"]), text_chars=int(row["text_chars"]),
                                        metadata=dict(row.get("metadata") or {}))
                except (ValueError, KeyError, TypeError):
                    continue
                _add(samples, sample, per_reason)
    return samples


def quarantine_samples(folder: Path, per_reason: int = DEFAULT_PER_REASON, max_chars: int = SAMPLE_CHARS,
                       max_lines: int = QUARANTINE_LINES_READ) -> dict[tuple[str, str], list[DropSample]]:
    """Examples of a source's quarantined records (`curated/quarantine/<source>/*.jsonl.gz`), by (step,
    reason) with the reason as the manifest counts it (`quarantine_<reason>`); at most `max_lines` lines read."""
    samples: dict[tuple[str, str], list[DropSample]] = {}
    read = 0
    for path in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else ():
        try:
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    read += 1
                    if read > max_lines:
                        return samples
                    try:
                        row = json.loads(line)
                        meta = dict(row.get("metadata") or {})
                        text = str(row.get("text") or "")
                        sample = DropSample(step=str(meta.get("quarantine_step") or "read"),
                                            reason=QUARANTINE_PREFIX + str(meta.get("quarantine_reason") or "unknown"),
                                            id=str(row.get("id") or ""), text=_cut(text, max_chars),
                                            text_chars=len(text),
                                            metadata={k: meta[k] for k in KEPT_METADATA if meta.get(k) is not None})
                    except (ValueError, TypeError, AttributeError):
                        continue
                    _add(samples, sample, per_reason)
        except (OSError, EOFError, zlib.error):
            continue  # a quarantine file cut short: the lines read so far are examples enough
    return samples
