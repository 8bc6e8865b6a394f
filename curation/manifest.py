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
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mixlab.curation.paths import name_problem, outside_problem, relative_path_problem

# 2: ShardFile.text_bytes; SourceEntry.bytes is UTF-8 text bytes; TokenizerInfo.held_out
# 3: curated shards under data/<source>/ (the folder users load, with its dataset card), not <source>/
SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"  # <curated>/data/<source>/*.parquet: what users load; tokens, logs, tokenizer live beside it


class ManifestError(ValueError):
    """A manifest that cannot be read or does not add up; the message says which file and what to do.

    When one entry is at fault, `path` (the manifest), `source`, `field` and `value` name it, so that a caller
    can point at it without parsing the message."""

    def __init__(self, message: str, *, path: Path | None = None, source: str | None = None,
                 field: str | None = None, value: Any = None):
        super().__init__(message)
        self.path, self.source, self.field, self.value = path, source, field, value


class _FieldTypeError(ValueError):
    """One field of a manifest with a value of the wrong type (turned into a ManifestError naming it)."""

    def __init__(self, where: str, value: Any, expected: str | None):
        super().__init__(f"{where} = {_short(value)} is not {expected}" if expected else f"{where} is missing (required)")
        self.where, self.value, self.expected = where, value, expected


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TYPE_NAMES = {int: "a whole number", str: "a string", bool: "true or false", float: "a number"}


def _typed(value: Any, hint: Any, where: str) -> Any:
    """`value` checked against a field's type hint (and dataclasses built from their dicts), or _FieldTypeError."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(value, inner, where)
    if is_dataclass(hint):
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _FieldTypeError(where, value, "a list")
        return [_typed(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _FieldTypeError(where, value, "an object")
        for key in value:
            if not isinstance(key, str):
                raise _FieldTypeError(f"{where} key", key, "a string")
        return {k: _typed(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise _FieldTypeError(where, value, _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint))))
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _build(cls: type, raw: Any, where: str) -> Any:
    """A manifest dataclass from its JSON object: unknown, missing and wrongly typed fields are refused by name."""
    if not isinstance(raw, dict):
        raise _FieldTypeError(where or "entry", raw, "an object")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "root"}
    for key in raw:
        if key not in known:
            raise _FieldTypeError(_join(where, key), raw[key], f"a field of this schema (known: {sorted(known)})")
    values = {}
    for name, spec in known.items():
        if name not in raw:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise _FieldTypeError(_join(where, name), None, None)
            continue
        values[name] = _typed(raw[name], hints[name], _join(where, name))
    return cls(**values)


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
    # what a step tallies besides its drops, when it declares them (PII redacted per type, words per language)
    counts: dict[str, int] = field(default_factory=dict)

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
        if self.shards and (in_shards := sum(s.docs for s in self.shards)) != self.docs:
            problems.append(f"{self.name}: shards hold {in_shards} docs but docs = {self.docs}")
        from mixlab.curation.readers import QUARANTINE_PREFIX  # readers build on the manifest's neighbours

        quarantined = sum(n for step in self.steps for reason, n in step.dropped.items()
                          if reason.startswith(QUARANTINE_PREFIX))
        if self.steps and quarantined != self.quarantined:
            problems.append(f"{self.name}: {quarantined} docs dropped as {QUARANTINE_PREFIX}* but quarantined = "
                            f"{self.quarantined}")
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
        """Read and check a manifest: its schema, the type of every field, that source names are plain names and
        that every path it lists stays inside its directory (symlinks resolved). A manifest that fails any check is
        refused here, before any of its files is read, written or deleted."""
        root = Path(root)
        path = root / MANIFEST_NAME if root.is_dir() or not root.suffix else root
        if not path.exists():
            raise ManifestError(f"{path}: no manifest here; run `mixlab curate` to create one", path=path)
        recurate = f"`mixlab curate --raw WORKDIR/raw --out {path.parent}`, then `mixlab tokenize`"
        if problem := outside_problem(path.parent, path):
            raise ManifestError(f"{path}: {problem}; replace it with the manifest itself or re-curate: {recurate}",
                                path=path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path}: not valid JSON ({err}); re-run `mixlab curate` or restore the file",
                                path=path) from err
        except OSError as err:
            raise ManifestError(f"{path}: cannot be read ({err}); restore the file or re-curate: {recurate}",
                                path=path) from err
        if not isinstance(raw, dict):
            raise ManifestError(f"{path}: holds a JSON {type(raw).__name__}, not an object; restore the file or "
                                f"re-curate: {recurate}", path=path, field="(top level)", value=raw)
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            known_int = isinstance(version, int) and not isinstance(version, bool)
            why = (
                " (written by an older mixlab that kept Parquet in <curated>/<source>/ instead of <curated>/data/<source>/)"
                if known_int and version < SCHEMA_VERSION
                else " (written by a newer mixlab: upgrade mixlab to read it)" if known_int else ""
            )
            raise ManifestError(
                f"{path}: schema_version {version!r} is not supported (this mixlab reads {SCHEMA_VERSION}){why}; "
                f"re-run curation with this version: `mixlab curate --raw WORKDIR/raw --out {path.parent}`, "
                "then `mixlab tokenize`", path=path, field="schema_version", value=version,
            )
        manifest = cls._from_dict(raw, path)
        manifest.root = path.parent
        manifest.check_paths(manifest_path=path)
        return manifest

    @classmethod
    def _from_dict(cls, raw: dict[str, Any], path: Path) -> ShardManifest:
        def refuse(err: _FieldTypeError, source: str | None) -> ManifestError:
            entry = f"source {_short(source)}: " if source is not None else ""
            return ManifestError(
                f"{path}: {entry}{err}; this manifest was not written by this mixlab (or was edited): restore it, or "
                f"re-curate with `mixlab curate --raw WORKDIR/raw --out {path.parent}`",
                path=path, source=source, field=err.where, value=err.value,
            )

        sources = {}
        raw_sources = raw.get("sources", {})
        if not isinstance(raw_sources, dict):
            raise refuse(_FieldTypeError("sources", raw_sources, "an object (source name -> entry)"), None)
        for name, src in raw_sources.items():
            try:
                sources[name] = _build(SourceEntry, src, "")
            except _FieldTypeError as err:
                raise refuse(err, name) from None
        try:
            tokenizer = _typed(raw.get("tokenizer"), TokenizerInfo | None, "tokenizer")
            created = _typed(raw.get("created", ""), str, "created")
            unknown = sorted(set(raw) - {"sources", "tokenizer", "schema_version", "created"})
            if unknown:
                raise _FieldTypeError(unknown[0], raw[unknown[0]], "a field of this schema")
        except _FieldTypeError as err:
            raise refuse(err, None) from None
        return cls(sources=sources, tokenizer=tokenizer, schema_version=raw["schema_version"], created=created)

    def check_paths(self, manifest_path: Path | None = None) -> None:
        """Refuse (ManifestError naming the entry) a source name that is not a plain name, or a listed path that is
        absolute, climbs out with '..' or resolves (through a symlink) outside the manifest's directory."""
        if self.root is None:
            raise ManifestError("manifest has no root directory; load() or save() it first")
        path = manifest_path or self.root / MANIFEST_NAME
        fix = (f"paths in a manifest are relative to its directory and stay inside it: restore the manifest, or "
               f"re-curate with `mixlab curate --raw WORKDIR/raw --out {self.root}`")
        for key, entry in self.sources.items():
            for field_name, value in (("name", key), ("name", entry.name)):
                if problem := name_problem(value):
                    raise ManifestError(
                        f"{path}: source {key!r}: {field_name} = {_short(value)} {problem}; rename it (source names "
                        f"become folder names) and re-curate with `mixlab curate --raw WORKDIR/raw --out {self.root}`",
                        path=path, source=key, field=field_name, value=value)
            if entry.name != key:
                raise ManifestError(
                    f"{path}: source {key!r}: name = {entry.name!r} differs from its key {key!r}; {fix}",
                    path=path, source=key, field="name", value=entry.name)
            for kind in ("shards", "token_shards"):
                for i, shard in enumerate(getattr(entry, kind)):
                    if problem := relative_path_problem(self.root, shard.path):
                        raise ManifestError(
                            f"{path}: source {key!r}: {kind}[{i}].path = {_short(shard.path)} {problem}; {fix}",
                            path=path, source=key, field=f"{kind}[{i}].path", value=shard.path)
        if self.tokenizer is not None and (problem := relative_path_problem(self.root, self.tokenizer.path)):
            raise ManifestError(f"{path}: tokenizer.path = {_short(self.tokenizer.path)} {problem}; {fix}",
                                path=path, field="tokenizer.path", value=self.tokenizer.path)

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
        from mixlab.curation.datacard import card_path, write_dataset_card  # the card reads the manifest

        self.root = root
        self.check_paths()  # names and paths first: nothing is written for a manifest that points outside
        path = self.resolve(MANIFEST_NAME)
        tmp = self.resolve(f"{MANIFEST_NAME}.tmp")
        card_path(self)  # refused here, before the manifest is written, when data/ points outside
        root.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a symlink left there would be followed by the write
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)
        write_dataset_card(self)
        return path

    # ---- queries -------------------------------------------------------------------------
    def source(self, name: str) -> SourceEntry:
        if name not in self.sources:
            raise ManifestError(f"source {name!r} is not in the manifest at {self.root}; known: {sorted(self.sources)}")
        return self.sources[name]

    def resolve(self, relative: str) -> Path:
        """`root / relative`, refused (ManifestError) when it is absolute, climbs out with '..' or resolves through
        a symlink outside the manifest's directory: every file mixlab reads, writes or deletes in a curated
        directory goes through here."""
        if self.root is None:
            raise ManifestError("manifest has no root directory; load() or save() it first")
        if problem := relative_path_problem(self.root, relative):
            raise ManifestError(
                f"{self.root}: {_short(relative)} {problem}; nothing there is read or written. If it is a symlink, "
                "replace it with a real folder inside the curated directory",
                path=self.root / MANIFEST_NAME, field="path", value=relative)
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
