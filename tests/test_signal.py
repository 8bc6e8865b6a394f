"""The four signal checks on constructed series whose answer is known: a monotone score gives rho 1, seed std is
numpy's, a score at chance is not above random, flipping rankings give tau -1, and the verdict tells a task that
carries signal from one that does not."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import polars as pl
import pytest
from mixlab.ablations.signal import (
    SignalThresholds,
    above_random,
    as_table,
    monotonicity,
    noise,
    ranking_consistency,
    signal_table,
    task_signal,
)

STEPS = [100 * (i + 1) for i in range(10)]


def _rows(task: str, variants: int, seeds: int, score: Callable[[int, int, int], float],
          steps: list[int] = STEPS) -> list[dict]:
    """One row per (variant, seed, step); `score(variant, seed, step_index)` gives the value."""
    return [{"run": f"{task}-v{v}-s{s}", "seed": s, "variant": f"v{v}", "step": step, "task": task,
             "value": score(v, s, i)}
            for v in range(variants) for s in range(seeds) for i, step in enumerate(steps)]


# ---- monotonicity ---------------------------------------------------------------------------
def test_monotone_series_gives_rho_one_and_reversed_minus_one():
    rising = _rows("acc", 2, 2, lambda v, s, i: 0.3 + 0.01 * i + 0.1 * v + 0.001 * s)
    assert monotonicity(rising).rho == pytest.approx(1.0)
    falling = _rows("acc", 2, 2, lambda v, s, i: 0.9 - 0.01 * i)
    assert monotonicity(falling).rho == pytest.approx(-1.0)
    # a loss that falls is improving: oriented by the metric's direction
    assert monotonicity(falling, higher_is_better=False).rho == pytest.approx(1.0)
    assert all(r == pytest.approx(-1.0) for r in monotonicity(falling).per_run.values())


def test_noise_only_series_gives_rho_near_zero():
    rng = np.random.default_rng(0)
    steps = [10 * (i + 1) for i in range(40)]
    table = _rows("acc", 5, 4, lambda v, s, i: 0.5 + float(rng.normal(0, 0.01)), steps)
    rho = monotonicity(table).rho
    assert rho is not None and abs(rho) < 0.15


def test_ties_share_ranks():
    table = [{"run": "r", "seed": 0, "variant": "a", "step": st, "task": "t", "value": v}
             for st, v in zip([1, 2, 3, 4], [1.0, 1.0, 2.0, 2.0], strict=True)]
    expected = np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3.5, 3.5])[0, 1]  # average ranks of the tied values
    assert monotonicity(table).rho == pytest.approx(expected)


def test_constant_or_short_series_gives_none_with_reason():
    flat = _rows("acc", 1, 2, lambda v, s, i: 0.25)
    result = monotonicity(flat)
    assert result.rho is None and "constant" in result.reason
    short = _rows("acc", 1, 1, lambda v, s, i: 0.1 * i, steps=[1, 2])
    result = monotonicity(short)
    assert result.rho is None and "needs 3" in result.reason
    # one constant run among moving ones: left out of the mean, named in the reason
    mixed = _rows("acc", 1, 2, lambda v, s, i: 0.25 if s == 0 else 0.25 + 0.01 * i)
    result = monotonicity(mixed)
    assert result.rho == pytest.approx(1.0) and "acc-v0-s0" in result.reason


# ---- noise ----------------------------------------------------------------------------------
def test_seed_std_equals_numpy():
    rng = np.random.default_rng(1)
    table = _rows("acc", 3, 4, lambda v, s, i: 0.4 + 0.05 * v + float(rng.normal(0, 0.02)))
    frame = pl.DataFrame(table)
    finals = frame.filter(pl.col("step") == STEPS[-1])
    result = noise(frame)
    assert result.step == STEPS[-1] and result.seeds == {"v0": 4, "v1": 4, "v2": 4}
    variances = []
    for v in ("v0", "v1", "v2"):
        values = finals.filter(pl.col("variant") == v)["value"].to_numpy()
        assert result.per_variant[v] == pytest.approx(np.std(values, ddof=1))
        assert noise(frame, ddof=0).per_variant[v] == pytest.approx(np.std(values))
        variances.append(np.var(values, ddof=1))
    assert result.std == pytest.approx(math.sqrt(np.mean(variances)))  # equal seeds: plain mean of variances
    means = [finals.filter(pl.col("variant") == v)["value"].mean() for v in ("v0", "v1", "v2")]
    assert result.spread == pytest.approx(max(means) - min(means))


def test_one_seed_gives_none_with_reason():
    result = noise(_rows("acc", 2, 1, lambda v, s, i: 0.3 + 0.1 * v))
    assert result.std is None and result.per_variant == {"v0": None, "v1": None}
    assert "2 seeds" in result.reason and result.snr is None


def test_final_is_the_last_step_every_run_reached():
    table = _rows("acc", 1, 3, lambda v, s, i: 0.3 + 0.01 * i * (s + 1))
    table = [r for r in table if not (r["seed"] == 2 and r["step"] > 500)]  # one run stopped early
    result = noise(table)
    assert result.step == 500
    values = [0.3 + 0.01 * 4 * (s + 1) for s in range(3)]
    assert result.std == pytest.approx(np.std(values, ddof=1))


# ---- above random ---------------------------------------------------------------------------
def test_task_at_chance_is_not_above_random():
    rng = np.random.default_rng(2)
    at_chance = _rows("acc", 3, 3, lambda v, s, i: 0.25 + float(rng.normal(0, 0.01)))
    result = above_random(at_chance, chance=0.25)
    assert result.above is False and abs(result.margin) < 0.02 and "within" in result.reason
    clear = _rows("acc", 3, 3, lambda v, s, i: 0.45 + float(rng.normal(0, 0.01)))
    result = above_random(clear, chance=0.25)
    assert result.above is True and result.margin == pytest.approx(result.final - 0.25)
    assert set(result.per_variant) == {"v0", "v1", "v2"}


def test_loss_below_chance_is_above_random():
    # a loss well under the uniform-guess loss log(256) is better than random
    table = _rows("loss", 2, 2, lambda v, s, i: 3.0 - 0.1 * i + 0.01 * s)
    result = above_random(table, chance=math.log(256), higher_is_better=False)
    assert result.above is True and result.margin == pytest.approx(math.log(256) - result.final)
    worse = _rows("loss", 2, 2, lambda v, s, i: 6.0 + 0.01 * s)
    assert above_random(worse, chance=math.log(256), higher_is_better=False).above is False


def test_one_run_needs_an_item_count():
    table = _rows("acc", 1, 1, lambda v, s, i: 0.30)
    result = above_random(table, chance=0.25)
    assert result.above is None and "n_items" in result.reason
    # binomial error of an accuracy over 1000 items: sqrt(0.3 * 0.7 / 1000) ~ 0.0145; margin 0.05 > 2 x that
    result = above_random(table, chance=0.25, n_items=1000)
    assert result.stderr == pytest.approx(math.sqrt(0.3 * 0.7 / 1000)) and result.above is True
    assert above_random(table, chance=0.25, n_items=50).above is False  # 50 items: error ~ 0.065


def _own_levels() -> tuple[list[dict], dict[str, float]]:
    """A falling loss whose two variants end 0.2 under very different chance levels (two vocabularies, say)."""
    levels = {"v0": 6.0, "v1": 3.0}
    return _rows("loss", 2, 3, lambda v, s, i: levels[f"v{v}"] - 0.11 - 0.01 * i + 0.001 * (s - 1)), levels


def test_each_variant_is_measured_from_its_own_chance_level():
    table, levels = _own_levels()
    own = above_random(table, chance=levels, higher_is_better=False)
    assert own.chance == pytest.approx(4.5) and own.chance_per_variant == levels  # mean level over the 6 runs
    assert own.margin == pytest.approx(0.2) and own.per_variant == pytest.approx({"v0": 0.2, "v1": 0.2})
    assert own.above is True and own.stderr < 0.001  # the error is over score - own level: seeds only
    # one level for all (their mean): same margin, but the 3-nat gap between the variants swamps the error
    shared = above_random(table, chance=4.5, higher_is_better=False)
    assert shared.margin == pytest.approx(own.margin) and shared.chance_per_variant is None
    assert shared.above is False and shared.stderr > 0.5 and "over chance 4.5" in shared.reason
    same = above_random(table, chance={"v0": 4.5, "v1": 4.5}, higher_is_better=False)
    assert (same.margin, same.stderr, same.above) == pytest.approx((shared.margin, shared.stderr, shared.above))
    assert "variants' own chance levels" in same.reason
    with pytest.raises(ValueError, match=r"no chance level for variant\(s\) \['v1'\]"):
        above_random(table, chance={"v0": 6.0}, higher_is_better=False)


def test_signal_table_takes_one_level_or_one_per_variant_per_task():
    losses, levels = _own_levels()
    accuracy = _rows("acc", 2, 3, lambda v, s, i: 0.3 + 0.02 * i + 0.05 * v + 0.001 * s)
    frame = signal_table([*losses, *accuracy], {"loss": levels, "acc": 0.25}, {"loss": False, "acc": True},
                         tasks=["loss", "acc"])
    assert frame["task"].to_list() == ["loss", "acc"]  # the order asked for
    loss, acc = frame.rows(named=True)
    assert loss["chance"] == pytest.approx(4.5) and loss["chance_per_variant"] == "v0 6, v1 3"
    assert loss["above_random"] is True and acc["chance"] == 0.25 and acc["chance_per_variant"] is None
    (signal,) = task_signal(losses, {"loss": levels}, {"loss": False})
    assert signal.above_random.chance_per_variant == levels and "above random (margin 0.2)" in signal.reason


# ---- ranking consistency --------------------------------------------------------------------
def test_flipping_rankings_give_tau_minus_one_and_stable_ones_one():
    stable = _rows("acc", 4, 2, lambda v, s, i: 0.3 + 0.05 * v + 0.01 * i)
    result = ranking_consistency(stable, last=4)
    assert result.tau == pytest.approx(1.0) and result.steps == STEPS[-4:] and len(result.pairs) == 3
    flipping = _rows("acc", 4, 2, lambda v, s, i: 0.3 + (0.05 * v if i % 2 else -0.05 * v))
    result = ranking_consistency(flipping, last=4)
    assert result.tau == pytest.approx(-1.0)
    assert all(t == pytest.approx(-1.0) for _, _, t in result.pairs)


def test_ranking_uses_mean_over_seeds_and_handles_ties():
    # v1's seeds swing past its neighbours and back at every step, but their mean keeps its place
    def swing(v: int, s: int, i: int) -> float:
        return 0.3 + 0.02 * v + (0.03 * (-1) ** (i + s) if v == 1 else 0.0)
    table = _rows("acc", 3, 2, swing)
    assert ranking_consistency(table).tau == pytest.approx(1.0)
    assert ranking_consistency([r for r in table if r["seed"] == 0]).tau < 0  # one seed alone flips
    tied = _rows("acc", 3, 2, lambda v, s, i: 0.3)
    result = ranking_consistency(tied)
    assert result.tau is None and "tie" in result.reason
    one = ranking_consistency(_rows("acc", 1, 2, lambda v, s, i: 0.1 * i))
    assert one.tau is None and "one variant" in one.reason


# ---- verdicts -------------------------------------------------------------------------------
def _ablation() -> list[dict]:
    rng = np.random.default_rng(3)
    good = _rows("good", 3, 3, lambda v, s, i: 0.3 + 0.02 * i + 0.05 * v + float(rng.normal(0, 0.002)))
    bad = _rows("bad", 3, 3, lambda v, s, i: 0.25 + float(rng.normal(0, 0.01)))
    return good + bad


def test_trustworthy_and_untrustworthy_tasks_get_the_right_verdicts():
    signals = task_signal(_ablation(), chance={"good": 0.25, "bad": 0.25},
                          higher_is_better={"good": True, "bad": True})
    by_task = {s.task: s for s in signals}
    assert [s.task for s in signals] == ["bad", "good"]
    good, bad = by_task["good"], by_task["bad"]
    assert good.trustworthy, good.reason
    assert "monotonic" in good.reason and "stable ranking" in good.reason
    assert not bad.trustworthy
    assert "not above random" in bad.reason and "not monotonic" in bad.reason and "noisy" in bad.reason
    assert good.monotonicity.rho > 0.9 and good.noise.snr > 10 and good.ranking.tau == pytest.approx(1.0)


def test_thresholds_decide_and_missing_checks_are_not_trusted():
    table = _ablation()
    strict = SignalThresholds(min_snr=1e6)
    good = task_signal(table, {"good": 0.25, "bad": 0.25}, {"good": True, "bad": True},
                       thresholds=strict, tasks=["good"])[0]
    assert not good.trustworthy and good.reason.startswith("noisy")
    single_seed = [r for r in table if r["seed"] == 0 and r["task"] == "good"]
    one = task_signal(single_seed, {"good": 0.25}, {"good": True})[0]
    assert not one.trustworthy and "cannot judge noise" in one.reason


def test_signal_table_matches_task_signal():
    table = pl.DataFrame(_ablation())
    chance, hib = {"good": 0.25, "bad": 0.25}, {"good": True, "bad": True}
    frame = signal_table(table, chance, hib)
    signals = task_signal(table, chance, hib)
    assert frame["task"].to_list() == [s.task for s in signals]
    assert frame["trustworthy"].to_list() == [s.trustworthy for s in signals]
    assert frame["rho"].to_list() == pytest.approx([s.monotonicity.rho for s in signals])
    assert frame["seed_std"].to_list() == pytest.approx([s.noise.std for s in signals])
    single = signal_table([r for r in _ablation() if r["seed"] == 0], chance, hib)
    assert single["seed_std"].null_count() == 2 and single["trustworthy"].to_list() == [False, False]


# ---- bad input ------------------------------------------------------------------------------
def test_bad_tables_are_refused_with_what_to_do():
    rows = _rows("acc", 2, 2, lambda v, s, i: 0.3)
    with pytest.raises(ValueError, match="variant_column=None"):
        as_table([{k: v for k, v in r.items() if k != "variant"} for r in rows])
    assert as_table([{k: v for k, v in r.items() if k != "variant"} for r in rows],
                    variant_column=None)["variant"].n_unique() == 4
    with pytest.raises(ValueError, match="non-finite"):
        as_table([*rows[:-1], {**rows[-1], "value": float("nan")}])
    with pytest.raises(ValueError, match="repeated"):
        as_table([*rows, rows[0]])
    with pytest.raises(ValueError, match="name one with task"):
        monotonicity(rows + _rows("other", 1, 1, lambda v, s, i: 0.1))
    with pytest.raises(ValueError, match=r"chance has no entry for task\(s\) \['acc'\]"):
        task_signal(rows, chance={}, higher_is_better={"acc": True})
    with pytest.raises(ValueError, match="empty"):
        as_table(pl.DataFrame(schema={c: pl.Float64 for c in ("run", "seed", "step", "task", "value", "variant")}))
