"""The trainer with the real MixtureSampler over real token shards (stdlib text, a tiny BPE): the LR decay starts
exactly with the data's decay stage, and a stopped or crashed run resumes to the uninterrupted run bit for bit."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from mixlab.curation import TokenSource, open_token_sources, token_byte_lengths, tokenizer_path
from mixlab.mixtures import MixtureSampler, MixtureSchedule, val_windows
from mixlab.training import (
    HeldOutEvaluator,
    ModelConfig,
    ResumeError,
    RunStore,
    TrainConfig,
    latest_checkpoint,
    train,
)
from mixlab.training.lr_schedule import decay_start_step, lr_at
from mixlab.training.trainer import _check_decay_alignment
from stdlib_corpus import build_tokenized_dir

torch.set_num_threads(1)  # tiny models: a second thread only adds sync (and stalls on a busy machine)

VOCAB = 1000
SEQ_LEN, BATCH = 32, 4


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return build_tokenized_dir(tmp_path_factory.mktemp("real-sampler"), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def sources(tokenized: Path) -> dict[str, TokenSource]:
    return open_token_sources(tokenized)


@pytest.fixture(scope="module")
def evaluator(tokenized: Path) -> HeldOutEvaluator:
    val = open_token_sources(tokenized, split="val")
    windows = {name: val_windows(src, SEQ_LEN, max_windows=4) for name, src in val.items()}
    return HeldOutEvaluator(windows, token_byte_lengths(tokenizer_path(tokenized)), batch_size=4)


def schedule(decay_fraction: float = 0.25) -> MixtureSchedule:
    return MixtureSchedule.stable_decay(
        {"code": 0.3, "prose": 0.7}, {"code": 0.8, "prose": 0.2}, decay_fraction=decay_fraction
    )


def sampler_for(sources, cfg: TrainConfig, mix: MixtureSchedule | None = None) -> MixtureSampler:
    """As pipelines.pretrain.build_sampler does: the trainer's budget, batches of batch_size."""
    return MixtureSampler(mix or schedule(), sources, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                          total_tokens=cfg.steps * cfg.tokens_per_step, seed=cfg.seed)


def first_decayed_step(cfg: TrainConfig) -> int:
    """First 0-based step past warmup whose LR is below the peak."""
    return next(s for s in range(cfg.warmup_steps, cfg.steps) if lr_at(s, cfg) < cfg.lr)


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.1, 0.3, 0.15])
def test_lr_decay_starts_exactly_with_the_data_decay_stage(sources, fraction):
    for steps in range(5, 400):
        base = dict(total_steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, warmup_steps=0, min_lr=0.0)
        default = TrainConfig(**base, decay_fraction=fraction)
        sampler = sampler_for(sources, default, schedule(fraction))
        data_start = sampler.stage_start_step(-1)
        assert sampler.stage_index(data_start) == 1 and sampler.stage_index(data_start - 1) == 0, steps
        # the default rule (same fraction as the schedule) and the pinned start agree with the sampler
        pinned = TrainConfig(**base, decay_start_step=data_start)
        for cfg in (default, pinned):
            assert decay_start_step(cfg) == data_start, (steps, cfg.decay_start_step)
            if data_start < steps:
                assert first_decayed_step(cfg) == data_start, steps
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_decay_alignment(sampler, default)

    # one step apart is reported, with the step to set
    cfg = TrainConfig(total_steps=100, batch_size=BATCH, seq_len=SEQ_LEN, warmup_steps=0, decay_start_step=79)
    with pytest.warns(UserWarning, match=r"last data stage starts at step 75; the LR decay at step 79.*\(= 75\)"):
        _check_decay_alignment(sampler_for(sources, cfg), cfg)
    # with grad_accum an optimizer step draws several batches: aligned when the stage starts on a step boundary
    accum = TrainConfig(total_steps=100, batch_size=BATCH, seq_len=SEQ_LEN, grad_accum=2, warmup_steps=0,
                        decay_fraction=0.25)
    accum_sampler = sampler_for(sources, accum)
    assert accum_sampler.stage_start_step(-1) == 150 == 2 * decay_start_step(accum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_decay_alignment(accum_sampler, accum)
    odd = TrainConfig(**{**accum.to_dict(), "total_steps": 99})  # 198 batches: the decay stage starts at 149
    odd_sampler = sampler_for(sources, odd)
    assert odd_sampler.stage_start_step(-1) == 149
    with pytest.warns(UserWarning, match=r"inside optimizer step 74 \(batch 149, grad_accum=2\)"):
        _check_decay_alignment(odd_sampler, odd)

MODEL = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=SEQ_LEN, qk_norm=True)
STEPS = 12


def train_config(sources) -> TrainConfig:
    """LR decay pinned to the sampler's decay stage, as pipelines.pretrain does."""
    cfg = TrainConfig(total_steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN, lr=3e-3, warmup_steps=2, log_every=1,
                      eval_every=4, checkpoint_every=5, keep_last_checkpoints=2, progress_bar=False, threads=1)
    start = sampler_for(sources, cfg).stage_start_step(-1)
    return TrainConfig(**{**cfg.to_dict(), "decay_start_step": start})


class CrashingSampler(MixtureSampler):
    """The real sampler, dying at a given step as a lost node would."""

    crash_at: int | None = None

    def next_batch(self):
        if self.step == self.crash_at:
            raise RuntimeError("simulated node failure")
        return super().next_batch()


def steps_of(run) -> list[tuple]:
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"], m["stage"], m["tokens_by_source"]) for m in run.metrics()]


def weights(run) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(run.checkpoint_dir) / "model.pt", weights_only=True)


def test_real_sampler_run_resumes_bit_for_bit(tmp_path, sources, evaluator):
    cfg = train_config(sources)
    store = RunStore(tmp_path)

    straight = store.create("straight", config={})
    reference_sampler = sampler_for(sources, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # budget and decay alignment checks are silent
        summary = train(straight, MODEL, cfg, reference_sampler, evaluator)
    reference = steps_of(straight)
    assert [r[0] for r in reference] == list(range(1, STEPS + 1))

    # the data's decay stage and the LR decay start at the same step of the real run (metrics are 1-based)
    first_decay_stage = next(step for step, *_, stage, _ in reference if stage == "decay")
    first_decayed_lr = next(step for step, _, lr, *_ in reference if step > cfg.warmup_steps and lr < cfg.lr)
    assert first_decay_stage == first_decayed_lr == cfg.decay_start_step + 1 == 10

    # one count of tokens per source: the sampler's, in the logs and in the summary
    assert summary["tokens_by_source"] == reference_sampler.tokens_by_source() == reference[-1][-1]
    assert sum(summary["tokens_by_source"].values()) == STEPS * BATCH * SEQ_LEN == summary["tokens"]

    # a clean stop after step 7, then a fresh process state and a fresh sampler
    stopped = store.create("stopped", config={})
    train(stopped, MODEL, cfg, sampler_for(sources, cfg), evaluator, stop_after=7)
    assert store.get("stopped").status == "interrupted"
    torch.manual_seed(1234), np.random.seed(99), random.seed(7)
    resumed = train(stopped, MODEL, cfg, sampler_for(sources, cfg), evaluator)
    assert resumed["resumed_from"].endswith("step_00000007")

    # a crash in step 9, after the checkpoint at step 5: steps 6-8 are dropped and redone
    crashed = store.create("crashed", config={})
    dying = CrashingSampler(schedule(), sources, seq_len=SEQ_LEN, batch_size=BATCH,
                            total_tokens=cfg.steps * cfg.tokens_per_step, seed=cfg.seed)
    dying.crash_at = 8
    with pytest.raises(RuntimeError, match="simulated node failure"):
        train(crashed, MODEL, cfg, dying, evaluator)
    assert store.get("crashed").status == "failed" and crashed.metrics()[-1]["step"] == 8
    train(crashed, MODEL, cfg, sampler_for(sources, cfg), evaluator)

    expected_evals = [(e["step"], e["source"], e["loss"], e["bpb"]) for e in straight.evals()]
    assert sorted({e[0] for e in expected_evals}) == [4, 8, 12]
    for run in (stopped, crashed):
        assert steps_of(run) == reference  # exact: loss, lr, grad norm, stage and token counts of every step
        assert [(e["step"], e["source"], e["loss"], e["bpb"]) for e in run.evals()] == expected_evals
        a, b = weights(straight), weights(run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        record = store.get(run.run_id)
        assert record.status == "completed" and record.summary["tokens_by_source"] == summary["tokens_by_source"]
        assert record.summary["final_loss"] == summary["final_loss"]


def test_a_sampler_that_cannot_continue_fails_the_run_with_the_reason(tmp_path, sources):
    cfg = train_config(sources)
    run = RunStore(tmp_path).create("r", config={})
    train(run, MODEL, cfg, sampler_for(sources, cfg), stop_after=3)
    other_mix = MixtureSchedule.stable_decay({"code": 0.5, "prose": 0.5}, {"code": 0.9, "prose": 0.1}, 0.25)
    with pytest.raises(ResumeError, match=r"run 'r': the sampler cannot continue from .*step_00000003: .*"
                                          r"mixture schedule changed.*Build the sampler as the run did"):
        train(run, MODEL, cfg, sampler_for(sources, cfg, other_mix))
    failed = RunStore(tmp_path).get("r")
    assert failed.status == "failed" and failed.summary["step"] == 3
    assert failed.summary["error"].startswith("ResumeError: run 'r': the sampler cannot continue")
    assert [m["step"] for m in failed.metrics()] == [1, 2, 3]  # nothing of the run was lost


def test_a_long_context_stage_raises_rope_theta_and_resumes_exactly(sources, tmp_path):
    """A stage with seq_len 64 and rope_theta 40000 after a 32-token stage at the model's theta 10000: the model's
    RoPE tables switch at the stage's first step, the checkpoints record the theta in force (so a standalone eval
    of the last one scores the model as trained), and a run stopped inside the long stage resumes bit for bit."""
    from mixlab.mixtures import Stage
    from mixlab.training.evaluate import load_model
    from mixlab.training.model import rope_tables

    mix = MixtureSchedule((Stage("short", {"code": 0.5, "prose": 0.5}, 0.5),
                           Stage("long", {"code": 0.5, "prose": 0.5}, 0.5, seq_len=64, rope_theta=40000.0)))
    assert MixtureSchedule.from_dict(mix.to_dict()).stages[1].rope_theta == 40000.0
    model_cfg = ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=64)
    cfg = TrainConfig.preset("tiny", total_steps=16, batch_size=BATCH, seq_len=SEQ_LEN, warmup_steps=2, log_every=1,
                             eval_every=100, checkpoint_every=4, progress_bar=False, threads=1, schedule="cosine")
    store = RunStore(tmp_path)
    whole = store.create("whole", config={})
    summary = train(whole, model_cfg, cfg, sampler_for(sources, cfg, mix))
    assert summary["rope_theta_changes"] == [{"step": 8, "rope_theta": 40000.0}]
    trained, _ = load_model(latest_checkpoint(whole.checkpoint_dir))
    assert trained.config.rope_theta == 40000.0
    assert torch.equal(trained.rope_cos, rope_tables(model_cfg.head_dim, 64, 40000.0)[0])

    cut = store.create("cut", config={})
    train(cut, model_cfg, cfg, sampler_for(sources, cfg, mix), stop_after=10)
    train(cut, model_cfg, cfg, sampler_for(sources, cfg, mix))
    assert [m["loss"] for m in cut.metrics()] == [m["loss"] for m in whole.metrics()]
    stopped = store.create("stopped", config={})
    train(stopped, model_cfg, cfg, sampler_for(sources, cfg, mix), stop_after=5)  # inside the base-theta stage
    with pytest.raises(ResumeError, match="RoPE theta 10000.0"):  # resumed with another base theta
        train(stopped, ModelConfig.preset("tiny", vocab_size=VOCAB, max_seq_len=64, rope_theta=20000.0), cfg,
              sampler_for(sources, cfg, mix))

    # without the stage's theta the same run differs from the first long step on (the switch did something)
    plain = MixtureSchedule((Stage("short", {"code": 0.5, "prose": 0.5}, 0.5),
                             Stage("long", {"code": 0.5, "prose": 0.5}, 0.5, seq_len=64)))
    other = store.create("plain", config={})
    train(other, model_cfg, cfg, sampler_for(sources, cfg, plain))
    ours, theirs = [m["loss"] for m in whole.metrics()], [m["loss"] for m in other.metrics()]
    assert ours[:8] == theirs[:8] and ours[8:] != theirs[8:]
