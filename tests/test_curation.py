"""Curation on real data: language ID, Gopher, MinHash, accounting, checksums, quarantine, resume."""

from __future__ import annotations

import gzip
import json
import shutil
import sysconfig
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from mixlab.curation.extract import QuarantiningTrafilatura
from mixlab.curation.filters import CodeQualityFilter
from mixlab.curation.lid import BundledLanguageFilter
from mixlab.curation.manifest import SCHEMA_VERSION, ManifestError, ShardManifest
from mixlab.curation.splits import TokenizeConfig, split_source
from mixlab.curation.stages import SourceLayout
from mixlab.curation.tokenizer import TokenizerConfig, iter_training_texts
from mixlab.pipelines.corpus import Downloads, default_cache_dir, iter_raw_documents, source_specs
from mixlab.pipelines.curate import curate


# ---- helpers ------------------------------------------------------------------------------------
def write_raw(raw_root: Path, source: str, docs: list[dict], files: int = 2) -> Path:
    """A raw source in the corpus format, split round-robin over `files` gzip JSONL files."""
    out = raw_root / source
    out.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with gzip.open(out / f"{f:05d}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for doc in docs[f::files]:
                handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    return out


def curated_rows(curated: Path, source: str) -> list[dict]:
    rows = []
    for path in sorted(SourceLayout(source, Path(), curated).output.glob("*.parquet")):
        rows += pq.read_table(path).to_pylist()
    return rows


def step(manifest: ShardManifest, source: str, name: str):
    return next(s for s in manifest.source(source).steps if s.name == name)


# ---- the curated test corpus -------------------------------------------------------------------
def test_accounting_adds_up_for_every_source(raw_corpus: Path, curated_manifest: ShardManifest) -> None:
    corpus = json.loads((raw_corpus / "corpus.json").read_text())
    assert set(curated_manifest.sources) == set(corpus["sources"])
    assert curated_manifest.check() == []
    for name, entry in curated_manifest.sources.items():
        assert entry.steps[0].name == "read" and entry.steps[0].docs_in == corpus["sources"][name]["docs"]
        assert entry.steps[-1].name == "minhash_dedup"
        assert entry.docs == entry.steps[-1].kept > 0
        assert sum(entry.languages.values()) == entry.docs


def test_manifest_bytes_are_utf8_text_bytes(curated_dir: Path, curated_manifest: ShardManifest) -> None:
    """`bytes` of a source is its documents' UTF-8 text (what budgets are in), not its compressed Parquet."""
    for name, entry in curated_manifest.sources.items():
        for shard in entry.shards:
            path = curated_manifest.resolve(shard.path)
            texts = pq.read_table(path, columns=["text"]).column(0).to_pylist()
            assert shard.text_bytes == sum(len(t.encode("utf-8")) for t in texts)
            assert shard.bytes == path.stat().st_size
        assert entry.bytes == sum(s.text_bytes for s in entry.shards) == sum(
            len(r["text"].encode("utf-8")) for r in curated_rows(curated_dir, name))


def test_tokenizer_sample_reaches_every_curated_shard(curated_manifest: ShardManifest) -> None:
    """A budget of a quarter of a source's text reaches both curated shards. (When compressed file sizes
    stood in for text bytes, the budget of these sources filled up inside their first shard.)"""
    held_out = TokenizeConfig()
    for name in ("math", "code-python"):
        shards = curated_manifest.source(name).shards
        assert len(shards) == 2
        budget = split_source(curated_manifest, name, held_out).train_bytes // 4
        config = TokenizerConfig(max_bytes_per_source=budget, sources=(name,), held_out=held_out)
        used = set(iter_training_texts(curated_manifest, config, {}))
        for shard in shards:
            texts = set(pq.read_table(curated_manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist())
            assert used & texts, (name, shard.path)


def test_checksums_verify_and_catch_a_changed_shard(curated_dir: Path, tmp_path: Path) -> None:
    assert ShardManifest.load(curated_dir).verify_checksums() == []
    copy = tmp_path / "curated"
    output = SourceLayout("math", Path(), curated_dir).output
    shutil.copytree(output, copy / output.relative_to(curated_dir))
    shutil.copy(curated_dir / "manifest.json", copy / "manifest.json")
    manifest = ShardManifest.load(copy)
    shard = manifest.resolve(manifest.source("math").shards[0].path)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = manifest.verify_checksums()
    assert any("checksum mismatch" in p and str(shard) in p for p in problems)


def test_parquet_keeps_per_document_metadata(curated_dir: Path, curated_manifest: ShardManifest) -> None:
    for name, entry in curated_manifest.sources.items():
        rows = curated_rows(curated_dir, name)
        assert len(rows) == entry.docs
        for row in rows:
            meta = row["metadata"]
            assert meta["source"] == name and meta["kind"] == entry.kind
            assert meta["path"] and meta["language"] and meta["minhash_cluster_size"] >= 1
            assert 0.0 <= meta["language_score"] <= 1.0


def test_language_is_natural_and_code_keeps_its_programming_language_apart(
        curated_dir: Path, curated_manifest: ShardManifest) -> None:
    """`language` means natural language in every source (the corpus's `lang_hint` of code is `python`)."""
    for name in curated_manifest.sources:
        for row in curated_rows(curated_dir, name):
            meta = row["metadata"]
            assert meta["language"] != "python" and meta["lang_hint"] != "python"
            assert (meta["programming_language"] == "python") == (name == "code-python"), (name, meta)
    code = curated_rows(curated_dir, "code-python")
    english = sum(r["metadata"]["language"] == "en" for r in code)
    assert english > len(code) / 2  # lid.176 on the stdlib: its comments and docstrings are English
    assert "python" not in curated_manifest.source("code-python").languages


def test_language_id_tags_german_and_english_pages(curated_dir: Path, curated_manifest: ShardManifest) -> None:
    for lang in ("de", "en"):
        rows = curated_rows(curated_dir, f"web-{lang}")
        assert rows and all(r["metadata"]["language"] == lang for r in rows)
        assert min(r["metadata"]["language_score"] for r in rows) >= 0.65
        assert curated_manifest.source(f"web-{lang}").languages == {lang: len(rows)}
    # the same filter on a real German page and a real English page, outside the pipeline
    lid = BundledLanguageFilter(["de"])
    german = Document(text=curated_rows(curated_dir, "web-de")[0]["text"], id="de")
    english = Document(text=curated_rows(curated_dir, "web-en")[0]["text"], id="en")
    assert lid.filter(german) is True and german.metadata["language"] == "de"
    assert lid.filter(english) == (False, "wrong_language_en") and english.metadata["language"] == "en"


def test_gopher_drops_real_pages(curated_manifest: ShardManifest) -> None:
    for lang in ("en", "de", "fr", "es", "ru"):
        quality = step(curated_manifest, f"web-{lang}", "gopher_quality")
        repetition = step(curated_manifest, f"web-{lang}", "gopher_repetition")
        assert quality.dropped_total + repetition.dropped_total > 0
        assert all(reason.startswith("gopher_") for reason in quality.dropped)
    # LibreOffice help has many stub pages: Gopher's 50-word minimum catches them in every language
    assert sum(step(curated_manifest, f"web-{lang}", "gopher_quality").dropped.get("gopher_short_doc", 0)
               for lang in ("en", "de", "fr", "es", "ru")) > 0


# ---- constructed raw sources from real documents -----------------------------------------------
def test_english_fallback_pages_are_dropped_from_web_de(raw_corpus: Path, tmp_path: Path) -> None:
    """`lib_tools.html` and `code-stubs.html` are untranslated (English) pages of libreoffice-help-de."""
    fallback = {"sbasic/shared/03/lib_tools.html", "sbasic/shared/code-stubs.html"}
    dl = Downloads(default_cache_dir())
    docs, german = [], 0
    for doc in source_specs()["web-de"].origins[0].documents(dl):
        rel = doc.id.split("/", 2)[2]
        if rel in fallback or (german < 8 and "/guide/" in rel):
            german += rel not in fallback
            docs.append({"id": doc.id, "text": doc.text, "metadata": doc.metadata})
    assert len(docs) == 10
    raw = tmp_path / "raw"
    write_raw(raw, "web-de", docs)
    manifest = curate(raw, tmp_path / "curated", sources=["web-de"])
    lid = step(manifest, "web-de", "language_id")
    assert lid.dropped.get("wrong_language_en", 0) >= 1
    kept = {r["id"].split("/", 2)[2] for r in curated_rows(tmp_path / "curated", "web-de")}
    assert kept and not kept & fallback
    assert manifest.check() == []


def test_minhash_drops_real_near_duplicates(raw_corpus: Path, tmp_path: Path) -> None:
    originals = [d for d in iter_raw_documents(raw_corpus / "math") if "gsm8k" in d["id"]][:40]
    near_dups = []
    for doc in originals[:6]:
        words = doc["text"].split()
        words[len(words) // 2] = words[len(words) // 2].upper()  # one word changed, one sentence added
        near_dups.append({"id": doc["id"] + "-copy", "text": " ".join(words) + " Check the result twice.",
                          "metadata": doc["metadata"]})
    raw = tmp_path / "raw"
    write_raw(raw, "math", originals + near_dups)
    manifest = curate(raw, tmp_path / "curated", sources=["math"])
    dedup = step(manifest, "math", "minhash_dedup")
    assert dedup.dropped == {"minhash_duplicate": 6}
    rows = curated_rows(tmp_path / "curated", "math")
    assert sum(r["metadata"]["minhash_cluster_size"] == 2 for r in rows) == 6
    assert manifest.source("math").metadata_summary["minhash_cluster_size_histogram"]["2"] == 6
    assert manifest.check() == []


def test_corrupted_raw_input_is_quarantined_not_fatal(raw_corpus: Path, tmp_path: Path) -> None:
    good = [d for d in iter_raw_documents(raw_corpus / "math")][:30]
    raw = tmp_path / "raw"
    source = write_raw(raw, "math", good[:20], files=1)
    bad_lines = [
        b'{"id": "broken", "text": "an unterminated string}\n',  # malformed JSON
        b'{"id": "bytes", "text": "caf\xe9 in latin-1"}\n',  # not UTF-8
        b'["a", "list", "not", "an", "object"]\n',
        b'{"id": "no-text", "metadata": {}}\n',
    ]
    with gzip.open(source / "00001.jsonl.gz", "wb") as handle:
        for i, doc in enumerate(good[20:25]):
            handle.write(json.dumps(doc).encode() + b"\n")
            if i < len(bad_lines):
                handle.write(bad_lines[i])
    full = gzip.compress(b"".join(json.dumps(d).encode() + b"\n" for d in good[25:30]))
    (source / "00002.jsonl.gz").write_bytes(full[: len(full) - 20])  # truncated: the gzip trailer is gone

    manifest = curate(raw, tmp_path / "curated", sources=["math"])
    entry = manifest.source("math")
    read = entry.steps[0]
    assert read.dropped == {"quarantine_malformed_json": 1, "quarantine_undecodable_bytes": 1,
                            "quarantine_not_an_object": 1, "quarantine_invalid_text": 1,
                            "quarantine_truncated_file": 1}
    assert entry.quarantined == 5
    assert read.kept >= 25  # every good line before the truncation got through
    quarantined = []
    for path in (tmp_path / "curated" / "quarantine" / "math").glob("*.jsonl.gz"):
        with gzip.open(path, "rt") as handle:
            quarantined += [json.loads(line) for line in handle]
    assert sorted(q["metadata"]["quarantine_reason"] for q in quarantined) == sorted(
        r.removeprefix("quarantine_") for r in read.dropped)
    assert manifest.check() == []


def test_extractor_failures_are_quarantined(raw_corpus: Path, tmp_path: Path) -> None:
    pages = [d for d in iter_raw_documents(raw_corpus / "web-en")][:3]
    docs = [Document(text=p["text"], id=p["id"], metadata=dict(p["metadata"])) for p in pages]
    extractor = QuarantiningTrafilatura(str(tmp_path / "quarantine"), timeout=1e-6)  # nothing can finish
    assert list(extractor.run(iter(docs))) == []
    assert extractor.stats["dropped_quarantine_extract_timeout"].total == 3
    with gzip.open(tmp_path / "quarantine" / "extract_00000.jsonl.gz", "rt") as handle:
        kept = [json.loads(line) for line in handle]
    assert [k["id"] for k in kept] == [p["id"] for p in pages]
    assert kept[0]["text"] == pages[0]["text"]  # the raw HTML is kept for inspection


def test_rerun_is_a_noop_and_resume_keeps_true_totals(raw_corpus: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(raw_corpus / "math", raw / "math")
    curated = tmp_path / "curated"
    first = curate(raw, curated, sources=["math"]).source("math")
    manifest_mtime = (curated / "manifest.json").stat().st_mtime_ns
    again = curate(raw, curated, sources=["math"]).source("math")
    assert (curated / "manifest.json").stat().st_mtime_ns == manifest_mtime
    assert again.steps == first.steps
    # lose rank 1 of the filter stage as if the job died: only it re-runs, stats of rank 0 still count
    logs = curated / "logs" / "math" / "filter"
    (logs / "completions" / "00001").unlink()
    (logs / "stats" / "00001.json").unlink()
    resumed = curate(raw, curated, sources=["math"]).source("math")
    assert resumed.steps == first.steps and resumed.docs == first.docs
    last_invocation = json.loads((logs / "stats.json").read_text())[0]["stats"]["total"]  # datatrove's own file
    last_invocation = last_invocation if isinstance(last_invocation, int | float) else last_invocation["total"]
    assert 0 < last_invocation < first.steps[0].docs_in  # covers only the re-run rank


# ---- units on real files ------------------------------------------------------------------------
def test_code_filter_drops_generated_stdlib_files() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = CodeQualityFilter()
    generated = Document(text=(stdlib / "token.py").read_text(), id="token.py")
    handwritten = Document(text=(stdlib / "textwrap.py").read_text(), id="textwrap.py")
    assert code.filter(generated) == (False, "code_autogenerated")
    assert code.filter(handwritten) is True


def test_manifest_schema_mismatch_is_a_clear_error(curated_dir: Path, tmp_path: Path) -> None:
    data = json.loads((curated_dir / "manifest.json").read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"schema_version {SCHEMA_VERSION + 1} is not supported.*re-run curation"):
        ShardManifest.load(tmp_path)
