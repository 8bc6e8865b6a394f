"""The embedded trainer on real text: loss goes down, logs and evals land in the run record, LR schedule shape,
clear errors. Real torch training on CPU in fp32; the data is CPython's own source and docs, byte-level."""

from __future__ import annotations

import argparse
import json
import pydoc_data.topics
import time
from pathlib import Path

import numpy as np
import pytest
from byte_sampler import ByteSampler
from mixlab.training import (
    ConfigError,
    HeldOutEvaluator,
    ModelConfig,
    NonFiniteLossError,
    RunStore,
    TrainConfig,
    TrainingError,
    train,
)
from mixlab.training.lr_schedule import decay_start_step, lr_at


def stdlib_corpora() -> dict[str, np.ndarray]:
    """Two real 'sources' as byte tokens (vocab 256): Python code and English documentation."""
    code = Path(argparse.__file__).read_bytes() + Path(json.__file__).read_bytes()
    docs = "\n".join(pydoc_data.topics.topics.values()).encode()[:200_000]
    return {"code": np.frombuffer(code, np.uint8).astype(np.int64), "docs": np.frombuffer(docs, np.uint8).astype(np.int64)}


def train_split(corpora: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first 90% of each source; `held_out` reads the rest."""
    return {name: data[: int(len(data) * 0.9)] for name, data in corpora.items()}


def held_out(corpora: dict[str, np.ndarray], seq_len: int, n: int = 8) -> HeldOutEvaluator:
    """Windows from the last 10% of each source, which the sampler never reads."""
    windows = {}
    for name, data in corpora.items():
        tail = data[int(len(data) * 0.9):]
        windows[name] = np.stack([tail[i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n)])
    return HeldOutEvaluator(windows, token_bytes=np.ones(256, dtype=np.int64), batch_size=8)


def test_loss_goes_down_on_real_text_and_everything_is_logged(tmp_path):
    corpora = stdlib_corpora()
    mcfg = ModelConfig.preset("tiny")
    tcfg = TrainConfig.preset("tiny", total_steps=150, log_every=10, eval_every=75, checkpoint_every=75,
                              progress_bar=False, threads=1)
    run = RunStore(tmp_path).create("tiny-bytes", config={"note": "test"}, tags={"mix": "code+docs"})
    summary = train(run, mcfg, tcfg, ByteSampler(train_split(corpora), tcfg.batch_size, tcfg.seq_len), held_out(corpora, 64))

    metrics = run.metrics()
    assert [m["step"] for m in metrics] == list(range(10, 151, 10))
    assert metrics[0]["loss"] > 3.3 and metrics[-1]["loss"] < 2.9, [m["loss"] for m in metrics]  # from ln 256 = 5.5
    assert metrics[-1]["tokens"] == 150 * 8 * 64 == summary["tokens"]
    assert sum(metrics[-1]["tokens_by_source"].values()) == summary["tokens"]
    assert set(metrics[-1]["tokens_by_source"]) == {"code", "docs"}
    assert all(m["tokens_per_s"] > 0 and m["stage"] == "stable" for m in metrics)

    evals = run.evals_frame()
    assert set(evals["source"]) == {"code", "docs", "all"} and sorted(set(evals["step"])) == [75, 150]
    eval_all = evals.filter(evals["source"] == "all").sort("step")
    assert eval_all["loss"][1] < eval_all["loss"][0] and eval_all["loss"][1] < 3.1, eval_all
    final_all = eval_all.row(1, named=True)
    assert final_all["bpb"] == pytest.approx(final_all["loss"] / np.log(2))  # one byte per token
    assert final_all["tokens"] == 2 * 8 * 64

    reloaded = RunStore(tmp_path).get("tiny-bytes")
    assert reloaded.status == "completed" and reloaded.config["note"] == "test"
    assert reloaded.config["model"]["d_model"] == 64 and reloaded.config["train"]["total_steps"] == 150
    assert reloaded.summary["eval"]["all"]["loss"] == pytest.approx(final_all["loss"])
    assert summary["tokens_per_s"] > 0 and summary["params"] == summary["non_embedding_params"] + 256 * 64
    assert [p.name for p in sorted(run.checkpoint_dir.iterdir())] == ["step_00000075", "step_00000150"]


def test_wsd_schedule_warmup_stable_decay():
    cfg = TrainConfig(total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup, never 0
    assert np.all(np.diff(lrs[:10]) > 0)
    assert decay_start_step(cfg) == 80 and all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert np.all(np.diff(lrs[80:]) < 0) and lrs[-1] == pytest.approx(0.1)  # linear decay to min_lr
    assert np.diff(lrs[80:]) == pytest.approx(np.full(19, -0.9 / 20))
    # the decay start can be pinned to the mixture's decay stage
    pinned = TrainConfig(total_steps=100, warmup_steps=10, decay_start_step=50)
    assert decay_start_step(pinned) == 50 and lr_at(49, pinned) == pinned.lr and lr_at(50, pinned) < pinned.lr


def test_cosine_and_constant_schedules_and_token_budget():
    cos = TrainConfig(total_steps=100, warmup_steps=10, lr=1.0, min_lr=0.0, schedule="cosine")
    lrs = [lr_at(s, cos) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and np.all(np.diff(lrs[10:]) < 0) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert lrs[54] == pytest.approx(0.5, abs=0.02)  # half-way through the decay: half the lr
    const = TrainConfig(total_steps=50, warmup_steps=5, schedule="constant")
    assert {lr_at(s, const) for s in range(5, 50)} == {const.lr}
    budget = TrainConfig(token_budget=10_000, batch_size=4, seq_len=32, grad_accum=2, warmup_steps=0)
    assert budget.tokens_per_step == 256 and budget.steps == 40  # ceil(10000 / 256)
    with pytest.raises(ValueError, match="set train.total_steps or train.token_budget"):
        TrainConfig()
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"total_steps": 1, "warmup_steps": 0, "lr_max": 1})


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    corpora = stdlib_corpora()
    tcfg = TrainConfig.preset("tiny", total_steps=30, lr=1e30, warmup_steps=0, grad_clip=0.0, weight_decay=0.0,
                              progress_bar=False, log_every=1, threads=1)
    run = RunStore(tmp_path).create("diverges", config={})
    with pytest.raises(NonFiniteLossError, match=r"step \d+: loss .*update was not applied.*lower train.lr"):
        train(run, ModelConfig.preset("tiny"), tcfg, ByteSampler(train_split(corpora), tcfg.batch_size, tcfg.seq_len))
    reloaded = RunStore(tmp_path).get("diverges")
    assert reloaded.status == "failed" and "NonFiniteLossError" in reloaded.summary["error"]
    assert issubclass(NonFiniteLossError, TrainingError) and issubclass(NonFiniteLossError, RuntimeError)


def test_mismatched_batch_shape_is_reported(tmp_path):
    tcfg = TrainConfig.preset("tiny", total_steps=2, warmup_steps=0, progress_bar=False, threads=1)
    run = RunStore(tmp_path).create("shape", config={})
    with pytest.raises(ConfigError, match="build the sampler with the same sizes"):
        train(run, ModelConfig.preset("tiny"), tcfg, ByteSampler(train_split(stdlib_corpora()), 4, tcfg.seq_len))
    assert RunStore(tmp_path).get("shape").status == "failed"
    with pytest.raises(ConfigError, match="run 'shape': train.seq_len=64 exceeds model.max_seq_len=32"):
        train(run, ModelConfig.preset("tiny", max_seq_len=32), tcfg, ByteSampler(stdlib_corpora(), 8, 64))


def test_batches_may_have_a_stage_seq_len_and_a_policy_needs_a_sampler_that_takes_weights(tmp_path):
    from mixlab.mixtures.policies import OnlineDataMixing

    corpora = train_split(stdlib_corpora())
    tcfg = TrainConfig.preset("tiny", total_steps=4, warmup_steps=0, progress_bar=False, threads=1, log_every=1)
    # 32-token rows while TrainConfig.seq_len is 64 (a mixture stage with its own seq_len): tokens follow the batch
    summary = train(RunStore(tmp_path).create("short-rows", config={}), ModelConfig.preset("tiny"), tcfg,
                    ByteSampler(corpora, tcfg.batch_size, 32))
    assert summary["tokens"] == 4 * 8 * 32 == sum(summary["tokens_by_source"].values())
    with pytest.raises(ConfigError, match="gave sequences of 64 tokens but model.max_seq_len=48"):
        train(RunStore(tmp_path).create("too-long", config={}), ModelConfig.preset("tiny", max_seq_len=48),
              TrainConfig.preset("tiny", total_steps=2, warmup_steps=0, seq_len=32, progress_bar=False, threads=1),
              ByteSampler(corpora, 8, 64))
    run = RunStore(tmp_path).create("no-weights", config={})
    with pytest.raises(ConfigError, match=r"policy 'odm' needs a sampler that can change its weights, but "
                                          r"ByteSampler has no \['set_weights', 'current_weights'\]"):
        train(run, ModelConfig.preset("tiny"), tcfg, ByteSampler(corpora, 8, 64), policy=OnlineDataMixing())
    assert not (run.path / "mixture.jsonl").exists()


def test_init_from_starts_a_new_run_from_another_runs_weights_and_moments(tmp_path):
    """train.init_from (annealing ablations, mid-training): step 0 of the new run has the parent's weights and
    AdamW moments, its own step count, LR schedule and optimizer hyper-parameters."""
    import torch
    from mixlab.training.checkpoint import latest_checkpoint, resolve_checkpoint
    from mixlab.training.evaluate import load_model

    corpora = stdlib_corpora()
    mcfg = ModelConfig.preset("tiny")
    parent_cfg = TrainConfig.preset("tiny", total_steps=40, eval_every=40, checkpoint_every=40, progress_bar=False,
                                    threads=1)
    store = RunStore(tmp_path)
    parent = store.create("parent", config={})
    train(parent, mcfg, parent_cfg, ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64))
    parent_ckpt = latest_checkpoint(parent.checkpoint_dir)
    assert resolve_checkpoint(parent.path) == parent_ckpt == resolve_checkpoint(parent_ckpt)

    child_cfg = TrainConfig.preset("tiny", total_steps=10, warmup_steps=0, decay_fraction=1.0, lr=1e-3,
                                   weight_decay=0.0, eval_every=10, checkpoint_every=10, progress_bar=False,
                                   threads=1, log_every=1, init_from=str(parent.path))
    child = store.create("child", config={})
    train(child, mcfg, child_cfg, ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64), stop_after=1)
    assert child.summary["initialized_from"] == {"checkpoint": str(parent_ckpt), "step": 40}
    # one step from the parent's weights: far closer to the parent than to a fresh model, and loss continues
    parent_model, _ = load_model(parent_ckpt)
    child_model, step = load_model(latest_checkpoint(child.checkpoint_dir))
    assert step == 1
    drift = max((a - b).abs().max().item() for a, b in zip(parent_model.parameters(), child_model.parameters(),
                                                         strict=True))
    assert 0 < drift < 5e-3
    assert child.metrics()[0]["loss"] < parent.metrics()[0]["loss"] - 0.5  # not an untrained model's loss
    state = torch.load(latest_checkpoint(child.checkpoint_dir) / "optimizer.pt", weights_only=True)
    assert all(g["weight_decay"] == 0.0 for g in state["param_groups"])  # the child's hyper-parameters

    mismatched = TrainConfig.preset("tiny", total_steps=10, warmup_steps=0, progress_bar=False, threads=1,
                                    init_from=str(parent.path))
    with pytest.raises(ConfigError, match="another model config"):
        train(store.create("wrong-model", config={}), ModelConfig.preset("tiny", n_layers=1), mismatched,
              ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64))
    with pytest.raises(TrainingError, match="no checkpoint here"):
        train(store.create("no-parent", config={}), mcfg,
              TrainConfig.preset("tiny", total_steps=10, warmup_steps=0, progress_bar=False, threads=1,
                                 init_from=str(tmp_path / "nowhere")),
              ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64))


def test_init_from_may_extend_the_context_with_yarn_or_a_larger_rope_theta(tmp_path):
    """Mid-training context extension: the child reads the parent's weights at a longer context with YaRN (or a
    larger RoPE theta); the parent's knowledge carries over (its loss starts far below a fresh model's)."""
    corpora = stdlib_corpora()
    store = RunStore(tmp_path)
    parent = store.create("short", config={})
    train(parent, ModelConfig.preset("tiny"), TrainConfig.preset("tiny", total_steps=40, checkpoint_every=40,
                                                                   eval_every=40, progress_bar=False, threads=1),
          ByteSampler(train_split(corpora), 8, 64), held_out(corpora, 64))
    for name, switch in (("yarn", {"yarn_factor": 2.0, "yarn_original_max_seq_len": 128}),
                         ("theta", {"rope_theta": 40000.0})):
        longer = ModelConfig.preset("tiny", max_seq_len=256, **switch)
        child = store.create(f"long-{name}", config={})
        cfg = TrainConfig.preset("tiny", total_steps=5, seq_len=256, warmup_steps=0, log_every=1, eval_every=5,
                                 checkpoint_every=5, progress_bar=False, threads=1, init_from=str(parent.path))
        train(child, longer, cfg, ByteSampler(train_split(corpora), 8, 256), held_out(corpora, 256), stop_after=1)
        assert child.summary["initialized_from"]["step"] == 40
        assert child.metrics()[0]["loss"] < parent.metrics()[0]["loss"] - 0.5


class _RepeatingSampler(ByteSampler):
    """A data-order bug: from step `from_step` on, the batch of that step is served again and again."""

    def __init__(self, *args, from_step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.from_step, self.served, self.stuck = from_step, 0, None

    def next_batch(self):
        self.served += 1
        if self.stuck is not None:
            return self.stuck
        batch = super().next_batch()
        if self.served >= self.from_step:
            self.stuck = batch
        return batch


def test_the_monitor_logs_alerts_and_stops_before_the_offending_update(tmp_path):
    """A repeated batch (a data-order anomaly) is an alert in alerts.jsonl and on the console; with on_alert="stop"
    the run stops before applying that update, checkpointed, "interrupted", and says why."""
    from mixlab.training.checkpoint import latest_checkpoint, read_checkpoint
    from mixlab.training.monitor import MonitorConfig, TrainingMonitor

    corpora = stdlib_corpora()
    run = RunStore(tmp_path).create("stuck", config={})
    cfg = TrainConfig.preset("tiny", total_steps=30, progress_bar=False, threads=1, checkpoint_every=10)
    sampler = _RepeatingSampler(train_split(corpora), 8, 64, from_step=12)
    summary = train(run, ModelConfig.preset("tiny"), cfg, sampler, held_out(corpora, 64),
                    monitor=TrainingMonitor(MonitorConfig(on_alert="stop", warmup_steps=5)))
    (alert,) = run.alerts()
    assert alert["kind"] == "repeated_window" and alert["step"] == 13 and alert["action"] == "stop"
    assert run.status == "interrupted" and summary["step"] == 12
    assert summary["stopped_by"] == "monitor: repeated_window at step 13"
    ckpt = latest_checkpoint(run.checkpoint_dir)
    assert read_checkpoint(ckpt).step == 12 and "monitor" in read_checkpoint(ckpt).trainer_state

    logged = RunStore(tmp_path / "log").create("stuck-log", config={})
    train(logged, ModelConfig.preset("tiny"), cfg, _RepeatingSampler(train_split(corpora), 8, 64, from_step=12),
          held_out(corpora, 64), monitor=TrainingMonitor(MonitorConfig(on_alert="log", warmup_steps=5)))
    assert logged.status == "completed" and {a["kind"] for a in logged.alerts()} == {"repeated_window"}


class _PoisonedSampler(ByteSampler):
    """Bad data: the batches of draws `poisoned` are uniform random bytes (a corrupt shard), a loss spike."""

    def __init__(self, *args, poisoned: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned = poisoned

    def next_batch(self):
        draw = self.draws
        batch = super().next_batch()
        if draw in self.poisoned:
            batch.tokens = np.random.default_rng(draw).integers(0, 256, size=batch.tokens.shape)
        return batch


def test_the_monitor_rewinds_to_the_last_checkpoint_and_skips_the_offending_batches(tmp_path):
    """on_alert="rewind": the spike at step 25 puts the step-20 checkpoint's weights back and the run goes on at
    step 26 with the sampler past the poisoned batch (steps 21..25's batches skipped), so the LR schedule and the
    data budget keep their places; the discarded steps' metrics go, the alert stays, the rewind is recorded and
    checkpointed, and a kill + resume after it continues exactly."""
    from mixlab.training.monitor import MonitorConfig, TrainingMonitor

    corpora = stdlib_corpora()
    cfg = TrainConfig.preset("tiny", total_steps=40, progress_bar=False, threads=1, checkpoint_every=10,
                             log_every=1, eval_every=40)

    def monitor():
        # only the loss spike acts; a busy machine's throughput dips are logged, not acted on
        return TrainingMonitor(MonitorConfig(on_alert="rewind", warmup_steps=5, kind_actions={
            "repeated_window": "log", "throughput_drop": "log"}))

    run = RunStore(tmp_path).create("spiky", config={})
    sampler = _PoisonedSampler(train_split(corpora), 8, 64, poisoned={24})  # draw 24 = step 25's batch
    summary = train(run, ModelConfig.preset("tiny"), cfg, sampler, held_out(corpora, 64), monitor=monitor())
    assert run.status == "completed" and summary["step"] == 40
    (rewind,) = summary["rewinds"]
    assert (rewind["at_step"], rewind["weights_from_step"], rewind["skipped_steps"]) == (25, 20, [21, 25])
    assert sampler.draws == 40  # one batch per step: the budget holds
    spikes = [a for a in run.alerts() if a["kind"] == "loss_spike"]
    assert [(a["step"], a["action"]) for a in spikes] == [(25, "rewind")]
    assert [m["step"] for m in run.metrics()] == [*range(1, 21), *range(26, 41)]
    assert [m["lr"] for m in run.metrics()] == [lr_at(m["step"] - 1, cfg) for m in run.metrics()]
    losses = [m["loss"] for m in run.metrics()]
    assert max(losses[20:]) < max(losses[10:20]) + 0.5  # what was trained after the rewind has no spike

    # the same run killed at step 30 (after the rewind) and resumed gives the same losses
    again = RunStore(tmp_path / "again").create("spiky", config={})
    train(again, ModelConfig.preset("tiny"), cfg, _PoisonedSampler(train_split(corpora), 8, 64, poisoned={24}),
          held_out(corpora, 64), monitor=monitor(), stop_after=30)
    resumed = train(again, ModelConfig.preset("tiny"), cfg,
                    _PoisonedSampler(train_split(corpora), 8, 64, poisoned={24}), held_out(corpora, 64),
                    monitor=monitor())
    assert resumed["step"] == 40 and [m["loss"] for m in again.metrics()] == losses
    assert len(resumed["rewinds"]) == 1


class _AnomalousSampler(ByteSampler):
    """A constructed run with one of each data/system fault, at known draws (0-based; step = draw + 1): a corrupt
    batch of one byte repeated at 30 (a loss and a grad-norm spike), a loader that stalls for draws 45-50 (vanishing
    throughput), draw 10's batch served again at 60 (a data-order bug) and from draw 70 on every row from "code"
    while the schedule says 50/50 (a source dominating)."""

    def current_weights(self) -> dict[str, float]:
        return {"code": 0.5, "docs": 0.5}

    def next_batch(self):
        draw = self.draws
        if draw == 60:
            self.draws = 10
            batch = super().next_batch()
            self.draws = 61
            return batch
        if 45 <= draw <= 50:
            time.sleep(0.25)
        batch = super().next_batch()
        if draw == 30:  # one byte that text never has, everywhere: every position pushes the same way
            batch.tokens = np.full_like(batch.tokens, 255)
            batch.tokens[:, 0] = np.arange(len(batch.tokens))  # distinct rows: not a repeated window
        if draw >= 70:
            start = np.random.default_rng([7, draw]).integers(0, len(self.corpora["code"]) - self.seq_len - 1,
                                                              size=self.batch_size)
            batch.tokens = np.stack([self.corpora["code"][s:s + self.seq_len + 1] for s in start])
            batch.sources = ["code"] * self.batch_size
        return batch


def test_a_constructed_run_fires_every_alert_at_its_step(tmp_path):
    """Each of the monitor's alerts, raised by the trainer on a real run where the fault was put on purpose; and
    a diverging run leaves its non_finite alert on record before it stops."""
    from mixlab.training.monitor import MonitorConfig, TrainingMonitor

    corpora = stdlib_corpora()
    cfg = TrainConfig.preset("tiny", total_steps=100, progress_bar=False, threads=1, checkpoint_every=100,
                             eval_every=100, log_every=10)
    run = RunStore(tmp_path).create("faults", config={})
    # early training's grad norms swing 10x, so the grad-norm threshold is set below the default 8 robust sigma
    # (a stalled loader runs at ~0.05x: a 0.2x threshold keeps a busy machine's dips from firing first)
    monitor = TrainingMonitor(MonitorConfig(warmup_steps=10, cooldown_steps=200, throughput_window=20,
                                            grad_norm_z=3.0, throughput_drop_ratio=0.2))
    train(run, ModelConfig.preset("tiny"), cfg, _AnomalousSampler(train_split(corpora), 8, 64), monitor=monitor)
    fired = {a["kind"]: a["step"] for a in run.alerts()}
    assert fired["loss_spike"] == 31 and fired["grad_norm_spike"] == 31
    assert 46 <= fired["throughput_drop"] <= 51
    assert fired["repeated_window"] == 61
    assert 71 < fired["source_dominance"] <= 90
    assert set(fired) == {"loss_spike", "grad_norm_spike", "throughput_drop", "repeated_window", "source_dominance"}
    assert run.status == "completed"  # on_alert="log": alerts only

    diverging = RunStore(tmp_path).create("diverges", config={})
    tcfg = TrainConfig.preset("tiny", total_steps=30, lr=1e30, warmup_steps=0, grad_clip=0.0, weight_decay=0.0,
                              progress_bar=False, log_every=1, threads=1)
    with pytest.raises(NonFiniteLossError):
        train(diverging, ModelConfig.preset("tiny"), tcfg, ByteSampler(train_split(corpora), 8, 64),
              monitor=TrainingMonitor())
    assert [a["kind"] for a in diverging.alerts()][-1:] == ["non_finite"]
