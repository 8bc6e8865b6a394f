"""The raw corpus: contract of each document, caps, idempotence, deterministic selection."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from conftest import TEST_MAX_MB
from mixlab.pipelines.corpus import CORPUS_JSON, FILL_TOLERANCE, SOURCES, fetch_corpus, iter_raw_documents


def test_every_source_is_built_with_the_document_contract(raw_corpus: Path) -> None:
    corpus = json.loads((raw_corpus / CORPUS_JSON).read_text())
    assert set(corpus["sources"]) == set(SOURCES), corpus.get("skipped")
    for name, entry in corpus["sources"].items():
        docs = list(iter_raw_documents(raw_corpus / name))
        assert len(docs) == entry["docs"] > 0
        ids = [d["id"] for d in docs]
        assert len(set(ids)) == len(ids), f"{name}: ids are not unique"
        for doc in docs:
            assert isinstance(doc["text"], str) and doc["text"].strip()
            meta = doc["metadata"]
            assert meta["source"] == name and meta["kind"] == entry["kind"]
            assert meta.get("path") or meta.get("url")
        # the cap holds on the text bytes of each source
        assert sum(len(d["text"].encode()) for d in docs) == entry["bytes"] <= TEST_MAX_MB * 1_000_000


def test_web_sources_hold_raw_html_with_language_hints(raw_corpus: Path) -> None:
    for lang in ("en", "de", "fr", "es", "ru"):
        docs = list(iter_raw_documents(raw_corpus / f"web-{lang}"))
        assert all(d["metadata"]["lang_hint"] == lang for d in docs)
        assert all("<html" in d["text"].lower() for d in docs)
    origins = {d["metadata"]["origin"] for d in iter_raw_documents(raw_corpus / "web-en")}
    assert origins == {"deb:libreoffice-help-en-us", "deb:python3.11-doc"}  # the cap is shared by both


def test_selection_is_page_aligned_across_languages(raw_corpus: Path) -> None:
    """The spread order hashes the page's path below the language folder: same pages in every language."""

    def pages(lang: str) -> list[str]:
        return [d["id"].split("/", 1)[1] for d in iter_raw_documents(raw_corpus / f"web-{lang}")]

    de, fr = set(pages("de")), set(pages("fr"))
    assert len(de & fr) >= 0.7 * min(len(de), len(fr))


def test_fetch_is_idempotent(raw_corpus: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in raw_corpus.rglob("*") if p.is_file()}
    corpus = fetch_corpus(raw_corpus.parent, max_mb=TEST_MAX_MB)
    after = {p: p.stat().st_mtime_ns for p in raw_corpus.rglob("*") if p.is_file()}
    assert before == after, "a re-run with the same arguments must not rewrite anything"
    assert corpus == json.loads((raw_corpus / CORPUS_JSON).read_text())


def test_a_changed_cap_rebuilds_only_that_source(tmp_path: Path) -> None:
    small = fetch_corpus(tmp_path, max_mb=0.05, sources=["code-python", "math"])
    assert small["sources"]["code-python"]["bytes"] <= 50_000
    math_file = tmp_path / "raw" / "math" / "00000.jsonl.gz"
    math_mtime = math_file.stat().st_mtime_ns
    larger = fetch_corpus(tmp_path, max_mb=0.1, sources=["code-python"])
    assert small["sources"]["code-python"]["docs"] < larger["sources"]["code-python"]["docs"]
    assert larger["sources"]["code-python"]["bytes"] <= 100_000
    assert math_file.stat().st_mtime_ns == math_mtime
    assert set(larger["sources"]) == {"code-python", "math"}  # corpus.json keeps the earlier source


def test_selection_is_deterministic(tmp_path: Path) -> None:
    first = fetch_corpus(tmp_path / "a", max_mb=0.05, sources=["web-de", "chat"])
    second = fetch_corpus(tmp_path / "b", max_mb=0.05, sources=["web-de", "chat"])
    for name in ("web-de", "chat"):
        a = [d["id"] for d in iter_raw_documents(tmp_path / "a" / "raw" / name)]
        b = [d["id"] for d in iter_raw_documents(tmp_path / "b" / "raw" / name)]
        assert a == b and first["sources"][name]["bytes"] == second["sources"][name]["bytes"]


def test_without_apt_web_en_falls_back_and_other_web_sources_are_skipped(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """No apt-get/dpkg on PATH and an empty download cache: stdlib sources still build, web-en comes from
    pydoc-rendered HTML, web-de is skipped with its reason in corpus.json and in the log."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    with caplog.at_level("WARNING", logger="mixlab.corpus"):
        corpus = fetch_corpus(tmp_path / "work", max_mb=0.05, sources=["web-en", "web-de", "code-python"],
                              cache_dir=tmp_path / "cache")
    assert set(corpus["sources"]) == {"web-en", "code-python"}
    assert "apt-get/dpkg not found" in corpus["skipped"]["web-de"]
    assert corpus["sources"]["web-en"]["origins"]["fallback_used"] is True
    docs = list(iter_raw_documents(tmp_path / "work" / "raw" / "web-en"))
    assert docs and all(d["metadata"]["origin"] == "stdlib:pydoc" and "<html" in d["text"].lower() for d in docs)
    assert any("falling back" in r.message for r in caplog.records)
    assert any("web-de: SKIPPED" in r.message for r in caplog.records)


def test_max_mb_caps_the_utf8_bytes_of_the_raw_text(tmp_path: Path, caplog) -> None:
    """--max-mb counts what its help says: UTF-8 bytes of the documents' `text`, in MB of 10^6 bytes; a source
    with more text than that fills its cap (within the fill tolerance) and no shortfall is reported."""
    with caplog.at_level("WARNING", logger="mixlab.corpus"):
        corpus = fetch_corpus(tmp_path, max_mb=0.08, sources=["code-python"])
    entry = corpus["sources"]["code-python"]
    docs = list(iter_raw_documents(tmp_path / "raw" / "code-python"))
    text_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert text_bytes == entry["bytes"]
    assert (1 - FILL_TOLERANCE) * 80_000 <= text_bytes <= 80_000
    characters = sum(len(d["text"]) for d in docs)
    compressed = sum(p.stat().st_size for p in (tmp_path / "raw" / "code-python").glob("*.jsonl.gz"))
    assert compressed < text_bytes and characters <= text_bytes  # neither file size nor characters are counted
    assert sum(len(line) for p in (tmp_path / "raw" / "code-python").glob("*.jsonl.gz")
               for line in gzip.open(p, "rb")) > text_bytes  # nor the JSON lines with ids and metadata
    assert entry["shortfall_bytes"] == 0
    assert not [r for r in caplog.records if "below the" in r.message]


def test_a_source_below_its_cap_is_warned_about_and_recorded(tmp_path: Path, caplog) -> None:
    """chatterbot-corpus holds well under 1 MB of dialogues: the cap cannot be reached."""
    with caplog.at_level("WARNING", logger="mixlab.corpus"):
        corpus = fetch_corpus(tmp_path, max_mb=1, sources=["chat"])
    entry = corpus["sources"]["chat"]
    assert 0 < entry["bytes"] < 1_000_000
    assert entry["shortfall_bytes"] == 1_000_000 - entry["bytes"]
    assert json.loads((tmp_path / "raw" / CORPUS_JSON).read_text())["sources"]["chat"]["shortfall_bytes"] == (
        entry["shortfall_bytes"])
    expected = f"chat: only {entry['bytes'] / 1e6:.3g} MB of text available, below the 1 MB cap"
    assert [r.message for r in caplog.records if "below the" in r.message] == [expected]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mixlab.corpus"):
        fetch_corpus(tmp_path, max_mb=1, sources=["chat"])  # up to date: nothing rebuilt, still warned
    assert [r.message for r in caplog.records if "below the" in r.message] == [expected]
