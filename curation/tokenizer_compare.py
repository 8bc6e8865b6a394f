"""The playbook's fertility table on mixlab's own data: candidate tokenizers side by side, per language and domain.

For each candidate and each group of curated documents (group by `metadata.language`, and by domain = the
source kind), `compare_tokenizers` reports:
- fertility: tokens per word, with words from the curation's own word splitter for that kind and language
  (spaCy blank tokenizer for web prose, the regex splitter for code, math and chat), so that the number is
  comparable with the word counts the filters used;
- bytes per token: UTF-8 bytes of the text over tokens (what bits per byte converts between);
- the share of unknown tokens and of byte-fallback tokens (`<0xNN>`, sentencepiece-style); a byte-level BPE
  has neither, by construction.
The sample is deterministic: the first `docs_per_group` documents of each group, in manifest order (sources
sorted by name, shards in order, rows in order). Tokens are counted without special tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.tokenizer import (
    BYTE_FALLBACK_PATTERN,
    TOKENIZER_FILE,
    TokenizerError,
    byte_length_rule,
    default_tokenizer_name,
    load_tokenizer,
    sentencepiece_to_tokenizer_json,
    tokenizer_kind,
)

COMPARE_STEM = "tokenizer_compare"  # <card folder>/tokenizer_compare.{md,json,png}
GROUP_BYS = ("language", "domain")
PROSE_KINDS = frozenset({"web"})  # kinds whose words come from spaCy (the web recipe's WarmSpacyTokenizer)


@dataclass(frozen=True)
class Candidate:
    """One tokenizer to compare: a display name and its tokenizer.json."""

    name: str
    path: Path


@dataclass
class GroupStats:
    """One tokenizer on one group of documents."""

    tokenizer: str
    group_by: str  # "language" or "domain"
    group: str
    docs: int = 0
    words: int = 0
    tokens: int = 0
    bytes: int = 0
    unk_tokens: int = 0
    byte_fallback_tokens: int = 0

    @property
    def fertility(self) -> float:
        return self.tokens / self.words if self.words else float("nan")

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else float("nan")

    @property
    def unk_share(self) -> float:
        return self.unk_tokens / self.tokens if self.tokens else 0.0

    @property
    def byte_fallback_share(self) -> float:
        return self.byte_fallback_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "fertility": self.fertility,
            "bytes_per_token": self.bytes_per_token,
            "unk_share": self.unk_share,
            "byte_fallback_share": self.byte_fallback_share,
        }


@dataclass
class TokenizerComparison:
    """The table: one row per (tokenizer, group_by, group); `tokenizers` describes each candidate."""

    docs_per_group: int
    tokenizers: dict[str, dict] = field(default_factory=dict)  # name -> path, kind, vocab_size
    rows: list[GroupStats] = field(default_factory=list)

    def row(self, tokenizer: str, group_by: str, group: str) -> GroupStats:
        for row in self.rows:
            if (row.tokenizer, row.group_by, row.group) == (tokenizer, group_by, group):
                return row
        raise KeyError(f"no row for tokenizer {tokenizer!r}, {group_by} {group!r}")

    def to_dict(self) -> dict:
        return {"docs_per_group": self.docs_per_group, "tokenizers": self.tokenizers,
                "rows": [row.to_dict() for row in self.rows]}


@dataclass(frozen=True)
class SampledDoc:
    text: str
    language: str
    domain: str


# ---- inputs --------------------------------------------------------------------------------------
def parse_candidate(spec: str | Path) -> Candidate:
    """`NAME=PATH` or `PATH` (a tokenizer.json, a folder holding one, or a sentencepiece `.model`); the name
    defaults to the file's stem, or the folder's name for `<folder>/tokenizer.json`."""
    text = str(spec)
    name, sep, path_text = text.partition("=")
    if not sep or "/" in name or not name:
        name, path_text = "", text
    path = Path(path_text)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"--tokenizer {text}: {path} is not a file; give a tokenizer.json, a folder with one, "
                             "or a sentencepiece .model (optionally as NAME=PATH)")
    return Candidate(name=name or default_tokenizer_name(path), path=path)


def _usable_json(candidate: Candidate, scratch: Path) -> Path:
    """The candidate as a tokenizer.json: sentencepiece models are converted once into `scratch`."""
    if candidate.path.suffix == ".json":
        return candidate.path
    target = scratch / f"{candidate.name}.json"
    if not target.is_file() or target.stat().st_mtime < candidate.path.stat().st_mtime:
        sentencepiece_to_tokenizer_json(candidate.path, target)
    return target


def sample_documents(manifest: ShardManifest, docs_per_group: int) -> list[SampledDoc]:
    """The first `docs_per_group` non-empty documents of every language and of every domain, in manifest order
    (a document is taken when either of its groups still needs documents)."""
    if docs_per_group <= 0:
        raise ValueError(f"docs_per_group must be positive, got {docs_per_group}")
    taken: dict[tuple[str, str], int] = {}
    chosen: list[SampledDoc] = []
    for name in sorted(manifest.sources):
        entry = manifest.sources[name]
        for shard in entry.shards:
            for text, metadata in _shard_rows(manifest.resolve(shard.path)):
                if not text:
                    continue
                language = str(metadata.get("language") or "unknown")
                domain = str(metadata.get("kind") or entry.kind or "unknown")
                keys = (("language", language), ("domain", domain))
                if all(taken.get(key, 0) >= docs_per_group for key in keys):
                    continue
                for key in keys:
                    taken[key] = taken.get(key, 0) + 1
                chosen.append(SampledDoc(text=text, language=language, domain=domain))
    return chosen


def _shard_rows(path: Path) -> Iterator[tuple[str, dict]]:
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if "text" not in names:
        raise TokenizerError(f"{path}: no `text` column (has {names}); curated shards must be written by `mixlab curate`")
    columns = ["text", *(["metadata"] if "metadata" in names else [])]
    for batch in parquet.iter_batches(batch_size=512, columns=columns):
        texts = batch.column(0).to_pylist()
        metas = batch.column(1).to_pylist() if len(columns) > 1 else [{}] * len(texts)
        for text, meta in zip(texts, metas, strict=True):
            yield text, meta if isinstance(meta, dict) else {}


# ---- words ---------------------------------------------------------------------------------------
def default_word_splitter(domain: str, language: str) -> Callable[[str], list[str]]:
    """The word splitter curation uses for documents of this kind and language: spaCy's blank tokenizer for
    web prose (as the web recipe's WarmSpacyTokenizer), the regex splitter otherwise or where spaCy has no
    such language."""
    from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer

    if domain in PROSE_KINDS:
        try:
            return WarmSpacyTokenizer(language).word_tokenize
        except (ImportError, KeyError, ValueError, OSError):  # spaCy lacks the language: regex, as curation does
            pass
    return RegexWordTokenizer(domain).word_tokenize


# ---- the comparison ------------------------------------------------------------------------------
def _special_ids(tokenizer, path: Path) -> tuple[int | None, frozenset[int]]:
    """The unknown-token id (if the model has one) and the byte-fallback token ids (if it falls back to bytes)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    unk = model.get("unk_token")
    unk_id = tokenizer.token_to_id(unk) if unk else None
    fallback: frozenset[int] = frozenset()
    if model.get("byte_fallback"):
        pattern = re.compile(BYTE_FALLBACK_PATTERN)
        fallback = frozenset(i for token, i in tokenizer.get_vocab().items() if pattern.fullmatch(token))
    return unk_id, fallback


def bits_per_byte_note(path: Path) -> str:
    """Whether a candidate's losses can be read as bits per byte (its token byte lengths), and how exactly:
    candidates are only comparable across vocabularies where this is defined."""
    try:
        rule = byte_length_rule(path)
    except TokenizerError:
        return "not defined"
    if rule.exact:
        return "exact"
    if rule.kind == "metaspace":
        return f"exact + {rule.prefix_bytes} byte/doc (dummy prefix)"
    return "approximate (1 whitespace byte per word)"


def compare_tokenizers(
    curated_dir: str | Path,
    candidates: Sequence[Candidate | str | Path],
    *,
    docs_per_group: int = 50,
    word_splitter: Callable[[str, str], Callable[[str], list[str]]] = default_word_splitter,
    scratch_dir: str | Path | None = None,
) -> TokenizerComparison:
    """Fertility, bytes per token and unknown / byte-fallback shares of each candidate on the curated shards'
    text, per language and per domain (see the module docstring). `word_splitter(domain, language)` returns
    the function that splits a document into words."""
    manifest = ShardManifest.load(curated_dir)
    parsed = [c if isinstance(c, Candidate) else parse_candidate(c) for c in candidates]
    if not parsed:
        raise TokenizerError("no tokenizer to compare; give at least one --tokenizer")
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise TokenizerError(f"tokenizer names {names} repeat; name them apart with NAME=PATH")
    docs = sample_documents(manifest, docs_per_group)
    if not docs:
        raise TokenizerError(f"{manifest.root}: the curated shards hold no text to compare tokenizers on")
    splitters: dict[tuple[str, str], Callable[[str], list[str]]] = {}
    words = []
    for doc in docs:
        key = (doc.domain, doc.language)
        if key not in splitters:
            splitters[key] = word_splitter(doc.domain, doc.language)
        words.append(len(splitters[key](doc.text)))
    texts = [doc.text for doc in docs]
    nbytes = [len(text.encode("utf-8")) for text in texts]

    scratch = Path(scratch_dir) if scratch_dir is not None else manifest.resolve(f"logs/{COMPARE_STEM}")
    scratch.mkdir(parents=True, exist_ok=True)
    result = TokenizerComparison(docs_per_group=docs_per_group)
    for candidate in parsed:
        path = _usable_json(candidate, scratch)
        tokenizer = load_tokenizer(path)
        unk_id, fallback = _special_ids(tokenizer, path)
        result.tokenizers[candidate.name] = {
            "path": str(candidate.path), "kind": tokenizer_kind(path), "vocab_size": tokenizer.get_vocab_size(),
            "bits_per_byte": bits_per_byte_note(path),
        }
        rows: dict[tuple[str, str], GroupStats] = {}
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        for doc, n_words, n_bytes, encoding in zip(docs, words, nbytes, encodings, strict=True):
            ids = encoding.ids
            for group_by, group in (("language", doc.language), ("domain", doc.domain)):
                row = rows.setdefault((group_by, group), GroupStats(candidate.name, group_by, group))
                if row.docs >= docs_per_group:
                    continue  # this document was sampled for its other group
                row.docs += 1
                row.words += n_words
                row.tokens += len(ids)
                row.bytes += n_bytes
                row.unk_tokens += sum(1 for i in ids if i == unk_id) if unk_id is not None else 0
                row.byte_fallback_tokens += sum(1 for i in ids if i in fallback) if fallback else 0
        result.rows.extend(rows[key] for key in sorted(rows))
    return result


# ---- writing -------------------------------------------------------------------------------------
def comparison_markdown(comparison: TokenizerComparison) -> str:
    """The table as markdown: one section per grouping, one row per group and tokenizer."""
    lines = ["# Tokenizer comparison", "",
             f"First {comparison.docs_per_group} documents per group of the curated shards. Fertility = tokens "
             "per word (words from curation's word splitter); bytes/token = UTF-8 bytes per token.", "",
             "| tokenizer | kind | vocabulary | bits per byte | path |", "|---|---|---:|---|---|"]
    for name, info in comparison.tokenizers.items():
        lines.append(f"| {name} | {info['kind']} | {info['vocab_size']:,} | {info.get('bits_per_byte', '')} | "
                     f"`{info['path']}` |")
    for group_by in GROUP_BYS:
        lines += ["", f"## Per {group_by}", "",
                  f"| {group_by} | tokenizer | docs | words | tokens | fertility | bytes/token | unk % | byte-fallback % |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        rows = sorted((r for r in comparison.rows if r.group_by == group_by), key=lambda r: (r.group, r.tokenizer))
        for r in rows:
            lines.append(f"| {r.group} | {r.tokenizer} | {r.docs} | {r.words:,} | {r.tokens:,} | {r.fertility:.3f} | "
                         f"{r.bytes_per_token:.3f} | {100 * r.unk_share:.2f} | {100 * r.byte_fallback_share:.2f} |")
    return "\n".join(lines) + "\n"


def comparison_png(comparison: TokenizerComparison, path: Path) -> Path:
    """Fertility and bytes per token per group (bars per tokenizer), languages on top, domains below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(comparison.tokenizers)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7), squeeze=False)
    for row_i, group_by in enumerate(GROUP_BYS):
        groups = sorted({r.group for r in comparison.rows if r.group_by == group_by})
        x = np.arange(len(groups))
        width = 0.8 / max(len(names), 1)
        for col, (metric, label) in enumerate((("fertility", "tokens per word"), ("bytes_per_token", "bytes per token"))):
            ax = axes[row_i][col]
            for k, name in enumerate(names):
                values = [getattr(comparison.row(name, group_by, g), metric) if any(
                    r.tokenizer == name and r.group_by == group_by and r.group == g for r in comparison.rows)
                    else np.nan for g in groups]
                ax.bar(x + k * width - 0.4 + width / 2, values, width, label=name)
            ax.set_xticks(x, groups, rotation=30, ha="right")
            ax.set_title(f"{label} per {group_by}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(curated_dir: str | Path, comparison: TokenizerComparison) -> dict[str, Path]:
    """`tokenizer_compare.md`, `.json` and `.png` in the dataset card's folder (`data/`). Returns their paths."""
    from mixlab.curation.datacard import card_path

    manifest = ShardManifest.load(curated_dir)
    folder = card_path(manifest).parent
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / f"{COMPARE_STEM}.md", "json": folder / f"{COMPARE_STEM}.json",
             "png": folder / f"{COMPARE_STEM}.png"}
    paths["markdown"].write_text(comparison_markdown(comparison), encoding="utf-8")
    paths["json"].write_text(json.dumps(comparison.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    comparison_png(comparison, paths["png"])
    return paths
