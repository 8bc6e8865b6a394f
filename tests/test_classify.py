"""`mixlab classify`: fastText quality classifiers on real documents (CPython's stdlib code vs its reference
prose, and the demo corpus's math vs web/code), the score annotator, and the threshold filter's accounting."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from mixlab.curation.accounting import merged_stage_stats, step_name, step_stats
from mixlab.curation.classify import (
    HELD_OUT_FILE,
    ClassifierScorer,
    ClassifierTrainConfig,
    ExampleSpec,
    ScoreThresholdFilter,
    load_classifier,
    normalise_text,
    roc_auc,
    scored_parquet_writer,
    train_classifier,
    train_preset,
)
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.manifest import ShardManifest
from mixlab.pipelines.cli import build_parser
from stdlib_corpus import build_curated_dir, stdlib_code_docs, stdlib_prose_docs


def _cli(argv: list[str]) -> str:
    """Run `mixlab classify …` (the parser `pipelines/cli.py` mounts) and return what it printed."""
    args = build_parser("classify").parse_args(["classify", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def _printed(text: str, name: str) -> float:
    return float(re.search(rf"\b{name} ([0-9.]+)", text).group(1))


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def stdlib_curated(tmp_path_factory) -> Path:
    return build_curated_dir(tmp_path_factory.mktemp("stdlib") / "curated")


@pytest.fixture(scope="module")
def code_model(stdlib_curated: Path, tmp_path_factory) -> tuple[Path, str]:
    """code vs prose, trained through the CLI; returns the model directory and what `train` printed."""
    out = tmp_path_factory.mktemp("models") / "code"
    printed = _cli(["train", "--name", "code", "--curated", str(stdlib_curated), "--positive", "source:code",
                    "--negative", "source:prose", "--out", str(out), "--max-words", "300", "--bucket", "20000"])
    return out, printed


def test_printed_metrics_equal_hand_computed_ones_on_held_out(stdlib_curated: Path, code_model):
    out, printed = code_model
    classifier = load_classifier(out)
    texts = {f"source:code/code/{d['id']}": d["text"] for d in stdlib_code_docs()}
    texts |= {f"source:prose/prose/{d['id']}": d["text"] for d in stdlib_prose_docs()}
    rows = [json.loads(line) for line in (out / HELD_OUT_FILE).read_text().splitlines()]
    card = classifier.card
    assert len(rows) == card["sizes"]["held_out"]["positive"] + card["sizes"]["held_out"]["negative"] >= 40
    # the stored scores are the saved model's scores of those documents' raw text
    rescored = classifier.score([texts[r["id"]] for r in rows])
    assert rescored == pytest.approx([r["score"] for r in rows], abs=1e-6)
    assert all(r["positive"] == r["id"].startswith("source:code/") for r in rows)
    # precision, recall and AUC by hand, from the definitions
    tp = sum(1 for r in rows if r["positive"] and r["score"] >= 0.5)
    fp = sum(1 for r in rows if not r["positive"] and r["score"] >= 0.5)
    fn = sum(1 for r in rows if r["positive"] and r["score"] < 0.5)
    pos = [r["score"] for r in rows if r["positive"]]
    neg = [r["score"] for r in rows if not r["positive"]]
    auc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert _printed(printed, "precision") == pytest.approx(tp / (tp + fp), abs=5e-5)
    assert _printed(printed, "recall") == pytest.approx(tp / (tp + fn), abs=5e-5)
    assert _printed(printed, "auc") == pytest.approx(auc, abs=5e-5)
    assert card["metrics"]["auc"] == pytest.approx(auc, abs=1e-12)
    assert auc > 0.9  # code vs English prose is separable
    assert card["positives"] == ["source:code"] and card["negatives"] == ["source:prose"]
    assert card["sizes"]["train"]["positive"] == card["sizes"]["train"]["negative"]  # balanced by default


def test_shuffled_labels_give_chance_auc(tmp_path: Path):
    docs = stdlib_code_docs() + stdlib_prose_docs()
    aucs, shas = [], []
    for seed in range(3):
        shuffled = list(docs)
        random.Random(seed).shuffle(shuffled)
        half = len(shuffled) // 2
        positives = _write_jsonl(tmp_path / f"a{seed}.jsonl", shuffled[:half])
        negatives = _write_jsonl(tmp_path / f"b{seed}.jsonl", shuffled[half:])
        config = ClassifierTrainConfig(name="noise", held_out_fraction=0.5, seed=seed, max_words=300, bucket=20_000)
        result = train_classifier([ExampleSpec("file", str(positives))], [ExampleSpec("file", str(negatives))],
                                  tmp_path / f"m{seed}", config)
        aucs.append(result.metrics.auc)
        shas.append(result.card["model_sha256"])
    assert abs(sum(aucs) / len(aucs) - 0.5) < 0.15, aucs
    # the same data and seed give the same model, also after several trainings in one process (fastText's own
    # in-process training drifted from the fourth call on; `_fit` trains in a child interpreter)
    again = train_classifier([ExampleSpec("file", str(tmp_path / "a0.jsonl"))],
                             [ExampleSpec("file", str(tmp_path / "b0.jsonl"))], tmp_path / "again",
                             ClassifierTrainConfig(name="noise", held_out_fraction=0.5, seed=0, max_words=300,
                                                   bucket=20_000))
    assert again.card["model_sha256"] == shas[0]


def test_roc_auc_equals_pair_counting_with_ties():
    rng = random.Random(7)
    labels = [rng.random() < 0.4 for _ in range(300)]
    scores = [round(rng.random() + (0.3 if y else 0.0), 1) for y in labels]  # rounding makes many ties
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_annotate_and_threshold_counts_add_up(code_model, tmp_path: Path):
    model_dir, _ = code_model
    docs = stdlib_code_docs()[:40] + stdlib_prose_docs()[:60]
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_jsonl(raw / "docs.jsonl", docs)
    scorer = ClassifierScorer(model_dir)
    threshold = ScoreThresholdFilter("code_score", min_score=0.5)
    pipeline = [JsonlReader(str(raw)), scorer, threshold, scored_parquet_writer(str(tmp_path / "out"), ["code_score"])]
    LocalPipelineExecutor(pipeline, tasks=1, workers=1, logging_dir=str(tmp_path / "logs")).run()

    stats = step_stats(step_name(threshold), merged_stage_stats(tmp_path / "logs").stats[2].stats)
    assert step_name(threshold) == "score_threshold_filter"
    scores = load_classifier(model_dir).score([d["text"] for d in docs])
    below = sum(1 for s in scores if s < 0.5)
    assert stats.docs_in == len(docs) and stats.dropped == {"code_score_below": below}
    assert stats.kept + stats.dropped_total == stats.docs_in and 0 < below < len(docs)
    table = pq.read_table(next((tmp_path / "out").glob("*.parquet")))
    kept = table.column("metadata").to_pylist()
    assert len(kept) == stats.kept and all(m["code_score"] >= 0.5 for m in kept)
    assert {m["code_score"] for m in kept} <= set(scores)

    missing = ScoreThresholdFilter("code_score", min_score=0.1, max_score=0.9)
    out = list(missing.run(iter([Document(text="x", id="a", metadata={}),
                                 Document(text="y", id="b", metadata={"code_score": 0.95}),
                                 Document(text="z", id="c", metadata={"code_score": 0.5})])))
    assert [d.id for d in out] == ["c"]
    counted = step_stats("score_threshold_filter", missing.stats.stats)
    assert (counted.docs_in, counted.kept) == (3, 1)
    assert counted.dropped == {"code_score_above": 1, "code_score_missing": 1}


def test_annotate_curated_keeps_scores_in_shards_manifest_and_selections(code_model, tmp_path: Path):
    from mixlab.curation.token_shards import tokenize_manifest
    from mixlab.curation.tokenizer import TokenizerConfig, train_tokenizer
    from mixlab.mixtures.selection import Selection, open_selection

    model_dir, _ = code_model
    curated = build_curated_dir(tmp_path / "curated")
    printed = _cli(["annotate", "--model", str(model_dir), "--curated", str(curated)])
    assert "code: " in printed and "prose: " in printed
    manifest = ShardManifest.load(curated)
    assert manifest.verify_checksums() == []  # rewritten shards are recorded with their new checksums
    classifier = load_classifier(model_dir)
    for entry in manifest.sources.values():
        shards = [pq.read_table(manifest.resolve(s.path)) for s in entry.shards]
        scores = [m["code_score"] for t in shards for m in t.column("metadata").to_pylist()]
        texts = [x for t in shards for x in t.column("text").to_pylist()]
        assert scores == pytest.approx(classifier.score(texts), abs=1e-9)
        summary = entry.metadata_summary["scores"]["code_score"]
        assert summary["docs"] == entry.docs == sum(summary["histogram"].values())
        assert summary["mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    means = {name: entry.metadata_summary["scores"]["code_score"]["mean"] for name, entry in manifest.sources.items()}
    assert means["code"] > 0.5 > means["prose"] and means["code"] - means["prose"] > 0.4, means

    # the score reaches the token sidecars, so a selection can filter on it
    train_tokenizer(curated, TokenizerConfig(vocab_size=300), show_progress=False)
    tokenize_manifest(curated, show_progress=False)
    sidecar_scores = []
    for split in ("train", "val"):
        view = open_selection(curated, Selection("codey", "*", {"code_score": {"min": 0.5}}), split)
        sidecar_scores.append(view.num_docs)
    all_scores = [m["code_score"] for entry in ShardManifest.load(curated).sources.values() for s in entry.shards
                  for m in pq.read_table(manifest.resolve(s.path)).column("metadata").to_pylist()]
    assert sum(sidecar_scores) == sum(1 for s in all_scores if s >= 0.5)


def test_selection_and_file_specs_name_the_right_documents(stdlib_curated: Path, tmp_path: Path):
    paths = [d["metadata"]["path"] for d in stdlib_code_docs()[:30]]
    selection = json.dumps({"name": "some", "source": "code", "where": {"path": paths}})
    prose = _write_jsonl(tmp_path / "prose.jsonl", stdlib_prose_docs()[:30])
    config = ClassifierTrainConfig(name="code", epoch=5)
    result = train_classifier([ExampleSpec.parse(f"selection:{selection}")], [ExampleSpec.parse(f"file:{prose}")],
                              tmp_path / "m", config, stdlib_curated)
    assert result.card["sizes"]["distinct_examples"] == {"positive": 30, "negative": 30}
    assert all(e.id.startswith("selection:") == e.positive for e, _ in result.held_out)
    assert normalise_text("A  b\n\tC d", 3) == "a b c"


def test_math_vs_not_preset_on_the_demo_corpus(curated_dir: Path, tmp_path: Path):
    result = train_preset("math-vs-not", curated_dir, tmp_path / "math")
    card = result.card
    assert card["positives"] == ["source:math"]
    assert "source:code-python" in card["negatives"] and "source:web-en" in card["negatives"]
    assert card["score_field"] == "math_score" and result.metrics.auc > 0.9


def test_bad_input_is_refused_with_the_field(stdlib_curated: Path, tmp_path: Path):
    with pytest.raises(CurationConfigError, match="source:NAME") as err:
        ExampleSpec.parse("math", "--positive")
    assert err.value.fields == ("--positive",)
    with pytest.raises(CurationConfigError, match="lowercase"):
        ClassifierTrainConfig(name="Math-1")
    with pytest.raises(CurationConfigError, match="no curated source matches"):
        train_classifier([ExampleSpec("source", "nope-*")], [ExampleSpec("source", "prose")], tmp_path / "m",
                         ClassifierTrainConfig(name="x"), stdlib_curated)
    with pytest.raises(CurationConfigError, match="at least 2 per class"):
        one = _write_jsonl(tmp_path / "one.jsonl", stdlib_code_docs()[:1])
        train_classifier([ExampleSpec("file", str(one))], [ExampleSpec("source", "prose")], tmp_path / "m",
                         ClassifierTrainConfig(name="x"), stdlib_curated)
    with pytest.raises(CurationConfigError, match="unknown metadata field"):
        bad = json.dumps({"name": "s", "source": "code", "where": {"nope": 1}})
        train_classifier([ExampleSpec("selection", bad)], [ExampleSpec("source", "prose")], tmp_path / "m",
                         ClassifierTrainConfig(name="x"), stdlib_curated)
    with pytest.raises(CurationConfigError, match="not a classifier directory"):
        load_classifier(tmp_path)


def test_curation_imports_nothing_from_the_layers_above():
    """curation is the lowest layer: no module of it imports mixtures, training or ablations, at module level
    or inside a function (the one exception: decontam's loader of the ablation tasks' eval sets)."""
    import ast

    import mixlab.curation as curation

    above = ("mixlab.mixtures", "mixlab.training", "mixlab.ablations")
    allowed = {("decontam.py", "mixlab.ablations.tasks")}
    found = []
    for path in sorted(Path(curation.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(path.name, n) for n in names if n.startswith(above) and (path.name, n) not in allowed]
    assert found == []


def test_selection_specs_filter_with_the_mixture_selections_semantics(tmp_path: Path):
    """A `selection:` spec (curation) and a mixture `Selection` pick the same rows: one `MetadataQuery`."""
    import pyarrow as pa
    from mixlab.curation.classify import _load_selection
    from mixlab.curation.metadata_filter import MetadataFilterError, MetadataQuery
    from mixlab.mixtures.selection import Selection, SelectionError

    table = pa.table({"language": ["en", "fr", None, "en"], "language_score": [0.95, 0.99, 0.5, 0.7]})
    data = {"name": "en", "source": "web-*", "where": {"language": "en", "language_score": {"min": 0.9}},
            "long_docs": {"min_tokens": 10, "factor": 2}}
    spec = ExampleSpec.parse(f"selection:{json.dumps(data)}")
    query, selection = _load_selection(spec.value, spec), Selection.from_dict(data)
    assert isinstance(selection, MetadataQuery) and issubclass(SelectionError, MetadataFilterError)
    assert query.mask(table, "web-en").tolist() == selection.mask(table, "web-en").tolist() == [True, False, False,
                                                                                                 False]
    with pytest.raises(CurationConfigError, match="selection 'en': where\\['language'\\]"):
        bad = json.dumps({**data, "where": {"language": []}})
        _load_selection(bad, ExampleSpec.parse(f"selection:{bad}"))
