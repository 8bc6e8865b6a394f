"""The train/val split of curated documents: one deterministic rule, used by tokenizer training and tokenization.

Validation documents are chosen per source in the order of a keyed hash of their id (`select_val_ids`), so the
split is stable across re-runs and independent of shard layout and worker count. `split_source` applies that
rule to a source of a manifest with the settings of a `TokenizeConfig`; `train_tokenizer` calls it to leave
the validation documents out of the tokenizer's training text, `tokenize_manifest` to route them to `val/`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from mixlab.curation.manifest import ManifestError, ShardManifest

SPLITS = ("train", "val")
ID_HASH_SALT = b"mixlab-val-split-v1"
VAL_SETTINGS = ("val_fraction", "min_val_docs", "max_val_fraction")


@dataclass
class TokenizeConfig:
    """How curated shards become token shards, including which documents are held out for validation.

    The validation split of each source is a share of its UTF-8 text *bytes*, not of its documents: documents
    are taken in id-hash order until they hold at least `val_fraction` of the source's text bytes and at
    least `min_val_docs` documents, skipping any document that would push validation past `max_val_fraction`
    of the text bytes, and always leaving one document for training. The same settings must be given to
    `train_tokenizer` (`TokenizerConfig(held_out=...)`), so that the tokenizer never sees validation text.
    """

    val_fraction: float = 0.02  # target share of each source's text bytes held out for validation
    min_val_docs: int = 8  # at least this many validation documents per source (for a stable per-source loss)...
    max_val_fraction: float = 0.2  # ...but never more than this share of a source's text bytes
    # the Rust tokenizer already uses every core inside one worker; >1 starts a process pool, so a calling
    # script needs an `if __name__ == "__main__":` guard
    workers: int = 1
    batch_size: int = 1000  # documents per encode_batch call
    verify_checksums: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.max_val_fraction <= 1.0:
            raise ValueError(f"max_val_fraction must be in [0, 1], got {self.max_val_fraction}")
        if self.min_val_docs < 0 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("min_val_docs must be >= 0, workers and batch_size >= 1")

    def val_settings(self) -> dict[str, Any]:
        """The settings that decide the validation split (what a tokenizer records it was trained without)."""
        return {name: getattr(self, name) for name in VAL_SETTINGS}


def id_hash(doc_id: str) -> int:
    """A stable 64-bit hash of a document id (Python's hash() changes between processes)."""
    return int.from_bytes(
        hashlib.blake2b(str(doc_id).encode(), digest_size=8, key=ID_HASH_SALT).digest(), "little"
    )


def select_val_ids(
    ids: Sequence[str], sizes: Sequence[int], val_fraction: float, min_val_docs: int, max_val_fraction: float
) -> frozenset[str]:
    """Held-out documents of one source: taken in id-hash order (a stable pseudo-random order) until they
    hold `val_fraction` of the source's text and at least `min_val_docs` documents, skipping any document
    that would push validation past `max_val_fraction` of the text, and always leaving one for training.

    Budgets are in bytes of text, not documents: in a small source one long document could otherwise
    take most of its tokens out of training.
    """
    total = sum(sizes)
    target, ceiling = val_fraction * total, max_val_fraction * total
    chosen: list[str] = []
    held = 0
    for i in sorted(range(len(ids)), key=lambda i: id_hash(ids[i])):
        if (held >= target and len(chosen) >= min_val_docs) or len(chosen) + 1 >= len(ids):
            break
        if held + sizes[i] > ceiling:
            continue
        chosen.append(ids[i])
        held += sizes[i]
    return frozenset(chosen)


def read_ids_and_sizes(manifest: ShardManifest, source: str) -> tuple[list[str], list[int]]:
    """Every document id of a source and the UTF-8 size of its text, streamed shard by shard."""
    ids: list[str] = []
    sizes: list[int] = []
    for shard in manifest.source(source).shards:
        path = manifest.resolve(shard.path)
        parquet = pq.ParquetFile(path)
        missing = {"id", "text"} - set(parquet.schema_arrow.names)
        if missing:
            raise ManifestError(
                f"{path}: no {sorted(missing)} column, so documents cannot be split into train/val stably; "
                "re-run `mixlab curate`"
            )
        for batch in parquet.iter_batches(batch_size=4096, columns=["id", "text"]):
            ids.extend(str(i) for i in batch.column(0).to_pylist())
            sizes.extend(pc.fill_null(pc.binary_length(batch.column(1)), 0).to_pylist())
    return ids, sizes


@dataclass(frozen=True)
class SourceSplit:
    """The validation documents of one source and the text bytes on each side."""

    val_ids: frozenset[str]
    train_bytes: int
    val_bytes: int


def split_source(manifest: ShardManifest, source: str, config: TokenizeConfig) -> SourceSplit:
    """The train/val split of one source of the manifest under `config`'s validation settings."""
    ids, sizes = read_ids_and_sizes(manifest, source)
    val_ids = select_val_ids(ids, sizes, config.val_fraction, config.min_val_docs, config.max_val_fraction)
    val_bytes = sum(size for doc_id, size in zip(ids, sizes, strict=True) if doc_id in val_ids)
    return SourceSplit(val_ids=val_ids, train_bytes=sum(sizes) - val_bytes, val_bytes=val_bytes)


def source_val_ids(manifest: ShardManifest, source: str, config: TokenizeConfig,
                   fixed: Mapping[str, Collection[str]] | None = None) -> frozenset[str]:
    """The validation documents of a source: `fixed[source]` (those ids the source has) when given, e.g. a
    curated variant's base's validation documents, else `config`'s rule (`split_source`)."""
    if fixed is not None and source in fixed:
        wanted = frozenset(str(i) for i in fixed[source])
        return frozenset(i for i in read_ids_and_sizes(manifest, source)[0] if i in wanted)
    return split_source(manifest, source, config).val_ids
