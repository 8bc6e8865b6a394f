"""Curation survives bad input: every bad record or file is quarantined with a reason, no good document is lost,
the counts add up and memory stays bounded with a 100 MB document. Real curate runs on real documents."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from bad_corpus import write_bad, write_clean, write_deep_web
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.readers import decoded_chunks, split_lines
from mixlab.curation.writers import CURATED_SCHEMA, DUPLICATE_ID, normalise_metadata, unique_shard_ids
from mixlab.pipelines.corpus import iter_raw_documents
from mixlab.pipelines.curate import curate
from test_curation import curated_rows

MAX_RSS_MB = 2048  # with a 100 MB document; the stock MinHash step alone needed > 15 GB for one

# this process's own peak is VmHWM, which starts afresh at exec; ru_maxrss of RUSAGE_SELF would keep the peak of the
# process that started it (Linux keeps resource usage across execve: a big pytest worker's, under pytest-xdist)
CURATE_AND_MEASURE = """
import json, resource, sys
from pathlib import Path
from mixlab.pipelines.curate import curate
curate(sys.argv[1], sys.argv[2], tasks=1, workers=1)
own = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
           if line.startswith("VmHWM:"))
peak = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"max_rss_mb": peak / 1024}))
"""


def quarantined(curated: Path, source: str) -> list[dict]:
    records = []
    for path in sorted((curated / "quarantine" / source).glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as handle:
            records += [json.loads(line) for line in handle]
    return records


def test_bad_input_is_quarantined_with_reasons_and_no_good_document_is_lost(raw_corpus: Path, tmp_path: Path):
    math = list(iter_raw_documents(raw_corpus / "math"))[:60]
    web = list(iter_raw_documents(raw_corpus / "web-en"))[:5]
    parts, clean_math, expected = write_bad(tmp_path / "bad", math, metadata_cast=2, duplicate=(0, 1))
    write_clean(tmp_path / "clean", clean_math, web)
    clean = curate(tmp_path / "clean", tmp_path / "clean-curated", tasks=1, workers=1)
    assert clean.check() == []
    kept_pages = {r["id"]: r["text"] for r in curated_rows(tmp_path / "clean-curated", "web-en")}
    deep = next(i for i, page in enumerate(web) if page["id"] in kept_pages)
    write_deep_web(tmp_path / "bad", web, deep)

    run = subprocess.run([sys.executable, "-c", CURATE_AND_MEASURE, str(tmp_path / "bad"), str(tmp_path / "curated")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["max_rss_mb"] < MAX_RSS_MB
    bad = ShardManifest.load(tmp_path / "curated")
    assert bad.check() == []

    # each bad record and file: quarantined with its reason, naming its file (and line)
    read = bad.source("math").steps[0]
    assert read.dropped == expected.reasons["math"]
    assert read.kept == len(clean_math)  # exactly the good documents the reader could see
    records = [r for r in quarantined(tmp_path / "curated", "math") if r["metadata"]["quarantine_step"] == "read"]
    assert Counter(f"quarantine_{r['metadata']['quarantine_reason']}" for r in records) == expected.reasons["math"]
    assert all((tmp_path / "bad" / "math" / r["metadata"]["file"]).is_file() for r in records)
    cuts = {r["metadata"]["file"]: r["metadata"]["line"] for r in records
            if r["metadata"]["quarantine_reason"] == "truncated_file"}
    assert cuts == {"00001.jsonl.gz": parts.readable_gz + 1, "00002.jsonl.zst": len(parts.zst) +
                    parts.readable_zst_cut + 1}
    huge = next(r for r in records if r["metadata"]["quarantine_reason"] == "too_large")
    assert huge["metadata"]["bytes"] > 100 << 20 and len(huge["text"]) <= 64 << 10

    # no good document is lost: the same texts as the good documents curated alone, the same later steps
    assert sorted(r["text"] for r in curated_rows(tmp_path / "curated", "math")) == sorted(
        r["text"] for r in curated_rows(tmp_path / "clean-curated", "math"))
    assert bad.source("math").steps[1:] == clean.source("math").steps[1:]
    # the page in 100,000 divs keeps its text (flattened, it may extract a little differently)
    pages = {r["id"]: r["text"] for r in curated_rows(tmp_path / "curated", "web-en")}
    assert pages.keys() == kept_pages.keys() and bad.source("web-en").steps == clean.source("web-en").steps
    first_line = kept_pages[web[deep]["id"]].splitlines()[0]
    assert first_line in pages[web[deep]["id"]]

    rows = {r["id"]: r for r in curated_rows(tmp_path / "curated", "math")}
    assert len(rows) == sum(s.docs for s in bad.source("math").shards)  # ids are unique
    first_id = math[0]["id"]
    clean_ids = {r["id"] for r in curated_rows(tmp_path / "clean-curated", "math")}
    assert {first_id, math[1]["id"]} <= clean_ids  # both documents of the repeated id are good ones
    renamed = [i for i in rows if DUPLICATE_ID.search(i)]
    assert len(renamed) == 1 and renamed[0].startswith(f"{first_id}#dup-")
    assert rows[renamed[0]]["text"] == math[1]["text"]
    assert bad.source("math").metadata_summary["duplicate_ids"] == 1
    assert rows[math[2]["id"]]["metadata"]["path"] == "42"  # a number where a string goes: cast, kept


def test_metadata_is_cast_to_the_schema_or_its_problem_named() -> None:
    meta, problems = normalise_metadata({"path": 42, "chars": "17", "language_score": "0.5", "turns": 2.0,
                                         "url": {"a": 1}, "other": object()})
    assert (meta["path"], meta["chars"], meta["language_score"], meta["turns"], meta["url"]) == (
        "42", 17, 0.5, 2, '{"a":1}')
    meta, problems = normalise_metadata({"chars": "many", "turns": 2.5, "minhash_cluster_size": True})
    assert meta["chars"] is None and len(problems) == 3 and any("metadata.chars = \"many\"" in p for p in problems)


def test_ids_repeated_across_shards_are_made_unique_the_same_way_every_time(tmp_path: Path) -> None:
    """Duplicates in files read by different ranks meet only in the shards: renamed there, deterministically."""
    meta = {name: None for name in CURATED_SCHEMA.field("metadata").type.names}
    rows = [[("a", "one"), ("b", "two")], [("a", "three"), ("b", "two"), ("c", "four")]]
    for n, shard in enumerate(rows):
        table = pa.Table.from_pylist([{"text": t, "id": i, "metadata": meta} for i, t in shard], schema=CURATED_SCHEMA)
        pq.write_table(table, tmp_path / f"{n:05d}.parquet", compression="zstd")
    assert unique_shard_ids(tmp_path) == 2
    first = (tmp_path / "00001.parquet").read_bytes()
    assert unique_shard_ids(tmp_path) == 2 and (tmp_path / "00001.parquet").read_bytes() == first  # idempotent
    ids = pq.read_table(tmp_path / "00001.parquet").column("id").to_pylist()
    assert ids[0].startswith("a#dup-") and ids[1].startswith("b#dup-") and ids[2] == "c"
    assert pq.read_table(tmp_path / "00000.parquet").column("id").to_pylist() == ["a", "b"]


def test_lines_are_split_in_bounded_memory_and_a_break_keeps_what_came_before(tmp_path: Path) -> None:
    data = b'{"a": 1}\n' + b"x" * 5_000_000 + b'\n{"b": 2}\n'
    whole = gzip.compress(data)
    (tmp_path / "ok.jsonl.gz").write_bytes(whole + gzip.compress(b'{"c": 3}\n'))  # two gzip members
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) - 12])
    with open(tmp_path / "ok.jsonl.gz", "rb") as handle:
        lines = list(split_lines(decoded_chunks(handle, ".jsonl.gz"), max_bytes=1 << 20))
    assert [(line.number, line.complete, line.broken) for line in lines] == [
        (1, True, None), (2, False, None), (3, True, None), (4, True, None)]
    assert lines[1].size == 5_000_000 and len(lines[1].data) <= 64 << 10 and lines[3].data == b'{"c": 3}'
    with open(tmp_path / "cut.jsonl.gz", "rb") as handle:
        cut = list(split_lines(decoded_chunks(handle, ".jsonl.gz"), max_bytes=1 << 20))
    assert cut[0].data == b'{"a": 1}' and cut[-1].broken is not None and cut[-1].broken.reason == "truncated_file"
