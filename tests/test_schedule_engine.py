"""The schedule engine: stage bounds in every unit, refusals, curricula, per-stage seq_len, hierarchy, YAML/JSON."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from mixlab.curation import ShardManifest
from mixlab.mixtures.hierarchy import MixtureNode
from mixlab.mixtures.schedule import (
    Curriculum,
    MixtureSchedule,
    ResolvedStage,
    ScheduleError,
    Stage,
)

AB = {"a": 0.5, "b": 0.5}


def starts(schedule: MixtureSchedule, total: int, batch: int = 1, seq_len: int = 8) -> list[tuple[int, int]]:
    return [(s.start_step, s.end_step) for s in schedule.resolve(total, batch, seq_len).stages]


# ---- bounds ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.75, 0.25), (0.9, 0.1), (0.3, 0.5, 0.2), (0.7, 1e-4, 0.2999),
                                       (1 / 3, 1 / 3, 1 / 3)])
def test_fraction_bounds_keep_the_progress_rule(fractions):
    """Resolved starts are the first steps that the progress rule (step / total) puts in each stage: step s is
    in stage i when s / total reaches the cumulative fraction of the stages before i (the earlier sampler's rule)."""
    schedule = MixtureSchedule(tuple(Stage(f"s{i}", AB, f) for i, f in enumerate(fractions)))
    cumulative = np.cumsum(fractions)[:-1]

    def progress_rule(progress: float) -> int:
        return int(sum(progress >= c - 1e-12 for c in cumulative))

    for total in range(1, 400):
        resolved = schedule.resolve(total, 1, 8)
        in_force = [progress_rule(s / total) for s in range(total + 2)]
        for i, stage in enumerate(resolved.stages):
            assert stage.start_step == next(s for s, k in enumerate(in_force) if k >= i), (total, i)
        assert resolved.stages[-1].end_step == total
        assert [resolved.stage_index_at_step(s) for s in range(total + 2)] == in_force


def test_bounds_by_tokens_steps_and_start_step():
    schedule = MixtureSchedule((
        Stage("warmup", AB, steps=10),
        Stage("stable", AB, tokens=1000),  # 1000 / (4 * 16) = 15.6 -> 16 steps
        Stage("long", AB, start_step=26, seq_len=64),
        Stage("decay", AB, start_step=50),
    ))
    resolved = schedule.resolve(60, 4, 16)
    assert resolved.stages == (
        ResolvedStage("warmup", 0, 0, 10, 16), ResolvedStage("stable", 1, 10, 26, 16),
        ResolvedStage("long", 2, 26, 50, 64), ResolvedStage("decay", 3, 50, 60, 16),
    )
    assert [resolved.seq_len_at_step(s) for s in (0, 25, 26, 49, 50, 59, 500)] == [16, 16, 64, 64, 16, 16, 16]
    assert resolved.stage_index_at_step(10**9) == 3  # past the end: the last stage
    assert list(resolved.stage_indices(0, 62)) == [resolved.stage_index_at_step(s) for s in range(62)]
    assert resolved.total_tokens == 4 * (10 * 16 + 16 * 16 + 24 * 64 + 10 * 16)
    assert resolved.stage_start_step("long") == 26 and resolved.stage_start_step(-1) == 50
    # a tokens bound depends on the stage's own seq_len
    per_stage = MixtureSchedule((Stage("short", AB, tokens=1000, seq_len=64), Stage("rest", AB)))
    assert starts(per_stage, 20, 4, 16) == [(0, 4), (4, 20)]
    # a fraction stage beside step stages: the rest goes to the unbounded last stage
    mixed = MixtureSchedule((Stage("warm", AB, steps=5), Stage("main", AB, 0.5), Stage("rest", AB)))
    assert starts(mixed, 100) == [(0, 5), (5, 55), (55, 100)]


def test_bounds_that_do_not_tile_the_run_are_refused_naming_the_stages():
    gap = MixtureSchedule((Stage("a", AB, steps=10), Stage("b", AB, start_step=12)))
    with pytest.raises(ScheduleError, match=r"steps \[10, 12\) belong to no stage: stage 'a' ends at step 10 and "
                                            r"stage 'b' starts at step 12"):
        gap.resolve(100, 1, 8)
    overlap = MixtureSchedule((Stage("a", AB, steps=10), Stage("b", AB, start_step=8)))
    with pytest.raises(ScheduleError, match=r"stages 'a' and 'b' overlap: 'a' runs to step 10 but 'b' starts at "
                                            r"step 8"):
        overlap.resolve(100, 1, 8)
    with pytest.raises(ScheduleError, match=r"stage 'b' starts at step 150, past the 100-step run"):
        MixtureSchedule((Stage("a", AB), Stage("b", AB, start_step=150))).resolve(100, 1, 8)
    with pytest.raises(ScheduleError, match=r"stage 'b' runs to step 120, past the 100-step run"):
        MixtureSchedule((Stage("a", AB, steps=60), Stage("b", AB, steps=60))).resolve(100, 1, 8)
    with pytest.raises(ScheduleError, match=r"steps \[60, 100\) belong to no stage; leave the last stage 'b'"):
        MixtureSchedule((Stage("a", AB, steps=30), Stage("b", AB, steps=30))).resolve(100, 1, 8)
    with pytest.raises(ScheduleError, match=r"steps \[40, 100\) belong to no stage; leave the last stage 'b'"):
        MixtureSchedule((Stage("a", AB, steps=10), Stage("b", AB, 0.3))).resolve(100, 1, 8)
    with pytest.raises(ScheduleError, match=r"stage 'a' has no length .* next stage 'b' has no start_step"):
        MixtureSchedule((Stage("a", AB), Stage("b", AB, steps=3)))
    with pytest.raises(ScheduleError, match=r"stage 'a' starts at step 5, but the run starts at step 0"):
        MixtureSchedule((Stage("a", AB, start_step=5),))
    with pytest.raises(ScheduleError, match=r"stage 'c' starts at step 5, not after stage 'b' \(step 5\)"):
        MixtureSchedule((Stage("a", AB, start_step=0), Stage("b", AB, start_step=5), Stage("c", AB, start_step=5)))
    with pytest.raises(ScheduleError, match=r"stage 'a': give one bound, not \['fraction', 'steps'\]"):
        Stage("a", AB, 0.5, steps=3)
    with pytest.raises(ScheduleError, match=r"stage 'a': tokens must be an integer >= 1, got -5"):
        Stage("a", AB, tokens=-5)
    with pytest.raises(ScheduleError, match=r"stage fractions add up to more than the whole run: a=0.7 \+ b=0.6"):
        MixtureSchedule((Stage("a", AB, 0.7), Stage("b", AB, 0.6), Stage("c", AB)))


@pytest.mark.parametrize("weights, message", [
    ({"web": float("nan"), "code": 1.0}, r"stage 's': weight of 'web': weights must be finite and non-negative, "
                                         r"got nan"),
    ({"web": -0.5, "code": 1.5}, r"stage 's': weight of 'web': weights must be finite and non-negative, got -0.5"),
    ({"web": 0.0, "code": 0}, r"stage 's': needs at least one source with a positive weight"),
    ({"web": "0.5", "code": 0.5}, r"stage 's': weight of 'web': weights must be numbers, got '0.5'"),
    ({"web": True}, r"stage 's': weight of 'web': weights must be numbers, got True"),
    ({"web": {"weight": 1.0, "children": {"en": -1.0}}}, r"stage 's': weight of 'web': child 'en': .*non-negative"),
])
def test_bad_weights_name_the_stage_and_the_leaf(weights, message):
    with pytest.raises(ScheduleError, match=message):
        Stage("s", weights)


def test_weights_must_sum_to_one_unless_normalised():
    with pytest.raises(ScheduleError, match=r"stage 'decay': weights sum to 0.9, not 1 \(web=0.6 \+ code=0.3\)"):
        MixtureSchedule.stable_decay({"web": 0.5, "code": 0.5}, {"web": 0.6, "code": 0.3})
    schedule = MixtureSchedule.stable_decay({"web": 0.5, "code": 0.5}, {"web": 0.6, "code": 0.3}, normalize=True)
    assert schedule.resolve(10, 1, 8).weights_at_step(9) == pytest.approx({"code": 1 / 3, "web": 2 / 3})
    with pytest.raises(ScheduleError, match=r"stage 's' curriculum end: weights sum to 2"):
        MixtureSchedule((Stage("s", AB, curriculum=Curriculum({"a": 1.0, "b": 1.0}, "linear")),))
    tree = {"web": MixtureNode(0.8, {"en": 0.5, "fr": 0.4}), "code": 0.2}
    with pytest.raises(ScheduleError, match=r"stage 's': weights under 'web' sum to 0.9"):
        MixtureSchedule((Stage("s", tree),))


# ---- curricula ---------------------------------------------------------------------------------------
def curriculum_schedule(shape: str, at: float = 0.5) -> MixtureSchedule:
    return MixtureSchedule((
        Stage("warm", {"a": 1.0}, steps=10),
        Stage("anneal", {"a": 0.8, "b": 0.2}, steps=11, curriculum=Curriculum({"b": 0.5, "c": 0.5}, shape, at)),
        Stage("end", {"c": 1.0}),
    ))


def test_step_curriculum_switches_at_its_fraction():
    resolved = curriculum_schedule("step", at=0.3).resolve(30, 2, 8)
    # 11 steps, switch at ceil(0.3 * 11) = 4 steps into the stage: steps 10..13 start, 14..20 end
    assert resolved.weights_at_step(13) == {"a": 0.8, "b": 0.2, "c": 0.0}
    assert resolved.weights_at_step(14) == {"a": 0.0, "b": 0.5, "c": 0.5}
    assert resolved.weights_at_step(20) == {"a": 0.0, "b": 0.5, "c": 0.5}
    assert resolved.weights_at_step(21) == {"a": 0.0, "b": 0.0, "c": 1.0}


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_linear_and_cosine_curricula_interpolate_from_first_to_last_step(shape):
    resolved = curriculum_schedule(shape).resolve(30, 2, 8)
    assert resolved.weights_at_step(9) == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert resolved.weights_at_step(10) == {"a": 0.8, "b": 0.2, "c": 0.0}  # the stage's first step: its weights
    assert resolved.weights_at_step(20) == {"a": 0.0, "b": 0.5, "c": 0.5}  # its last step: the end mixture
    for k in range(11):
        t = k / 10 if shape == "linear" else (1 - math.cos(math.pi * k / 10)) / 2
        expected = {"a": 0.8 * (1 - t), "b": 0.2 * (1 - t) + 0.5 * t, "c": 0.5 * t}
        assert resolved.weights_at_step(10 + k) == pytest.approx(expected, abs=1e-15)
    # three steps in: linear 0.3, cosine (1 - cos(0.3 pi)) / 2 = 0.2061
    t3 = resolved.weights_at_step(13)["c"] / 0.5
    assert t3 == pytest.approx(0.3 if shape == "linear" else 0.20610737385376343, abs=1e-12)


@pytest.mark.parametrize("shape", ["step", "linear", "cosine"])
def test_weights_matrix_and_expected_rows_are_exact(shape):
    schedule = curriculum_schedule(shape, at=0.4)
    resolved = schedule.resolve(30, 6, 8)
    matrix = resolved.weights_matrix(0, 30)
    assert matrix.shape == (30, 3) and matrix.dtype == np.float64
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    for step in (0, 11, 17, 29):
        assert dict(zip(resolved.sources, matrix[step], strict=True)) == resolved.weights_at_step(step)
    np.testing.assert_array_equal(resolved.weights_matrix(7, 19), matrix[7:19])  # blocks agree with the whole
    for i, stage in enumerate(resolved.stages):
        block = resolved.weights_matrix(stage.start_step, stage.end_step).sum(axis=0) * 6
        rows = resolved.expected_rows(i)
        assert [rows[n] for n in resolved.sources] == pytest.approx(list(block), rel=1e-12, abs=1e-12)
    total = resolved.expected_rows()
    assert sum(total.values()) == pytest.approx(30 * 6)
    assert resolved.expected_tokens() == pytest.approx({n: r * 8 for n, r in total.items()})


def test_expected_tokens_use_each_stage_seq_len():
    schedule = MixtureSchedule((Stage("short", {"web": 1.0}, 0.75), Stage("long", {"book": 1.0}, 0.25, seq_len=1024)))
    resolved = schedule.resolve(100, 8, 256)
    assert [s.seq_len for s in resolved.stages] == [256, 1024]
    assert resolved.expected_rows() == {"book": 200.0, "web": 600.0}
    assert resolved.expected_tokens() == {"book": 200.0 * 1024, "web": 600.0 * 256}
    assert resolved.expected_tokens(1) == {"book": 200.0 * 1024, "web": 0.0}
    matrix = resolved.weights_matrix(70, 80)  # sources sorted: book, web
    assert matrix.tolist() == [[0.0, 1.0]] * 5 + [[1.0, 0.0]] * 5


def test_curriculum_is_validated():
    with pytest.raises(ScheduleError, match="unknown shape 'exp'"):
        Curriculum({"a": 1.0}, "exp")
    with pytest.raises(ScheduleError, match=r"at must be a number in \(0, 1\)"):
        Curriculum({"a": 1.0}, "step", at=1.5)
    with pytest.raises(ScheduleError, match=r"stage 's': curriculum.*expected \{end"):
        Stage("s", AB, curriculum={"shape": "linear"})


# ---- hierarchy ---------------------------------------------------------------------------------------
def web_code_math(rule: str = "by_tokens") -> dict:
    langs = ["web-fr", "web-de", "web-es", "web-ru"]
    return {
        "web": MixtureNode(0.75, {"web-en": 0.88, "multilingual": MixtureNode(0.12, langs, rule)}),
        "code-python": 0.15,
        "math": 0.10,
    }


@pytest.fixture(scope="module")
def train_tokens(tokenized_curated: Path) -> dict[str, int]:
    manifest = ShardManifest.load(tokenized_curated)
    return {name: src.tokens["train"] for name, src in manifest.sources.items() if src.tokens.get("train")}


def test_flattening_by_tokens_is_the_exact_product(train_tokens):
    schedule = MixtureSchedule((Stage("stable", web_code_math(), 0.8), Stage("decay", {"math": 0.5, "code-python": 0.5})))
    assert not schedule.is_flat and schedule.flatten(train_tokens).is_flat
    assert schedule.sources == ["code-python", "math", "web-de", "web-en", "web-es", "web-fr", "web-ru"]
    with pytest.raises(ScheduleError, match=r"flatten it with schedule.flatten\(token counts\)"):
        schedule.resolve(100, 1, 8)
    flat = schedule.flatten(train_tokens)
    weights = flat.stages[0].weights
    multi = sum(train_tokens[n] for n in ("web-fr", "web-de", "web-es", "web-ru"))
    assert weights["web-en"] == 0.75 * 0.88
    for lang in ("web-fr", "web-de", "web-es", "web-ru"):
        assert weights[lang] == 0.75 * 0.12 * (train_tokens[lang] / multi)
    assert weights["code-python"] == 0.15 and weights["math"] == 0.10
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert flat.stages[1] == schedule.stages[1] and flat.stages[0].fraction == 0.8
    resolved = flat.resolve(100, 4, 64)
    assert resolved.weights_at_step(0)["web-de"] == pytest.approx(weights["web-de"])
    with pytest.raises(ScheduleError, match=r"group 'web'/multilingual: rule 'by_tokens' has no token count for "
                                            r"\['web-es'\]"):
        schedule.flatten({k: v for k, v in train_tokens.items() if k != "web-es"})


def test_flattening_uniform_and_explaining():
    schedule = MixtureSchedule((Stage("s", web_code_math("uniform")),))
    weights = schedule.flatten().stages[0].weights
    assert weights["web-fr"] == weights["web-ru"] == 0.75 * 0.12 * 0.25
    text = schedule.explain_flattening()
    assert "stage 's':" in text and "multilingual (uniform)" in text
    assert re.search(r"web-en\s+0.88\s+-> 0.66\b", text)
    assert re.search(rf"web-fr\s+0.25\s+-> {0.75 * 0.12 * 0.25:.6g}", text)
    assert re.search(r"code-python\s+0.15\s+-> 0.15", text)
    with pytest.raises(ScheduleError, match="rule 'uniform' shares a list of leaves"):
        MixtureNode(1.0, {"a": 1.0}, "uniform")
    with pytest.raises(ScheduleError, match="have no weights; set rule 'by_tokens' or 'uniform'"):
        MixtureNode(1.0, ["a", "b"])


def test_explaining_by_tokens_shows_the_counts(train_tokens):
    text = MixtureSchedule((Stage("s", web_code_math()),)).explain_flattening(train_tokens)
    assert f"web-fr ({train_tokens['web-fr']:,d} tokens)" in text


# ---- the same objects in Python, YAML and JSON ---------------------------------------------------------
SCHEDULE_YAML = """
format: mixlab.mixture/v2
description: a long-context ablation
normalize: false
selections:
  - {name: web-en-hq, source: web-en, where: {language_score: {min: 0.9}}}
stages:
  - name: stable
    fraction: 0.7
    weights:
      web: {weight: 0.75, children: {web-en-hq: 0.88, multilingual: {weight: 0.12, rule: uniform,
            children: [web-fr, web-de]}}}
      code-python: 0.15
      math: 0.10
  - name: anneal
    steps: 200
    weights: {web-en-hq: 0.5, math: 0.5}
    curriculum: {shape: cosine, end: {math: 0.8, code-python: 0.2}}
  - name: long
    seq_len: 1024
    weights: {web-en-hq: 1.0}
"""


def python_schedule() -> MixtureSchedule:
    return MixtureSchedule(
        (
            Stage("stable", {"web": MixtureNode(0.75, {"web-en-hq": 0.88, "multilingual": MixtureNode(
                0.12, ["web-fr", "web-de"], "uniform")}), "code-python": 0.15, "math": 0.10}, 0.7),
            Stage("anneal", {"web-en-hq": 0.5, "math": 0.5}, steps=200,
                  curriculum=Curriculum({"math": 0.8, "code-python": 0.2}, "cosine")),
            Stage("long", {"web-en-hq": 1.0}, seq_len=1024),
        ),
        description="a long-context ablation",
        selections=({"name": "web-en-hq", "source": "web-en", "where": {"language_score": {"min": 0.9}}},),
    )


def test_yaml_json_and_python_describe_the_same_schedule(tmp_path: Path):
    schedule = python_schedule()
    from_yaml = MixtureSchedule.from_yaml(SCHEDULE_YAML)
    assert from_yaml == schedule
    assert MixtureSchedule.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
    assert MixtureSchedule.from_yaml(schedule.to_yaml()) == schedule
    assert MixtureSchedule.from_yaml(schedule.save(tmp_path / "mix.yaml")) == schedule
    saved = schedule.save(tmp_path / "mix.json")
    assert MixtureSchedule.from_dict(json.loads(saved.read_text())) == schedule
    assert from_yaml.fingerprint() == schedule.fingerprint()
    assert schedule.selection_names == ["web-en-hq"]
    assert yaml.safe_load(schedule.to_yaml())["selections"][0]["where"] == {"language_score": {"min": 0.9}}
    resolved = schedule.flatten().resolve(1000, 4, 256)
    assert [(s.start_step, s.end_step, s.seq_len) for s in resolved.stages] == [
        (0, 700, 256), (700, 900, 256), (900, 1000, 1024)]


def test_fingerprint_covers_what_the_sampler_depends_on():
    base = python_schedule()
    changed = [
        MixtureSchedule((*base.stages[:2], base.stages[2].replace(seq_len=2048)), selections=base.selections),
        MixtureSchedule((base.stages[0], base.stages[1].replace(steps=201), base.stages[2]),
                        selections=base.selections),
        MixtureSchedule((base.stages[0], base.stages[1].replace(curriculum=Curriculum(
            {"math": 0.8, "code-python": 0.2}, "linear")), base.stages[2]), selections=base.selections),
        MixtureSchedule(base.stages, selections=({"name": "web-en-hq", "source": "web-en"},)),
    ]
    prints = {s.fingerprint() for s in changed}
    assert base.fingerprint() not in prints and len(prints) == len(changed)
    same = MixtureSchedule(base.stages, description="other words", selections=base.selections)
    assert same.fingerprint() == base.fingerprint()


def test_unknown_keys_are_refused_by_name():
    with pytest.raises(ScheduleError, match=r"stage 'a': unknown keys \['fractoin'\]"):
        MixtureSchedule.from_dict({"stages": [{"name": "a", "fractoin": 1.0, "weights": {"web": 1.0}}]})
    with pytest.raises(ScheduleError, match=r"unknown schedule keys \['stage'\]"):
        MixtureSchedule.from_dict({"stage": []})


def test_map_sources_keeps_bounds_and_curricula():
    schedule = MixtureSchedule((
        Stage("a", {"stack-py": 0.3, "stack-go": 0.2, "web": 0.5}, steps=10, seq_len=32),
        Stage("b", {"web": 1.0}, curriculum=Curriculum({"stack-go": 0.5, "web": 0.5}, "step")),
    ))
    grouped = schedule.map_sources({"stack-py": "code", "stack-go": "code"})
    assert grouped.stages[0].weights == {"code": 0.5, "web": 0.5} and grouped.stages[0].steps == 10
    assert grouped.stages[0].seq_len == 32 and grouped.stages[1].curriculum.end == {"code": 0.5, "web": 0.5}
    assert not grouped.normalize
    dropped = schedule.map_sources({"stack-go": None})
    assert dropped.normalize and dropped.stages[0].weights == {"stack-py": 0.3, "web": 0.5}
    assert dropped.resolve(20, 1, 8).weights_at_step(0) == pytest.approx({"stack-py": 0.375, "web": 0.625})


def test_a_fraction_after_a_step_bound_that_does_not_fit_is_refused_not_cut():
    ab = {"a": 0.5, "b": 0.5}
    for first in (Stage("a", ab, steps=90), Stage("a", ab, steps=100)):
        with pytest.raises(ScheduleError, match="stage 'b' runs to step 1[45]0, past the 100-step run"):
            MixtureSchedule((first, Stage("b", ab, 0.5))).resolve(100, 1, 8)
    fits = MixtureSchedule((Stage("a", ab, steps=50), Stage("b", ab, 0.5))).resolve(100, 1, 8)
    assert [(s.start_step, s.end_step) for s in fits.stages] == [(0, 50), (50, 100)]
