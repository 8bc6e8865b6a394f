"""SmolLM3's shipped stages, projected onto the demo sources, planned and trained at proxy scale."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from mixlab.mixtures import MixtureSchedule, PlanError, PlanLimits, ScheduleError
from mixlab.mixtures.planner import plan_for_manifest
from mixlab.pipelines.smollm3 import (
    PRETRAINING_CONFIG,
    LongContextStage,
    SmolLM3ProxyConfig,
    demo_source_for,
    run_smollm3,
    smollm3_schedule,
)
from mixlab.training import RunRecord

needs_smollm3 = pytest.mark.skipif(not PRETRAINING_CONFIG.exists(), reason="SmolLM3 reference config not on this machine")

DEMO_SOURCES = {"web-en", "web-de", "web-fr", "web-es", "web-ru", "code-python", "math"}


def test_projection_groups_every_dataset_and_refuses_an_unknown_one():
    assert demo_source_for("fw2-fra") == "web-fr" and demo_source_for("fw2-hq-deu_Latn") == "web-de"
    assert demo_source_for("fw2-cmn") is None and demo_source_for("multilingual_wiki") is None
    assert demo_source_for("stack-edu-real-shuffled-Rust") == "code-python"
    assert demo_source_for("finemath-4plus") == "math" and demo_source_for("dclm") == "web-en"
    with pytest.raises(ScheduleError, match="new-dataset"):
        demo_source_for("new-dataset")


@needs_smollm3
def test_three_stages_keep_smollm3_boundaries_and_upweight_code_and_math():
    schedule = smollm3_schedule()
    original = MixtureSchedule.from_nanotron_config(PRETRAINING_CONFIG)
    assert [s.name for s in schedule.stages] == [s.name for s in original.stages]
    resolved = schedule.resolve(4_720_000, 8, 256)
    # nanotron starts the stages at steps 1, 3,450,001 and 4,198,001 (1-based)
    assert [s.start_step for s in resolved.stages] == [0, 3_450_000, 4_198_000]
    assert set(schedule.sources) == DEMO_SOURCES
    stable, decay = resolved.weights_at_step(0), resolved.weights_at_step(4_700_000)
    assert sum(decay.values()) == pytest.approx(1.0)
    assert decay["code-python"] > stable["code-python"] and decay["math"] > stable["math"]
    # projection adds up the raw weights of the datasets grouped into a source, then renormalises per stage
    raw = original.stages[0].weights
    raw_web_en = sum(w for name, w in raw.items() if demo_source_for(name) == "web-en")
    kept = sum(w for name, w in raw.items() if demo_source_for(name) is not None)
    assert stable["web-en"] == pytest.approx(raw_web_en / kept)


@needs_smollm3
def test_long_context_stage_and_missing_sources():
    schedule = smollm3_schedule({"web-en", "code-python", "math"}, long_context=LongContextStage(0.1, 1024))
    resolved = schedule.resolve(300, 8, 256)
    assert [s.seq_len for s in resolved.stages] == [256, 256, 256, 1024]
    assert resolved.stages[-1].start_step == 270 and set(schedule.sources) == {"web-en", "code-python", "math"}
    assert schedule.stages[-1].rope_theta is None
    raised = smollm3_schedule({"web-en", "math"}, long_context=LongContextStage(0.1, 1024, rope_theta=400_000.0))
    assert [s.rope_theta for s in raised.stages] == [None, None, None, 400_000.0]
    with pytest.raises(ScheduleError, match="fraction"):
        smollm3_schedule(long_context=LongContextStage(1.5))


@needs_smollm3
def test_smollm3_plans_and_trains_at_proxy_scale(tokenized_curated: Path, tmp_path: Path):
    config = SmolLM3ProxyConfig(workdir=tmp_path, curated=tokenized_curated, steps=40, model_preset="tiny",
                                train_preset="tiny", long_context=LongContextStage(0.25, 128))
    png = tmp_path / "reports" / "smollm3-proxy" / "plan.png"
    # the test corpus has 8 English web documents: SmolLM3's ~75% web-en repeats them past the 4-epoch limit
    plan = plan_for_manifest(tokenized_curated, smollm3_schedule(DEMO_SOURCES, long_context=config.long_context),
                             40, 8, 64)
    assert [p.split(" would")[0] for p in plan.problems] == ["source 'web-en'"]
    with pytest.raises(PlanError, match="web-en"):
        run_smollm3(config)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the plan is drawn, so the refusal can be seen
    assert not (tmp_path / "runs" / "smollm3-proxy").exists()  # refused before the run directory

    report = run_smollm3(replace(config, plan=PlanLimits(max_epochs_by_source={"web-en": 20})))
    run = RunRecord.load(tmp_path / "runs" / "smollm3-proxy")
    assert run.status == "completed" and run.summary["step"] == 40 and report.exists()
    metrics = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    stages = [m["stage"] for m in metrics if "stage" in m]
    assert stages[0] == "stable" and stages[-1] == "long context"
    # the long-context stage trains on 128-token rows: its steps carry twice the tokens of a 64-token step
    tokens = {m["step"]: m["tokens"] for m in metrics if "tokens" in m}
    steps = sorted(tokens)
    per_step = {b: (tokens[b] - tokens[a]) / (b - a) for a, b in zip(steps, steps[1:], strict=False)}
    assert per_step[steps[-1]] == 8 * 128 and per_step[steps[1]] == 8 * 64
    # the learning rate anneals from the decay stage on, not from the long-context stage
    lr = {m["step"]: m["lr"] for m in metrics if "lr" in m}
    resolved = smollm3_schedule(DEMO_SOURCES, long_context=config.long_context).resolve(40, 8, 64)
    decay_start = run.config["train"]["decay_start_step"]
    assert decay_start == resolved.stages[2].start_step < resolved.stages[3].start_step
    assert lr[20] == lr[25] > lr[30] > lr[35]


def test_a_missing_config_says_where_it_was_looked_for(tokenized_curated: Path, tmp_path: Path):
    missing = tmp_path / "pretraining_3_stages.yaml"
    with pytest.raises(ScheduleError, match=f"{missing}: SmolLM3's nanotron config is not there.*--config"):
        run_smollm3(SmolLM3ProxyConfig(workdir=tmp_path, curated=tokenized_curated, config=missing))
    assert not (tmp_path / "runs").exists()
