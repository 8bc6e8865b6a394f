"""Dedup engine on real documents: exact dedup (within and across sources), cluster sizes, datatrove's
sentence dedup, the datasketch index, and curation with every dedup on, whose manifest must add up."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from mixlab.curation.dedup import (
    CountingSentenceDedupFilter,
    ExactDedupSettings,
    MinHashIndex,
    MinhashSettings,
    SentenceDedupSettings,
    content_hash,
    exact_dedup_stages,
    normalised_content,
    sentence_dedup_stages,
)
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.stages import SourceLayout, SourcePipelines, assemble_stages
from mixlab.pipelines.curate import curate
from stdlib_corpus import stdlib_code_docs, stdlib_prose_docs
from test_curation import write_raw


def prose(limit: int = 40, words: int = 300) -> list[Document]:
    """Distinct English documents (reference-manual topics), cut to `words` words."""
    docs = [d for d in stdlib_prose_docs() if len(d["text"].split()) >= 120][:limit]
    return [Document(text=" ".join(d["text"].split()[:words]), id=d["id"]) for d in docs]


def restyled(text: str) -> str:
    """The same content with other case, punctuation and spacing: an exact duplicate once normalised."""
    return "  " + text.upper().replace(" ", "   ").replace(".", " !") + " ...\n"


def run_exact(ranks: list[list[Document]], work: Path, index: Path | None = None,
              source: str | None = None) -> list[list[Document]]:
    """Exact dedup's three stages over `ranks` (one list of documents per task); the kept docs per rank."""
    stages = exact_dedup_stages(work, index, source)
    for rank, docs in enumerate(ranks):
        for step in stages.signatures:
            list(step.run(iter(docs), rank, len(ranks)) or ())
    for step in stages.clusters:
        list(step.run(None, 0, 1) or ())
    kept = []
    for rank, docs in enumerate(ranks):
        copies = [Document(text=d.text, id=d.id, metadata=dict(d.metadata)) for d in docs]
        kept.append(list(stages.filter.run(iter(copies), rank, len(ranks))))
    return kept


def test_normalised_hash_ignores_case_punctuation_spacing_and_width() -> None:
    text = prose(1)[0].text
    assert content_hash(restyled(text)) == content_hash(text)
    assert normalised_content("Ｆｕｌｌ-width “quotes”,\ttabs\n\nand ﬁ") == "full width quotes tabs and fi"
    assert content_hash(text) != content_hash(text.replace(" ", " not ", 1))  # one word more is another text


def test_exact_dedup_keeps_first_copy_across_ranks_and_records_cluster_size(tmp_path: Path) -> None:
    docs = prose(20)
    rank0 = docs[:10] + [Document(text=restyled(docs[12].text), id="copy-of-12")]
    rank1 = docs[10:] + [Document(text=restyled(docs[3].text), id="copy-of-3"),
                         Document(text=docs[3].text + "  ", id="copy2-of-3")]
    kept = run_exact([rank0, rank1], tmp_path / "exact")
    ids = {d.id: d for r in kept for d in r}
    # the first occurrence in (rank, index) order is kept: rank 0's copy of 12 wins over rank 1's original
    assert "copy-of-12" in ids and docs[12].id not in ids
    assert "copy-of-3" not in ids and "copy2-of-3" not in ids
    assert len(ids) == 20
    assert ids[docs[3].id].metadata["dup_cluster_size"] == 3
    assert ids["copy-of-12"].metadata["exact_cluster_size"] == 2
    assert sum(d.metadata["dup_cluster_size"] for d in ids.values()) == len(rank0) + len(rank1)
    assert all(d.metadata["dup_cluster_size"] == 1 for i, d in ids.items() if i not in (docs[3].id, "copy-of-12"))


def test_exact_dedup_across_sources_drops_only_copies_of_earlier_sources(tmp_path: Path) -> None:
    docs = prose(24)
    first, second = docs[:14], docs[10:]  # 4 documents in both
    index = tmp_path / "index"
    kept_a = run_exact([first], tmp_path / "a", index, "a")
    kept_b = run_exact([second], tmp_path / "b", index, "b")
    assert len(kept_a[0]) == 14
    assert [d.id for d in kept_b[0]] == [d.id for d in docs[14:]]
    assert json.loads((index / "order.json").read_text()) == ["a", "b"]
    # re-curating `a` after `b`: it registered first, so it keeps its copies
    kept_a = run_exact([first], tmp_path / "a2", index, "a")
    assert len(kept_a[0]) == 14


def test_exact_filter_refuses_a_rank_without_decisions(tmp_path: Path) -> None:
    stages = exact_dedup_stages(tmp_path / "exact")
    with pytest.raises(FileNotFoundError, match="stages 1"):
        list(stages.filter.run(iter(prose(2)), 0, 1))


def test_sentence_dedup_cuts_repeated_spans_and_counts_docs_left_too_short(tmp_path: Path) -> None:
    from datatrove.utils.text import split_into_sentences

    docs = prose(12, words=250)
    boilerplate = ("Cookies help us deliver our services. By using them you agree to our use of cookies. "
                   "Read the privacy policy for details. Contact the webmaster for questions.")
    pages = [Document(text=f"{d.text} {boilerplate}", id=d.id) for d in docs]
    sentences = split_into_sentences(docs[0].text, "en")
    short = Document(text=" ".join(sentences[:4]), id="short-repeat")  # only sentences already seen
    settings = SentenceDedupSettings(min_doc_words=20)
    stages = sentence_dedup_stages(tmp_path / "sd", settings)
    stream = pages + [short]
    for step in stages.signatures:
        list(step.run(iter(stream), 0, 1) or ())
    for step in stages.find:
        list(step.run(None, 0, 1) or ())
    out = list(stages.filter.run(iter([Document(text=d.text, id=d.id) for d in stream]), 0, 1))
    by_id = {d.id: d for d in out}
    assert "short-repeat" not in by_id
    assert by_id[pages[0].id].text.count("privacy policy") == 1  # the first page keeps the boilerplate
    assert sum("privacy policy" in d.text for d in out) == 1
    stats = stages.filter.stats
    assert stats["total"].total == len(stream) and stats["forwarded"].total == len(out)
    assert stats["dropped_sentence_dedup_too_short"].total == 1
    assert isinstance(stages.filter, CountingSentenceDedupFilter)


def test_sentence_settings_refuse_bad_values() -> None:
    with pytest.raises(CurationConfigError, match="n_sentences"):
        SentenceDedupSettings(n_sentences=0).config()


def test_minhash_index_finds_a_new_sources_near_copies_of_a_curated_one(tmp_path: Path) -> None:
    existing = prose(30)
    folder = tmp_path / "curated"
    folder.mkdir()
    import pyarrow as pa

    pq.write_table(pa.table({"id": [d.id for d in existing], "text": [d.text for d in existing]}),
                   folder / "00000.parquet")
    index = MinHashIndex.from_parquet(folder)
    new = []
    for d in existing[:5]:
        words = d.text.split()
        words[len(words) // 2] = "changed"
        new.append({"id": f"new/{d.id}", "text": " ".join(words)})
    new += [{"id": d["id"], "text": d["text"]} for d in stdlib_code_docs(10)]
    new += [{"id": f"other/{d.id}", "text": d.text} for d in prose(45)[35:]]  # prose, but not indexed
    pairs = index.near_duplicates(new)
    assert {(p.new_id, p.indexed_id) for p in pairs} == {(f"new/{d.id}", d.id) for d in existing[:5]}
    assert all(p.jaccard > 0.8 for p in pairs)
    with pytest.raises(ValueError, match="indexed already"):
        index.add(existing[0].id, "text")


# ---- curation with every dedup on ----------------------------------------------------------------
def dedup_recipe(sentence: bool):
    def build(raw: Path, curated: Path, tasks: int) -> SourcePipelines:
        layout = SourceLayout("prose", raw / "prose", curated)
        return assemble_stages(layout, "web", [], tasks, MinhashSettings(), "en", config={"test": 1},
                               exact=ExactDedupSettings(),
                               sentence=SentenceDedupSettings(min_doc_words=20) if sentence else None)
    return build


@pytest.mark.parametrize("sentence", [False, True])
def test_curation_with_exact_and_minhash_dedup_adds_up(tmp_path: Path, sentence: bool) -> None:
    docs = prose(30)
    raw_docs = [{"id": d.id, "text": d.text, "metadata": {}} for d in docs]
    raw_docs += [{"id": f"exact/{d.id}", "text": restyled(d.text), "metadata": {}} for d in docs[:4]]
    near = []
    for d in docs[4:7]:
        words = d.text.split()
        words[len(words) // 2] = words[len(words) // 2].upper() + "x"
        near.append({"id": f"near/{d.id}", "text": " ".join(words) + " Check the result twice.", "metadata": {}})
    write_raw(tmp_path / "raw", "prose", raw_docs + near)
    curated = tmp_path / "curated"
    manifest = curate(tmp_path / "raw", curated, sources=["prose"], recipes={"prose": dedup_recipe(sentence)})
    entry = manifest.source("prose")
    assert entry.check_accounting() == []
    names = [s.name for s in entry.steps]
    assert names == ["read", "exact_dedup", *(["sentence_dedup"] if sentence else []), "minhash_dedup"]
    steps = {s.name: s for s in entry.steps}
    assert steps["exact_dedup"].dropped == {"exact_duplicate": 4}
    if sentence:  # a near copy is all repeated sentences: sentence dedup removes it before MinHash sees it
        assert steps["sentence_dedup"].dropped == {"sentence_dedup_too_short": 3}
        assert steps["minhash_dedup"].dropped == {}
    else:
        assert steps["minhash_dedup"].dropped == {"minhash_duplicate": 3}
    assert entry.docs == 30
    kept_exact = [json.loads(line) for f in sorted((curated / "work/prose/exact/kept").glob("*.jsonl.gz"))
                  for line in gzip.open(f, "rt")]
    sizes = {r["id"]: r["metadata"]["exact_cluster_size"] for r in kept_exact}
    assert sorted(sizes.values()).count(2) == 4 and sum(sizes.values()) == len(raw_docs) + len(near)
    assert json.loads((curated / "index/exact/order.json").read_text()) == ["prose"]
