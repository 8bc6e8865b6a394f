"""MinHash near-dedup across sources on real documents: near copies (a real document with small edits) planted
in a later source are dropped there with a reason naming the earlier source, the earlier source keeps them,
the registration order makes re-runs deterministic, and re-curating a source replaces its index entry."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from mixlab.curation.dedup import (
    INDEX_ORDER,
    MINHASH_INDEX,
    MinhashSettings,
    minhash_index_name,
    minhash_stages,
    register_source,
    source_index_entries,
)
from mixlab.curation.stages import SourceLayout, SourcePipelines, assemble_stages
from mixlab.pipelines.curate import curate
from test_curation import curated_rows, step, write_raw
from test_dedup_engine import prose


def near_copy(doc: Document, tag: str) -> dict:
    """The document with two words changed and a sentence added: Jaccard of 5-gram shingles stays ~0.95."""
    words = doc.text.split()
    words[len(words) // 3] = words[len(words) // 3].upper() + "s"
    words[2 * len(words) // 3] = "also"
    return {"id": f"{tag}/{doc.id}", "text": " ".join(words) + " See the reference manual.", "metadata": {}}


def as_raw(docs: list[Document]) -> list[dict]:
    return [{"id": d.id, "text": d.text, "metadata": {}} for d in docs]


def recipe(source: str, settings: MinhashSettings | None = None, version: int = 1):
    def build(raw: Path, curated: Path, tasks: int) -> SourcePipelines:
        layout = SourceLayout(source, raw / source, curated)
        return assemble_stages(layout, "web", [], tasks, settings or MinhashSettings(), "en",
                               config={"test": version})
    return build


def test_near_copies_of_an_earlier_source_are_dropped_in_the_later_one(tmp_path: Path) -> None:
    docs = prose(40)
    alpha, beta = docs[:20], docs[20:36]
    raw = tmp_path / "raw"
    write_raw(raw, "alpha", as_raw(alpha))
    planted = [near_copy(d, "beta-copy") for d in alpha[:5]]
    within = near_copy(beta[3], "beta-self")  # a near copy of beta's own document: a within-source duplicate
    write_raw(raw, "beta", as_raw(beta) + planted + [within])
    curated = tmp_path / "curated"
    recipes = {"alpha": recipe("alpha"), "beta": recipe("beta")}
    manifest = curate(raw, curated, sources=["alpha", "beta"], recipes=recipes)

    assert step(manifest, "alpha", "minhash_dedup").dropped == {}
    assert step(manifest, "beta", "minhash_dedup").dropped == {"minhash_duplicate_of_alpha": 5, "minhash_duplicate": 1}
    assert manifest.source("alpha").check_accounting() == [] and manifest.source("beta").check_accounting() == []
    assert {r["id"] for r in curated_rows(curated, "alpha")} == {d.id for d in alpha}
    beta_ids = {r["id"] for r in curated_rows(curated, "beta")}
    assert len(beta_ids) == len(beta) and not beta_ids & {p["id"] for p in planted}
    assert len(beta_ids & {beta[3].id, within["id"]}) == 1  # one of the within-source pair is kept
    index = curated / "index" / "minhash"
    assert json.loads((index / INDEX_ORDER).read_text()) == ["alpha", "beta"]
    config_index = index / minhash_index_name(MinhashSettings().config())
    entries = sorted(p.name for p in config_index.glob(f"*/*{MINHASH_INDEX}"))
    assert entries == sorted([f"alpha_00{MINHASH_INDEX}"] * 14 + [f"beta_00{MINHASH_INDEX}"] * 14)

    # re-curating alpha (after beta registered) keeps its documents: the order decides, not the run
    manifest = curate(raw, curated, sources=["alpha"], recipes={"alpha": recipe("alpha", version=2)})
    assert step(manifest, "alpha", "minhash_dedup").dropped == {}
    assert json.loads((index / INDEX_ORDER).read_text()) == ["alpha", "beta"]

    # alpha re-curated without the planted documents' originals replaces its index entry: beta keeps its copies
    write_raw(raw, "alpha", as_raw(alpha[5:]))
    curate(raw, curated, sources=["alpha"], recipes={"alpha": recipe("alpha", version=3)})
    # beta's own recipe and raw data are unchanged: the change of alpha's index entry alone re-curates it
    manifest = curate(raw, curated, sources=["beta"], recipes={"beta": recipe("beta")})
    assert step(manifest, "beta", "minhash_dedup").dropped == {"minhash_duplicate": 1}
    assert {r["id"] for r in curated_rows(curated, "beta")} >= {p["id"] for p in planted}

    # alpha curated empty (every record unreadable) holds nothing in the indexes any more, and beta follows
    for path in (raw / "alpha").iterdir():
        path.write_bytes(b"\xff\xfe not a JSON record\n")
    curate(raw, curated, sources=["alpha"], recipes={"alpha": recipe("alpha", version=3)})
    assert source_index_entries(index, "alpha") == []
    assert source_index_entries(curated / "index" / "exact", "alpha") == []
    assert len(source_index_entries(index, "beta")) == 14


def test_across_sources_off_keeps_the_later_sources_copies(tmp_path: Path) -> None:
    docs = prose(30)
    raw = tmp_path / "raw"
    write_raw(raw, "alpha", as_raw(docs[:15]))
    write_raw(raw, "beta", as_raw(docs[15:]) + [near_copy(d, "copy") for d in docs[:4]])
    off = MinhashSettings(across_sources=False)
    manifest = curate(raw, tmp_path / "curated", sources=["alpha", "beta"],
                      recipes={"alpha": recipe("alpha", off), "beta": recipe("beta", off)})
    assert step(manifest, "beta", "minhash_dedup").dropped == {}
    assert manifest.source("beta").docs == 19
    assert not (tmp_path / "curated" / "index" / "minhash").exists()


def run_minhash(docs: list[Document], work: Path, index: Path, source: str,
                settings: MinhashSettings) -> tuple[list[Document], dict[str, int]]:
    """The four stages in-process, one task (14 bucket tasks); the kept documents and the drop reasons."""
    stages = minhash_stages(work, settings, "en", index_folder=index, source=source)
    for s in stages.signatures:
        list(s.run(iter(docs), 0, 1) or ())
    for bucket in range(stages.buckets_tasks):
        for s in stages.buckets:
            list(s.run(None, bucket, stages.buckets_tasks) or ())
    for s in stages.clusters:
        list(s.run(None, 0, 1) or ())
    kept = list(stages.filter.run(iter([Document(text=d.text, id=d.id) for d in docs]), 0, 1))
    reasons = {k.removeprefix("dropped_"): int(v.total) for k, v in stages.filter.stats.stats.items()
               if k.startswith("dropped_")}
    return kept, reasons


def test_the_earliest_source_is_named_when_several_hold_the_copy(tmp_path: Path) -> None:
    docs = prose(30)
    index, settings = tmp_path / "index", MinhashSettings()
    run_minhash(docs[:10], tmp_path / "a", index, "a", settings)
    _, reasons_b = run_minhash(docs[10:20] + [Document(**{k: near_copy(docs[0], "b")[k] for k in ("id", "text")})],
                               tmp_path / "b", index, "b", settings)
    assert reasons_b == {"minhash_duplicate_of_a": 1}
    # c holds a near copy of a document of both a and b's dropped copy, and one of b's own
    copies = [near_copy(docs[0], "c"), near_copy(docs[12], "c")]
    kept, reasons_c = run_minhash(docs[20:] + [Document(text=c["text"], id=c["id"]) for c in copies],
                                  tmp_path / "c", index, "c", settings)
    assert reasons_c == {"minhash_duplicate_of_a": 1, "minhash_duplicate_of_b": 1}
    assert [d.id for d in kept] == [d.id for d in docs[20:]]
    assert register_source(index, "b") == ["a", "b", "c"]


def test_minhash_stages_refuse_half_an_index(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        minhash_stages(tmp_path, MinhashSettings(), "en", index_folder=tmp_path / "index")


def test_translated_help_pages_are_not_near_duplicates_across_languages(curated_dir: Path, tmp_path: Path) -> None:
    """The demo's web-<lang> sources are translations of one help: MinHash across them must keep them all."""
    index, settings = tmp_path / "index", MinhashSettings()
    dropped = {}
    for source in ("web-en", "web-de", "web-fr", "web-es", "web-ru"):
        shards = sorted((curated_dir / "data" / source).glob("*.parquet"))
        tables = [pq.read_table(p, columns=["id", "text"]) for p in shards]
        docs = [Document(text=t, id=str(i)) for table in tables
                for i, t in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True)]
        assert docs, f"{source}: no curated documents"
        kept, reasons = run_minhash(docs, tmp_path / source, index, source, settings)
        dropped[source] = {r: n for r, n in reasons.items() if r != "minhash_duplicate"}
    assert all(not by_source for by_source in dropped.values()), dropped
