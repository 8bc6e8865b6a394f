"""Tokenize recipe: BPE on the curated shards, token shards, and the held-out leakage check, in that order.

One held-out split (`TokenizeConfig`) serves all three: the tokenizer never learns from validation
documents, the shards route them to `val/`, and the leakage check looks for their near-copies in training.

A tokenizer is also an ablation axis: `tokenize_candidates` tokenizes the same curated data with each
candidate (BPEs trained at several vocabulary sizes, existing tokenizer.json files) into its own token
dataset, `<curated>/tokenized/<name>/`, a complete curated directory (its manifest, its curated shards as hard
links to the base's, its tokenizer and token shards) that a run names as `data.curated`. Every candidate holds
out the same validation documents, and bits per byte makes the runs comparable across vocabularies.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from mixlab.curation import (
    LeakageReport,
    ShardManifest,
    TokenizeConfig,
    TokenizerConfig,
    TokenizerError,
    default_tokenizer_name,
    held_out_leakage,
    install_tokenizer,
    record_leakage,
    tokenize_manifest,
    train_tokenizer,
)
from mixlab.training.errors import ConfigError

CANDIDATES_DIR = "tokenized"  # <curated>/tokenized/<candidate>/
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def tokenize_curated(
    curated_dir: str | Path,
    held_out: TokenizeConfig,
    vocab_size: int | None = None,
    tokenizer: str | Path | None = None,
    eos_token: str | None = None,
) -> tuple[ShardManifest, LeakageReport]:
    """Train a tokenizer (unless `tokenizer` names an existing tokenizer.json or sentencepiece `.model`), write
    token shards, record held-out leakage. An existing tokenizer is copied into `<curated>/tokenizer/` and
    recorded in the manifest with its sha256, vocabulary size and EOS token (`eos_token`, else detected)."""
    if tokenizer is not None and vocab_size is not None:
        raise ConfigError("--vocab-size trains a new tokenizer; it cannot be combined with --tokenizer (an existing "
                          "one): drop one of them", ["vocab_size", "tokenizer"])
    if tokenizer is None:
        extra = {"vocab_size": vocab_size} if vocab_size is not None else {}
        train_tokenizer(curated_dir, TokenizerConfig(held_out=held_out, **extra))
    else:
        install_tokenizer(curated_dir, tokenizer, eos_token)
    manifest = tokenize_manifest(curated_dir, None, config=held_out)
    leakage = held_out_leakage(manifest, held_out)
    record_leakage(manifest, leakage)
    return manifest, leakage


@dataclass(frozen=True)
class TokenizerCandidate:
    """One candidate of the tokenizer axis: a BPE to train at `vocab_size`, or an existing `path`."""

    name: str
    vocab_size: int | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.path is None):
            raise ConfigError(f"tokenizer candidate {self.name!r}: give exactly one of vocab_size or path",
                              ["vocab_size", "tokenizer"])
        if not _NAME_OK.fullmatch(self.name):
            raise ConfigError(f"tokenizer candidate name {self.name!r} must be a plain folder name "
                              "(letters, digits, . _ -); name it with NAME=PATH", ["tokenizer"])


def candidates_from_args(vocab_sizes: list[int] | None, tokenizers: list[str] | None) -> list[TokenizerCandidate]:
    """`bpe-<size>` for each vocabulary size, and `NAME=PATH` or `PATH` (named after the file, or its folder
    for `<folder>/tokenizer.json`) for each existing tokenizer; names must not repeat."""
    out = [TokenizerCandidate(f"bpe-{size}", vocab_size=size) for size in vocab_sizes or []]
    for spec in tokenizers or []:
        name, sep, path_text = spec.partition("=")
        if not sep or "/" in name:
            name, path_text = "", spec
        path = Path(path_text)
        out.append(TokenizerCandidate(name or default_tokenizer_name(path), path=path))
    names = [c.name for c in out]
    if repeated := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"tokenizer candidates {repeated} appear twice; give distinct sizes, or NAME=PATH",
                          ["vocab_sizes", "tokenizer"])
    return out


def candidate_dir(curated_dir: str | Path, name: str) -> Path:
    """Where candidate `name`'s token dataset lives: `<curated>/tokenized/<name>/`."""
    return ShardManifest.load(curated_dir).resolve(f"{CANDIDATES_DIR}/{name}")


def prepare_candidate_dir(curated_dir: str | Path, name: str) -> Path:
    """`<curated>/tokenized/<name>/`: the base manifest with its curated shards hard-linked (copied where links
    cannot be made) and no tokenizer or token shards yet. A stale folder of that name is replaced."""
    base = ShardManifest.load(curated_dir)
    target = base.resolve(f"{CANDIDATES_DIR}/{name}")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for entry in base.sources.values():
        for shard in entry.shards:
            if problem := base.check_file(shard, owner=entry.name, checksum=False):
                raise TokenizerError(problem)
            link = target / shard.path
            link.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(base.resolve(shard.path), link)
            except OSError:
                shutil.copy2(base.resolve(shard.path), link)
        entry.token_shards = []
        entry.tokens = {}
        entry.metadata_summary.pop("held_out_leakage", None)
    base.tokenizer = None
    base.save(target)  # writes the manifest and the candidate's own data card (not a link to the base's)
    return target


def tokenize_candidates(
    curated_dir: str | Path,
    held_out: TokenizeConfig,
    candidates: list[TokenizerCandidate],
    eos_token: str | None = None,
) -> dict[str, tuple[ShardManifest, LeakageReport]]:
    """Tokenize the curated data with every candidate, each into `<curated>/tokenized/<name>/`, with the same
    held-out split. Returns name -> (the candidate's manifest, its leakage report)."""
    if not candidates:
        raise ConfigError("no tokenizer candidate: give --vocab-sizes and/or --tokenizer", ["vocab_sizes", "tokenizer"])
    results = {}
    for candidate in candidates:
        target = prepare_candidate_dir(curated_dir, candidate.name)
        results[candidate.name] = tokenize_curated(
            target, held_out, candidate.vocab_size, candidate.path, eos_token if candidate.path else None
        )
    return results
