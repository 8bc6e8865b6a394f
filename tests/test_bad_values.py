"""Bad numbers and bad schedules are refused at the command line, with a message about that value, before a run is
touched; the planner refuses a mixture that repeats a source past its limit."""

from __future__ import annotations

import re

import pytest
import yaml
from mixlab.mixtures import MixtureSchedule, PlanError, PlanLimits, ScheduleError, plan_mixture
from mixlab.pipelines.cli import main


def _train(curated, runs, *extra: str) -> list[str]:
    return ["train", "--curated", str(curated), "--runs", str(runs), "--run-id", "bad", "--model-preset", "tiny",
            "--train-preset", "tiny", *extra]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "train.total_steps=0 must be a whole number >= 1"),
    (["--steps", "-5"], "train.total_steps=-5 must be a whole number >= 1"),
    (["--batch-size", "0"], "train.batch_size=0 must be a whole number >= 1"),
    (["--seq-len", "0"], "train.seq_len=0 must be a whole number >= 1"),
    (["--seq-len", "4096"], "train.seq_len=4096 exceeds model.max_seq_len=128"),
    (["--lr", "nan"], "train.lr=nan must be a finite number"),
    (["--lr", "-1"], "train.lr=-1.0 must be a finite number >= 0"),
    (["--threads", "0"], "train.threads=0 must be a whole number >= 1"),
    (["--eval-windows", "0"], "eval.windows_per_source=0 must be a whole number >= 1"),
    (["--set", "train.batch_size=eight"], "train.batch_size='eight' must be a whole number >= 1"),
])
def test_bad_numbers_are_refused_with_a_message_about_the_value(tokenized_curated, tmp_path, capsys, flags, message):
    assert main(_train(tokenized_curated, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()  # nothing was created


def test_schedule_errors_name_the_file_the_stage_and_the_weight(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"stages": [
        {"name": "stable", "fraction": 0.8, "weights": {"web-en": 1.0}},
        {"name": "decay", "fraction": 0.2, "weights": {"web-en": "0.5", "math": 0.5}}]}))
    with pytest.raises(ScheduleError, match=re.escape(f"{path}: stage 'decay': weight of 'web-en': weights must be "
                                                      "numbers, got '0.5'")):
        MixtureSchedule.from_yaml(path)
    path.write_text(yaml.safe_dump({"stages": [{"name": "only", "fraction": "all", "weights": {"a": 1}}]}))
    with pytest.raises(ScheduleError, match=rf"{path}: stage 'only': fraction must be a number, got 'all'"):
        MixtureSchedule.from_yaml(path)


def test_planner_refuses_a_source_repeated_past_its_limit(tokenized_curated, tmp_path, capsys):
    # web-de holds a few thousand train tokens in the test corpus: 60% of 300 tiny steps repeats it dozens of times
    schedule = tmp_path / "mix.yaml"
    schedule.write_text(yaml.safe_dump({"stages": [{"name": "s", "fraction": 1.0,
                                                    "weights": {"web-de": 0.6, "math": 0.4}}]}))
    args = _train(tokenized_curated, tmp_path, "--schedule", str(schedule), "--steps", "300")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "source 'web-de' would be repeated" in err and "stage(s) 's' (60.0%)" in err
    assert "plan.max_epochs_by_source.web-de" in err and not (tmp_path / "bad").exists()
    assert main(["mix", "--curated", str(tokenized_curated), "--schedule", str(schedule), "--train-preset", "tiny",
                 "--steps", "300"]) == 2  # the preview refuses the same plan, after printing it
    captured = capsys.readouterr()
    assert "over the limit of 4" in captured.out and "would be repeated" in captured.err
    # an explicit, per-source limit lets it through
    assert main([*args, "--steps", "30", "--set", "plan.max_epochs_by_source.web-de=1000"]) == 0


def test_plan_limits_are_checked_and_per_source():
    schedule = MixtureSchedule.constant({"a": 0.5, "b": 0.5})
    limits = PlanLimits(max_epochs=4, max_epochs_by_source={"b": 10})
    # 10 windows of 64 tokens each; 25 steps of 4 rows draw 50 rows of each: 5 epochs
    problems = plan_mixture(schedule, {"a": 641, "b": 641}, 25, 4, 64, limits).problems
    assert len(problems) == 1 and "'a' would be repeated 5.0 times (limit 4)" in problems[0]
    with pytest.raises(PlanError, match="must be a positive number"):
        PlanLimits(max_epochs=float("nan"))
