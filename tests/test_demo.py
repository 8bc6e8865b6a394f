"""The main job, `run_demo`, end to end at test size: every stage runs, a second run is trained on another
mixture, and the report compares the two on one self-contained page."""

from __future__ import annotations

import re
import shutil

from conftest import TEST_MAX_MB, TEST_WORKDIR
from mixlab.pipelines.demo import DemoConfig, run_demo
from mixlab.training import RunStore


def test_demo_runs_every_stage_compares_two_runs_and_prints_the_report_path(curated_dir, tmp_path, capsys):
    work = tmp_path / "demo"
    # the test corpus, raw and curated: fetch and curate find their work done and skip it (idempotence)
    shutil.copytree(TEST_WORKDIR, work)
    report = run_demo(DemoConfig(workdir=work, max_mb=TEST_MAX_MB, vocab_size=600, model_preset="tiny",
                                 train_preset="tiny", steps=24, compare_steps=12))
    captured = capsys.readouterr()
    out = captured.out
    assert out.rstrip().endswith(f"Report: {report.resolve()}")
    assert "held-out" in out  # the leakage check ran and said so
    assert "run demo: completed at step 24/24" in out and "run demo-web-heavy: completed at step 12/12" in out
    # curation: exactly one line per source (curate() prints them), no datatrove stats or log lines
    console = captured.out + captured.err
    for source in ("web-en", "code-python", "math", "chat"):
        assert len(re.findall(rf"^\s+{source}\s+[\d,]+ docs read", console, flags=re.M)) == 1, source
    assert "| INFO" not in console and "Stats" not in console

    runs = {r.run_id: r for r in RunStore(work / "runs").runs()}
    assert runs["demo"].config["mixture"]["stages"][0]["name"] == "stable"
    assert runs["demo-web-heavy"].config["mixture"]["stages"][0]["name"] == "web-heavy"
    # a run shorter than the preset's warms up over a sixth of it (the tiny preset's 10 steps would not fit 12)
    assert [runs[r].config["train"]["warmup_steps"] for r in ("demo", "demo-web-heavy")] == [4, 2]
    html = report.read_text()
    assert "demo-web-heavy" in html and "Config differences" in html and "Epochs per source" in html
    assert "Counts add up" in html
    sources = re.findall(r"<img[^>]*src=['\"]([^'\"]+)", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # mailable as one file
