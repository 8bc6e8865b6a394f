"""Cloze downstream tasks: built from held-out documents only, deterministic, scored per character, and a model
trained for a few dozen steps moves their margin."""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mixlab.ablations.tasks import (
    ClozeEvaluator,
    ClozeItem,
    ClozeTask,
    TaskFileError,
    build_tasks,
    load_tasks,
)
from mixlab.curation import ShardManifest, TokenizeConfig, load_tokenizer, split_source
from mixlab.training.model import ModelConfig, Transformer

FIXTURE_SPLIT = TokenizeConfig(val_fraction=0.05)  # what the `tokenized_curated` fixture tokenized with


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def documents(tokenized_curated: Path) -> dict[str, dict[str, dict[str, str]]]:
    """Per source, the text of every validation and every training document, split here by the fixture's own
    settings (not by what the builders read from the manifest)."""
    manifest = ShardManifest.load(tokenized_curated)
    out = {}
    for name, source in manifest.sources.items():
        val_ids = split_source(manifest, name, FIXTURE_SPLIT).val_ids
        split: dict[str, dict[str, str]] = {"val": {}, "train": {}}
        for shard in source.shards:
            for row in pq.read_table(manifest.resolve(shard.path), columns=["id", "text"]).to_pylist():
                if row["text"]:
                    split["val" if row["id"] in val_ids else "train"][row["id"]] = row["text"]
        out[name] = split
    return out


@pytest.fixture(scope="module")
def built(tokenized_curated: Path, tmp_path_factory) -> tuple[Path, list[ClozeTask]]:
    folder = tmp_path_factory.mktemp("tasks") / "default"
    return folder, build_tasks(tokenized_curated, folder)


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_items_come_from_held_out_documents_only(built, documents):
    folder, tasks = built
    names = {t.name for t in tasks}
    assert {"gsm8k", "code-completion-python", "dialogue-response"} <= names
    assert any(n.startswith("next-sentence-") for n in names)
    index = json.loads((folder / "tasks.json").read_text())
    for reason in index["skipped"].values():  # a task with too few items is skipped with its reason
        assert "< 8" in reason
    for task, entry in zip(tasks, index["tasks"], strict=True):
        assert entry["name"] == task.name and entry["items"] == len(task.items) <= 1000
        assert entry["chance"] == pytest.approx(0.25) and entry["source"] == task.source
        split = documents[task.source]
        train_text = _norm("\n".join(split["train"].values()))
        for item in task.items:
            assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.answer < 4
            assert item.doc_id not in split["train"], f"{task.name}: item from training document {item.doc_id}"
            for doc, choice in zip(item.choice_docs, item.choices, strict=True):
                assert doc is None or doc in split["val"] or (task.name == "gsm8k" and doc == item.doc_id)
                if doc is not None and doc != item.doc_id:
                    assert _norm(choice) in _norm(split["val"][doc])  # a distractor is text of its own document
            if task.kind == "gsm8k":
                question = item.context.removeprefix("Question: ").removesuffix("\nAnswer:")
                assert item.context.startswith("Question: ") and item.context.endswith("\nAnswer:")
                assert _norm(question) not in train_text
                assert item.correct.startswith(" ") and item.correct.strip().lstrip("-").isdigit()
                assert all(d.strip().lstrip("-").isdigit() for d in item.distractors)
                if item.doc_id in split["val"]:
                    final = split["val"][item.doc_id].rstrip().rpartition("####")[2]
                    assert final.strip().replace(",", "") == item.correct.strip()  # "#### 114,200" -> " 114200"
            else:
                source_text = split["val"][item.doc_id]
                assert _norm(item.context + item.correct) in _norm(source_text)  # context, then the real next part
                assert item.choice_docs[item.answer] == item.doc_id
                assert _norm(item.context[-40:] + item.correct) not in train_text  # never trained on in this context
    code = next(t for t in tasks if t.kind == "code-completion")
    assert all(len(item.correct.strip()) >= 10 for item in code.items)


def test_gsm8k_without_the_test_file_uses_validation_and_raw_problems(tokenized_curated, raw_corpus, documents,
                                                                      tmp_path):
    missing = tmp_path / "no-such" / "test.jsonl"
    val_only = build_tasks(tokenized_curated, tmp_path / "val", gsm8k_file=missing)
    gsm8k = next(t for t in val_only if t.name == "gsm8k")
    assert {i.doc_id for i in gsm8k.items} <= set(documents["math"]["val"])  # no other held-out problem here
    notes = json.loads((tmp_path / "val" / "tasks.json").read_text())["counts"]["gsm8k"]["notes"]
    assert any("not found" in n for n in notes)  # the builder says what it could not use
    with_raw = build_tasks(tokenized_curated, tmp_path / "raw", gsm8k_file=missing, raw_dir=raw_corpus)
    raw_gsm8k = next(t for t in with_raw if t.name == "gsm8k")
    raw_ids = set()
    for path in (raw_corpus / "math").glob("*.jsonl.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            raw_ids |= {json.loads(line)["id"] for line in handle}
    held_out = {i for i in raw_ids if "gsm8k" in i} - set(documents["math"]["train"])  # dropped by curation or val
    counts = json.loads((tmp_path / "raw" / "tasks.json").read_text())["counts"]["gsm8k"]
    assert {i.doc_id for i in raw_gsm8k.items} <= held_out
    assert len(raw_gsm8k.items) == len(held_out) - counts["seen_in_train"] - counts["no_distractors"]
    assert {i.doc_id for i in gsm8k.items} <= {i.doc_id for i in raw_gsm8k.items}


def test_builds_are_deterministic_and_smaller_builds_are_prefixes(tokenized_curated, built, tmp_path):
    folder, tasks = built
    again = build_tasks(tokenized_curated, tmp_path / "again")
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert files == sorted(p.name for p in (tmp_path / "again").iterdir() if not p.name.startswith("."))
    for name in files:
        assert (folder / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    small = {t.name: t for t in build_tasks(tokenized_curated, tmp_path / "small", max_items=12)}
    for task in tasks:
        assert small[task.name].items == task.items[:12]  # the first k items of a bigger build are a sample
    assert [t.name for t in again] == [t.name for t in tasks]


def test_load_tasks_reads_back_and_refuses_changed_or_broken_files(built, tmp_path):
    folder, tasks = built
    loaded = load_tasks(folder)
    assert [(t.name, t.kind, t.source, t.items) for t in loaded] == [(t.name, t.kind, t.source, t.items) for t in tasks]
    assert [t.name for t in load_tasks(folder, names=["gsm8k"])] == ["gsm8k"]
    with pytest.raises(TaskFileError, match="no task"):
        load_tasks(folder, names=["hellaswag"])
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.glob("*.json*"):
        (copy / path.name).write_bytes(path.read_bytes())
    target = copy / "gsm8k.jsonl"
    lines = target.read_text().splitlines()
    record = json.loads(lines[0])
    record["answer"] = (record["answer"] + 1) % 4
    target.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(TaskFileError, match=r"gsm8k\.jsonl: content checksum"):
        load_tasks(copy)
    target.write_text("\n".join([lines[0], '{"context": "x", "choices": ["a"], "answer": 0, "doc_id": "d"}']) + "\n")
    with pytest.raises(TaskFileError, match=r"gsm8k\.jsonl:2: not a valid cloze item"):
        load_tasks(copy)


def test_scores_are_log_likelihood_per_character_of_the_continuation(tokenized_curated):
    tokenizer = load_tokenizer(ShardManifest.load(tokenized_curated).resolve("tokenizer/tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.get_vocab_size()))
    long, short = " the the the the the the", "!"
    context = "def main():\n    print('hello, world') and a much longer context " * 3
    items = [ClozeItem(context, (long, short), 0, "a"), ClozeItem(context, (short, long), 1, "b"),
             ClozeItem(context, (short, long), 0, "c")]
    task = ClozeTask("normalisation", "constructed", "none", items)
    scorer = ClozeEvaluator([task], tokenizer, max_seq_len=16, batch_size=2, prefix_token=eos)
    totals = scorer.pair_logprobs(model)
    # the same numbers from one unpadded forward pass per pair, context cut from the left to 16 + 1 tokens
    for k, (item_index, choice) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        item = items[item_index]
        cont = tokenizer.encode(item.choices[choice], add_special_tokens=False).ids
        seq = ([eos] + tokenizer.encode(context, add_special_tokens=False).ids + cont)[-17:]
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq[:-1]]))
        logp = torch.log_softmax(logits[0, -len(cont):], dim=-1)
        expected = logp.gather(1, torch.tensor(seq[-len(cont):]).unsqueeze(1)).sum().item()
        assert totals[k] == pytest.approx(expected, abs=1e-4)
    # the long choice has the lower total log-probability but the higher one per character: it must win
    total_long, total_short = totals[0], totals[1]
    assert total_long < total_short and total_long / len(long) > total_short / len(short)
    row = scorer.evaluate(model)[0]
    assert row["items"] == 3 and row["chance"] == 0.5
    assert row["accuracy"] == pytest.approx(2 / 3)  # items a and b pick the long one; c says short is right
    per_char = total_long / len(long) - total_short / len(short)
    assert row["margin"] == pytest.approx((per_char + per_char - per_char) / 3, rel=1e-6)


def test_untrained_is_near_chance_and_training_moves_the_margin(tokenized_curated, tmp_path):
    from mixlab.pipelines.pretrain import pretrain
    from mixlab.pipelines.run_config import run_config_from_document
    from mixlab.training import RunRecord

    scorer = ClozeEvaluator.for_curated(tokenized_curated, max_seq_len=64, max_items=200)
    index = tokenized_curated / "tasks" / "tasks.json"
    built_at = index.stat().st_mtime_ns
    assert ClozeEvaluator.for_curated(tokenized_curated, max_seq_len=64, max_items=100).names == scorer.names
    assert index.stat().st_mtime_ns == built_at  # tasks of the same data are reused, not rebuilt
    torch.manual_seed(0)
    untrained = Transformer(ModelConfig.preset("tiny", vocab_size=600))
    started = time.perf_counter()
    rows = {r["task"]: r for r in scorer.evaluate(untrained)}
    seconds = time.perf_counter() - started
    pairs = sum(len(i.choices) for t in scorer.tasks for i in t.items)
    print(f"\ncloze eval of an untrained tiny model: {pairs} pairs in {seconds:.2f}s on 1 thread")
    assert untrained.training  # train mode is restored
    big = [r for r in rows.values() if r["items"] >= 100]
    right = sum(r["accuracy"] * r["items"] for r in big) / sum(r["items"] for r in big)
    assert abs(right - 0.25) < 0.1, rows

    document = {
        "run_id": "tasks", "runs_dir": str(tmp_path / "runs"), "data": {"curated": str(tokenized_curated)},
        "mixture": {"stages": [{"name": "all", "weights": {"chat": 0.25, "code-python": 0.25, "math": 0.25,
                                                           "web-de": 0.25}}]},
        "model": {"preset": "tiny"},
        "train": {"preset": "tiny", "total_steps": 40, "eval_every": 40, "checkpoint_every": 40, "progress_bar": False},
        "eval": {"tasks": "all", "task_items": 200, "windows_per_source": 8},
    }
    record = pretrain(run_config_from_document(document, vocab_size=600))
    trained = {r["task"]: r for r in RunRecord.load(record.path).tasks() if r["step"] == 40}
    assert set(trained) == set(rows)
    for name, row in trained.items():
        assert row["items"] == rows[name]["items"] and row["chance"] == rows[name]["chance"]
        assert 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["margin"])
    gains = {name: trained[name]["margin"] - rows[name]["margin"] for name in rows}
    assert max(gains.values()) > 0.02, gains
