"""Token shards: curated Parquet -> `.ds` files (datatrove/nanotron format), and a memory-mapped reader.

Writing goes through datatrove's own `DocumentTokenizer`, so the files are exactly what datatrove writes and
nanotron's Nanoset reads: `.ds` (uint16 tokens, uint32 when the vocabulary needs it, every document ending
with EOS), `.ds.index` (uint64 end offset of each document) and `.ds.metadata` (`tokenizer|token_size`, then
the token count). Documents are held out for `val` by `curation.splits.split_source` (a share of each
source's text bytes, in the order of a hash of the document ids), so the split is stable across re-runs,
independent of shard layout and worker count, and the same one the tokenizer was trained without. mixlab
only renames the files (one token shard per curated shard, `tokens/<source>/<split>/00000.ds`) and writes an
exact tokenizer id into the metadata instead of an absolute path, so that shards stay valid when the work
directory moves and a reader can tell which tokenizer made them.

Beside each token shard, `<shard>.ds.docs.parquet` holds one row per document in `.ds.index` order (`id`,
`tokens` and the curated metadata fields), so that mixtures can select documents by language, score or length
without re-tokenizing. It is checked at write time against the curated rows the task read (same count, and a
few documents re-encoded to the same tokens), and at read time against the index and the manifest's checksum.
The manifest does not list it (its `ShardFile` entries are token shards); its path is derived from the shard's.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from mixlab.curation.console import quiet_datatrove_console
from mixlab.curation.manifest import (
    ManifestError,
    ShardFile,
    ShardManifest,
    SourceEntry,
    TokenizerInfo,
    sha256_file,
)
from mixlab.curation.splits import (
    SPLITS,
    TokenizeConfig,
    select_val_ids,  # noqa: F401  (re-exported: the split rule lives in curation.splits)
    source_val_ids,
)
from mixlab.curation.tokenizer import (
    EOS_TOKEN,
    TOKENIZER_DIR,
    TOKENIZER_FILE,
    TokenizerError,
    load_tokenizer,
    tokenizer_id,
    write_transformers_config,
)
from tqdm.auto import tqdm

logger = logging.getLogger("mixlab.token_shards")

TOKENS_DIR = "tokens"
DOCS_SUFFIX = ".docs.parquet"  # per-document metadata beside `<shard>.ds`: `<shard>.ds.docs.parquet`
DOCS_SIDECAR_VERSION = "1"
SIDECAR_SAMPLE_DOCS = 5  # documents per shard re-encoded at write time to prove the rows line up with the index


class TokenShardError(ValueError):
    """Token shards that are missing, changed or inconsistent; the message names the file and the fix."""


class DocColumnError(TokenShardError):
    """Per-document columns asked for that the sidecar does not have; `unknown` and `columns` name them."""

    def __init__(self, message: str, unknown: list[str], columns: list[str]):
        super().__init__(message)
        self.unknown, self.columns = unknown, columns


def token_size_for_vocab(vocab_size: int) -> int:
    """Bytes per token on disk: uint16 while every id fits, else uint32 (datatrove's rule)."""
    return 4 if vocab_size > np.iinfo(np.uint16).max + 1 else 2


# ---- train/val routing ---------------------------------------------------------------------------
class SplitRouter(BaseFilter):
    """Keep the documents of one split: validation is the chosen ids of the document's source.

    Task `rank` reads curated shard `rank`, so the source (and its validation ids) is known per rank.
    """

    name = "🔀 train/val split"

    def __init__(self, split: str, source_by_rank: list[str], val_ids: dict[str, frozenset[str]]):
        super().__init__()
        self.split = split
        self.source_by_rank = source_by_rank
        self.val_ids = val_ids
        self.current: frozenset[str] = frozenset()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.current = self.val_ids[self.source_by_rank[rank]]
        return super().run(data, rank, world_size)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if (str(doc.id) in self.current) == (self.split == "val"):
            return True
        return False, "other_split"


# ---- reading ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardMetadata:
    tokenizer: str
    token_size: int
    tokens: int

    @classmethod
    def read(cls, path: Path) -> ShardMetadata:
        meta_path = Path(f"{path}.metadata")
        if not meta_path.exists():
            raise TokenShardError(f"{meta_path}: missing; re-run `mixlab tokenize`")
        lines = meta_path.read_text().splitlines()
        try:
            tokenizer, token_size = lines[0].rsplit("|", 1)
            return cls(tokenizer=tokenizer, token_size=int(token_size), tokens=int(lines[1]))
        except (IndexError, ValueError) as err:
            raise TokenShardError(
                f"{meta_path}: expected `tokenizer|token_size` then the token count, got {lines[:2]!r}; "
                "re-run `mixlab tokenize`"
            ) from err

    def write(self, path: Path) -> None:
        Path(f"{path}.metadata").write_text(f"{self.tokenizer}|{self.token_size}\n{self.tokens}\n")


def read_shard_docs(
    docs_path: Path,
    shard_path: Path,
    *,
    num_docs: int,
    tokens: int | None = None,
    sha256: str | None = None,
    doc_ends: np.ndarray | None = None,
    columns: Iterable[str] | None = None,
) -> pa.Table:
    """The per-document sidecar of one token shard, refused (TokenShardError naming the file) unless it describes
    exactly that shard: written for the same `.ds` (its sha256, when known), one row per document, and a `tokens`
    column equal to the document lengths of the index (`doc_ends`) or summing to the shard's token count."""
    fix = "re-run `mixlab tokenize` on this curated directory to write it again"
    if not docs_path.is_file():
        raise TokenShardError(
            f"{docs_path}: per-document metadata of token shard {shard_path.name} is missing (tokenized by an older "
            f"mixlab, or deleted); selections need it: {fix}"
        )
    try:
        parquet = pq.ParquetFile(docs_path)
    except (pa.ArrowException, OSError) as err:
        raise TokenShardError(f"{docs_path}: not a readable Parquet file ({err}); {fix}") from err
    recorded = (parquet.schema_arrow.metadata or {}).get(b"mixlab.token_shard_sha256")
    if recorded is None:
        raise TokenShardError(f"{docs_path}: not written by `mixlab tokenize` (no token shard checksum); {fix}")
    if sha256 is not None and recorded.decode() != sha256:
        raise TokenShardError(
            f"{docs_path}: written for another version of {shard_path.name} (checksum {recorded.decode()[:12]}, "
            f"the manifest has {sha256[:12]}); {fix}"
        )
    names = parquet.schema_arrow.names
    if parquet.metadata.num_rows != num_docs or not {"id", "tokens"} <= set(names):
        raise TokenShardError(
            f"{docs_path}: {parquet.metadata.num_rows} rows with columns {names}, but {shard_path.name} holds "
            f"{num_docs} documents and the sidecar needs `id` and `tokens`; {fix}"
        )
    wanted = None if columns is None else list(dict.fromkeys(columns))
    if wanted is not None and (unknown := [c for c in wanted if c not in names]):
        raise DocColumnError(f"{docs_path}: no column {unknown}; the per-document columns are {names}", unknown, names)
    table = parquet.read(columns=None if wanted is None else list(dict.fromkeys(["tokens", *wanted])))
    lengths = table.column("tokens").to_numpy().astype(np.int64, copy=False)
    if doc_ends is not None:
        expected = np.diff(doc_ends.astype(np.int64), prepend=0)
        if not np.array_equal(lengths, expected):
            bad = int(np.flatnonzero(lengths != expected)[0])
            raise TokenShardError(
                f"{docs_path}: document {bad} has {lengths[bad]} tokens here but {expected[bad]} in "
                f"{shard_path.name}.index, so its rows do not line up with the documents; {fix}"
            )
    elif tokens is not None and int(lengths.sum()) != tokens:
        raise TokenShardError(
            f"{docs_path}: documents add up to {int(lengths.sum())} tokens, the manifest lists {tokens} for "
            f"{shard_path.name}; {fix}"
        )
    return table if wanted is None else table.select(wanted)


class TokenShard:
    """One `.ds` file, memory-mapped, with its document ends. Opening checks that the three files agree.

    `docs_path` is where its per-document sidecar is (default `<path>.docs.parquet`; the manifest-resolved path
    when opened from a manifest), `sha256` the checksum the sidecar must have been written for (None: unchecked).
    The sidecar is only read when asked for (`doc_metadata`), so shards tokenized before it existed still open.
    """

    def __init__(
        self,
        path: str | Path,
        vocab_size: int | None = None,
        tokenizer: str | None = None,
        *,
        docs_path: str | Path | None = None,
        sha256: str | None = None,
    ):
        self.path = Path(path)
        self.docs_path = Path(docs_path) if docs_path is not None else Path(f"{self.path}{DOCS_SUFFIX}")
        self.sha256 = sha256
        if not self.path.exists():
            raise TokenShardError(f"{self.path}: token shard missing; re-run `mixlab tokenize`")
        self.metadata = ShardMetadata.read(self.path)
        if self.metadata.token_size not in (2, 4):
            raise TokenShardError(
                f"{self.path}.metadata: token size {self.metadata.token_size} is not 2 or 4 bytes"
            )
        if vocab_size is not None and token_size_for_vocab(vocab_size) != self.metadata.token_size:
            raise TokenShardError(
                f"{self.path}: stored with {self.metadata.token_size}-byte tokens but the tokenizer has {vocab_size} "
                f"tokens (needs {token_size_for_vocab(vocab_size)} bytes); re-run `mixlab tokenize` with this tokenizer"
            )
        if tokenizer is not None and self.metadata.tokenizer != tokenizer:
            raise TokenShardError(
                f"{self.path}: made by tokenizer {self.metadata.tokenizer!r}, not the manifest's {tokenizer!r}; "
                "re-run `mixlab tokenize` after training a tokenizer"
            )
        size = self.path.stat().st_size
        if size != self.metadata.tokens * self.metadata.token_size:
            raise TokenShardError(
                f"{self.path}: {size} bytes but the metadata says {self.metadata.tokens} tokens of "
                f"{self.metadata.token_size} bytes; the file is truncated or changed, re-run `mixlab tokenize`"
            )
        index_path = Path(f"{self.path}.index")
        if not index_path.exists():
            raise TokenShardError(f"{index_path}: document index missing; re-run `mixlab tokenize`")
        self.doc_ends = np.fromfile(index_path, dtype="<u8")
        if len(self.doc_ends) == 0 or int(self.doc_ends[-1]) != self.metadata.tokens:
            last = int(self.doc_ends[-1]) if len(self.doc_ends) else None
            raise TokenShardError(
                f"{index_path}: last document ends at {last}, not at the shard's {self.metadata.tokens} tokens; "
                "re-run `mixlab tokenize`"
            )
        dtype = np.dtype("<u4" if self.metadata.token_size == 4 else "<u2")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return self.metadata.tokens

    @property
    def num_docs(self) -> int:
        return len(self.doc_ends)

    def document(self, i: int) -> np.ndarray:
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.tokens[start : int(self.doc_ends[i])]

    def doc_metadata(self, columns: Iterable[str] | None = None) -> pa.Table:
        """One row per document of this shard, in index order (`id`, `tokens`, the curated metadata fields)."""
        return read_shard_docs(
            self.docs_path, self.path, num_docs=self.num_docs, sha256=self.sha256, doc_ends=self.doc_ends,
            columns=columns,
        )


@runtime_checkable
class TokenStream(Protocol):
    """What the sampler and evaluator read: a flat stream of documents back to back. `TokenSource` (a whole
    source) and `mixtures.selection.SelectionView` (chosen documents of one or several sources) implement it."""

    name: str
    doc_ends: np.ndarray  # cumulative end offset of every document in the stream

    def __len__(self) -> int: ...

    def read(self, start: int, length: int) -> np.ndarray: ...  # int64 tokens [start, start + length)

    @property
    def num_docs(self) -> int: ...


class TokenSource:
    """All token shards of one source and split, seen as one flat token stream (documents back to back)."""

    def __init__(self, name: str, split: str, shards: list[TokenShard]):
        self.name = name
        self.split = split
        self.shards = shards
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(lengths)])
        self._doc_metadata: pa.Table | None = None

    @classmethod
    def from_manifest(
        cls,
        manifest: ShardManifest | str | Path,
        source: str,
        split: str = "train",
        verify_checksums: bool = True,
    ) -> TokenSource:
        """Open a source's token shards as listed in the manifest, checking tokenizer and (optionally) sha256."""
        manifest, entry = _tokenized_entry(manifest, source, split)
        expected_tokenizer = tokenizer_id(manifest.tokenizer)
        shards = []
        for record in (s for s in entry.token_shards if s.split == split):
            if problem := manifest.check_file(record, owner=source, checksum=verify_checksums):
                raise TokenShardError(problem)
            path = manifest.resolve(record.path)
            shards.append(
                TokenShard(
                    path,
                    vocab_size=manifest.tokenizer.vocab_size,
                    tokenizer=expected_tokenizer,
                    docs_path=manifest.resolve(f"{record.path}{DOCS_SUFFIX}"),  # refused if it leads outside
                    sha256=record.sha256,
                )
            )
        return cls(source, split, shards)

    def __len__(self) -> int:
        return int(self._shard_starts[-1])

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def num_docs(self) -> int:
        return sum(s.num_docs for s in self.shards)

    @cached_property
    def doc_ends(self) -> np.ndarray:
        """End offset of every document in the flat stream (uint64, like `.ds.index`)."""
        if not self.shards:
            return np.zeros(0, dtype=np.uint64)
        return np.concatenate(
            [
                s.doc_ends + np.uint64(start)
                for s, start in zip(self.shards, self._shard_starts[:-1], strict=True)
            ]
        )

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the flat stream as int64, crossing shard boundaries if needed."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(
                f"{self.name}/{self.split}: read [{start}, {start + length}) outside [0, {len(self)})"
            )
        first = int(np.searchsorted(self._shard_starts, start, side="right")) - 1
        if start + length <= self._shard_starts[first + 1]:  # the common case: inside one shard
            offset = start - int(self._shard_starts[first])
            return self.shards[first].tokens[offset : offset + length].astype(np.int64)
        out = np.empty(length, dtype=np.int64)
        filled, position, shard = 0, start, first
        while filled < length:
            offset = position - int(self._shard_starts[shard])
            take = min(length - filled, len(self.shards[shard]) - offset)
            out[filled : filled + take] = self.shards[shard].tokens[offset : offset + take]
            filled += take
            position += take
            shard += 1
        return out

    def document(self, i: int) -> np.ndarray:
        end = int(self.doc_ends[i])
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.read(start, end - start)

    def doc_metadata(self, columns: Iterable[str] | None = None) -> pa.Table:
        """Per-document metadata of the whole stream: row i describes document i (the span ending at
        `doc_ends[i]`). Read from the shards' sidecars, each checked against its index; the full table is
        kept after the first call."""
        wanted = None if columns is None else list(columns)
        if self._doc_metadata is None:
            tables = [shard.doc_metadata() for shard in self.shards]
            self._doc_metadata = (
                pa.concat_tables(tables, promote_options="default")
                if tables
                else pa.table({"id": pa.array([], pa.string()), "tokens": pa.array([], pa.int64())})
            )
        table = self._doc_metadata
        if wanted is not None and (unknown := [c for c in wanted if c not in table.column_names]):
            raise DocColumnError(
                f"{self.name}/{self.split}: no per-document column {unknown}; the columns are {table.column_names}",
                unknown,
                table.column_names,
            )
        return table if wanted is None else table.select(wanted)

    def flat(self) -> np.ndarray:
        """The whole stream: the memmap itself for one shard, else a concatenated in-memory copy."""
        if len(self.shards) == 1:
            return self.shards[0].tokens
        return self.read(0, len(self))

    def __repr__(self) -> str:
        return f"TokenSource({self.name!r}, {self.split!r}, shards={len(self.shards)}, tokens={len(self)}, docs={self.num_docs})"


def _tokenized_entry(manifest: ShardManifest | str | Path, source: str, split: str) -> tuple[ShardManifest, SourceEntry]:
    """The loaded manifest and its entry for a tokenized `source`; refuses an unknown split or an untokenized
    source with the command that fixes it."""
    if not isinstance(manifest, ShardManifest):
        manifest = ShardManifest.load(manifest)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    entry = manifest.source(source)
    if manifest.tokenizer is None or not entry.token_shards:
        raise ManifestError(f"{manifest.root}: source {source!r} has no token shards; run `mixlab tokenize` first")
    return manifest, entry


def read_doc_metadata(
    manifest: ShardManifest | str | Path,
    source: str,
    split: str = "train",
    columns: Iterable[str] | None = None,
) -> pa.Table:
    """Per-document metadata of one source and split, in stream order, without opening its token shards:
    each sidecar is checked against the manifest's record of its shard (checksum, documents, tokens)."""
    manifest, entry = _tokenized_entry(manifest, source, split)
    wanted = None if columns is None else list(columns)
    tables = [
        read_shard_docs(
            manifest.resolve(f"{record.path}{DOCS_SUFFIX}"),
            manifest.resolve(record.path),
            num_docs=record.docs,
            tokens=record.tokens,
            sha256=record.sha256,
            columns=wanted,
        )
        for record in entry.token_shards
        if record.split == split
    ]
    if not tables:
        empty = {"id": pa.array([], pa.string()), "tokens": pa.array([], pa.int64())}
        return pa.table({k: v for k, v in empty.items() if wanted is None or k in wanted})
    return pa.concat_tables(tables, promote_options="default")


def open_token_sources(
    curated_dir: str | Path | ShardManifest,
    split: str = "train",
    sources: Iterable[str] | None = None,
    verify_checksums: bool = True,
) -> dict[str, TokenSource]:
    """Every tokenized source of a curated directory (or the named ones), ready for the sampler/evaluator."""
    manifest = curated_dir if isinstance(curated_dir, ShardManifest) else ShardManifest.load(curated_dir)
    names = (
        list(sources)
        if sources is not None
        else sorted(n for n, s in manifest.sources.items() if s.token_shards)
    )
    return {name: TokenSource.from_manifest(manifest, name, split, verify_checksums) for name in names}


# ---- writing -------------------------------------------------------------------------------------
def tokenize_manifest(
    curated_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    config: TokenizeConfig | None = None,
    *,
    sources: Iterable[str] | None = None,
    show_progress: bool = True,
    held_out_ids: Mapping[str, Collection[str]] | None = None,
) -> ShardManifest:
    """Tokenize every (or the named) curated source into `<curated>/tokens/<source>/{train,val}/*.ds`,
    record tokens per split and token shards in the manifest, save it and return it.

    `tokenizer_path=None` uses the tokenizer recorded in the manifest, which must have been trained without
    the validation split of `config` (pass the same `TokenizeConfig` to `TokenizerConfig(held_out=...)`);
    another tokenizer.json is copied into `<curated>/tokenizer/` (with the transformers config files) and
    recorded, so the manifest always names the tokenizer its shards use. `config=None` is `TokenizeConfig()`.
    `held_out_ids` fixes the validation documents of the sources it names (those of its ids the source has)
    instead of `config`'s rule: a curated variant holds out exactly its base's validation documents, so no base
    validation document is ever trained on and every variant is scored on the same held-out text.
    """
    config = config or TokenizeConfig()
    manifest = ShardManifest.load(curated_dir)
    names = list(sources) if sources is not None else sorted(manifest.sources)
    for name in names:
        manifest.source(name)
    # every folder this writes or clears, checked before anything is: a symlink pointing out is refused here
    token_dirs = {name: manifest.resolve(f"{TOKENS_DIR}/{name}") for name in names}
    for split in SPLITS:
        manifest.resolve(f"{TOKENS_DIR}/.staging-{split}")
        manifest.resolve(f"logs/tokenize-{split}")
    manifest.resolve(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}")
    info = _resolve_tokenizer(manifest, tokenizer_path)
    if info.held_out is not None and info.held_out != config.val_settings():
        raise TokenizerError(
            f"{manifest.resolve(info.path)}: the tokenizer was trained without the validation split "
            f"{info.held_out}, but this tokenization holds out {config.val_settings()}, so the tokenizer has seen "
            "validation text; train it again with TokenizerConfig(held_out=<this TokenizeConfig>) "
            "(`mixlab tokenize` does both with the same --val-fraction)"
        )
    tok_path = manifest.resolve(info.path).resolve()
    for name in names:
        entry = manifest.source(name)
        if not entry.shards:
            raise ManifestError(
                f"{manifest.root}: source {name!r} has no curated shards; run `mixlab curate` first"
            )
        for shard in entry.shards:
            if problem := manifest.check_file(shard, owner=name, checksum=config.verify_checksums):
                raise TokenShardError(problem)

    # one datatrove task per curated shard, across all sources: task r reads shard r
    tasks = [(name, i, shard) for name in names for i, shard in enumerate(manifest.sources[name].shards)]
    val_ids = {}
    for name in names:
        val_ids[name] = source_val_ids(manifest, name, config, held_out_ids)
        manifest.sources[name].token_shards = []
        manifest.sources[name].tokens = dict.fromkeys(SPLITS, 0)
        shutil.rmtree(token_dirs[name], ignore_errors=True)

    total_tokens, started = 0, time.perf_counter()
    bar = tqdm(SPLITS, desc="tokenize", unit="split", disable=not show_progress)
    for split in bar:
        bar.set_postfix_str(split)
        records = _tokenize_split(manifest, tasks, split, val_ids, tok_path, info, config)
        for name, record in records:
            manifest.sources[name].token_shards.append(record)
            manifest.sources[name].tokens[split] += record.tokens or 0
            total_tokens += record.tokens or 0
        bar.set_postfix_str(f"{split} {total_tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
    for name in names:
        entry = manifest.sources[name]
        docs = sum(r.docs for r in entry.token_shards)
        if docs != entry.docs:
            logger.warning(
                "%s: %d documents tokenized but the manifest lists %d (empty texts are skipped)",
                name,
                docs,
                entry.docs,
            )
    manifest.save()
    elapsed = time.perf_counter() - started
    logger.info(
        "tokenized %d sources: %d tokens in %.1fs (%.0f tokens/s)",
        len(names),
        total_tokens,
        elapsed,
        total_tokens / max(elapsed, 1e-9),
    )
    return manifest


def _resolve_tokenizer(manifest: ShardManifest, tokenizer_path: str | Path | None) -> TokenizerInfo:
    source = None if tokenizer_path is None else Path(tokenizer_path)
    source = source / TOKENIZER_FILE if source is not None and source.is_dir() else source
    recorded = manifest.tokenizer
    if source is None or (recorded is not None and source.resolve() == manifest.resolve(recorded.path).resolve()):
        if recorded is None:
            raise ManifestError(
                f"{manifest.root}: no tokenizer in the manifest; train one first (`mixlab tokenize`)"
            )
        if problem := manifest.check_file(recorded):
            raise TokenizerError(problem)
        return recorded
    tokenizer = load_tokenizer(source)
    eos = manifest.tokenizer.eos_token if manifest.tokenizer else EOS_TOKEN
    if tokenizer.token_to_id(eos) is None:
        raise TokenizerError(f"{source}: has no EOS token {eos!r}; documents could not be separated")
    target = manifest.resolve(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}")
    if source.resolve() != target.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    write_transformers_config(target.parent, eos)  # the folder loads with AutoTokenizer, EOS = the shards' EOS
    manifest.tokenizer = TokenizerInfo(
        path=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        vocab_size=tokenizer.get_vocab_size(),
        sha256=sha256_file(target),
        eos_token=eos,
        kind=manifest.tokenizer.kind if manifest.tokenizer else "bpe",
    )
    return manifest.tokenizer


def _tokenize_split(
    manifest: ShardManifest,
    tasks: list[tuple[str, int, ShardFile]],
    split: str,
    val_ids: dict[str, frozenset[str]],
    tok_path: Path,
    info: TokenizerInfo,
    config: TokenizeConfig,
) -> list[tuple[str, ShardFile]]:
    """Run one datatrove pipeline (read shards -> keep this split -> DocumentTokenizer) with one task per
    curated shard, then move each task's output to `tokens/<source>/<split>/<shard>.ds` with portable
    metadata. Returns (source, token shard) pairs; shards without a document of this split are dropped."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    staging = manifest.resolve(f"{TOKENS_DIR}/.staging-{split}")
    logs_dir = manifest.resolve(f"logs/tokenize-{split}")
    for stale in (staging, logs_dir):
        shutil.rmtree(stale, ignore_errors=True)
    logs_dir.mkdir(parents=True)
    paths_file = logs_dir / "curated_shards.txt"
    paths_file.write_text("".join(f"{shard.path}\n" for _, _, shard in tasks))
    executor = LocalPipelineExecutor(
        pipeline=[
            ParquetReader(str(manifest.root), paths_file=str(paths_file), read_metadata=False),
            SplitRouter(split, [source for source, _, _ in tasks], val_ids),
            DocumentTokenizer(
                output_folder=str(staging),
                tokenizer_name_or_path=str(tok_path),
                eos_token=info.eos_token,
                batch_size=config.batch_size,
                shuffle_documents=False,  # the sampler shuffles windows; file order stays = curated order
            ),
        ],
        tasks=len(tasks),
        workers=min(config.workers, len(tasks)),
        logging_dir=str(logs_dir),
        skip_completed=False,  # always re-tokenize: a stale completion marker must never keep old shards
    )
    with quiet_datatrove_console():
        executor.run()

    name = tokenizer_id(info)
    token_size = token_size_for_vocab(info.vocab_size)
    encoder = _eos_encoder(tok_path, info.eos_token)
    records = []
    for rank, (source, index, curated) in enumerate(tasks):
        written = staging / f"{rank:05d}_unshuffled.ds"
        if not written.exists():
            raise TokenShardError(
                f"{written}: datatrove wrote no token shard for task {rank}; see {logs_dir}/logs"
            )
        meta = ShardMetadata.read(written)
        if meta.token_size != token_size:
            raise TokenShardError(
                f"{written}: {meta.token_size}-byte tokens for a {info.vocab_size}-token vocabulary"
            )
        if meta.tokens == 0:  # this curated shard had no document of this split
            continue
        final = manifest.resolve(f"{TOKENS_DIR}/{source}/{split}/{index:05d}.ds")
        final.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".index", ".metadata"):
            Path(f"{written}{suffix}").replace(f"{final}{suffix}")
        ShardMetadata(name, meta.token_size, meta.tokens).write(final)
        shard = TokenShard(final, vocab_size=info.vocab_size, tokenizer=name)
        relative = final.relative_to(manifest.root).as_posix()
        digest = sha256_file(final)
        rows = _curated_rows(manifest.resolve(curated.path), split, val_ids[source], shard, encoder)
        _write_doc_sidecar(manifest.resolve(f"{relative}{DOCS_SUFFIX}"), rows, shard, digest, curated.path)
        records.append(
            (
                source,
                ShardFile(
                    path=relative,
                    docs=shard.num_docs,
                    bytes=final.stat().st_size,
                    sha256=digest,
                    tokens=len(shard),
                    split=split,
                ),
            )
        )
    shutil.rmtree(staging, ignore_errors=True)
    return records


# ---- per-document sidecars -----------------------------------------------------------------------
def _eos_encoder(tok_path: Path, eos_token: str):
    """The tokenizer as DocumentTokenizer runs it (EOS appended by the post-processor), to re-encode samples."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = load_tokenizer(tok_path)
    tokenizer.post_processor = TemplateProcessing(
        single="$A <EOS>", special_tokens=[("<EOS>", tokenizer.token_to_id(eos_token))], pair=None
    )
    return tokenizer


def _curated_rows(curated: Path, split: str, val_ids: frozenset[str], shard: TokenShard, encoder) -> pa.Table:
    """The rows of a curated shard that went into `shard`, in its document order, as `id` + metadata columns.

    They are the documents datatrove's reader yields (text neither null nor empty) that `SplitRouter` routes to
    `split`. The count must equal the shard's documents, and a few documents (first, last, spread between) must
    re-encode to exactly their tokens in the shard; otherwise nothing can be aligned and tokenization stops.
    """
    parquet = pq.ParquetFile(curated)
    names = parquet.schema_arrow.names
    if not {"id", "text"} <= set(names):
        raise TokenShardError(f"{curated}: no `id`/`text` columns, so per-document metadata cannot be written")
    columns = [c for c in ("id", "text", "metadata") if c in names]
    wanted_val = split == "val"
    val_set = pa.array(sorted(val_ids), pa.string())
    n = shard.num_docs
    samples = set(np.linspace(0, n - 1, num=min(SIDECAR_SAMPLE_DOCS, n)).round().astype(int).tolist())
    texts: dict[int, str] = {}
    parts, kept = [], 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        text = batch.column(columns.index("text"))
        has_text = pc.fill_null(pc.greater(pc.binary_length(text), 0), False)  # datatrove skips `not text`
        ids = pc.fill_null(pc.cast(batch.column(columns.index("id")), pa.string()), "None")  # str(doc.id)
        in_val = pc.fill_null(pc.is_in(ids, value_set=val_set), False)
        keep = pc.and_(has_text, in_val if wanted_val else pc.invert(in_val))
        positions = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        for j, position in enumerate(positions.tolist()):
            if kept + j in samples:
                texts[kept + j] = text[position].as_py()
        kept += len(positions)
        chosen = pa.array(positions, pa.int64())
        part = {"id": ids.take(chosen)}
        if "metadata" in columns:
            metadata = batch.column(columns.index("metadata"))
            if pa.types.is_struct(metadata.type):
                for field, values in zip(metadata.type, metadata.flatten(), strict=True):
                    if field.name not in ("id", "tokens"):  # the sidecar's own columns win
                        part[field.name] = values.take(chosen)
        parts.append(pa.table(part))
    rows = pa.concat_tables(parts, promote_options="default") if parts else pa.table({"id": pa.array([], pa.string())})
    if rows.num_rows != n:
        raise TokenShardError(
            f"{shard.path}: {n} documents tokenized, but {curated} has {rows.num_rows} documents of split {split!r} "
            "with text, so per-document metadata cannot be lined up with the index; re-run `mixlab tokenize` "
            "(and `mixlab curate` if the curated shard changed while tokenizing)"
        )
    for i in sorted(samples):
        expected = encoder.encode(texts[i]).ids
        if not np.array_equal(shard.document(i), np.asarray(expected, dtype=np.int64)):
            raise TokenShardError(
                f"{shard.path}: document {i} does not re-encode to the text of {rows.column('id')[i].as_py()!r} in "
                f"{curated}, so the curated rows and the token shard are not in the same order; re-run "
                "`mixlab tokenize`"
            )
    return rows


def _write_doc_sidecar(path: Path, rows: pa.Table, shard: TokenShard, sha256: str, curated: str) -> None:
    """`<shard>.ds.docs.parquet`: `id`, `tokens` (from the index), then the curated metadata columns."""
    lengths = np.diff(shard.doc_ends.astype(np.int64), prepend=0)
    table = rows.add_column(1, "tokens", pa.array(lengths, pa.int64()))
    table = table.replace_schema_metadata(
        {
            "mixlab.docs_sidecar": DOCS_SIDECAR_VERSION,
            "mixlab.token_shard_sha256": sha256,
            "mixlab.curated_shard": curated,
        }
    )
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    pq.write_table(table, tmp, compression="zstd")
    tmp.replace(path)
