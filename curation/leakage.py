"""Held-out leakage: validation documents with a near-duplicate in some source's training split.

Curation dedups within each source, so the same text can still sit in two sources (a help page quoting
code, a dialogue copied into a web page) or within one source just below the MinHash threshold. An eval
document whose near-copy is trained on flatters that source's held-out loss, so the tokenize step counts
such documents per source and records them in the manifest. At proxy scale the whole check fits in memory:
datasketch's MinHashLSH indexes the (small) validation side and every training document queries it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow.parquet as pq
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.splits import TokenizeConfig, source_val_ids

if TYPE_CHECKING:  # datasketch is imported where it is used: it imports scipy.integrate (1 s)
    from datasketch import MinHash


@dataclass
class LeakageConfig:
    """Near-duplicate = estimated Jaccard similarity of word n-gram sets at or above `threshold`."""

    threshold: float = 0.8
    num_perm: int = 64
    ngram: int = 5
    examples_per_source: int = 3


@dataclass
class LeakageReport:
    """Per source: validation documents checked, those with a near-duplicate in training, a few examples."""

    checked: dict[str, int] = field(default_factory=dict)
    leaked: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)

    def summary(self, source: str) -> dict[str, int]:
        return {"val_docs": self.checked.get(source, 0), "val_near_duplicates_in_train": self.leaked.get(source, 0)}


def _signature(text: str, config: LeakageConfig) -> MinHash:
    words = text.split()
    n = config.ngram
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))] if words else [text]
    from datasketch import MinHash

    signature = MinHash(num_perm=config.num_perm, seed=1)
    signature.update_batch([g.encode("utf-8") for g in set(grams)])
    return signature


def _documents(manifest: ShardManifest, source: str):
    for shard in manifest.source(source).shards:
        for batch in pq.ParquetFile(manifest.resolve(shard.path)).iter_batches(batch_size=2048, columns=["id", "text"]):
            yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True)


def held_out_leakage(
    manifest: ShardManifest,
    split: TokenizeConfig,
    config: LeakageConfig | None = None,
    sources: list[str] | None = None,
    held_out_ids: Mapping[str, Collection[str]] | None = None,
) -> LeakageReport:
    """Count, for each source, validation documents that have a near-duplicate in any source's train split
    (`held_out_ids`: fixed validation documents of some sources, as `tokenize_manifest` takes them)."""
    config = config or LeakageConfig()
    names = sources or sorted(n for n, s in manifest.sources.items() if s.shards)
    val_ids = {name: source_val_ids(manifest, name, split, held_out_ids) for name in names}
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=config.threshold, num_perm=config.num_perm)
    report = LeakageReport()
    for name in names:
        report.checked[name] = report.leaked[name] = 0
        for doc_id, text in _documents(manifest, name):
            if str(doc_id) in val_ids[name]:
                lsh.insert((name, str(doc_id)), _signature(text or "", config))
                report.checked[name] += 1
    leaked: dict[tuple[str, str], tuple[str, str]] = {}
    for name in names:
        for doc_id, text in _documents(manifest, name):
            if str(doc_id) in val_ids[name]:
                continue
            for key in lsh.query(_signature(text or "", config)):
                leaked.setdefault(key, (name, str(doc_id)))
    for (val_source, val_id), (train_source, train_id) in sorted(leaked.items()):
        report.leaked[val_source] += 1
        examples = report.examples.setdefault(val_source, [])
        if len(examples) < config.examples_per_source:
            examples.append({"val_id": val_id, "train_source": train_source, "train_id": train_id})
    return report


def record_leakage(manifest: ShardManifest, report: LeakageReport) -> ShardManifest:
    """Store the counts in each source's `metadata_summary` and save the manifest."""
    for name in report.checked:
        entry = manifest.source(name)
        entry.metadata_summary["held_out_leakage"] = {**report.summary(name), "examples": report.examples.get(name, [])}
    manifest.save()
    return manifest
