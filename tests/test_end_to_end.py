"""The whole loop through the CLI on the small real test corpus: tokenize → mix → train → eval → report,
then a resume that continues instead of restarting."""

from __future__ import annotations

import json
import shutil

import pytest
from mixlab.curation import ShardManifest
from mixlab.pipelines.cli import main
from mixlab.training import RunRecord


@pytest.fixture(scope="module")
def tokenized_dir(curated_dir, tmp_path_factory):
    """A private copy of the shared curated fixture, tokenized with a small vocabulary."""
    work = tmp_path_factory.mktemp("e2e") / "curated"
    shutil.copytree(curated_dir, work)
    assert main(["tokenize", "--curated", str(work), "--vocab-size", "600", "--val-fraction", "0.05"]) == 0
    return work


def _train_args(curated, runs, run_id, steps):
    return ["train", "--curated", str(curated), "--runs", str(runs), "--run-id", run_id,
            "--model-preset", "tiny", "--train-preset", "tiny", "--steps", str(steps)]


def test_tokenize_records_tokens_for_every_pretraining_source(tokenized_dir):
    manifest = ShardManifest.load(tokenized_dir)
    assert manifest.tokenizer is not None and manifest.tokenizer.vocab_size == 600
    for name in ("web-en", "code-python", "math"):
        src = manifest.source(name)
        assert src.tokens["train"] > 1000 and src.tokens["val"] > 0, name
    assert manifest.verify_checksums() == []
    assert manifest.check() == []


def test_mix_preview_prints_plan(tokenized_dir, capsys):
    assert main(["mix", "--curated", str(tokenized_dir), "--train-preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "stage 'stable'" in out and "stage 'decay'" in out and "code-python" in out


def test_train_eval_report_and_resume(tokenized_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(_train_args(tokenized_dir, runs, "e2e", 40)) == 0
    run = RunRecord.load(runs / "e2e")
    assert run.status == "completed"
    losses = [m["loss"] for m in run.metrics()]
    assert losses[-1] < losses[0] - 0.5, f"loss did not go down: {losses}"
    sources = {e["source"] for e in run.evals()}
    assert {"web-en", "code-python", "math", "all"} <= sources
    # the mixture schedule reached its decay stage and the sampler served several sources
    assert {m.get("stage") for m in run.metrics()} == {"stable", "decay"}
    assert len(run.metrics()[-1]["tokens_by_source"]) >= 3

    # standalone eval of the latest checkpoint reproduces the logged final eval
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 0
    table = capsys.readouterr().out
    final = {e["source"]: e for e in run.evals() if e["step"] == 40}
    assert f"{final['math']['loss']:8.4f}" in table
    assert run.config["train"]["seq_len"] == 64 and "loss by position" not in table  # one bucket: no line

    out = tmp_path / "report"
    assert main(["report", "--run", str(run.path), "--out", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "went down" in html and "Counts add up" in html and "mixture.png" in html

    # extending the run resumes from step 40 instead of starting over
    assert main(_train_args(tokenized_dir, runs, "e2e", 50)) == 0
    steps = [m["step"] for m in RunRecord.load(runs / "e2e").metrics()]
    assert steps == sorted(set(steps)) and steps[-1] == 50
    assert json.loads((runs / "e2e" / "run.json").read_text())["status"] == "completed"


def test_cli_errors_say_what_is_wrong_without_a_traceback(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "missing-run")]) == 2
    assert "no run.json" in capsys.readouterr().err
    (tmp_path / "curated").mkdir()
    assert main(["mix", "--curated", str(tmp_path / "curated")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixlab mix: error:") and "mixlab curate" in err


def test_eval_refuses_shards_made_by_another_tokenizer(tokenized_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(_train_args(tokenized_dir, runs, "tok", 12)) == 0
    other = tmp_path / "retokenized"
    shutil.copytree(tokenized_dir, other)
    assert main(["tokenize", "--curated", str(other), "--vocab-size", "500"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(runs / "tok"), "--curated", str(other)]) == 2
    assert "tokenizer" in capsys.readouterr().err
