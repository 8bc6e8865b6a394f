"""The main job, `run_demo`, end to end at test size: every stage runs and the report says what happened."""

from __future__ import annotations

import shutil

from conftest import TEST_MAX_MB, TEST_WORKDIR
from mixlab.pipelines.demo import DemoConfig, run_demo


def test_demo_runs_every_stage_and_prints_the_report_path(curated_dir, tmp_path, capsys):
    work = tmp_path / "demo"
    # the test corpus, raw and curated: fetch and curate find their work done and skip it (idempotence)
    shutil.copytree(TEST_WORKDIR, work)
    report = run_demo(DemoConfig(workdir=work, max_mb=TEST_MAX_MB, vocab_size=600, model_preset="tiny",
                                 train_preset="tiny", steps=24))
    out = capsys.readouterr().out
    assert f"Report: {report.resolve()}" in out
    assert "held-out" in out  # the leakage check ran and said so
    html = report.read_text()
    assert "went down" in html and "Counts add up" in html
    for plot in ("loss.png", "eval_bpb.png", "mixture.png", "curation.png"):
        assert (report.parent / plot).stat().st_size > 1000
