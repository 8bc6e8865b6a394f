"""The planner on real token shards: its numbers add up, each refusal and warning names the stage and the leaf,
the PNG is a PNG, and `mixlab mix plan` / `mixlab train` refuse the same plans (train before any run directory)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from mixlab.curation import ShardManifest
from mixlab.mixtures.planner import PlanError, PlanLimits, plan_for_manifest, plan_mixture
from mixlab.mixtures.schedule import MixtureSchedule, Stage
from mixlab.mixtures.selection import Selection
from mixlab.pipelines.cli import main

STEPS, BATCH, SEQ = 60, 8, 64  # the tiny train preset


@pytest.fixture(scope="module")
def manifest(tokenized_curated) -> ShardManifest:
    return ShardManifest.load(tokenized_curated)


@pytest.fixture(scope="module")
def train_tokens(manifest) -> dict[str, int]:
    return {name: src.tokens["train"] for name, src in manifest.sources.items() if src.tokens.get("train")}


def _write(path, document) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


# ---- numbers -------------------------------------------------------------------------------------
def test_table_numbers_add_up_over_stages_with_different_seq_len(manifest, train_tokens):
    schedule = MixtureSchedule((
        Stage("short", {"math": 0.5, "code-python": 0.3, "chat": 0.2}, 0.5),
        Stage("long", {"math": 0.2, "code-python": 0.8}, seq_len=128),
    ))
    plan = plan_for_manifest(manifest, schedule, STEPS, BATCH, SEQ)
    assert plan.ok, plan.problems
    assert [(s.name, s.start_step, s.end_step, s.seq_len) for s in plan.stages] == [
        ("short", 0, 30, 64), ("long", 30, 60, 128)]
    # tokens drawn per stage add up to the stage's tokens, and over the run to the run's tokens
    for stage in plan.stages:
        drawn = sum(leaf.tokens_by_stage[stage.name] for leaf in plan.leaves.values())
        assert drawn == pytest.approx(stage.steps * BATCH * stage.seq_len)
    assert plan.total_tokens == 30 * BATCH * 64 + 30 * BATCH * 128
    assert sum(leaf.tokens_drawn for leaf in plan.leaves.values()) == pytest.approx(plan.total_tokens)
    # epochs: rows drawn over the windows of each stage's own grid
    math_leaf = plan.leaves["math"]
    assert math_leaf.available_tokens == train_tokens["math"]
    windows_64, windows_128 = (train_tokens["math"] - 1) // 64, (train_tokens["math"] - 1) // 128
    assert math_leaf.windows_by_stage == {"short": windows_64, "long": windows_128}
    expected = 30 * BATCH * 0.5 / windows_64 + 30 * BATCH * 0.2 / windows_128
    assert math_leaf.epochs == pytest.approx(expected)
    assert plan.leaves["chat"].tokens_by_stage == {"short": pytest.approx(30 * BATCH * 0.2 * 64), "long": 0.0}
    table = plan.table()
    assert f"{train_tokens['math']:,d}" in table and f"{expected:.2f}" in table
    assert "stage 'long': steps [30, 60), seq_len 128" in table
    data = plan.to_dict()
    assert data["ok"] and data["leaves"]["math"]["epochs"] == pytest.approx(expected)
    json.dumps(data)  # --json prints it


def test_hierarchical_weights_are_flattened_by_available_tokens_and_explained(manifest, train_tokens):
    schedule = MixtureSchedule.from_dict({"stages": [{"name": "all", "weights": {
        "web": {"weight": 0.5, "children": ["web-de", "web-fr"], "rule": "by_tokens"}, "math": 0.5}}]})
    plan = plan_for_manifest(manifest, schedule, STEPS, BATCH, SEQ)
    assert plan.ok, plan.problems
    de, fr = train_tokens["web-de"], train_tokens["web-fr"]
    assert plan.leaves["web-de"].share_by_stage["all"] == pytest.approx(0.5 * de / (de + fr))
    assert plan.schedule.is_flat and "web-de" in plan.flattening
    assert "hierarchical weights, flattened" in plan.table()


# ---- refusals ------------------------------------------------------------------------------------
def test_refuses_a_leaf_repeated_past_its_limit_and_the_limit_is_per_leaf(manifest):
    schedule = MixtureSchedule((Stage("s", {"web-de": 0.6, "math": 0.4}, 1.0),))
    plan = plan_for_manifest(manifest, schedule, 300, BATCH, SEQ)
    [problem] = plan.problems
    assert "source 'web-de' would be repeated" in problem and "stage(s) 's' (60.0%)" in problem
    assert "plan.max_epochs_by_source.web-de" in problem
    assert plan.leaves["web-de"].epochs > 4 > plan.leaves["math"].epochs
    with pytest.raises(PlanError, match="would be repeated"):
        plan.check()
    relaxed = plan_for_manifest(manifest, schedule, 300, BATCH, SEQ, PlanLimits(max_epochs_by_source={"web-de": 100}))
    assert relaxed.ok, relaxed.problems
    relaxed.check()


def test_refuses_every_bad_weight_at_once_naming_stage_and_leaf(train_tokens):
    document = {"stages": [
        {"name": "a", "fraction": 0.25, "weights": {"math": float("nan"), "chat": 0.5}},
        {"name": "b", "fraction": 0.25, "weights": {"math": 1.5, "chat": -0.5}},
        {"name": "c", "fraction": 0.25, "weights": {"math": 0.0, "chat": 0.0}},
        {"name": "d", "weights": {"math": 0.5, "chat": 0.7}},
    ]}
    plan = plan_mixture(document, train_tokens, STEPS, BATCH, SEQ)
    assert len(plan.problems) == 4, plan.problems
    a, b, c, d = plan.problems
    assert "stage 'a'" in a and "'math'" in a and "nan" in a
    assert "stage 'b'" in b and "'chat'" in b and "-0.5" in b
    assert "stage 'c'" in c and "positive weight" in c
    assert "stage 'd'" in d and "chat=0.7" in d and "normalize" in d
    with pytest.raises(PlanError) as err:
        plan.check()
    assert all(f"stage '{name}'" in str(err.value) for name in "abcd")


def test_weights_not_summing_to_one_pass_when_normalisation_is_asked_for(train_tokens):
    document = {"stages": [{"name": "s", "weights": {"math": 2.0, "chat": 2.0}}]}
    refused = plan_mixture(document, train_tokens, STEPS, BATCH, SEQ)
    assert len(refused.problems) == 1 and "stage 's'" in refused.problems[0] and "normalize" in refused.problems[0]
    plan = plan_mixture(document, train_tokens, STEPS, BATCH, SEQ, normalize=True)
    assert plan.ok, plan.problems
    assert plan.leaves["math"].share_by_stage["s"] == pytest.approx(0.5)
    # the same through a schedule object
    schedule = MixtureSchedule.constant({"math": 2.0, "chat": 2.0}, normalize=True)
    assert plan_mixture(schedule, train_tokens, STEPS, BATCH, SEQ).ok


def test_refuses_unknown_sources_and_selections_that_match_nothing(manifest, train_tokens):
    schedule = MixtureSchedule(
        (Stage("s", {"math": 0.5, "web-xx": 0.2, "klingon": 0.2, "nobody": 0.1}, 1.0),),
        selections=(Selection("klingon", "web-*", where={"language": "tlh"}),
                    Selection("nobody", "forum-*")))
    plan = plan_for_manifest(manifest, schedule, STEPS, BATCH, SEQ)
    assert len(plan.problems) == 3, plan.problems
    by_leaf = {leaf: [p for p in plan.problems if f"{kind} {leaf!r}" in p]
               for kind, leaf in (("leaf", "web-xx"), ("selection", "klingon"), ("selection", "nobody"))}
    assert all(len(found) == 1 for found in by_leaf.values()), plan.problems
    assert all("'s'" in found[0] for found in by_leaf.values()), plan.problems  # each names the stage
    assert "neither a source" in by_leaf["web-xx"][0]
    assert "matches no document" in by_leaf["klingon"][0]
    assert "matches no source" in by_leaf["nobody"][0]
    # without a manifest, the planner refuses a leaf it has no token count for, naming stage and leaf
    alone = plan_mixture(MixtureSchedule.constant({"math": 0.5, "web-xx": 0.5}, name="only"), train_tokens,
                         STEPS, BATCH, SEQ)
    [problem] = alone.problems
    assert "'only'" in problem and "'web-xx'" in problem and "neither a tokenized source" in problem


def test_a_selection_with_documents_is_planned_by_its_sidecar_tokens(manifest):
    schedule = MixtureSchedule((Stage("s", {"math": 0.9, "web-en-hq": 0.1}, 1.0),),
                               selections=(Selection("web-en-hq", "web-*", where={"language": "en"}),))
    plan = plan_for_manifest(manifest, schedule, STEPS, BATCH, SEQ, PlanLimits(max_epochs=100))
    assert plan.ok, plan.problems
    leaf = plan.leaves["web-en-hq"]
    assert leaf.kind == "selection" and 0 < leaf.available_tokens
    # the curated web sources a selection draws from are not "never drawn"
    assert not any("web-en (" in w for w in plan.warnings), plan.warnings


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "start_step": 0, "weights": {"math": 1.0}}, {"name": "b", "start_step": 30, "weights": {"chat": 1.0}},
      {"name": "c", "start_step": 20, "weights": {"math": 1.0}}], "stage 'c' starts at step 20, not after stage 'b'"),
    ([{"name": "a", "steps": 20, "weights": {"math": 1.0}}, {"name": "b", "start_step": 30, "weights": {"chat": 1.0}}],
     "steps [20, 30) belong to no stage: stage 'a' ends at step 20 and stage 'b' starts at step 30"),
    ([{"name": "a", "steps": 40, "weights": {"math": 1.0}}, {"name": "b", "start_step": 30, "weights": {"chat": 1.0}}],
     "stages 'a' and 'b' overlap"),
    ([{"name": "a", "steps": 20, "weights": {"math": 1.0}}, {"name": "b", "steps": 20, "weights": {"chat": 1.0}}],
     "steps [40, 60) belong to no stage"),
])
def test_refuses_stage_bounds_that_overlap_or_leave_gaps(train_tokens, stages, message):
    plan = plan_mixture({"stages": stages}, train_tokens, STEPS, BATCH, SEQ)
    assert any(message in p for p in plan.problems), plan.problems


def test_bad_bounds_and_bad_weights_are_reported_together(train_tokens):
    stages = [{"name": "a", "steps": 20, "weights": {"math": -1.0}}, {"name": "b", "start_step": 30,
                                                                      "weights": {"chat": 1.0}}]
    plan = plan_mixture({"stages": stages}, train_tokens, STEPS, BATCH, SEQ)
    assert any("stage 'a'" in p and "'math'" in p for p in plan.problems), plan.problems
    assert any("steps [20, 30) belong to no stage" in p for p in plan.problems), plan.problems


# ---- warnings ------------------------------------------------------------------------------------
def test_warns_about_tiny_weights_and_leaves_never_drawn(manifest):
    schedule = MixtureSchedule((
        Stage("stable", {"math": 0.999, "code-python": 0.001}, 0.5),
        Stage("decay", {"math": 0.5, "code-python": 0.5, "chat": 0.0}),
    ))
    plan = plan_for_manifest(manifest, schedule, STEPS, BATCH, SEQ)
    assert plan.ok, plan.problems
    [tiny] = [w for w in plan.warnings if "Megatron-LM#705" in w]
    assert "stage 'stable'" in tiny and "'code-python'" in tiny and "0.001" in tiny and "'math'" not in tiny
    [never] = [w for w in plan.warnings if "'chat'" in w]
    assert "never drawn" in never
    [unused] = [w for w in plan.warnings if "leaves out curated source(s)" in w]
    assert "web-en (" in unused and "math (" not in unused
    # a weight that gives a row per step is no warning, even at 1%
    at_batch_100 = plan_for_manifest(manifest, schedule, STEPS, 100, SEQ, PlanLimits(max_epochs=1000))
    assert not any("Megatron" in w for w in at_batch_100.warnings)


def test_a_curriculum_that_fades_a_leaf_to_a_tiny_weight_is_warned_about(train_tokens):
    schedule = MixtureSchedule((Stage("fade", {"math": 0.5, "chat": 0.5},
                                      curriculum={"end": {"math": 0.9999, "chat": 0.0001}, "shape": "linear"}),))
    plan = plan_mixture(schedule, train_tokens, STEPS, BATCH, SEQ)
    assert any("stage 'fade'" in w and "'chat'" in w and "Megatron" in w for w in plan.warnings), plan.warnings


# ---- the figure ----------------------------------------------------------------------------------
def test_plot_writes_a_png_of_token_shares(manifest, tmp_path):
    schedule = MixtureSchedule((
        Stage("stable", {"math": 0.7, "code-python": 0.3}, 0.6),
        Stage("decay", {"math": 0.3, "code-python": 0.7}, seq_len=128,
              curriculum={"end": {"math": 0.1, "code-python": 0.9}, "shape": "cosine"}),
    ))
    plan = plan_for_manifest(manifest, schedule, 5000, BATCH, SEQ, PlanLimits(max_epochs=1000))
    path = plan.plot(tmp_path / "plan" / "shares.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(PlanError, match="nothing to plot|no resolved schedule"):
        plan_mixture({"stages": [{"name": "s", "weights": {"math": -1}}]}, {"math": 10}, 10, 1, 4).plot(
            tmp_path / "none.png")


# ---- the command line ----------------------------------------------------------------------------
def test_mix_plan_prints_the_plan_writes_the_png_and_exits_zero(tokenized_curated, tmp_path, capsys):
    schedule = _write(tmp_path / "mix.yaml", {"stages": [
        {"name": "stable", "fraction": 0.8, "weights": {"math": 0.6, "code-python": 0.4}},
        {"name": "decay", "weights": {"math": 0.3, "code-python": 0.699, "chat": 0.001}}]})
    png = tmp_path / "plan.png"
    args = ["--curated", str(tokenized_curated), "--schedule", schedule, "--train-preset", "tiny"]
    assert main(["mix", "plan", *args, "--png", str(png)]) == 0
    captured = capsys.readouterr()
    assert "stage 'stable': steps [0, 48)" in captured.out and "epochs" in captured.out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "mixlab mix: warning:" in captured.err and "'chat'" in captured.err  # 0.001 x batch 8
    assert main(["mix", *args]) == 0  # plan is the default action
    assert capsys.readouterr().out == captured.out.split("token shares:")[0]
    assert main(["mix", "plan", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["total_steps"] == STEPS and set(data["leaves"]) == {"chat", "code-python", "math"}
    assert math.isclose(sum(leaf["tokens_drawn"] for leaf in data["leaves"].values()), data["total_tokens"])


def test_mix_plan_lists_every_refusal_and_exits_non_zero(tokenized_curated, tmp_path, capsys):
    schedule = _write(tmp_path / "bad.yaml", {"stages": [
        {"name": "stable", "fraction": 0.8, "weights": {"math": 0.6, "code-python": -0.4}},
        {"name": "decay", "weights": {"math": 0.3, "web-xx": 0.7}}]})
    assert main(["mix", "plan", "--curated", str(tokenized_curated), "--schedule", schedule,
                 "--train-preset", "tiny", "--png", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mixlab mix: error: the planner refuses this mixture")
    assert "stage 'stable'" in captured.err and "'code-python'" in captured.err
    assert "'decay'" in captured.err and "'web-xx'" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "p.png").exists()


def test_mix_plan_refuses_a_stage_longer_than_the_model_context(tokenized_curated, tmp_path, capsys):
    schedule = _write(tmp_path / "long.yaml", {"stages": [
        {"name": "short", "fraction": 0.5, "weights": {"math": 1.0}},
        {"name": "long", "seq_len": 256, "weights": {"math": 1.0}}]})
    assert main(["mix", "--curated", str(tokenized_curated), "--schedule", schedule, "--train-preset", "tiny",
                 "--model-preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "stage 'long' has seq_len 256, more than model.max_seq_len=128" in err


def _train(curated, runs, schedule: str, *extra: str) -> list[str]:
    return ["train", "--curated", str(curated), "--runs", str(runs), "--run-id", "refused", "--model-preset", "tiny",
            "--train-preset", "tiny", "--schedule", schedule, *extra]


def test_train_refuses_a_refused_plan_before_a_run_directory_exists(tokenized_curated, tmp_path, capsys):
    bad_weights = _write(tmp_path / "weights.yaml", {"stages": [
        {"name": "stable", "fraction": 0.5, "weights": {"math": float("nan"), "chat": 0.5}},
        {"name": "decay", "weights": {"math": 0.5, "chat": 0.6}}]})
    runs = tmp_path / "runs"
    assert main(_train(tokenized_curated, runs, bad_weights)) == 2
    err = capsys.readouterr().err
    assert "the planner refuses" in err and "stage 'stable'" in err and "stage 'decay'" in err  # both, at once
    assert not (runs / "refused").exists()

    unknown = _write(tmp_path / "unknown.yaml", {"stages": [{"name": "s", "weights": {"math": 0.5, "web-xx": 0.5}}]})
    assert main(_train(tokenized_curated, runs, unknown)) == 2
    err = capsys.readouterr().err
    assert "'web-xx'" in err and "['s']" in err and not (runs / "refused").exists()

    long_stage = _write(tmp_path / "long.yaml", {"stages": [
        {"name": "short", "fraction": 0.5, "weights": {"math": 1.0}},
        {"name": "long", "seq_len": 256, "weights": {"math": 1.0}}]})
    assert main(_train(tokenized_curated, runs, long_stage)) == 2
    err = capsys.readouterr().err
    assert "more than model.max_seq_len=128" in err and "--set mixture.stages.1.seq_len" in err
    assert not (runs / "refused").exists()


def test_train_runs_a_planned_schedule_with_a_selection_and_a_longer_stage(tokenized_curated, tmp_path, capsys):
    schedule = _write(tmp_path / "sel.yaml", {
        "selections": [{"name": "web-latin", "source": "web-*", "where": {"language": ["de", "fr", "es"]}}],
        "stages": [{"name": "short", "fraction": 0.5, "weights": {"math": 0.5, "code-python": 0.3, "web-latin": 0.2}},
                   {"name": "long", "seq_len": 128, "weights": {"math": 0.4, "code-python": 0.6}}]})
    runs = tmp_path / "runs"
    args = _train(tokenized_curated, runs, schedule, "--steps", "12", "--eval-every", "6", "--warmup-steps", "2",
                  "--run-id", "planned")
    assert main(args) == 0
    from mixlab.training import RunRecord

    run = RunRecord.load(runs / "planned")
    assert run.status == "completed"
    assert {m.get("stage") for m in run.metrics()} == {"short", "long"}
    assert run.config["mixture"]["selections"][0]["name"] == "web-latin"
    # the selection's held-out documents are its sources': the web sources are evaluated
    assert {"web-de", "web-fr", "web-es", "math"} <= {e["source"] for e in run.evals()}
    capsys.readouterr()
    assert main(["eval", "--run", str(run.path)]) == 0
    assert "web-de" in capsys.readouterr().out


SMOLLM3 = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm3" / "pretraining_3_stages.yaml"


@pytest.mark.skipif(not SMOLLM3.exists(), reason="SmolLM3 reference config not on this machine")
def test_mix_plan_lays_a_nanotron_config_over_any_budget(tokenized_curated, capsys):
    """SmolLM3's config plans at 60 steps: its stages keep their shares; what is refused is its datasets, which
    this corpus does not have."""
    assert main(["mix", "plan", "--curated", str(tokenized_curated), "--schedule", str(SMOLLM3),
                 "--train-preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "past the" not in err and "'fineweb-edu'" in err and "stage(s) ['stable'" in err


def test_long_document_upsampling_counts_against_the_epoch_limit():
    from mixlab.mixtures.selection import LongDocUpsample

    long_math = Selection("long-math", "math", where={"tokens": {"min": 1}}, long_docs=LongDocUpsample(100, 4))
    schedule = MixtureSchedule.constant({"long-math": 0.5, "code-python": 0.5})
    schedule = MixtureSchedule(schedule.stages, selections=(long_math,))
    # 10 windows each; 10 steps of 4 rows draw 20 rows of each: 2 passes, so a long document is seen 8 times
    plan = plan_mixture(schedule, {"long-math": 641, "code-python": 641}, 10, 4, 64)
    assert plan.leaves["long-math"].epochs == pytest.approx(2) and plan.leaves["long-math"].document_repeats == 8
    assert [p.split(" by stage")[0] for p in plan.problems] == [
        "selection 'long-math' would be repeated 8.0 times (2.0 passes, its long documents 4x in each: lower "
        "long_docs.factor too) (limit 4)"]
    assert not any("code-python" in p for p in plan.problems)  # 2 epochs of a plain source are fine
