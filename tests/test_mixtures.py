"""Mixture schedules: validation, stage lookup, serialisation, and SmolLM3's real 3-stage config."""

from __future__ import annotations

from pathlib import Path

import pytest
from mixlab.mixtures import MixtureSchedule, ScheduleError, Stage

# shared/ lies beside the checkout (as in CI); SmolLM3's real nanotron config is kept there, not in the repo
SMOLLM3 = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm3" / "pretraining_3_stages.yaml"
needs_smollm3 = pytest.mark.skipif(
    not SMOLLM3.exists(), reason="SmolLM3 reference config not on this machine"
)


def code_math_web(name: str) -> str:
    """Group SmolLM3's sources the way the playbook discusses them."""
    if name.startswith(
        ("stack-", "pull-requests", "kaggle", "jupyter", "github-issues", "open-codereasoning")
    ):
        return "code"
    if "math" in name or name.startswith(("finemath", "infiwebmath", "tiny-gsm", "dolmino")):
        return "math"
    return "text"


def test_stage_validation():
    with pytest.raises(ScheduleError, match="non-negative"):
        Stage("s", {"web": -0.1, "code": 1.0}, 1.0)
    with pytest.raises(ScheduleError, match="positive weight"):
        Stage("s", {"web": 0.0}, 1.0)
    with pytest.raises(ScheduleError, match="fraction must be positive"):
        Stage("s", {"web": 1.0}, 0.0)
    with pytest.raises(ScheduleError, match=r"sum to 1.*a=0.5 \+ b=0.4"):
        MixtureSchedule((Stage("a", {"web": 1}, 0.5), Stage("b", {"web": 1}, 0.4)))
    with pytest.raises(ScheduleError, match="unique"):
        MixtureSchedule((Stage("a", {"web": 1}, 0.5), Stage("a", {"web": 1}, 0.5)))
    with pytest.raises(ScheduleError, match="at least one stage"):
        MixtureSchedule(())


def test_stage_switches_at_its_fraction_of_the_budget():
    schedule = MixtureSchedule.stable_decay(
        {"web": 0.9, "code": 0.1}, {"web": 0.5, "code": 0.3, "math": 0.2}, 0.2
    )
    assert [s.name for s in schedule.stages] == ["stable", "decay"]
    resolved = schedule.resolve(10_000, 8, 64)
    assert [(s.start_step, s.end_step) for s in resolved.stages] == [(0, 8000), (8000, 10_000)]
    assert resolved.stage_at_step(0).name == resolved.stage_at_step(7999).name == "stable"
    assert resolved.stage_at_step(8000).name == resolved.stage_at_step(30_000).name == "decay"
    with pytest.raises(ValueError):
        resolved.stage_at_step(-1)
    assert resolved.weights_at_step(1000) == pytest.approx({"code": 0.1, "math": 0.0, "web": 0.9})
    assert sum(resolved.weights_at_step(9000).values()) == pytest.approx(1.0)


def test_weights_are_normalised_on_use_only_when_asked():
    with pytest.raises(ScheduleError, match=r"stage 'constant': weights sum to 4, not 1 \(web=3 \+ code=1\).*normalize=True"):
        MixtureSchedule.constant({"web": 3, "code": 1})
    schedule = MixtureSchedule.constant({"web": 3, "code": 1}, normalize=True)
    assert schedule.resolve(10, 1, 8).weights_at_step(5) == {"code": 0.25, "web": 0.75}
    assert schedule.stages[0].weights == {"web": 3.0, "code": 1.0}  # stored as written
    MixtureSchedule.constant({"web": 0.7, "code": 0.3005})  # within the 1e-3 tolerance


def test_unknown_sources_are_named():
    schedule = MixtureSchedule.constant({"web": 0.5, "code": 0.5, "unused": 0})
    schedule.check_sources({"web", "code"})  # weight zero needs no data
    with pytest.raises(ScheduleError, match=r"\['code'\] that are not available"):
        schedule.check_sources({"web"})


def test_dict_and_yaml_round_trip(tmp_path: Path):
    schedule = MixtureSchedule(
        (Stage("stable", {"web": 0.7, "code": 0.3}, 0.75), Stage("decay", {"web": 0.4, "code": 0.6}, 0.25)),
        description="demo",
    )
    assert MixtureSchedule.from_dict(schedule.to_dict()) == schedule
    assert MixtureSchedule.from_yaml(schedule.to_yaml()) == schedule
    path = schedule.save(tmp_path / "mix.yaml")
    loaded = MixtureSchedule.from_yaml(path)
    assert loaded == schedule and loaded.fingerprint() == schedule.fingerprint()
    assert loaded.description == "demo"
    changed = MixtureSchedule.stable_decay({"web": 0.7, "code": 0.3}, {"web": 0.4, "code": 0.6}, 0.3)
    assert changed.fingerprint() != schedule.fingerprint()
    assert MixtureSchedule.from_dict({"weights": {"web": 1}}) == MixtureSchedule.constant({"web": 1})
    with pytest.raises(ScheduleError, match="malformed"):
        MixtureSchedule.from_dict({"stages": [{"weights": {"web": 1}}]})


def test_map_sources_groups_weights():
    schedule = MixtureSchedule.constant({"stack-Python": 0.2, "stack-Go": 0.1, "fineweb": 0.6, "wiki": 0.1})
    grouped = schedule.map_sources(
        {"stack-Python": "code", "stack-Go": "code", "fineweb": "web"}, drop_unmapped=True
    )
    assert grouped.stages[0].weights == pytest.approx({"code": 0.3, "web": 0.6})
    kept = schedule.map_sources({"stack-Python": "code", "stack-Go": "code"})
    assert set(kept.sources) == {"code", "fineweb", "wiki"}
    with pytest.raises(ScheduleError, match="no weight left"):
        schedule.map_sources(lambda name: None)


@needs_smollm3
def test_smollm3_three_stage_config_imports():
    schedule = MixtureSchedule.from_nanotron_config(SMOLLM3)
    assert [s.name for s in schedule.stages] == ["stable", "stable stage 2", "decay stage"]
    assert [len(s.weights) for s in schedule.stages] == [41, 46, 56]
    # nanotron's 1-based start_training_step 1, 3_450_001 and 4_198_001 are mixlab's 0-based start steps
    assert [s.start_step for s in schedule.stages] == [0, 3_450_000, 4_198_000]
    resolved = schedule.resolve(4_720_000, 1, 4096)
    assert [(s.start_step, s.end_step) for s in resolved.stages] == [
        (0, 3_450_000), (3_450_000, 4_198_000), (4_198_000, 4_720_000)]
    assert schedule.stages[0].weights["fineweb-edu"] == 0.333 and schedule.stages[0].weights["dclm"] == 0.37
    assert "stack-edu-real-shuffled-Python" in schedule.stages[2].weights
    assert resolved.stage_at_step(2_000_000).name == "stable"
    assert resolved.stage_at_step(4_500_000).name == "decay stage"
    assert schedule.normalize  # raw decay weights sum to 1.00565; nanotron normalises them
    assert sum(resolved.weights_at_step(4_500_000).values()) == pytest.approx(1.0)
    proxy = MixtureSchedule.from_nanotron_config(SMOLLM3, bounds="fraction")
    assert MixtureSchedule.from_yaml(SMOLLM3) == proxy  # a nanotron config as a schedule file: shares of the run
    assert [s.fraction for s in proxy.stages] == pytest.approx([3_450_000 / 4_720_000, 748_000 / 4_720_000, None])
    at_proxy_scale = proxy.resolve(1000, 1, 8)
    assert at_proxy_scale.stage_at_step(500).name == "stable" and at_proxy_scale.stage_at_step(950).name == "decay stage"
    assert schedule.as_fractions(4_720_000) == proxy


@needs_smollm3
def test_smollm3_decay_stage_upsamples_code_and_math():
    grouped = MixtureSchedule.from_nanotron_config(SMOLLM3, bounds="fraction").map_sources(code_math_web)
    resolved = grouped.resolve(1000, 1, 8)
    stable, decay = resolved.weights_at_step(0), resolved.weights_at_step(990)
    assert decay["code"] > stable["code"] and decay["math"] > stable["math"]
    assert decay["text"] < stable["text"]
    renamed = MixtureSchedule.from_nanotron_config(SMOLLM3, source_names={"fineweb-edu": "web"})
    assert "web" in renamed.stages[0].weights and "fineweb-edu" not in renamed.sources


def test_nanotron_config_errors_name_the_stage():
    base = {"tokens": {"train_steps": 100}}
    mismatched = {
        **base,
        "data_stages": [
            {
                "name": "stable",
                "start_training_step": 1,
                "data": {"dataset": {"dataset_read_path": ["/d/web", "/d/code"], "dataset_weights": [1.0]}},
            }
        ],
    }
    with pytest.raises(ScheduleError, match=r"stage 'stable': 2 dataset paths but 1 dataset_weights"):
        MixtureSchedule.from_nanotron_config(mismatched)
    with pytest.raises(ScheduleError, match="no `data_stages`"):
        MixtureSchedule.from_nanotron_config(base)
    older = {
        **base,
        "data_stages": [
            {
                "name": "a",
                "start_training_step": 1,
                "data": {"dataset": {"dataset_folder": {"/d/web/": 0.5}}},
            },
            {
                "name": "b",
                "start_training_step": 76,
                "data": {"dataset": {"dataset_folder": {"/d/code": 1.0}}},
            },
        ],
    }
    schedule = MixtureSchedule.from_nanotron_config(older)
    assert [(s.start_step, s.end_step) for s in schedule.resolve(100, 1, 8).stages] == [(0, 75), (75, 100)]
    assert schedule.stages[0].weights == {"web": 0.5}


def test_missing_schedule_file_is_named(tmp_path: Path):
    with pytest.raises(ScheduleError, match="no such schedule file"):
        MixtureSchedule.from_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(ScheduleError, match="not valid YAML"):
        MixtureSchedule.from_yaml("stages: [\n  {name: a")
