"""The recipes' shared wiring on real data: exact dedup across sources, decontamination against GSM8K with its
match report in the manifest, and the demo's "math vs not" classifier annotating the curated shards."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mixlab.curation.classify import score_field
from mixlab.curation.decontam import read_contamination_report
from mixlab.curation.dedup import SentenceDedupSettings
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.stages import DecontamSettings, SourceLayout, decontam_index
from mixlab.pipelines.chat import ChatRecipe, chat_pipeline
from mixlab.pipelines.corpus import Downloads, default_cache_dir
from mixlab.pipelines.curate import curate
from mixlab.pipelines.demo import DEMO_CLASSIFIER, demo_classifier
from mixlab.pipelines.web import WebRecipe, web_pipeline


def _read_raw(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle if line.strip()]
    return rows


def _write_raw(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True)
    with gzip.open(folder / "00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _output(curated: Path, source: str) -> dict[str, str]:
    texts = {}
    for path in sorted((curated / "data" / source).glob("*.parquet")):
        table = pq.read_table(path, columns=["id", "text"])
        texts.update(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
    return texts


def _step(entry, fragment: str):
    return next(s for s in entry.steps if fragment in s.name)


def test_web_and_chat_recipes_dedup_exactly_across_sources_and_decontaminate_by_default(tmp_path):
    web = web_pipeline(tmp_path / "raw", tmp_path / "curated")
    chat = chat_pipeline(tmp_path / "raw", tmp_path / "curated")
    for pipelines in (web, chat):
        names = [stage.name for stage in pipelines.stages]
        assert names[:3] == ["filter", "exact_hashes", "exact_clusters"] and "sentence_signatures" not in names
        assert type(pipelines.stages[0].pipeline[-2]).__name__ == "DecontaminationFilter"  # last before the writer
        assert pipelines.config["decontam"]["index"].startswith("index/decontam-")
    opt_in = chat_pipeline(tmp_path / "raw", tmp_path / "curated", recipe=ChatRecipe(sentence=SentenceDedupSettings()))
    assert "sentence_signatures" in [s.name for s in opt_in.stages]
    off = web_pipeline(tmp_path / "raw", tmp_path / "curated", recipe=WebRecipe(exact=None, decontam=None))
    assert [s.name for s in off.stages][:2] == ["filter", "minhash_signatures"] and off.config["decontam"] is None
    assert not any(type(step).__name__ == "DecontaminationFilter" for step in off.stages[0].pipeline)


def test_exact_copies_planted_across_two_real_sources_leave_the_later_one(raw_corpus, tmp_path):
    dialogues = _read_raw(raw_corpus / "chat")
    assert len(dialogues) > 600
    first, second = dialogues[:300], dialogues[300:600]
    # 25 dialogues of the first source copied into the second, with new ids and other case and spacing
    copies = [{**row, "id": f"chat-extra/copy/{i:03d}", "text": "  " + row["text"].upper().replace(" ", "  ") + " "}
              for i, row in enumerate(first[:250:10])]
    raw = tmp_path / "raw"
    _write_raw(raw / "chat", first)
    _write_raw(raw / "chat-extra", [{**row, "id": row["id"].replace("chat/", "chat-extra/", 1)} for row in second]
               + copies)
    curated = tmp_path / "curated"
    manifest = curate(raw, curated, sources=["chat", "chat-extra"], tasks=2, workers=2, console=io.StringIO())

    later = _output(curated, "chat-extra")
    assert not any(doc_id.startswith("chat-extra/copy/") for doc_id in later)
    assert len(later) > 200  # its own dialogues are kept
    exact = _step(manifest.sources["chat-extra"], "exact")
    assert exact.dropped.get("exact_duplicate", 0) >= len(copies)
    # the earlier source keeps the content: the copy left the later one only
    kept_first = {" ".join(text.upper().split()) for text in _output(curated, "chat").values()}
    originals = [" ".join(row["text"].upper().split()) for row in first[:250:10]]
    assert sum(text in kept_first for text in originals) >= len(originals) - 3  # MinHash may merge a few
    assert manifest.sources["chat-extra"].check_accounting() == []
    assert json.loads((curated / "index" / "exact" / "order.json").read_text()) == ["chat", "chat-extra"]


def test_a_real_gsm8k_problem_planted_in_a_web_source_is_removed_and_listed_under_gsm8k(raw_corpus, tmp_path):
    from mixlab.curation.decontam import gsm8k_eval_set

    gsm8k = gsm8k_eval_set(Downloads(default_cache_dir()))
    pages = _read_raw(raw_corpus / "web-en")
    planted, questions = {}, {}
    for k, page in enumerate(pages):
        question = gsm8k.items[k].text.split("\n", 1)[0]
        page["text"] = page["text"].replace("</body>", f"<p>A puzzle from a forum: {question}</p>\n</body>", 1)
        planted[page["id"]], questions[page["id"]] = gsm8k.items[k].id, question
    raw = tmp_path / "raw"
    _write_raw(raw / "web-en", pages)
    curated = tmp_path / "curated"
    manifest = curate(raw, curated, sources=["web-en"], tasks=2, workers=2, console=io.StringIO())

    entry = manifest.sources["web-en"]
    step = _step(entry, "decontamination")
    removed = step.dropped.get("contaminated:gsm8k", 0)
    assert removed >= 1 and step.docs_in == step.kept + sum(step.dropped.values())
    # no false negative: no page that passed the filter still holds its planted problem (13 words or more)
    def words(text: str) -> str:
        return " ".join(text.lower().split())

    passed = [json.loads(line) for path in (curated / "work" / "web-en" / "filtered").glob("*.jsonl.gz")
              for line in gzip.open(path, "rt", encoding="utf-8")]
    assert len(passed) == step.kept
    assert not [d["id"] for d in passed if len(questions[d["id"]].split()) >= 13
                and words(questions[d["id"]]) in words(d["text"])]
    summary = entry.metadata_summary["decontamination"]
    assert summary["removed"] == {"gsm8k": removed} and summary["eval_sets"] == ["gsm8k", "humaneval"]
    assert (curated / summary["index"]).is_file()
    matches = read_contamination_report(curated / summary["report"])
    assert len(matches) == removed
    for match in matches:  # each page matched the very problem planted into it
        assert match["eval_set"] == "gsm8k" and match["eval_item"] == planted[match["doc_id"]]
    assert not set(_output(curated, "web-en")) & {m["doc_id"] for m in matches}
    # reloaded from disk, the manifest still lists them; a changed eval set (GSM8K excluded) re-curates
    assert ShardManifest.load(curated).sources["web-en"].metadata_summary["decontamination"]["removed"] == {
        "gsm8k": removed}
    recipe = {"web-en": lambda r, c, n: web_pipeline(r, c, source="web-en", tasks=n, recipe=WebRecipe(
        decontam=DecontamSettings(exclude=("gsm8k",))))}
    again = curate(raw, curated, sources=["web-en"], tasks=2, workers=2, recipes=recipe, console=io.StringIO())
    assert "contaminated:gsm8k" not in _step(again.sources["web-en"], "decontamination").dropped
    assert again.sources["web-en"].docs >= entry.docs + removed - 1  # near-copies may still merge in MinHash


def test_decontam_settings_are_checked_and_the_index_is_built_once(tmp_path):
    with pytest.raises(CurationConfigError, match="unknown eval set"):
        DecontamSettings(eval_sets=("mmlu",))
    with pytest.raises(CurationConfigError, match="name no eval set"):
        DecontamSettings(exclude=("gsm8", ))
    settings = DecontamSettings(eval_sets=("humaneval",))
    path = decontam_index(tmp_path, settings)
    assert path is not None and path.parent == tmp_path / "index"
    mtime = path.stat().st_mtime_ns
    assert decontam_index(tmp_path, settings) == path and path.stat().st_mtime_ns == mtime
    assert decontam_index(tmp_path, DecontamSettings(eval_sets=("humaneval",), exclude=("humaneval",))) is None
    SourceLayout("web-en", tmp_path / "raw" / "web-en", tmp_path)  # the index folder is inside the curated dir


def test_demo_classifier_annotates_the_curated_shards_and_is_idempotent(raw_corpus, curated_dir, tmp_path):
    curated = tmp_path / "curated"
    shutil.copytree(curated_dir, curated)
    model = tmp_path / "classifiers" / DEMO_CLASSIFIER
    done = demo_classifier(curated, model)
    assert done["trained"] and done["annotated"] and "auc" in done["metrics"]
    field = score_field(DEMO_CLASSIFIER)
    manifest = ShardManifest.load(curated)
    means = {}
    for name, entry in manifest.sources.items():
        for shard in entry.shards:
            metadata = pq.read_table(manifest.resolve(shard.path), columns=["metadata"]).column("metadata")
            assert field in metadata.type.names, (name, shard.path)
        summary = entry.metadata_summary["scores"][field]
        assert summary["docs"] == entry.docs and summary["model_sha256"] == json.loads(
            (model / "card.json").read_text())["model_sha256"]
        means[name] = summary["mean"]
    assert means["math"] > 0.6 > 0.3 > max(means["web-en"], means["code-python"])

    checksums = {s.path: s.sha256 for e in manifest.sources.values() for s in e.shards}
    again = demo_classifier(curated, model)
    assert not again["trained"] and again["annotated"] == [] and again["metrics"] == done["metrics"]
    # a no-op re-curation keeps the annotated shards and their score summaries
    curate(raw_corpus, curated, tasks=2, workers=2, console=io.StringIO())
    after = ShardManifest.load(curated)
    assert {s.path: s.sha256 for e in after.sources.values() for s in e.shards} == checksums
    assert all(field in e.metadata_summary.get("scores", {}) for e in after.sources.values())
    assert demo_classifier(curated, model)["annotated"] == []
