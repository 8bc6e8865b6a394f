"""The mixture sampler on real token shards: determinism, bit-identical resume, realised weights, stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mixlab.curation.token_shards import TokenSource, open_token_sources
from mixlab.mixtures import (
    MixtureSampler,
    MixtureSchedule,
    SamplerStateError,
    ScheduleError,
    Stage,
    val_windows,
)
from stdlib_corpus import build_tokenized_dir

SEQ_LEN = 64


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return build_tokenized_dir(tmp_path_factory.mktemp("sampler"))


@pytest.fixture(scope="module")
def sources(tokenized: Path) -> dict[str, TokenSource]:
    return open_token_sources(tokenized)


@pytest.fixture(scope="module")
def val_sources(tokenized: Path) -> dict[str, TokenSource]:
    return open_token_sources(tokenized, split="val")


def stable_decay() -> MixtureSchedule:
    return MixtureSchedule.stable_decay(
        {"code": 0.3, "prose": 0.7}, {"code": 0.8, "prose": 0.2}, decay_fraction=0.25
    )


def make(sources, schedule=None, seed=7, steps=100, batch_size=8, seq_len=SEQ_LEN) -> MixtureSampler:
    return MixtureSampler(
        schedule or stable_decay(),
        sources,
        seq_len=seq_len,
        batch_size=batch_size,
        total_tokens=steps * batch_size * seq_len,
        seed=seed,
    )


def test_batches_are_windows_of_the_sources(sources):
    sampler = make(sources)
    batch = sampler.next_batch()
    assert batch.tokens.shape == (8, SEQ_LEN + 1) and batch.tokens.dtype == np.int64
    assert batch.step == 0 and batch.stage == "stable" and len(batch.sources) == 8
    # row i is the next window of its source's epoch-0 permutation
    seen: dict[str, int] = {}
    for row, name in zip(batch.tokens, batch.sources, strict=True):
        window = sampler.permutation(name, 0)[seen.get(name, 0)]
        seen[name] = seen.get(name, 0) + 1
        assert np.array_equal(row, sources[name].read(int(window) * SEQ_LEN, SEQ_LEN + 1))
    assert sampler.step == 1


def test_same_seed_same_stream_other_seed_other_stream(sources):
    a, b, c = make(sources), make(sources), make(sources, seed=8)
    for _ in range(5):
        x, y, z = a.next_batch(), b.next_batch(), c.next_batch()
        assert np.array_equal(x.tokens, y.tokens) and x.sources == y.sources
    assert not np.array_equal(x.tokens, z.tokens)


def test_resume_is_bit_identical(sources):
    # small batches over many steps: crosses the stage switch and wraps prose into later epochs
    steps, cut = 240, 97
    reference = make(sources, steps=steps, batch_size=16, seq_len=256)
    batches = list(reference)
    assert len(batches) == steps and reference.state["prose"].epoch >= 1

    first = make(sources, steps=steps, batch_size=16, seq_len=256)
    for _ in range(cut):
        first.next_batch()
    saved = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = make(sources, steps=steps, batch_size=16, seq_len=256)
    resumed.load_state_dict(saved)
    for expected in batches[cut:]:
        got = resumed.next_batch()
        assert got.step == expected.step and got.stage == expected.stage and got.sources == expected.sources
        assert np.array_equal(got.tokens, expected.tokens)
    assert resumed.state_dict() == reference.state_dict()


def test_state_is_small_and_accounts_for_tokens(sources):
    sampler = make(sources)
    for _ in range(20):
        sampler.next_batch()
    state = sampler.state_dict()
    assert len(json.dumps(state)) < 1000
    assert state["step"] == 20 and set(state["sources"]) == {"code", "prose"}
    assert sum(sampler.tokens_by_source().values()) == 20 * 8 * SEQ_LEN
    assert sum(s["sequences"] for s in state["sources"].values()) == 20 * 8


def test_every_window_once_per_epoch(sources):
    only_prose = MixtureSchedule.constant({"prose": 1.0, "code": 0.0})
    sampler = make(sources, schedule=only_prose, batch_size=1, seq_len=512)
    windows = sampler.num_windows["prose"]
    for _ in range(windows):
        sampler.next_batch()
    assert sampler.epochs_by_source()["prose"] == 1.0 and sampler.state["prose"].cursor == 0
    assert sorted(sampler.permutation("prose", 0)) == list(range(windows))
    assert not np.array_equal(sampler.permutation("prose", 0), sampler.permutation("prose", 1))
    assert sampler.tokens_by_source()["code"] == 0


def test_realised_mixture_matches_the_weights(sources):
    weights = {"code": 0.35, "prose": 0.65}
    sampler = make(sources, schedule=MixtureSchedule.constant(weights), steps=1500, batch_size=8)
    counts = dict.fromkeys(weights, 0)
    for batch in sampler:
        for name in batch.sources:
            counts[name] += 1
    draws = sum(counts.values())
    chi2 = sum((counts[n] - draws * w) ** 2 / (draws * w) for n, w in weights.items())
    assert chi2 < 10.83  # chi-square, 1 degree of freedom, p = 0.001
    tokens = sampler.tokens_by_source()
    assert tokens["code"] / sum(tokens.values()) == pytest.approx(0.35, abs=0.02)


def test_stage_switches_at_the_right_step(sources):
    decay_code_only = MixtureSchedule.stable_decay(
        {"code": 0.0, "prose": 1.0}, {"code": 1.0}, decay_fraction=0.25
    )
    sampler = make(sources, schedule=decay_code_only, steps=40)
    batches = list(sampler)
    assert [b.stage for b in batches] == ["stable"] * 30 + ["decay"] * 10
    assert all(set(b.sources) == {"prose"} for b in batches[:30])
    assert all(set(b.sources) == {"code"} for b in batches[30:])
    expected = sampler.expected_epochs()
    assert expected["code"] == pytest.approx(sampler.epochs_by_source()["code"], rel=1e-9)


@pytest.mark.parametrize("fractions", [(0.8, 0.2), (0.75, 0.25), (0.9, 0.1), (0.3, 0.5, 0.2), (0.7, 1e-4, 0.2999)])
def test_stage_start_step_is_where_the_sampler_switches(sources, fractions):
    schedule = MixtureSchedule(
        tuple(Stage(f"s{i}", {"code": 1.0, "prose": float(i)}, f) for i, f in enumerate(fractions)), normalize=True
    )
    for steps in range(1, 400):
        sampler = make(sources, schedule=schedule, steps=steps, batch_size=1)
        in_force = [sampler.stage_index(s) for s in range(steps + 2)]
        for i in range(len(fractions)):
            first = next(s for s, index in enumerate(in_force) if index >= i)
            assert sampler.stage_start_step(i) == first == sampler.stage_start_step(f"s{i}"), (steps, i)
        assert sampler.stage_start_step(-1) == sampler.stage_start_step(len(fractions) - 1)
    # the stream itself: the first batch of the last stage is drawn at stage_start_step(-1)
    sampler = make(sources, schedule=schedule, steps=57, batch_size=1)
    stages = [b.stage for b in sampler]
    assert stages.index(schedule.stages[-1].name) == sampler.stage_start_step(-1)
    with pytest.raises(ValueError, match="no stage named 'decay'"):
        sampler.stage_start_step("decay")
    with pytest.raises(ValueError, match="out of range"):
        sampler.stage_start_step(len(fractions))


def test_incompatible_state_is_refused_or_warned(sources):
    sampler = make(sources)
    for _ in range(3):
        sampler.next_batch()
    state = sampler.state_dict()
    other_mix = make(sources, schedule=MixtureSchedule.constant({"code": 0.5, "prose": 0.5}))
    with pytest.raises(SamplerStateError, match="mixture schedule changed.*strict=False"):
        other_mix.load_state_dict(state)
    with pytest.warns(UserWarning, match="mixture schedule changed"):
        other_mix.load_state_dict(state, strict=False)
    assert other_mix.step == 3 and other_mix.state_dict()["sources"]["code"] == state["sources"]["code"]
    finished = make(sources, steps=10)
    for _ in range(10):
        finished.next_batch()
    with pytest.warns(UserWarning, match="stage changes from 'decay' to 'stable'"):
        make(sources, steps=20).load_state_dict(finished.state_dict())
    with pytest.raises(SamplerStateError, match="seq_len=64"):
        make(sources, seq_len=32).load_state_dict(state)
    # a longer run is a deliberate change: warned about (with the new boundaries), not refused
    longer = make(sources, steps=200)
    with pytest.warns(UserWarning, match=r"budget changed from 100 steps \(51200 tokens\) to 200 steps \(102400 tokens\).*\[0, 150\]"):
        longer.load_state_dict(state)
    assert longer.step == 3


def test_bad_configuration_is_named(sources):
    with pytest.raises(ScheduleError, match=r"\['web'\] that are not available"):
        make(sources, schedule=MixtureSchedule.constant({"web": 0.5, "code": 0.5}))
    empty = {**sources, "tiny": TokenSource("tiny", "train", [])}
    with pytest.raises(ValueError, match="'tiny' has 0 tokens"):
        make(empty, schedule=MixtureSchedule.constant({"tiny": 0.5, "code": 0.5}))


def test_val_windows(val_sources):
    source = val_sources["prose"]
    all_windows = val_windows(source, SEQ_LEN)
    assert all_windows.shape == ((len(source) - 1) // SEQ_LEN, SEQ_LEN + 1) and all_windows.dtype == np.int64
    assert np.array_equal(all_windows[1], source.read(SEQ_LEN, SEQ_LEN + 1))
    few = val_windows(source, SEQ_LEN, max_windows=10)
    assert few.shape == (10, SEQ_LEN + 1)
    assert np.array_equal(few[0], all_windows[0]) and np.array_equal(few[-1], all_windows[-1])
    assert val_windows(TokenSource("none", "val", []), SEQ_LEN).shape == (0, SEQ_LEN + 1)
