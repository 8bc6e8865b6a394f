"""The sampler as a long-run engine, on the real curated + tokenized test corpus: resume across a change of the
data-parallel degree and of the sequence length, document boundaries, and weight changes that neither repeat
nor skip a window over a full epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from mixlab.curation.token_shards import TokenSource, open_token_sources
from mixlab.mixtures.sampler import MixtureSampler, SampledBatch, SamplerStateError, block_steps
from mixlab.mixtures.schedule import Curriculum, MixtureSchedule, Stage

SEQ, BATCH = 64, 8
MIX = {"chat": 0.3, "code-python": 0.3, "math": 0.3, "web-es": 0.1}


@pytest.fixture(scope="module")
def sources(tokenized_curated: Path) -> dict[str, TokenSource]:
    return open_token_sources(tokenized_curated, sources=sorted(MIX))


def three_seq_lens() -> MixtureSchedule:
    """64 -> 128 -> 64: a long-context stage in the middle, then back to the first grid."""
    return MixtureSchedule((
        Stage("short", MIX, 0.4),
        Stage("long", {"chat": 0.5, "code-python": 0.2, "math": 0.3}, 0.3, seq_len=128),
        Stage("again", {"chat": 0.2, "code-python": 0.2, "math": 0.6}),
    ))


def make(sources, schedule=None, steps=120, **kwargs) -> MixtureSampler:
    return MixtureSampler(schedule or three_seq_lens(), sources, seq_len=SEQ, batch_size=BATCH, seed=3,
                          total_steps=steps, **kwargs)


def global_step(samplers: list[MixtureSampler]) -> SampledBatch:
    """One step on dp ranks: the ranks' rows put back together, and every rank in the same state."""
    parts = [s.next_batch(rank, len(samplers)) for rank, s in enumerate(samplers)]
    states = [json.dumps(s.state_dict(), sort_keys=True) for s in samplers]
    assert len(set(states)) == 1
    return SampledBatch(np.concatenate([p.tokens for p in parts]), sum((p.sources for p in parts), []),
                        parts[0].stage, parts[0].step, parts[0].seq_len, starts=np.concatenate([p.starts for p in parts]))


def same(a: SampledBatch, b: SampledBatch) -> bool:
    return (a.step, a.stage, a.sources, a.seq_len) == (b.step, b.stage, b.sources, b.seq_len) and np.array_equal(
        a.tokens, b.tokens) and np.array_equal(a.starts, b.starts)


def test_rows_are_windows_of_the_stage_grid(sources):
    sampler = make(sources)
    batches = list(sampler)
    assert [b.stage for b in batches] == ["short"] * 48 + ["long"] * 36 + ["again"] * 36
    for batch in batches:
        assert batch.tokens.shape == (BATCH, batch.seq_len + 1) == (BATCH, (128 if batch.stage == "long" else 64) + 1)
        for row, name, start in zip(batch.tokens, batch.sources, batch.starts.tolist(), strict=True):
            assert start % batch.seq_len == 0
            assert np.array_equal(row, sources[name].read(start, batch.seq_len + 1))
    assert sampler.tokens_by_source()["chat"] == sum(
        b.seq_len for b in batches for name in b.sources if name == "chat")


def test_resume_with_another_dp_degree_is_bit_identical(sources):
    reference = make(sources)
    expected = [reference.next_batch() for _ in range(120)]
    for cut in (17, 48, 60, 84, 101):  # inside each stage and exactly at both seq_len changes
        two = [make(sources), make(sources)]
        for step in range(cut):
            assert same(global_step(two), expected[step])
        saved = json.loads(json.dumps(two[0].state_dict()))
        for dp in (4, 1):
            ranks = [make(sources) for _ in range(dp)]
            for rank in ranks:
                rank.load_state_dict(saved)
            for step in range(cut, 120):
                assert same(global_step(ranks), expected[step]), (cut, dp, step)
            assert ranks[0].state_dict() == reference.state_dict()
    with pytest.raises(ValueError, match="multiple of dp_size"):
        make(sources).next_batch(0, 3)


def test_a_new_seq_len_starts_a_new_pass_and_back_again_another(sources):
    sampler = make(sources)
    by_stage: dict[str, list[int]] = {}
    for batch in sampler:
        by_stage.setdefault(batch.stage, []).extend(s for n, s in zip(batch.sources, batch.starts.tolist(), strict=True)
                                                    if n == "math")
    short, long, again = by_stage["short"], by_stage["long"], by_stage["again"]
    windows = {seq: (len(sources["math"]) - 1) // seq for seq in (64, 128)}
    assert len(short) < windows[64] and len(long) < windows[128]  # no pass finished: only grid changes
    # each stage walks its own pass from the start: pass 0 on 64, pass 1 on 128, pass 2 on 64
    assert short == (sampler.permutation("math", 0, 64)[: len(short)] * 64).tolist()
    assert long == (sampler.permutation("math", 1, 128)[: len(long)] * 128).tolist()
    assert again == (sampler.permutation("math", 2, 64)[: len(again)] * 64).tolist()
    assert again[:20] != (sampler.permutation("math", 0, 64)[len(short): len(short) + 20] * 64).tolist()
    state = sampler.state_dict()["sources"]["math"]
    assert state["closed"] == [[64, len(short)], [128, len(long)]] and state["epoch"] == 2
    assert state["cursor"] == len(again) and state["seq_len"] == 64
    epochs = len(short) / windows[64] + len(long) / windows[128] + len(again) / windows[64]
    assert sampler.epochs_by_source()["math"] == pytest.approx(epochs, rel=1e-12)
    assert sampler.expected_epochs()["math"] == pytest.approx(epochs, rel=0.25)
    # web-es has weight only in the first stage: it never moves to the 128 grid
    assert sampler.state_dict()["sources"]["web-es"]["seq_len"] == 64


def independent_doc_ends(source: TokenSource) -> np.ndarray:
    """Document ends of the flat stream straight from the `.ds.index` files and the shard file sizes."""
    ends, base = [], 0
    for shard in source.shards:
        ends.append(np.fromfile(f"{shard.path}.index", dtype="<u8").astype(np.int64) + base)
        base += Path(shard.path).stat().st_size // shard.metadata.token_size
    return np.concatenate(ends)


def test_document_packing_marks_every_document_start(sources):
    docs = make(sources, packing="documents")
    windows = make(sources)
    ends = {name: independent_doc_ends(src) for name, src in sources.items()}
    eos = {int(sources[name].read(int(e) - 1, 1)[0]) for name in sources for e in ends[name][:50]}
    assert len(eos) == 1  # every document ends with the same end-of-document token
    restarts = 0
    for batch, plain in zip(docs, windows, strict=True):
        assert same(batch, plain) and plain.position_ids is None and plain.cu_seqlens is None
        T = batch.seq_len
        assert batch.position_ids.shape == (BATCH, T) and len(batch.cu_seqlens) == BATCH
        for row, name, start, positions, cu in zip(batch.tokens, batch.sources, batch.starts.tolist(),
                                                   batch.position_ids, batch.cu_seqlens, strict=True):
            inner = [int(e) - start for e in ends[name] if start < e < start + T]
            assert cu.dtype == np.int32 and cu.tolist() == [0, *inner, T]
            expected = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:], strict=True)])
            assert np.array_equal(positions, expected)
            assert all(row[b - 1] in eos for b in inner)  # a restart follows an end-of-document token
            assert np.array_equal(np.flatnonzero(positions[1:] == 0) + 1, np.array(inner, dtype=np.int64))
            restarts += len(inner)
    assert restarts > 100


def test_weight_changes_over_a_full_epoch_serve_every_window_once(sources):
    """Stage switches, a curriculum and several set_weights calls: the chat windows of epoch 0 are each
    served once, in the pass's order, and what was served is what was scheduled."""
    windows = (len(sources["chat"]) - 1) // SEQ
    schedule = MixtureSchedule((
        Stage("warm", MIX, 0.2),
        Stage("cur", {"chat": 0.1, "math": 0.9}, 0.4, curriculum=Curriculum({"chat": 0.8, "math": 0.2}, "cosine")),
        Stage("late", {"chat": 0.5, "code-python": 0.5}),
    ))
    steps = 2 * windows // BATCH + 200
    sampler = make(sources, schedule, steps=steps)
    changes = {37: {"chat": 0.9, "web-es": 0.1}, 90: {"math": 1.0}, steps // 2: {"chat": 1.0},
               steps // 2 + 25: {"chat": 0.05, "math": 0.95}, 3 * steps // 4: {"chat": 0.7, "math": 0.3}}
    served: dict[str, list[int]] = {name: [] for name in sources}
    resolved = schedule.resolve(steps, BATCH, SEQ)
    override: tuple[int, dict[str, float]] | None = None  # (its stage, weights): the test's own model of the rule
    expected_rows = dict.fromkeys(sources, 0.0)
    for step in range(steps):
        if step in changes:
            total = sum(changes[step].values())
            override = (resolved.stage_index_at_step(step), {k: v / total for k, v in changes[step].items()})
        if override is not None and override[0] != resolved.stage_index_at_step(step):
            override = None
        in_force = override[1] if override is not None else resolved.weights_at_step(step)
        for name, w in in_force.items():
            expected_rows[name] += w * BATCH
        if step in changes:
            sampler.set_weights(changes[step], cause=f"test change at {step}")
            assert sampler.current_weights()["chat"] == pytest.approx(
                changes[step].get("chat", 0.0) / sum(changes[step].values()))
        scheduled = sampler.sources_for_step(step)
        batch = sampler.next_batch()
        assert batch.sources == scheduled
        if step in (90, steps // 2):  # a one-leaf override draws only that leaf until its stage ends
            assert set(batch.sources) == set(changes[step])
        for name, start, row in zip(batch.sources, batch.starts.tolist(), batch.tokens, strict=True):
            served[name].append(start)
            assert np.array_equal(row, sources[name].read(start, SEQ + 1))
    chat = served["chat"]
    assert len(chat) > windows
    epoch0 = chat[:windows]
    assert len(set(epoch0)) == windows  # zero duplicates
    assert sorted(epoch0) == list(range(0, windows * SEQ, SEQ))  # zero skips
    assert epoch0 == (sampler.permutation("chat", 0) * SEQ).tolist()
    assert chat[windows:] == (sampler.permutation("chat", 1)[: len(chat) - windows] * SEQ).tolist()
    for name, starts in served.items():  # served = scheduled = counted
        assert sampler.state[name].sequences == len(starts) and sampler.tokens_by_source()[name] == len(starts) * SEQ
        # and scheduled = the weights in force: rows per leaf within 5 binomial sigmas of the expected count
        sigma = math.sqrt(max(expected_rows[name], 1.0))
        assert abs(len(starts) - expected_rows[name]) < 5 * sigma, (name, len(starts), expected_rows[name])
    assert sampler.epochs_by_source()["chat"] == pytest.approx(len(chat) / windows)


def test_weight_override_lasts_to_the_stage_end_and_resumes(sources):
    schedule = MixtureSchedule((Stage("a", {"chat": 0.5, "math": 0.5}, 0.5), Stage("b", {"code-python": 1.0})))
    reference = make(sources, schedule, steps=60)
    batches = []
    for step in range(60):
        if step == 10:
            reference.set_weights({"web-es": 1.0}, cause="rule: more Spanish")
        if step == 20:
            saved = json.loads(json.dumps(reference.state_dict()))
        batches.append(reference.next_batch())
    assert all(set(b.sources) == {"web-es"} for b in batches[10:30])
    assert all(set(b.sources) == {"code-python"} for b in batches[30:])  # the next stage's own weights
    assert saved["weights_override"] == {"weights": {"web-es": 1.0}, "from_step": 10, "stage": "a",
                                         "cause": "rule: more Spanish"}
    resumed = make(sources, schedule, steps=60)
    resumed.load_state_dict(saved)
    assert resumed.current_weights()["web-es"] == 1.0
    for expected in batches[20:]:
        assert same(resumed.next_batch(), expected)
    assert resumed.state_dict() == reference.state_dict()


def test_set_weights_and_states_are_checked(sources):
    sampler = make(sources)
    with pytest.raises(ValueError, match=r"unknown leaves \['web'\]"):
        sampler.set_weights({"web": 1.0})
    with pytest.raises(ValueError, match="'math' must be finite"):
        sampler.set_weights({"math": float("nan")})
    with pytest.raises(ValueError, match="all weights are zero"):
        sampler.set_weights({"math": 0.0})
    with pytest.raises(ValueError, match="exactly one of total_tokens= or total_steps="):
        MixtureSampler(three_seq_lens(), sources, SEQ, BATCH)
    old = {**sampler.state_dict(), "version": 1}
    with pytest.raises(SamplerStateError, match="version 1.*start a new run id"):
        make(sources).load_state_dict(old)
    # the budget in tokens gives the same run as the same budget in steps
    by_tokens = MixtureSampler(three_seq_lens(), sources, SEQ, BATCH, total_tokens=120 * BATCH * SEQ, seed=3)
    assert by_tokens.total_steps == 120 and same(by_tokens.next_batch(), make(sources).next_batch())


def test_source_choice_is_a_pure_function_of_the_step(sources):
    sampler = make(sources, steps=3 * block_steps(BATCH))
    far = sampler.sources_for_step(2 * block_steps(BATCH) + 5)  # another block: must not disturb the stream
    first = [sampler.next_batch() for _ in range(3)]
    again = make(sources, steps=3 * block_steps(BATCH))
    assert all(same(a, again.next_batch()) for a in first)
    assert again.sources_for_step(2 * block_steps(BATCH) + 5) == far
    state = sampler.state_dict()
    assert len(json.dumps(state)) < 2000  # small integers, whatever the number of steps


def test_a_selection_view_is_a_leaf_like_a_source(tokenized_curated, sources):
    from mixlab.mixtures.selection import Selection, open_leaves

    selection = Selection("math-long", "math", {"tokens": {"min": 120}})
    leaves = open_leaves(tokenized_curated, ["math-long", "chat"], [selection])
    assert 0 < len(leaves["math-long"]) < len(sources["math"])
    schedule = MixtureSchedule.constant({"math-long": 0.7, "chat": 0.3})
    sampler = MixtureSampler(schedule, leaves, SEQ, BATCH, total_steps=40, seed=1, packing="documents")
    drawn = 0
    for batch in sampler:
        for name, start, row, cu in zip(batch.sources, batch.starts.tolist(), batch.tokens, batch.cu_seqlens,
                                        strict=True):
            assert np.array_equal(row, leaves[name].read(start, SEQ + 1))
            ends = np.asarray(leaves[name].doc_ends, dtype=np.int64)
            inner = ends[(ends > start) & (ends < start + SEQ)] - start
            assert cu.tolist() == [0, *inner.tolist(), SEQ]
            drawn += name == "math-long"
    assert drawn == sampler.state["math-long"].sequences > 0
