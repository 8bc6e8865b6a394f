"""From datatrove's per-rank stats and the written Parquet to a manifest `SourceEntry` that adds up.

datatrove's `stats.json` covers only the ranks run in the last invocation; after a resume it is short.
The per-rank files `stats/NNNNN.json` are kept for every completed rank, so merging all of them (what
datatrove's `merge_stats` tool does) gives the true totals however many invocations it took.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupFilter
from datatrove.pipeline.extractors.base import BaseExtractor
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter, LanguageFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.stats import PipelineStats
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.dedup import CountingSentenceDedupFilter, ExactDedupFilter
from mixlab.curation.filters import ChatFormatFilter, CodeQualityFilter, MathQualityFilter
from mixlab.curation.manifest import ShardFile, SourceEntry, StepStats, sha256_file
from mixlab.curation.readers import QUARANTINE_PREFIX, QuarantiningReader
from mixlab.curation.stages import SourceLayout, SourcePipelines
from mixlab.curation.writers import unique_shard_ids


class CountedStep(PipelineStep):
    """Counts documents in and out of a step that does not count them itself (a plain `PipelineStep` or a
    `(data, rank, world_size)` function), so its drops show in the manifest as `unspecified`.

    A `BaseFilter` subclass is better: its drops carry reasons. `curate` wraps such steps on its own
    (`count_plain_steps`); the manifest names the step after the wrapped class.
    """

    type = "🔢 - COUNTED"

    def __init__(self, step: PipelineStep | Any):
        self.step = step
        self.name = getattr(step, "name", None) or getattr(step, "__name__", type(step).__name__)
        super().__init__()

    @property
    def step_class(self) -> str:
        return type(self.step).__name__ if isinstance(self.step, PipelineStep) else self.name

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen = 0

        def counted_input() -> DocumentsPipeline:
            nonlocal seen
            for doc in data or ():
                seen += 1
                self.stat_update(StatHints.total)
                yield doc

        out = 0
        for doc in self.step(counted_input(), rank, world_size):
            out += 1
            self.stat_update(StatHints.forwarded)
            yield doc
        if seen > out:
            self.stat_update(StatHints.dropped, value=seen - out)
        elif out > seen:
            self.stat_update("added", value=out - seen)  # a step that makes documents: the accounting says so


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# The name each counting step gets in the manifest (first match wins).
STEP_NAMES: list[tuple[type, str]] = [
    (QuarantiningReader, "read"),  # raw JSONL/Parquet, WARC, HTML and code trees, saved HF datasets
    (BaseExtractor, "extract"),
    (LanguageFilter, "language_id"),
    (GopherRepetitionFilter, "gopher_repetition"),
    (GopherQualityFilter, "gopher_quality"),
    (CodeQualityFilter, "code_quality"),
    (MathQualityFilter, "math_quality"),
    (ChatFormatFilter, "chat_format"),
    (ExactDedupFilter, "exact_dedup"),
    (CountingSentenceDedupFilter, "sentence_dedup"),
    (MinhashDedupFilter, "minhash_dedup"),
    (BaseFilter, ""),  # any other filter: named after its class
]


def step_name(step: PipelineStep) -> str | None:
    """The manifest name of a step that counts documents in and out, or None for pass-through steps."""
    if isinstance(step, CountedStep):
        return _snake(step.step_class)
    for cls, name in STEP_NAMES:
        if isinstance(step, cls):
            return name or _snake(type(step).__name__)
    return None


def count_plain_steps(pipeline: list[PipelineStep]) -> list[PipelineStep]:
    """The pipeline with every step between its reader and its last step that counts nothing (neither a
    known counting step nor a writer) wrapped in `CountedStep`: a plain step that drops documents is then
    counted instead of breaking the accounting. The last step of a stage (a writer, or a MinHash stage that
    consumes documents and yields none) is left alone."""
    wrapped = []
    for index, step in enumerate(pipeline):
        plain = (0 < index < len(pipeline) - 1 and callable(step) and step_name(step) is None
                 and not isinstance(step, BaseReader | DiskWriter))
        wrapped.append(CountedStep(step) if plain else step)
    return wrapped


def merged_stage_stats(logging_dir: Path) -> PipelineStats | None:
    """Sum of every completed rank's stats of one stage, or None if no rank has finished."""
    files = sorted((logging_dir / "stats").glob("*.json"))
    if not files:
        return None
    return sum((PipelineStats.from_json(json.loads(f.read_text())) for f in files), start=PipelineStats())


def stage_output_docs(pipeline: list[PipelineStep], logging_dir: Path) -> int | None:
    """Documents kept by the last counting step of a stage (what the next stage reads), summed over its
    finished ranks; None when no rank has finished or nothing in the stage counts."""
    merged = merged_stage_stats(logging_dir)
    counted = [i for i, step in enumerate(pipeline) if step_name(step)]
    if merged is None or not counted:
        return None
    return _count(merged.stats[counted[-1]].stats, "forwarded")


def stage_read_docs(logging_dir: Path) -> int:
    """Documents the first step (the reader) of a stage passed on in its finished ranks (0 when none)."""
    merged = merged_stage_stats(logging_dir)
    if merged is None or not merged.stats:
        return 0
    return _count(merged.stats[0].stats, "forwarded")


def _count(stats: Any, key: str) -> int:
    """A count from a step's stats; stats loaded from one rank's file may hold a plain number."""
    if key not in stats:
        return 0
    value = stats[key]
    if isinstance(value, dict):  # one rank's stats.json keeps a `value=` stat as {"total": ..., "n": ...}
        value = value.get("total", 0)
    return int(getattr(value, "total", value))


def step_stats(name: str, stats: dict[str, Any], count_prefixes: tuple[str, ...] = ()) -> StepStats:
    """total/forwarded/dropped(+dropped_<reason>) of one step; drops without a reason are `unspecified`. Stats
    whose key starts with one of `count_prefixes` (a step's `manifest_counts`, e.g. PII redacted per type) are
    kept as its `counts`."""

    def count(key: str) -> int:
        return _count(stats, key)

    reasons = {key.removeprefix("dropped_"): count(key) for key in stats if key.startswith("dropped_")}
    unexplained = count("dropped") - sum(reasons.values())
    if unexplained > 0:
        reasons["unspecified"] = unexplained
    counts = {key: count(key) for key in sorted(stats) if count_prefixes and key.startswith(count_prefixes)}
    return StepStats(name=name, docs_in=count("total"), kept=count("forwarded"), dropped=dict(sorted(reasons.items())),
                     counts=counts)


def source_steps(pipelines: SourcePipelines, layout: SourceLayout) -> list[StepStats]:
    steps: list[StepStats] = []
    for stage in pipelines.stages:
        counted = [(i, name) for i, step in enumerate(stage.pipeline) if (name := step_name(step))]
        if not counted:
            continue
        merged = merged_stage_stats(layout.logs / stage.name)
        for index, name in counted:
            if merged is None:
                steps.append(StepStats(name=name, docs_in=0, kept=0))
                continue
            stats = merged.stats[index]
            expected = str(stage.pipeline[index])
            if stats.name != expected:
                raise RuntimeError(f"{layout.logs / stage.name}: stats step {index} is {stats.name!r}, expected {expected!r}")
            steps.append(step_stats(name, stats.stats, tuple(getattr(stage.pipeline[index], "manifest_counts", ()))))
    return steps


def _histogram(values: list[int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(values).items())}


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": round(sum(ordered) / len(ordered), 4), "min": ordered[0], "p50": pick(0.5), "p90": pick(0.9),
            "max": ordered[-1]}


def shard_summary(layout: SourceLayout) -> tuple[list[ShardFile], dict[str, int], dict[str, Any]]:
    """Shard files (file size, UTF-8 text bytes, checksum), language counts and per-document metadata summaries."""
    shards, languages = [], Counter()
    scores: list[float] = []
    chars: list[int] = []
    clusters: list[int] = []
    dup_clusters: list[int] = []  # only when the Parquet schema keeps `dup_cluster_size`
    origins: Counter = Counter()
    for path in sorted(layout.output.glob("*.parquet")):
        table = pq.read_table(path, columns=["text", "metadata"])
        meta = table.column("metadata").to_pylist()
        text_bytes = pc.sum(pc.binary_length(table.column("text"))).as_py() or 0
        shards.append(ShardFile(path=path.relative_to(layout.curated_dir).as_posix(), docs=table.num_rows,
                                bytes=path.stat().st_size, sha256=sha256_file(path), text_bytes=text_bytes))
        for m in meta:
            languages[m["language"] or "unknown"] += 1
            if m["language_score"] is not None:
                scores.append(m["language_score"])
            chars.append(m["chars"])
            clusters.append(m["minhash_cluster_size"])
            if m.get("dup_cluster_size") is not None:
                dup_clusters.append(m["dup_cluster_size"])
            origins[m["origin"] or "unknown"] += 1
    summary: dict[str, Any] = {
        "chars": _quantiles(chars),
        "minhash_cluster_size_histogram": _histogram(clusters),
        "origins": dict(sorted(origins.items())),
    }
    if dup_clusters:
        summary["dup_cluster_size_histogram"] = _histogram(dup_clusters)
    if scores:
        summary["language_score"] = _quantiles(scores)
    return shards, dict(languages.most_common()), summary


def build_source_entry(pipelines: SourcePipelines, layout: SourceLayout, origin: dict[str, Any] | None = None,
                       timing: dict[str, Any] | None = None) -> SourceEntry:
    """The manifest entry of one curated source; `check_accounting()` of the result must be empty.

    The shards are described as final: repeated ids are made unique first (`unique_shard_ids`), and how
    many were is `metadata_summary.duplicate_ids`.
    """
    steps = source_steps(pipelines, layout)
    duplicate_ids = unique_shard_ids(layout.output) if layout.output.is_dir() else 0
    shards, languages, summary = shard_summary(layout)
    summary["duplicate_ids"] = duplicate_ids
    if timing:
        summary["timing"] = timing
    quarantined = sum(n for step in steps for reason, n in step.dropped.items() if reason.startswith(QUARANTINE_PREFIX))
    return SourceEntry(
        name=pipelines.source,
        kind=pipelines.kind,
        docs=sum(s.docs for s in shards),
        bytes=sum(s.text_bytes or 0 for s in shards),  # text, not file sizes: budgets are in text bytes
        shards=shards,
        steps=steps,
        quarantined=quarantined,
        languages=languages,
        metadata_summary=summary,
        origin=origin or {},
    )
