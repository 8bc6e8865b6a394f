"""MinHash stage 1: datatrove's `MinhashDedupSignature` against `FastMinhashDedupSignature`, same run, same docs.

    .venv/bin/python bench/minhash_bench.py [--curated DIR] [--sources web-en code-python ...] [--json OUT]

Documents: the curated text of every source of a curated directory (plus near copies of every 10th document): `--curated`, else the bench's demo-size
corpus (.cache/mixlab-bench/curated, `bench/run_all.py prepare`) when it is there, else the test corpus
(.cache/mixlab-tests/corpus/curated, built by the test fixtures). Each source's documents are one rank.

Word splitting is the same in both (the same shingles): for web-<lang> datatrove's step gets the language code
(its own spaCy tokenizer, as datatrove runs it) and the fast step the recipe's `WarmSpacyTokenizer(lang)`, which
gives the same words; for code, math and chat both get the recipe's `RegexWordTokenizer`. MinHash settings are
the project's (`MinhashSettings`: 5-grams, 14 x 8, 64-bit xxhash, seed 1).

Per source it prints docs/s of each step (after a warm-up on a text outside the corpus, so that both have
imported and built their tokenizers) and the ratio, whether the 14 bucket files are byte-identical, and whether
datatrove's stages 2-4 over each step's signatures remove the same documents (end-to-end cluster equality).
The overall ratio is (all docs / sum of seconds) of one over the other's. The machine's load is printed: on
two shared cores, single timings move by 2x; the equality checks do not.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
from mixlab.curation.dedup import MinhashSettings
from mixlab.curation.fast_minhash import FastMinhashDedupSignature
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [REPO / ".cache" / "mixlab-bench" / "curated", REPO / ".cache" / "mixlab-tests" / "corpus" / "curated"]
WARM_UP = "A warm-up text outside the corpus, long enough for a few five-word shingles to be hashed twice."


def default_curated() -> Path:
    for path in CANDIDATES:
        if (path / "manifest.json").is_file():
            return path
    raise SystemExit("no curated corpus: run `.venv/bin/python bench/run_all.py prepare` (or the tests, which "
                     f"build {CANDIDATES[1]}), or pass --curated DIR")


def near_copy(text: str) -> str:
    """The text with every 40th word dropped: a near duplicate (Jaccard of 5-grams ~0.88) MinHash should catch."""
    words = text.split(" ")
    return " ".join(w for i, w in enumerate(words) if i % 40 != 39)


def source_docs(manifest: ShardManifest, source: str) -> list[Document]:
    """The source's curated documents, then near copies of every 10th one of over 60 words (curated text is
    deduplicated already: without them the cluster check would compare empty sets)."""
    docs = []
    for shard in manifest.source(source).shards:
        table = pq.read_table(manifest.resolve(shard.path), columns=["id", "text"])
        docs += [Document(text=text, id=str(doc_id))
                 for doc_id, text in zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True)]
    return docs + [Document(text=near_copy(d.text), id=f"{d.id}#near") for d in docs[::10] if len(d.text.split()) > 60]


def words_for(kind: str, source: str):
    """(datatrove's step's words, the fast step's words): the same splitting, as the recipes configure it."""
    if kind == "web":
        language = source.split("-", 1)[1] if "-" in source else "en"
        return language, WarmSpacyTokenizer(language)
    tokenizer = RegexWordTokenizer(kind)
    return tokenizer, tokenizer


def timed_signatures(step_class, folder: Path, words, docs: list[Document]) -> float:
    config = MinhashSettings().config()
    step = step_class(str(folder / "signatures"), config=config, language=words)
    step.run(iter([Document(WARM_UP, "w")]))  # warm-up: imports, tokenizers and tables both build lazily
    started = time.perf_counter()
    step.run(iter(docs))
    return time.perf_counter() - started


def removed_ids(folder: Path, docs: list[Document]) -> set[str]:
    """datatrove's stages 2-4 over `folder/signatures`: the ids of the documents stage 4 drops."""
    config = MinhashSettings().config()
    for bucket in range(config.num_buckets):
        MinhashDedupBuckets(str(folder / "signatures"), str(folder / "buckets"), config=config).run(
            None, bucket, config.num_buckets)
    MinhashDedupCluster(str(folder / "buckets"), str(folder / "clusters"), config=config).run(None, 0, 1)
    copies = [Document(text=d.text, id=d.id) for d in docs]
    kept = {d.id for d in MinhashDedupFilter(str(folder / "clusters")).run(iter(copies), 0, 1)}
    return {d.id for d in docs} - kept


def bench_source(manifest: ShardManifest, source: str, work: Path) -> dict:
    docs = source_docs(manifest, source)
    stock_words, fast_words = words_for(manifest.source(source).kind, source)
    stock_s = timed_signatures(MinhashDedupSignature, work / "stock", stock_words, docs)
    fast_s = timed_signatures(FastMinhashDedupSignature, work / "fast", fast_words, docs)
    files = sorted(p.relative_to(work / "stock" / "signatures")
                   for p in (work / "stock" / "signatures").rglob("*.minhash.sig"))
    identical = bool(files) and all(filecmp.cmp(work / "stock" / "signatures" / f, work / "fast" / "signatures" / f,
                                                shallow=False) for f in files)
    stock_removed, fast_removed = removed_ids(work / "stock", docs), removed_ids(work / "fast", docs)
    near = {d.id for d in docs if d.id.endswith("#near")}
    return {"source": source, "docs": len(docs), "near_copies": len(near),
            "near_copies_removed": len(near & fast_removed), "words": sum(len(d.text.split()) for d in docs),
            "stock_s": stock_s, "fast_s": fast_s, "stock_docs_s": len(docs) / stock_s, "fast_docs_s": len(docs) / fast_s,
            "ratio": stock_s / fast_s, "bucket_files": len(files), "byte_identical": identical,
            "removed": len(fast_removed), "same_removed": stock_removed == fast_removed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curated", type=Path, default=None)
    parser.add_argument("--sources", nargs="*", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from datatrove.utils.logging import logger

    logger.remove()  # datatrove logs every bucket sort
    curated = args.curated or default_curated()
    manifest = ShardManifest.load(curated)
    sources = args.sources or sorted(manifest.sources)
    print(f"corpus {curated}  load average {os.getloadavg()[0]:.2f}")
    print(f"{'source':14} {'docs':>6} {'stock docs/s':>13} {'fast docs/s':>12} {'ratio':>6}  bytes   clusters")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minhash-bench-") as tmp:
        for source in sources:
            work = Path(tmp) / source
            row = bench_source(manifest, source, work)
            shutil.rmtree(work, ignore_errors=True)
            rows.append(row)
            print(f"{source:14} {row['docs']:6d} {row['stock_docs_s']:13.0f} {row['fast_docs_s']:12.0f} "
                  f"{row['ratio']:5.1f}x  {'SAME' if row['byte_identical'] else 'DIFF':6}  "
                  f"{'SAME' if row['same_removed'] else 'DIFF'} ({row['removed']} removed, "
                  f"{row['near_copies_removed']}/{row['near_copies']} near copies)", flush=True)
    docs = sum(r["docs"] for r in rows)
    stock_s, fast_s = sum(r["stock_s"] for r in rows), sum(r["fast_s"] for r in rows)
    web = [r for r in rows if manifest.source(r["source"]).kind == "web"]
    summary = {"docs": docs, "stock_docs_s": docs / stock_s, "fast_docs_s": docs / fast_s, "ratio": stock_s / fast_s,
               "web_ratio": (sum(r["stock_s"] for r in web) / sum(r["fast_s"] for r in web)) if web else None,
               "byte_identical": all(r["byte_identical"] for r in rows),
               "same_clusters": all(r["same_removed"] for r in rows)}
    print(f"{'all':14} {docs:6d} {summary['stock_docs_s']:13.0f} {summary['fast_docs_s']:12.0f} "
          f"{summary['ratio']:5.1f}x  {'SAME' if summary['byte_identical'] else 'DIFF':6}  "
          f"{'SAME' if summary['same_clusters'] else 'DIFF'}"
          + (f"   (web sources: {summary['web_ratio']:.1f}x)" if web else ""))
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"curated": str(curated), "sources": rows, "all": summary}, indent=1))
    return 0 if summary["byte_identical"] and summary["same_clusters"] else 1


if __name__ == "__main__":
    sys.exit(main())
