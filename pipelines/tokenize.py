"""Tokenize recipe: BPE on the curated shards, token shards, and the held-out leakage check, in that order.

One held-out split (`TokenizeConfig`) serves all three: the tokenizer never learns from validation
documents, the shards route them to `val/`, and the leakage check looks for their near-copies in training.
"""

from __future__ import annotations

from pathlib import Path

from mixlab.curation import (
    LeakageReport,
    ShardManifest,
    TokenizeConfig,
    TokenizerConfig,
    held_out_leakage,
    record_leakage,
    tokenize_manifest,
    train_tokenizer,
)


def tokenize_curated(
    curated_dir: str | Path,
    held_out: TokenizeConfig,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
) -> tuple[ShardManifest, LeakageReport]:
    """Train a tokenizer (unless `tokenizer` names one), write token shards, record held-out leakage."""
    if tokenizer is not None and vocab_size is not None:
        raise ValueError("vocab_size trains a new tokenizer; it cannot be combined with an existing tokenizer")
    if tokenizer is None:
        extra = {"vocab_size": vocab_size} if vocab_size is not None else {}
        train_tokenizer(curated_dir, TokenizerConfig(held_out=held_out, **extra))
    manifest = tokenize_manifest(curated_dir, tokenizer, config=held_out)
    leakage = held_out_leakage(manifest, held_out)
    record_leakage(manifest, leakage)
    return manifest, leakage
