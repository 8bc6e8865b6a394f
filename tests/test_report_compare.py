"""The comparison report on two real tiny runs (real curated corpus, tokenizer, sampler, torch), and the pure
functions behind its tables and mixture plot."""

from __future__ import annotations

import base64
import html.parser
from pathlib import Path

import pytest
import torch
from mixlab.ablations import (
    build_report,
    config_differences,
    epochs_per_source,
    flatten_config,
    select_runs,
    smoothed_mixture_shares,
    target_segments,
)
from mixlab.ablations.compare import stage_first_steps, training_tokens_at, with_interval
from mixlab.curation import ShardManifest
from mixlab.training import ModelConfig, RunRecord, TrainConfig

torch.set_num_threads(1)


class _Sources(html.parser.HTMLParser):
    """Every src= / href= in a page, with the tag it belongs to."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value is not None:
                self.refs.append((tag, name, value))


@pytest.fixture(scope="module")
def two_runs(tokenized_curated, tmp_path_factory) -> tuple[Path, list[RunRecord]]:
    """Two tiny real runs on the same data and mixture, differing only in their seed."""
    from mixlab.pipelines.demo import demo_schedule
    from mixlab.pipelines.pretrain import pretrain
    from mixlab.pipelines.run_config import RunConfig

    manifest = ShardManifest.load(tokenized_curated)
    schedule = demo_schedule({n for n, s in manifest.sources.items() if s.tokens.get("train")})
    model = ModelConfig.preset("tiny", vocab_size=manifest.tokenizer.vocab_size)
    runs_dir = tmp_path_factory.mktemp("compare") / "runs"
    done = []
    for seed in (0, 1):
        train = TrainConfig.preset("tiny", total_steps=16, warmup_steps=2, log_every=2, eval_every=8,
                                   checkpoint_every=16, seed=seed, threads=1, device="cpu", progress_bar=False)
        done.append(pretrain(RunConfig(tokenized_curated, runs_dir, f"seed-{seed}", schedule, model, train,
                                       tags={"recipe": "test", "seed": str(seed)})))
    return runs_dir, done


def test_two_run_report_is_self_contained_and_compares_the_runs(two_runs, tokenized_curated, tmp_path):
    runs_dir, runs = two_runs
    report = build_report([r.path for r in runs], tmp_path / "report", manifest_dir=tokenized_curated)
    page = report.html_path.read_text()
    assert report.run_ids == ["seed-0", "seed-1"]
    assert "seed-0" in page and "seed-1" in page

    # self-contained: every src is a data: URI whose base64 decodes to a PNG
    parser = _Sources()
    parser.feed(page)
    images = [value for tag, name, value in parser.refs if tag == "img"]
    assert len(images) == len(report.plots) >= 6
    assert all(value.startswith("data:") for _, name, value in parser.refs if name == "src")
    for value in images:
        assert value.startswith("data:image/png;base64,")
        assert base64.b64decode(value.split(",", 1)[1], validate=True)[:8] == b"\x89PNG\r\n\x1a\n"

    # the config diff lists the key that differs and none that is equal
    diff_start = page.index("<h2>Config differences</h2>")
    diff = page[diff_start:page.index("<h2>", diff_start + 4)]
    assert "<td>train.seed</td>" in diff and "<td>tags.seed</td>" in diff
    assert "train.lr" not in diff and "model.d_model" not in diff and "mixture.stages" not in diff

    # epochs per source: tokens served / the manifest's train tokens, shown per run
    manifest = ShardManifest.load(tokenized_curated)
    served = runs[0].metrics()[-1]["tokens_by_source"]
    epochs = epochs_per_source(served, manifest)
    source = max(served, key=served.get)
    assert epochs[source] == pytest.approx(served[source] / manifest.sources[source].tokens["train"])
    assert 0 < epochs[source] < 1
    section = page[page.index("<h2>Epochs per source</h2>"):]
    assert f"{epochs[source]:.3f}" in section[:section.index("<h2>", 4)]

    # eval numbers carry their bootstrap interval, in the table as `point [lo, hi]`
    final = {e["source"]: e for e in runs[1].evals() if e["step"] == 16}
    assert final["all"]["loss_lo"] <= final["all"]["loss"] <= final["all"]["loss_hi"]
    assert with_interval(final["all"], "bpb") in page


def test_select_runs_filters_by_pattern_tags_and_status(two_runs):
    runs_dir, _ = two_runs
    assert [r.run_id for r in select_runs(runs_dir)] == ["seed-0", "seed-1"]
    assert [r.run_id for r in select_runs(runs_dir, pattern="*-1")] == ["seed-1"]
    assert [r.run_id for r in select_runs(runs_dir, tags={"seed": 0})] == ["seed-0"]
    assert len(select_runs(runs_dir, status="completed")) == 2
    with pytest.raises(ValueError, match="no run matches.*seed-0 \\(completed\\)"):
        select_runs(runs_dir, status="failed")
    with pytest.raises(FileNotFoundError, match="no such runs directory"):
        select_runs(runs_dir / "missing")


def test_single_run_report_still_works_from_a_path(two_runs, tokenized_curated, tmp_path):
    _, runs = two_runs
    report = build_report(runs[0].path, tmp_path / "one", manifest_dir=tokenized_curated)
    page = report.html_path.read_text()
    assert "mixlab run <code>seed-0</code>" in page and "seed-1" not in page
    assert "Config differences" not in page and "went down" in page and "Counts add up" in page
    assert {"loss", "eval_by_step", "eval_by_tokens", "mixture", "funnel", "funnel_drops"} <= set(report.plots)


def test_flatten_config_and_differences_keep_only_differing_keys():
    a = {"train": {"lr": 0.003, "seed": 0}, "mixture": {"stages": [{"name": "s", "weights": {"web": 1.0}}]},
         "run_id": "a", "eval": {}}
    b = {"train": {"lr": 0.003, "seed": 1}, "mixture": {"stages": [{"name": "s", "weights": {"web": 2.0}}]},
         "run_id": "b", "eval": {}, "extra": True}
    assert flatten_config(a) == {"train.lr": 0.003, "train.seed": 0, "mixture.stages.0.name": "s",
                                 "mixture.stages.0.weights.web": 1.0, "run_id": "a", "eval": {}}
    diff = config_differences({"a": a, "b": b})
    assert diff["key"].to_list() == ["extra", "mixture.stages.0.weights.web", "train.seed"]
    assert diff.row(0) == ("extra", "(absent)", "true")
    assert config_differences({"a": a, "a2": dict(a, run_id="other")}).is_empty()
    # True is not 1 in a config
    assert config_differences({"x": {"flag": True}, "y": {"flag": 1}}).height == 1


def test_smoothed_shares_are_a_moving_window_over_cumulative_counts():
    # web gets 10 tokens per log interval, code 0 then 10: cumulative counts as the trainer logs them
    cumulative = [(10, 0), (20, 0), (30, 10), (40, 20), (50, 30)]
    metrics = [{"step": 2 * (i + 1), "tokens_by_source": {"web": w, "code": c}} for i, (w, c) in enumerate(cumulative)]
    shares = smoothed_mixture_shares(metrics, window=2)
    assert shares["step"].to_list() == [2, 4, 6, 8, 10]
    assert shares["code"].to_list() == pytest.approx([0.0, 0.0, 10 / 30, 20 / 40, 20 / 40])
    assert shares["web"].to_list() == pytest.approx([1.0, 1.0, 20 / 30, 0.5, 0.5])
    # window 1 is the plain per-interval share
    assert smoothed_mixture_shares(metrics, window=1)["code"].to_list() == pytest.approx([0, 0, 0.5, 0.5, 0.5])


def test_target_segments_use_logged_stage_switches_then_fractions():
    stages = [{"name": "stable", "fraction": 0.75, "weights": {"web": 3.0, "code": 1.0}},
              {"name": "decay", "fraction": 0.25, "weights": {"web": 1.0, "code": 1.0}}]
    metrics = [{"step": s, "stage": "stable" if s < 70 else "decay"} for s in range(10, 101, 10)]
    logged = target_segments(stages, 100, stage_first_steps(metrics))
    assert logged.select("stage", "start", "end").rows() == [("stable", 0, 70), ("decay", 70, 100)]
    assert logged["web"].to_list() == pytest.approx([0.75, 0.5])
    # a run that has not reached the decay stage yet: its start comes from the fractions
    early = target_segments(stages, 100, stage_first_steps(metrics[:3]))
    assert early.select("start", "end").rows() == [(0, 75), (75, 100)]


def test_training_tokens_at_interpolates_between_log_points():
    metrics = [{"step": 10, "tokens": 1000}, {"step": 20, "tokens": 2000}]
    assert training_tokens_at(metrics, [5, 10, 15, 20]) == pytest.approx([500, 1000, 1500, 2000])
