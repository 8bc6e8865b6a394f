"""The report's data shaping and HTML, on a run directory written through the real RunRecord API."""

from __future__ import annotations

import pytest
from mixlab.ablations import build_report, final_evals, mixture_shares
from mixlab.curation import ShardFile, ShardManifest, SourceEntry, StepStats
from mixlab.training import RunStore


def test_mixture_shares_are_interval_differences_of_cumulative_counts():
    metrics = [
        {"step": 10, "tokens_by_source": {"web": 80, "code": 20}},
        {"step": 20, "tokens_by_source": {"web": 130, "code": 70}},
    ]
    shares = mixture_shares(metrics)
    assert shares["step"].to_list() == [10, 20]
    assert shares["web"].to_list() == pytest.approx([0.8, 0.5])
    assert shares["code"].to_list() == pytest.approx([0.2, 0.5])


def test_final_evals_takes_last_step_only():
    evals = [
        {"step": 5, "source": "web", "loss": 3.0, "bpb": 1.5},
        {"step": 9, "source": "web", "loss": 2.0, "bpb": 1.0},
        {"step": 9, "source": "code", "loss": 1.0, "bpb": 0.5},
    ]
    frame = final_evals(evals)
    assert frame["source"].to_list() == ["code", "web"]
    assert frame["loss"].to_list() == [1.0, 2.0]


def test_build_report_writes_html_and_plots(tmp_path):
    manifest = ShardManifest(
        sources={
            "web-en": SourceEntry(
                name="web-en",
                kind="web",
                docs=7,
                bytes=700,
                shards=[ShardFile(path="web-en/00000.parquet", docs=7, bytes=700, sha256="0")],
                steps=[
                    StepStats("extract", docs_in=10, kept=9, dropped={"empty": 1}),
                    StepStats("minhash", docs_in=9, kept=7, dropped={"duplicate": 2}),
                ],
            )
        }
    )
    manifest.save(tmp_path / "curated")
    run = RunStore(tmp_path / "runs").create("r1", {"manifest_dir": str(tmp_path / "curated")})
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.5)]:
        run.log_metrics(step, loss=loss, stage="stable" if step < 3 else "decay", tokens_by_source={"web-en": 100 * step})
    run.log_eval(3, "web-en", loss=3.4, bpb=1.2, tokens=50)
    run.log_eval(3, "all", loss=3.4, bpb=1.2, tokens=50)

    report = build_report(run.path, tmp_path / "report")
    text = report.html_path.read_text()
    assert "went down" in text
    assert "Counts add up" in text
    assert "duplicate: 2" in text
    assert "No config key differs" not in text  # one run: nothing to compare, no such section
    assert set(report.plots) == {"loss", "eval_by_step", "eval", "mixture", "funnel", "funnel_drops"}
    for png in report.plots.values():
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # epochs per source: 300 tokens served / the manifest's (absent) train tokens -> not known
    assert "Epochs per source" in text


def test_mixture_shares_merges_intervals_without_losing_tokens():
    metrics = [{"step": s, "tokens_by_source": {"web": 10 * s, "code": 30 * s}} for s in range(1, 11)]
    shares = mixture_shares(metrics, max_points=3)
    assert shares["step"].to_list() == [4, 8, 10]
    assert shares["web"].to_list() == pytest.approx([0.25] * 3)


def test_re_evaluating_a_step_replaces_its_rows(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    run.log_eval(10, "web", loss=2.0)
    run.log_eval(10, "code", loss=1.0)
    run.log_eval(10, "web", loss=1.5)
    assert [(e["source"], e["loss"]) for e in run.evals()] == [("web", 1.5), ("code", 1.0)]
    assert RunStore(tmp_path).evals_frame().height == 2
