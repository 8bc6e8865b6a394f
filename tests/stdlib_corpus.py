"""A tiny but real curated corpus for the tokenizer, token-shard and sampler tests.

Code is CPython's own standard library source; prose is the reference text in `pydoc_data.topics` and
module docstrings. Everything is on the machine already, so the tests need no network and no mocks.
"""

from __future__ import annotations

import ast
import pydoc_data.topics
import sysconfig
from functools import cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mixlab.curation.manifest import ShardFile, ShardManifest, SourceEntry, sha256_file

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@cache
def stdlib_code_docs(limit: int = 120, max_chars: int = 12_000) -> list[dict]:
    """Python modules from the stdlib, sorted by path so the corpus is the same on every run."""
    files = sorted(p for p in STDLIB.glob("*.py") if not p.name.startswith("_"))
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")[:max_chars]
        if len(text) > 200:
            docs.append({"id": f"stdlib/{path.name}", "text": text, "metadata": {"path": path.name}})
        if len(docs) >= limit:
            break
    return docs


@cache
def stdlib_prose_docs(limit: int = 150) -> list[dict]:
    """Reference-manual topics plus module docstrings: English technical prose."""
    docs = [
        {"id": f"topics/{name}", "text": text, "metadata": {"path": name}}
        for name, text in sorted(pydoc_data.topics.topics.items())
    ]
    for path in sorted(STDLIB.glob("*.py")):
        if len(docs) >= limit:
            break
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        except SyntaxError:
            continue
        if docstring and len(docstring) > 300:
            docs.append({"id": f"docstring/{path.name}", "text": docstring, "metadata": {"path": path.name}})
    return docs[:limit]  # cached: callers must not mutate


def write_source(root: Path, name: str, kind: str, docs: list[dict], shards: int) -> SourceEntry:
    """Write docs as `shards` Parquet files shaped like datatrove's ParquetWriter output."""
    (root / name).mkdir(parents=True, exist_ok=True)
    entry = SourceEntry(name=name, kind=kind)
    for i in range(shards):
        part = docs[i::shards]
        table = pa.table(
            {
                "text": [d["text"] for d in part],
                "id": [d["id"] for d in part],
                "metadata": [d["metadata"] for d in part],
            }
        )
        path = root / name / f"{i:05d}.parquet"
        pq.write_table(table, path)
        entry.shards.append(
            ShardFile(
                path=path.relative_to(root).as_posix(),
                docs=len(part),
                bytes=path.stat().st_size,
                sha256=sha256_file(path),
                text_bytes=sum(len(d["text"].encode()) for d in part),
            )
        )
    entry.docs = len(docs)
    entry.bytes = sum(s.text_bytes for s in entry.shards)
    return entry


def build_curated_dir(root: Path) -> Path:
    """Two sources (code in two shards, prose in one) and their manifest; returns the curated directory."""
    manifest = ShardManifest()
    manifest.sources["code"] = write_source(root, "code", "code", stdlib_code_docs(), shards=2)
    manifest.sources["prose"] = write_source(root, "prose", "web", stdlib_prose_docs(), shards=1)
    manifest.save(root)
    return root


def build_tokenized_dir(root: Path, vocab_size: int = 1000) -> Path:
    """The curated corpus above with a trained tokenizer and train/val token shards."""
    from mixlab.curation.token_shards import tokenize_manifest
    from mixlab.curation.tokenizer import TokenizerConfig, train_tokenizer

    build_curated_dir(root)
    train_tokenizer(root, TokenizerConfig(vocab_size=vocab_size), show_progress=False)
    tokenize_manifest(root, show_progress=False)
    return root


def copy_untokenized_sources(curated_dir: Path, out: Path, names: tuple[str, ...]) -> Path:
    """Some sources of a curated directory (e.g. the session fixture, never changed in place) copied into `out`
    with their shards and without any tokenizer or token shards: a small dataset a test may tokenize."""
    import shutil

    manifest = ShardManifest.load(curated_dir)
    manifest.sources = {name: manifest.sources[name] for name in names}
    manifest.tokenizer = None
    for entry in manifest.sources.values():
        entry.token_shards, entry.tokens = [], {}
        for shard in entry.shards:
            (out / shard.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(curated_dir / shard.path, out / shard.path)
    manifest.save(out)
    return out
