"""The shard manifest: the one file that curation hands to every later stage.

`manifest.json` lives at the root of a curated directory. It names every source, its Parquet
shards (with checksums), per-step document accounting, per-document metadata summaries, and,
once tokenized, the token shards. Readers refuse a manifest whose schema version they do not
know instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# 2: ShardFile.text_bytes; SourceEntry.bytes is UTF-8 text bytes; TokenizerInfo.held_out
# 3: curated shards under data/<source>/ (the folder users load, with its dataset card), not <source>/
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"  # <curated>/data/<source>/*.parquet: what users load; tokens, logs, tokenizer live beside it


class ManifestError(ValueError):
    """A manifest that cannot be read or does not add up; the message says which file and what to do."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class StepStats:
    """Documents entering one pipeline step, kept by it, and dropped by reason."""

    name: str
    docs_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass
class ShardFile:
    """One file on disk, relative to the manifest's directory."""

    path: str
    docs: int
    bytes: int  # size of the file on disk (compressed, for Parquet): never a measure of how much text it holds
    sha256: str
    tokens: int | None = None
    split: str | None = None  # for token shards: "train" or "val"; None for curated shards
    text_bytes: int | None = None  # curated shards: UTF-8 bytes of the documents' text; None for token shards


@dataclass
class SourceEntry:
    """One curated source: where its documents are, how many survived which step, what they contain."""

    name: str
    kind: str  # web | code | math | chat | ...
    docs: int = 0  # documents in the curated shards (= the last step's kept)
    bytes: int = 0  # UTF-8 bytes of the text of those documents (sum of the shards' text_bytes), not file sizes
    tokens: dict[str, int] = field(default_factory=dict)  # split -> tokens
    shards: list[ShardFile] = field(default_factory=list)
    token_shards: list[ShardFile] = field(default_factory=list)
    steps: list[StepStats] = field(default_factory=list)
    quarantined: int = 0
    languages: dict[str, int] = field(default_factory=dict)
    metadata_summary: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Any] = field(default_factory=dict)  # where the raw data came from

    def check_accounting(self) -> list[str]:
        """Problems with the per-step counts: each step's input must be the previous step's output,
        every document entering a step must be kept or dropped, and the last step must match the shards."""
        problems = []
        for prev, step in zip(self.steps, self.steps[1:], strict=False):
            if step.docs_in != prev.kept:
                problems.append(f"{self.name}: step {step.name!r} got {step.docs_in} docs but {prev.name!r} kept {prev.kept}")
        for step in self.steps:
            if step.docs_in != step.kept + step.dropped_total:
                problems.append(
                    f"{self.name}: step {step.name!r}: in {step.docs_in} != kept {step.kept} + dropped {step.dropped_total}"
                )
        if self.steps and self.steps[-1].kept != self.docs:
            problems.append(f"{self.name}: last step kept {self.steps[-1].kept} but shards hold {self.docs} docs")
        return problems


@dataclass
class TokenizerInfo:
    path: str
    vocab_size: int
    sha256: str
    eos_token: str
    kind: str = "bpe"
    # the validation split the tokenizer was trained without (`TokenizeConfig.val_settings()`); None for a
    # tokenizer brought from elsewhere, which may have seen anything
    held_out: dict[str, Any] | None = None


@dataclass
class ShardManifest:
    """All sources of a curated directory. Paths inside are relative to `root`."""

    sources: dict[str, SourceEntry] = field(default_factory=dict)
    tokenizer: TokenizerInfo | None = None
    schema_version: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    root: Path | None = field(default=None, repr=False, compare=False)

    # ---- reading and writing -------------------------------------------------------------
    @classmethod
    def load(cls, root: str | Path) -> ShardManifest:
        root = Path(root)
        path = root / MANIFEST_NAME if root.is_dir() or not root.suffix else root
        if not path.exists():
            raise ManifestError(f"{path}: no manifest here; run `mixlab curate` to create one")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err}); re-run `mixlab curate` or restore the file") from err
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            why = (
                " (written by an older mixlab that kept Parquet in <curated>/<source>/ instead of <curated>/data/<source>/)"
                if isinstance(version, int) and version < SCHEMA_VERSION else ""
            )
            raise ManifestError(
                f"{path}: schema_version {version!r} is not supported (this mixlab reads {SCHEMA_VERSION}){why}; "
                f"re-run curation with this version: `mixlab curate --raw WORKDIR/raw --out {path.parent}`, "
                "then `mixlab tokenize`"
            )
        try:
            manifest = cls._from_dict(raw)
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{path}: malformed manifest ({err!r})") from err
        manifest.root = path.parent
        return manifest

    @classmethod
    def _from_dict(cls, raw: dict[str, Any]) -> ShardManifest:
        sources = {}
        for name, src in raw["sources"].items():
            src = dict(src)
            src["shards"] = [ShardFile(**s) for s in src.get("shards", [])]
            src["token_shards"] = [ShardFile(**s) for s in src.get("token_shards", [])]
            src["steps"] = [StepStats(**s) for s in src.get("steps", [])]
            sources[name] = SourceEntry(**src)
        tok = raw.get("tokenizer")
        return cls(
            sources=sources,
            tokenizer=TokenizerInfo(**tok) if tok else None,
            schema_version=raw["schema_version"],
            created=raw.get("created", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root", None)
        return data

    def save(self, root: str | Path | None = None) -> Path:
        """Write atomically so that a crash never leaves a half-written manifest, and rewrite the dataset card
        (`data/README.md`) from it, so that the card is as current as the manifest."""
        root = Path(root) if root is not None else self.root
        if root is None:
            raise ManifestError("ShardManifest.save needs a directory")
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        path = root / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        from mixlab.curation.datacard import write_dataset_card  # the card reads the manifest: import here

        write_dataset_card(self)
        return path

    # ---- queries -------------------------------------------------------------------------
    def source(self, name: str) -> SourceEntry:
        if name not in self.sources:
            raise ManifestError(f"source {name!r} is not in the manifest at {self.root}; known: {sorted(self.sources)}")
        return self.sources[name]

    def resolve(self, relative: str) -> Path:
        if self.root is None:
            raise ManifestError("manifest has no root directory; load() or save() it first")
        return self.root / relative

    def check(self) -> list[str]:
        """Everything that does not add up, across all sources (empty list: consistent)."""
        return [problem for src in self.sources.values() for problem in src.check_accounting()]

    def check_file(self, record: ShardFile | TokenizerInfo, *, owner: str | None = None, checksum: bool = True) -> str | None:
        """The problem with one file the manifest lists (missing, or changed since it was recorded), or None.

        The message names the file and the command that writes it again; `owner` (a source name) is added
        to say whose file it is. `checksum=False` only checks that the file exists.
        """
        path = self.resolve(record.path)
        if isinstance(record, TokenizerInfo):
            what, fix = "tokenizer", "re-train it with `mixlab tokenize`"
        elif record.split is not None:
            what, fix = "token shard", "re-run `mixlab tokenize`"
        else:
            what, fix = "curated shard", "re-run `mixlab curate`"
        if owner is not None:
            what = f"{what} of {owner!r}"
        if not path.is_file():
            return f"{path}: {what} listed in the manifest is missing; {fix}"
        if checksum and sha256_file(path) != record.sha256:
            return f"{path}: checksum mismatch with the manifest (the {what} changed after it was written); {fix}"
        return None

    def verify_checksums(self) -> list[str]:
        """Every listed file (curated shards, token shards, tokenizer) that is missing or changed since written."""
        problems = [
            self.check_file(shard, owner=src.name)
            for src in self.sources.values()
            for shard in [*src.shards, *src.token_shards]
        ]
        if self.tokenizer is not None:
            problems.append(self.check_file(self.tokenizer))
        return [p for p in problems if p is not None]
