"""Token shards: curated Parquet -> `.ds` files (datatrove/nanotron format), and a memory-mapped reader.

The files are byte for byte what datatrove's `DocumentTokenizer` (unshuffled) writes and nanotron's Nanoset
reads, written through datatrove's own `TokenizedFile` but without its executor: each curated shard is read
once with Arrow, its documents encoded once in batches (a background thread encodes the next batch while this
one is written) and both splits written from that pass (tests/test_token_shards.py compares the bytes with
datatrove's). `.ds` (uint16 tokens, uint32 when the vocabulary needs it, every document ending
with EOS), `.ds.index` (uint64 end offset of each document) and `.ds.metadata` (`tokenizer|token_size`, then
the token count). Documents are held out for `val` by `curation.splits.split_source` (a share of each
source's text bytes, in the order of a hash of the document ids), so the split is stable across re-runs,
independent of shard layout and worker count, and the same one the tokenizer was trained without. mixlab
names the files (one token shard per curated shard, `tokens/<source>/<split>/00000.ds`) and writes an
exact tokenizer id into the metadata instead of an absolute path, so that shards stay valid when the work
directory moves and a reader can tell which tokenizer made them.

Beside each token shard, `<shard>.ds.docs.parquet` holds one row per document in `.ds.index` order (`id`,
`tokens` and the curated metadata fields), so that mixtures can select documents by language, score or length
without re-tokenizing. It is checked at write time against the curated rows the task read (same count, and a
few documents re-encoded to the same tokens), and at read time against the index and the manifest's checksum.
The manifest does not list it (its `ShardFile` entries are token shards); its path is derived from the shard's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path
from queue import Full, Queue
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
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
def route_rows(batch: pa.RecordBatch, val_set: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """The documents of one curated record batch as datatrove's reader sees them, and their split.

    Returns `str(doc.id)` of every row, the positions of the rows that are documents (text neither null nor
    empty: datatrove skips `not text`), in file order, and whether each of those is a validation document
    (its id is one of the source's validation ids, `val_set`)."""
    text = batch.column(batch.schema.get_field_index("text"))
    ids = pc.fill_null(pc.cast(batch.column(batch.schema.get_field_index("id")), pa.string()), "None")  # str(doc.id)
    has_text = pc.fill_null(pc.greater(pc.binary_length(text), 0), False)
    positions = np.flatnonzero(has_text.to_numpy(zero_copy_only=False))
    in_val = pc.fill_null(pc.is_in(ids, value_set=val_set), False).to_numpy(zero_copy_only=False)
    return ids, positions, in_val[positions]


def _row_part(batch: pa.RecordBatch, ids: pa.Array, chosen: np.ndarray) -> pa.Table:
    """Sidecar rows of the chosen positions of a curated batch: `id`, then the curated metadata fields."""
    take = pa.array(chosen, pa.int64())
    part = {"id": ids.take(take)}
    if (index := batch.schema.get_field_index("metadata")) >= 0:
        metadata = batch.column(index)
        if pa.types.is_struct(metadata.type):
            for field, values in zip(metadata.type, metadata.flatten(), strict=True):
                if field.name not in ("id", "tokens"):  # the sidecar's own columns win
                    part[field.name] = values.take(take)
    return pa.table(part)


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

    val_ids = {}
    for name in names:
        val_ids[name] = source_val_ids(manifest, name, config, held_out_ids)
        manifest.sources[name].token_shards = []
        manifest.sources[name].tokens = dict.fromkeys(SPLITS, 0)
        shutil.rmtree(token_dirs[name], ignore_errors=True)
    jobs = [
        ShardJob(
            source=name,
            curated=manifest.resolve(shard.path),
            curated_path=shard.path,
            outputs={split: manifest.resolve(f"{TOKENS_DIR}/{name}/{split}/{i:05d}.ds") for split in SPLITS},
            val_ids=val_ids[name],
        )
        for name in names
        for i, shard in enumerate(manifest.sources[name].shards)
    ]

    total_tokens, started = 0, time.perf_counter()
    done = _tokenize_shards(manifest, jobs, tok_path, info, config, show_progress)
    for split in SPLITS:  # the manifest lists a source's train shards, then its val shards, in curated order
        for job, records in zip(jobs, done, strict=True):
            for record in (r for r in records if r.split == split):
                manifest.sources[job.source].token_shards.append(record)
                manifest.sources[job.source].tokens[split] += record.tokens or 0
                total_tokens += record.tokens or 0
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


@dataclass(frozen=True)
class ShardJob:
    """One curated shard to tokenize: both splits are written from a single read and a single encode pass."""

    source: str
    curated: Path  # the curated Parquet file, resolved
    curated_path: str  # as the manifest lists it (recorded in the sidecars)
    outputs: dict[str, Path]  # split -> its token shard, `tokens/<source>/<split>/<shard>.ds`
    val_ids: frozenset[str]


@dataclass(frozen=True)
class EncodedBatch:
    """One record batch of a curated shard: its documents (`route_rows`) and their encodings, in order."""

    batch: pa.RecordBatch
    ids: pa.Array
    positions: np.ndarray
    in_val: np.ndarray
    encodings: list


@dataclass(frozen=True)
class WrittenShard:
    """A token shard as written (before it is checked and recorded), with its per-document rows."""

    split: str
    path: Path
    rows: pa.Table


def eos_encoder(tok_path: Path, eos_token: str):
    """The tokenizer as datatrove's DocumentTokenizer runs it: EOS appended to every document by the
    post-processor, so each encoding is one document exactly as it is stored."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = load_tokenizer(tok_path)
    tokenizer.post_processor = TemplateProcessing(
        single="$A <EOS>", special_tokens=[("<EOS>", tokenizer.token_to_id(eos_token))], pair=None
    )
    return tokenizer


_eos_encoder = eos_encoder  # the older private name


def routed_batches(job: ShardJob, batch_size: int) -> Iterator[tuple[EncodedBatch, list[str]]]:
    """The documents of a curated shard, read with Arrow and routed (`route_rows`) a record batch at a time, each
    with its texts still to encode (`encodings` empty)."""
    parquet = pq.ParquetFile(job.curated)
    names = parquet.schema_arrow.names
    if not {"id", "text"} <= set(names):
        raise TokenShardError(f"{job.curated}: no `id`/`text` columns; re-run `mixlab curate` to write it again")
    columns = [c for c in ("id", "text", "metadata") if c in names]
    val_set = pa.array(sorted(job.val_ids), pa.string())
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        ids, positions, in_val = route_rows(batch, val_set)
        if len(positions):
            texts = batch.column(columns.index("text")).take(pa.array(positions, pa.int64())).to_pylist()
            yield EncodedBatch(batch, ids, positions, in_val, []), texts


def _ids_encoder(encoder):
    """`encode_batch_fast` (ids only, no offsets; the same ids as `encode_batch`), where tokenizers has it."""
    return encoder.encode_batch_fast if hasattr(encoder, "encode_batch_fast") else encoder.encode_batch


def encoded_batches(job: ShardJob, encoder, batch_size: int) -> Iterator[EncodedBatch]:
    """`routed_batches` with their encodings, one encode call per record batch."""
    encode = _ids_encoder(encoder)
    for routed, texts in routed_batches(job, batch_size):
        yield dataclasses.replace(routed, encodings=encode(texts))


def tokenize_shard(
    job: ShardJob,
    encoder,
    token_size: int,
    tokenizer_name: str,
    batch_size: int,
    batches: Iterable[EncodedBatch] | None = None,
) -> list[WrittenShard]:
    """Tokenize one curated shard into its train and val token shards (datatrove's `TokenizedFile` writes the
    `.ds`, `.ds.index` and `.ds.metadata`); a split without a document gets no files. `batches`: the shard's
    `encoded_batches`, when another thread prepares them (default: read and encoded here).

    Why not datatrove's executor + DocumentTokenizer: they cost a task logger, a tokenizer load and a read of
    the shard per task and split, plus a `Document` and a `struct.pack` per document; here the shard is read
    once with Arrow, each batch of documents is encoded once and written as one numpy buffer. The bytes are
    the same (tests/test_token_shards.py compares them with datatrove's)."""
    from datatrove.pipeline.tokens.tokenizer import TokenizedFile

    dtype = np.dtype("<u4" if token_size == 4 else "<u2")
    files, parts = {}, {split: [] for split in SPLITS}
    for split, path in job.outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        files[split] = TokenizedFile(
            str(path.parent), path.name, save_index=True, tokenizer_name_or_path=tokenizer_name,
            save_final_metadata=False, token_size=token_size,
        )
    try:
        for encoded in batches if batches is not None else encoded_batches(job, encoder, batch_size):
            in_val = encoded.in_val
            for split, chosen in (("train", np.flatnonzero(~in_val)), ("val", np.flatnonzero(in_val))):
                if not len(chosen):
                    continue
                docs = [encoded.encodings[i].ids for i in chosen.tolist()]
                ends = np.cumsum(np.fromiter(map(len, docs), np.int64, len(docs)))
                tokens = np.fromiter(chain.from_iterable(docs), dtype, int(ends[-1]))
                files[split].write_bytes(tokens.tobytes(), doc_ends=ends.tolist())
                parts[split].append(_row_part(encoded.batch, encoded.ids, encoded.positions[chosen]))
    finally:
        for file in files.values():
            file.close()
    written = []
    for split, path in job.outputs.items():
        tokens = files[split].write_idx
        if tokens == 0:  # this curated shard has no document of this split
            files[split].cleanup()
            continue
        ShardMetadata(tokenizer_name, token_size, tokens).write(path)
        rows = pa.concat_tables(parts[split], promote_options="default")
        written.append(WrittenShard(split, path, rows))
    return written


_END = object()


def _prefetched(jobs: list[ShardJob], encoder, batch_size: int, stop: threading.Event) -> Iterator[Iterator]:
    """Per job, an iterator over its encoded batches, read and encoded by a background thread at least one
    `batch_size` of documents ahead (documents of consecutive shards encoded together), so that the Rust encoder (which releases the GIL) runs while this thread writes files,
    checksums and sidecars. Each job's iterator must be consumed before the next one; `stop` ends the thread."""
    queue: Queue = Queue(maxsize=2)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    encode = _ids_encoder(encoder)
    pending: list = []  # routed batches (with their texts) and ends of jobs, in order, not yet encoded

    def flush() -> bool:
        """Encode every pending text in one call (documents of several small shards together keep every core
        busy) and hand the batches over in order."""
        encodings = encode([text for item in pending if item is not _END for text in item[1]])
        start = 0
        for item in pending:
            if item is not _END:
                routed, texts = item
                item = dataclasses.replace(routed, encodings=encodings[start : start + len(texts)])
                start += len(texts)
            if not put(item):
                return False
        pending.clear()
        return True

    def produce() -> None:
        try:
            waiting = 0
            for job in jobs:
                for routed in routed_batches(job, batch_size):
                    pending.append(routed)
                    waiting += len(routed[1])
                    if waiting >= batch_size:
                        if not flush():
                            return
                        waiting = 0
                pending.append(_END)
            flush()
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    threading.Thread(target=produce, name="mixlab-tokenize-prefetch", daemon=True).start()

    def one_job() -> Iterator[EncodedBatch]:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    for _ in jobs:
        yield one_job()


_worker_encoder = None


def _init_worker(tok_path: Path, eos_token: str) -> None:
    global _worker_encoder
    _worker_encoder = eos_encoder(tok_path, eos_token)


def _tokenize_in_worker(job: ShardJob, token_size: int, tokenizer_name: str, batch_size: int) -> list[WrittenShard]:
    return tokenize_shard(job, _worker_encoder, token_size, tokenizer_name, batch_size)


def _tokenize_shards(
    manifest: ShardManifest,
    jobs: list[ShardJob],
    tok_path: Path,
    info: TokenizerInfo,
    config: TokenizeConfig,
    show_progress: bool,
) -> list[list[ShardFile]]:
    """Tokenize every job, in this process or (config.workers > 1) in a pool of spawned processes, then check
    each written shard (the three files agree, a sidecar row per document), write its sidecar and return the
    manifest entries of each job's shards."""
    name = tokenizer_id(info)
    token_size = token_size_for_vocab(info.vocab_size)
    bar = tqdm(total=len(jobs), desc="tokenize", unit="shard", disable=not show_progress)
    workers, stop = min(config.workers, len(jobs)), threading.Event()
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(tok_path, info.eos_token),
        )
        futures = [pool.submit(_tokenize_in_worker, job, token_size, name, config.batch_size) for job in jobs]
        results = (future.result() for future in futures)
    else:
        pool, encoder = None, eos_encoder(tok_path, info.eos_token)
        per_job = _prefetched(jobs, encoder, config.batch_size, stop)
        results = (
            tokenize_shard(job, encoder, token_size, name, config.batch_size, batches)
            for job, batches in zip(jobs, per_job, strict=True)
        )
    done, tokens, started = [], 0, time.perf_counter()
    try:
        for job, written in zip(jobs, results, strict=True):
            records = []
            for shard_out in written:
                shard = TokenShard(shard_out.path, vocab_size=info.vocab_size, tokenizer=name)
                if shard_out.rows.num_rows != shard.num_docs:
                    raise TokenShardError(
                        f"{shard.path}: {shard.num_docs} documents tokenized but {shard_out.rows.num_rows} rows of "
                        f"{job.curated}; re-run `mixlab tokenize`"
                    )
                digest = sha256_file(shard.path)
                _write_doc_sidecar(Path(f"{shard.path}{DOCS_SUFFIX}"), shard_out.rows, shard, digest, job.curated_path)
                records.append(
                    ShardFile(
                        path=shard.path.relative_to(manifest.root).as_posix(),
                        docs=shard.num_docs,
                        bytes=shard.path.stat().st_size,
                        sha256=digest,
                        tokens=len(shard),
                        split=shard_out.split,
                    )
                )
                tokens += len(shard)
            done.append(records)
            bar.update()
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s")
    finally:
        stop.set()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    return done


# ---- per-document sidecars -----------------------------------------------------------------------
def _curated_rows(curated: Path, split: str, val_ids: frozenset[str], shard: TokenShard, encoder) -> pa.Table:
    """The rows of a curated shard that went into an existing `shard`, in its document order, as `id` + metadata
    columns: a check of a shard against its curated source (tokenizing builds the rows from the same read).

    They are the documents datatrove's reader yields (text neither null nor empty) that `route_rows` routes to
    `split`. The count must equal the shard's documents, and a few documents (first, last, spread between) must
    re-encode to exactly their tokens in the shard; otherwise nothing can be aligned and a TokenShardError says so.
    """
    parquet = pq.ParquetFile(curated)
    names = parquet.schema_arrow.names
    if not {"id", "text"} <= set(names):
        raise TokenShardError(f"{curated}: no `id`/`text` columns, so per-document metadata cannot be written")
    columns = [c for c in ("id", "text", "metadata") if c in names]
    val_set = pa.array(sorted(val_ids), pa.string())
    n = shard.num_docs
    samples = set(np.linspace(0, n - 1, num=min(SIDECAR_SAMPLE_DOCS, n)).round().astype(int).tolist())
    texts: dict[int, str] = {}
    parts, kept = [], 0
    for batch in parquet.iter_batches(batch_size=4096, columns=columns):
        ids, positions, in_val = route_rows(batch, val_set)
        positions = positions[in_val if split == "val" else ~in_val]
        text = batch.column(columns.index("text"))
        for j, position in enumerate(positions.tolist()):
            if kept + j in samples:
                texts[kept + j] = text[position].as_py()
        kept += len(positions)
        parts.append(_row_part(batch, ids, positions))
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
