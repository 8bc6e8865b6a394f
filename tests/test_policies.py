"""Adaptive mixture policies: on synthetic loss signals where the right move is known, and in a short real run on
the tokenized demo corpus (real trainer, real sampler) whose resume makes the same decisions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mixlab.mixtures.policies import (
    ADOPolicy,
    DoReMiPolicy,
    MixturePolicy,
    OnlineDataMixing,
    PolicyError,
    PolicyHistory,
    RulePolicy,
    ShiftWeight,
    fit_power_law,
    policy_from_dict,
    project_to_bounds,
)
from mixlab.training import RunStore


def drive(policy: MixturePolicy, losses, steps: int, start: dict[str, float], evals=None, eval_every: int = 0,
          rows: int = 8) -> tuple[dict[str, float], list[tuple[int, dict[str, float], str]]]:
    """Feed `policy` the loss curves `losses[source](rows seen)` as a trainer would, applying its decisions.
    Rows per source follow the weights in force, so a source given more weight moves along its curve faster."""
    weights, seen, changes = dict(start), dict.fromkeys(start, 0.0), []
    for step in range(1, steps + 1):
        drawn = {s: max(1, round(rows * w)) for s, w in weights.items()}
        for s in seen:
            seen[s] += drawn[s]
        policy.observe_train(step, {s: losses[s](seen[s]) for s in weights}, drawn)
        if evals is not None and eval_every and step % eval_every == 0:
            policy.observe_eval(step, [{"source": s, "loss": evals[s](step), "bpb": evals[s](step) / math.log(2)}
                                       for s in weights] + [{"source": "all", "loss": 0.0}])
        decision = policy.decide(step, weights)
        if decision is not None:
            assert abs(sum(decision.weights.values()) - 1) < 1e-9 and decision.cause.startswith(policy.name)
            weights = decision.weights
            changes.append((step, dict(weights), decision.cause))
    return weights, changes


EVEN = {"math": 0.5, "web": 0.5}


def test_projection_keeps_bounds_and_sum():
    out = project_to_bounds({"a": 0.9, "b": 0.05, "c": 0.05}, {"a": (0.0, 0.5), "c": (0.2, 1.0)})
    assert sum(out.values()) == pytest.approx(1.0)
    assert out["a"] == pytest.approx(0.5) and out["c"] >= 0.2 - 1e-12
    assert project_to_bounds({"a": 0.3, "b": 0.7}, {}) == pytest.approx({"a": 0.3, "b": 0.7})
    with pytest.raises(PolicyError, match="admit no weights summing to 1"):
        project_to_bounds({"a": 0.5, "b": 0.5}, {"a": (0.0, 0.2), "b": (0.0, 0.3)})


def test_doremi_gives_weight_to_the_source_with_excess_loss_and_averages_for_the_final_run():
    # math stays 0.8 nats above its reference, web reaches its reference: math must gain
    evals = {"math": lambda s: 3.0 + 0.8, "web": lambda s: 2.5}
    policy = DoReMiPolicy({"math": 3.0, "web": 2.5}, eta=0.5, update_every=5)
    weights, changes = drive(policy, {"math": lambda n: 4.0, "web": lambda n: 3.0}, 60, EVEN, evals, eval_every=10)
    assert weights["math"] > 0.9 and changes and all(step % 10 == 0 for step, _, _ in changes)  # only after evals
    assert "excess loss math 0.800 > web 0.000" in changes[0][2]
    # the run-average lies between the start and the end, and it is the final run's constant schedule
    avg = policy.average_weights()
    assert 0.5 < avg["math"] < weights["math"]
    final = policy.final_schedule()
    assert len(final.stages) == 1 and final.stages[0].weights["math"] == pytest.approx(avg["math"])
    # smoothing with the uniform distribution keeps every source alive
    assert weights["web"] >= policy.c / 2 - 1e-12


def test_doremi_reads_its_reference_from_a_run_directory(tmp_path):
    ref = RunStore(tmp_path).create("reference", config={})
    for step, (m, w) in {10: (3.5, 3.0), 20: (3.0, 2.9)}.items():
        ref.log_eval(step, "math", loss=m)
        ref.log_eval(step, "web", loss=w)
        ref.log_eval(step, "all", loss=(m + w) / 2)
    policy = DoReMiPolicy(ref.path, update_every=1)
    assert policy.excess_loss(15, {"math": 3.6, "web": 2.0}) == pytest.approx({"math": 0.1, "web": 0.0})
    assert policy.excess_loss(25, {"math": 3.6, "web": 3.0}) == pytest.approx({"math": 0.6, "web": 0.1})
    with pytest.raises(PolicyError, match=r"has no loss for \['code'\]"):
        policy.excess_loss(25, {"code": 1.0})
    with pytest.raises(PolicyError, match="not a run directory"):
        DoReMiPolicy(tmp_path / "missing")


def test_odm_rewards_the_hard_source_and_with_progress_the_fast_learner():
    # paper's reward (loss): web stays harder (higher loss) -> web gains
    hard = {"math": lambda n: 2.0, "web": lambda n: 4.0}
    weights, changes = drive(OnlineDataMixing(update_every=5, exploration=0.05), hard, 200, EVEN)
    assert weights["web"] > 0.8 and changes[-1][2].startswith("odm: exp3 on loss: web leads by")
    # progress reward: math's loss falls faster than web's -> math gains
    fast = {"math": lambda n: 1.0 + 4.0 * (n + 10) ** -0.5, "web": lambda n: 3.0 + 0.3 * (n + 10) ** -0.1}
    weights, _ = drive(OnlineDataMixing(update_every=5, exploration=0.05, reward="progress", learning_rate=0.2), fast, 200, EVEN)
    assert weights["math"] > 0.6, weights
    # the default exploration decays with the updates and never starves a source
    policy = OnlineDataMixing(update_every=1)
    weights, _ = drive(policy, hard, 50, EVEN)
    assert min(weights.values()) >= policy._rates(2)[1] - 1e-12 > 0


def test_ado_fits_power_laws_and_moves_weight_to_the_fastest_falling_source():
    n = np.arange(10, 400, 10, dtype=np.float64)
    law = fit_power_law(n, 1.5 + 3.0 * n ** -0.5)
    assert law is not None and law.alpha == pytest.approx(0.5, abs=0.05) and law.eps == pytest.approx(1.5, abs=0.1)
    fast = {"math": lambda n: 1.0 + 4.0 * n ** -0.5, "web": lambda n: 2.0 + 0.5 * n ** -0.2}
    policy = ADOPolicy(update_every=10)
    weights, changes = drive(policy, fast, 150, EVEN)
    # diminishing returns: math gains until its fitted decrease per row meets web's, not all the way
    assert 0.58 < weights["math"] < 0.9 and changes and "per row math" in changes[-1][2]
    assert policy.laws["math"].alpha > policy.laws["web"].alpha
    # ... and the same signal with the names swapped moves the other way
    swapped = {"web": fast["math"], "math": fast["web"]}
    weights, _ = drive(ADOPolicy(update_every=10), swapped, 150, EVEN)
    assert weights["web"] > 0.58


def test_bounds_hold_for_every_policy():
    fast = {"math": lambda n: 1.0 + 4.0 * n ** -0.5, "web": lambda n: 2.0 + 0.5 * n ** -0.2}
    bounds = {"math": (0.1, 0.6), "web": (0.4, 1.0)}
    for policy in (ADOPolicy(update_every=5, bounds=bounds),
                   OnlineDataMixing(update_every=5, bounds=bounds, reward="progress", learning_rate=0.5),
                   DoReMiPolicy({"math": 1.0, "web": 2.0}, update_every=5, bounds=bounds)):
        weights, changes = drive(policy, fast, 120, EVEN, {"math": lambda s: 3.0, "web": lambda s: 2.0}, 10)
        assert changes, policy.name
        for _, w, _ in changes:
            assert 0.1 - 1e-12 <= w["math"] <= 0.6 + 1e-12 and w["web"] >= 0.4 - 1e-12, (policy.name, w)
        if not isinstance(policy, ADOPolicy):
            assert weights["math"] == pytest.approx(0.6), policy.name  # pushed to its upper bound
    with pytest.raises(PolicyError, match=r"bounds\['web'\]"):
        ADOPolicy(bounds={"web": (0.5, 0.2)})


def test_smoothing_moves_part_of_the_way():
    hard = {"math": lambda n: 2.0, "web": lambda n: 4.0}
    rough, _ = drive(OnlineDataMixing(update_every=5, exploration=0.05), hard, 5, EVEN)
    smooth, _ = drive(OnlineDataMixing(update_every=5, exploration=0.05, smoothing=0.75), hard, 5, EVEN)
    assert smooth["web"] - 0.5 == pytest.approx(0.25 * (rough["web"] - 0.5))


def test_rule_fires_exactly_when_its_condition_holds():
    # math's held-out loss improves 5% per eval for 4 evals, then stalls
    curve = [4.0 * 0.95 ** min(i, 4) for i in range(10)]
    evals = {"math": lambda s: curve[s // 10 - 1], "web": lambda s: 3.0}
    rule = ShiftWeight(when=lambda h: h.improvement("math", k=3) < 0.01, take_from="web", give_to="math",
                       share=0.1, name="math stalls")
    policy = RulePolicy([rule])
    weights, changes = drive(policy, {"math": lambda n: 3.0, "web": lambda n: 3.0}, 100, EVEN, evals, eval_every=10)
    history = PolicyHistory()
    expected = []
    for i in range(10):  # when does the condition hold, eval by eval?
        history.add_eval(10 * (i + 1), [{"source": "math", "loss": curve[i]}])
        if history.improvement("math", k=3) < 0.01:
            expected.append(10 * (i + 1))
    assert expected == [80, 90, 100]  # the last 3 evals have been flat only from the 8th on
    assert [step for step, _, _ in changes] == expected
    assert changes[0][2] == "rules: rule 'math stalls': moved 0.050 from web to math"
    assert weights["web"] == pytest.approx(0.5 * 0.9 ** 3)
    with pytest.raises(PolicyError, match="not in the mixture"):
        drive(RulePolicy([ShiftWeight(lambda h: True, "code", "math", 0.1)], on="step"), {"math": lambda n: 1.0,
              "web": lambda n: 1.0}, 2, EVEN)


@pytest.mark.parametrize("make", [
    lambda: DoReMiPolicy({"math": 3.0, "web": 2.5}, update_every=5),
    lambda: OnlineDataMixing(update_every=5, reward="progress"),
    lambda: ADOPolicy(update_every=5),
    lambda: RulePolicy([ShiftWeight(lambda h: h.improvement("math", k=1) < 0.2, "web", "math", 0.2)]),
], ids=["doremi", "odm", "ado", "rules"])
def test_state_round_trip_gives_identical_next_decisions(make):
    losses = {"math": lambda n: 1.0 + 4.0 * n ** -0.5, "web": lambda n: 2.0 + 0.5 * n ** -0.2}
    evals = {"math": lambda s: 4.0 - s / 100, "web": lambda s: 3.0}
    whole, first = make(), make()
    _, all_changes = drive(whole, losses, 80, EVEN, evals, 10)
    weights, early = drive(first, losses, 40, EVEN, evals, 10)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores: plain JSON
    resumed = make()
    resumed.load_state_dict(state)
    # continue from step 41 with the same weights and the same rows seen
    seen = dict.fromkeys(EVEN, 0.0)
    w = dict(EVEN)
    late = []
    for step in range(1, 81):
        drawn = {s: max(1, round(8 * x)) for s, x in w.items()}
        for s in seen:
            seen[s] += drawn[s]
        if step <= 40:
            w = next((c[1] for c in reversed(early) if c[0] <= step), EVEN)
            continue
        resumed.observe_train(step, {s: losses[s](seen[s]) for s in w}, drawn)
        if step % 10 == 0:
            resumed.observe_eval(step, [{"source": s, "loss": evals[s](step), "bpb": evals[s](step) / math.log(2)}
                                        for s in w])
        decision = resumed.decide(step, w)
        if decision is not None:
            w = decision.weights
            late.append((step, dict(w), decision.cause))
    assert all_changes, "the policy never moved: the test proves nothing"
    assert early + late == all_changes
    assert resumed.state_dict() == json.loads(json.dumps(whole.state_dict()))
    other = make()
    other.update_every += 1  # built with another cadence: refused, not silently continued
    with pytest.raises(PolicyError, match="other settings"):
        other.load_state_dict(state)


def test_policies_from_a_document():
    policy = policy_from_dict({"name": "odm", "update_every": 20, "exploration": 0.1, "bounds": {"web": [0.2, 0.9]}})
    assert isinstance(policy, OnlineDataMixing) and policy.update_every == 20 and policy.bounds["web"] == (0.2, 0.9)
    with pytest.raises(PolicyError, match="choose one of"):
        policy_from_dict({"name": "bandit"})
    with pytest.raises(PolicyError, match="rules are Python"):
        policy_from_dict({"name": "rules"})
    with pytest.raises(PolicyError, match="policy 'ado'"):
        policy_from_dict({"name": "ado", "learning_rate": 1})


# ---- a short real run: real token shards, the real sampler and trainer ---------------------------------------
SEQ, BATCH, STEPS = 32, 4, 24
LEAVES = ("code-python", "math", "web-en")


@pytest.fixture(scope="module")
def demo(tokenized_curated):
    from mixlab.curation import open_token_sources, token_byte_lengths, tokenizer_path
    from mixlab.mixtures.sampler import val_windows
    from mixlab.training import HeldOutEvaluator

    train_sources = open_token_sources(tokenized_curated, sources=LEAVES)
    val = open_token_sources(tokenized_curated, split="val", sources=LEAVES)
    windows = {name: val_windows(src, SEQ, max_windows=4) for name, src in val.items()}
    evaluator = HeldOutEvaluator(windows, token_byte_lengths(tokenizer_path(tokenized_curated)), batch_size=4)
    vocab = int(max(int(src.read(0, len(src)).max()) for src in train_sources.values())) + 1
    return train_sources, evaluator, max(vocab, 600)


def _real_run(demo, root, run_id: str, policy: MixturePolicy, stop_after: int | None = None):
    from mixlab.mixtures.sampler import MixtureSampler
    from mixlab.mixtures.schedule import MixtureSchedule, Stage
    from mixlab.training import ModelConfig, TrainConfig, train

    sources, evaluator, vocab = demo
    # a second stage with its own (longer) sequence length: the trainer takes the batches as they come
    schedule = MixtureSchedule((Stage("stable", dict.fromkeys(LEAVES, 1 / 3), 0.75),
                                Stage("long", {"code-python": 0.2, "math": 0.3, "web-en": 0.5}, 0.25, seq_len=64)))
    cfg = TrainConfig.preset("tiny", total_steps=STEPS, batch_size=BATCH, seq_len=SEQ, warmup_steps=2, log_every=2,
                             eval_every=6, checkpoint_every=6, progress_bar=False, threads=1, schedule="constant")
    sampler = MixtureSampler(schedule, sources, seq_len=SEQ, batch_size=BATCH, total_steps=STEPS, seed=3)
    run = RunStore(root).create(run_id, config={})
    summary = train(run, ModelConfig.preset("tiny", vocab_size=vocab), cfg, sampler, evaluator,
                    stop_after=stop_after, policy=policy)
    return run, summary, sampler


def _odm() -> OnlineDataMixing:
    return OnlineDataMixing(update_every=3, exploration=0.1, learning_rate=0.5, bounds={"web-en": (0.1, 0.8)})


def test_real_run_with_a_policy_logs_its_decisions_and_resumes_identically(demo, tmp_path):
    whole, summary, sampler = _real_run(demo, tmp_path, "whole", _odm())
    changes = whole.mixture_changes()
    assert changes[0] == {"step": 0, "weights": pytest.approx(dict.fromkeys(LEAVES, 1 / 3)),
                          "cause": "start: the schedule's weights", "policy": "odm"}
    decided = [c for c in changes if c["cause"].startswith("odm: exp3 on loss")]
    assert len(decided) >= 4 and all(c["step"] % 3 == 0 for c in decided)
    assert all(0.1 - 1e-9 <= c["weights"]["web-en"] <= 0.8 + 1e-9 for c in decided)
    # the long stage starts at step 18 with the schedule's weights, then the policy takes over again
    stage_rows = [c for c in changes if c["cause"].startswith("schedule:")]
    assert [(c["step"], c["cause"]) for c in stage_rows] == [(18, "schedule: stage 'long' starts")]
    assert stage_rows[0]["weights"] == pytest.approx({"code-python": 0.2, "math": 0.3, "web-en": 0.5})
    # the sampler drew with the policy's weights: its weights at the end are the last decision's
    assert sampler.current_weights() == pytest.approx(changes[-1]["weights"])
    # the long stage trained 64-token rows: tokens come from the batch shapes
    assert summary["tokens"] == 18 * BATCH * SEQ + 6 * BATCH * 64
    # stopped in the middle (not on a checkpoint step), then resumed: the same decisions and losses
    _real_run(demo, tmp_path, "resumed", _odm(), stop_after=10)
    assert RunStore(tmp_path).get("resumed").status == "interrupted"
    resumed, _, _ = _real_run(demo, tmp_path, "resumed", _odm())
    assert (resumed.path / "mixture.jsonl").read_text() == (whole.path / "mixture.jsonl").read_text()
    assert [(m["step"], m["loss"]) for m in resumed.metrics()] == [(m["step"], m["loss"]) for m in whole.metrics()]
    assert sorted((e["step"], e["source"], e["loss"]) for e in resumed.evals()) == sorted(
        (e["step"], e["source"], e["loss"]) for e in whole.evals())

    # DoReMi against a reference run directory (the ODM run: another mixture, so real excess losses)
    doremi = DoReMiPolicy(whole.path, eta=20.0, update_every=6)
    dm_run, _, dm_sampler = _real_run(demo, tmp_path, "doremi", doremi)
    dm_changes = [c for c in dm_run.mixture_changes() if c["cause"].startswith("doremi")]
    assert dm_changes and {c["step"] for c in dm_changes} <= {6, 12, 18}  # only after evals
    loss_at = {(r["step"], r["source"]): r["loss"] for r in dm_run.evals()}
    ref_at = {(r["step"], r["source"]): r["loss"] for r in whole.evals()}
    for change in dm_changes:  # the excess losses named in the cause are this run's evals minus the reference's
        for leaf in LEAVES:
            excess = max(loss_at[(change["step"], leaf)] - ref_at[(change["step"], leaf)], 0.0)
            assert f"{leaf} {excess:.3f}" in change["cause"], change
    avg = doremi.average_weights()
    assert sum(avg.values()) == pytest.approx(1) and doremi.final_schedule().stages[0].weights == pytest.approx(avg)

    # the report plots the weights over the run and lists every change with its cause
    from mixlab.ablations.report import build_report

    report = build_report(whole.path, tmp_path / "report")
    page = report.html_path.read_text()
    assert report.plots["mixture_weights"].stat().st_size > 10_000
    assert "Adaptive mixture" in page and f"Weight changes ({len(changes)})" in page
    assert "schedule: stage &#x27;long&#x27; starts" in page and decided[0]["cause"].split(" (")[0] in page


def _math_rule() -> RulePolicy:
    # fires at every eval once there are two (improvement is NaN before): a condition that can be checked
    return RulePolicy([ShiftWeight(when=lambda h: h.improvement("math", k=1) < 1.0, take_from="web-en",
                                   give_to="math", share=0.2, name="more math")], update_every=1)


def _ado() -> ADOPolicy:
    return ADOPolicy(update_every=3, min_points=4, bounds={"web-en": (0.05, 0.9)})


@pytest.mark.parametrize("make", [_ado, _math_rule], ids=["ado", "rules"])
def test_ado_and_rules_decide_in_a_real_run_and_resume_identically(demo, tmp_path, make):
    whole, _, sampler = _real_run(demo, tmp_path, "whole", make())
    policy = make().name
    decided = [c for c in whole.mixture_changes() if c["cause"].startswith(f"{policy}:")]
    assert decided, whole.mixture_changes()
    assert sampler.current_weights() == pytest.approx(whole.mixture_changes()[-1]["weights"])
    if policy == "rules":  # at the evals of steps 12 and 18 (a stage starts at 18: the shift applies to its weights)
        assert [c["step"] for c in decided] == [12, 18]
        before = {"code-python": 0.2, "math": 0.3, "web-en": 0.5}  # the long stage's weights
        assert decided[1]["weights"] == pytest.approx({**before, "math": 0.3 + 0.1, "web-en": 0.5 - 0.1})
    else:
        assert all(c["step"] % 3 == 0 and c["weights"]["web-en"] >= 0.05 - 1e-9 for c in decided)
    _real_run(demo, tmp_path, "resumed", make(), stop_after=10)
    resumed, _, _ = _real_run(demo, tmp_path, "resumed", make())
    assert (resumed.path / "mixture.jsonl").read_text() == (whole.path / "mixture.jsonl").read_text()
    assert [(m["step"], m["loss"]) for m in resumed.metrics()] == [(m["step"], m["loss"]) for m in whole.metrics()]


def test_the_run_config_builds_the_policy(tmp_path):
    from mixlab.pipelines.run_config import run_config_from_document
    from mixlab.training import ConfigError

    doc = {"run_id": "adaptive", "runs_dir": str(tmp_path), "data": {"curated": str(tmp_path)},
           "model": {"preset": "tiny", "vocab_size": 600}, "train": {"preset": "tiny"},
           "policy": {"name": "ado", "update_every": 25, "bounds": {"math": [0.05, 0.5]}}}
    config = run_config_from_document(doc)
    policy = config.build_policy()
    assert isinstance(policy, ADOPolicy) and policy.update_every == 25 and policy.bounds == {"math": (0.05, 0.5)}
    assert config.build_policy() is not policy  # a fresh object per run
    assert run_config_from_document(config.to_dict()).policy == doc["policy"]  # run.json reproduces it
    assert run_config_from_document({**doc, "policy": None}).build_policy() is None
    with pytest.raises(ConfigError, match=r"policy: policy.name='bandit': choose one of \['ado', 'doremi', 'odm'\]"):
        run_config_from_document({**doc, "policy": {"name": "bandit"}})
    with pytest.raises(ConfigError, match="policy: odm: smoothing"):
        run_config_from_document({**doc, "policy": {"name": "odm", "smoothing": 1.5}})
