"""Two processes under torchrun (DDP over gloo, on CPU) train what one process trains: the same global batch from
the real MixtureSampler, split by rank, gives the same per-step losses (dense, and MoE with bias balancing); a
SIGTERM that reaches only rank 1 stops both ranks at the same step with one checkpoint, and the resumed pair
continues the uninterrupted run bit for bit.

This file is also the worker script: torchrun runs it with `worker ...` arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

TOKENIZER_VOCAB = 300  # a byte-level BPE's smallest: 256 bytes + 4 specials + a few merges
STEPS, BATCH, SEQ_LEN = 10, 4, 32
MODEL = dict(vocab_size=TOKENIZER_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
             max_seq_len=SEQ_LEN)


class SignalAtDraw:
    """The real sampler, but the process sends itself SIGTERM when it draws batch `at` (a preemption that
    reaches one rank first)."""

    def __init__(self, sampler, at: int | None):
        self.sampler, self.at = sampler, at

    def next_batch(self, dp_rank: int = 0, dp_size: int = 1):
        if self.sampler.step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.sampler.next_batch(dp_rank, dp_size)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def worker(tokenized: Path, runs: Path, run_id: str, signal_rank: int | None = None, signal_at: int | None = None,
           moe: bool = False) -> dict:
    """Train the tiny model on the stdlib corpus with the real sampler; rank 0 creates the run, as pretrain does.
    `moe`: 4 experts, top-2, DeepSeek-V3 bias balancing (the bias steps must agree on every rank)."""
    import torch
    from mixlab.curation import open_token_sources, token_byte_lengths, tokenizer_path
    from mixlab.mixtures import MixtureSampler, MixtureSchedule, val_windows
    from mixlab.training import HeldOutEvaluator, ModelConfig, RunRecord, RunStore, TrainConfig, train
    from mixlab.training.data_parallel import DataParallelWorld
    from mixlab.training.monitor import TrainingMonitor

    torch.set_num_threads(1)
    cfg = TrainConfig(total_steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN, lr=3e-3, warmup_steps=2, log_every=1,
                      eval_every=5, checkpoint_every=5, progress_bar=False, threads=1)
    schedule = MixtureSchedule.stable_decay({"code": 0.3, "prose": 0.7}, {"code": 0.8, "prose": 0.2},
                                            decay_fraction=0.3)
    sampler = MixtureSampler(schedule, open_token_sources(tokenized), seq_len=SEQ_LEN, batch_size=BATCH,
                             total_tokens=cfg.steps * cfg.tokens_per_step, seed=cfg.seed)
    cfg = replace(cfg, decay_start_step=sampler.stage_start_step(-1))  # the LR decays with the data's decay stage
    val = open_token_sources(tokenized, split="val")
    evaluator = HeldOutEvaluator({n: val_windows(s, SEQ_LEN, max_windows=2) for n, s in val.items()},
                                 token_byte_lengths(tokenizer_path(tokenized)), batch_size=4)
    world = DataParallelWorld.from_env()
    created = world.init()
    if world.is_main:
        run = RunStore(runs).create(run_id, config={"test": "ddp"})
    world.barrier()
    if not world.is_main:
        run = RunRecord.load(runs / run_id)
    at = signal_at if signal_rank == world.rank else None
    model = ModelConfig(**MODEL, **(dict(n_experts=4, moe_top_k=2, moe_balance="bias", moe_bias_rate=0.01)
                                     if moe else {}))
    summary = train(run, model, cfg, SignalAtDraw(sampler, at), evaluator, monitor=TrainingMonitor())
    if created:
        world.destroy()
    return summary


def torchrun(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    command = [str(exe), "--standalone", "--nproc_per_node", "2", __file__, "worker", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    if done.returncode != 0:  # the ranks' own errors first, then the launcher's report
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if "rank" in line or "Error" in line or "error" in line]
        raise AssertionError("\n".join(errors[-60:] + ["..."] + lines[-40:]))
    return done


def losses(run_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


def max_relative_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def test_two_processes_train_what_one_does_and_resume_after_a_signal(tmp_path):
    from mixlab.training import RunRecord
    from stdlib_corpus import build_tokenized_dir

    tokenized = build_tokenized_dir(tmp_path / "data", vocab_size=TOKENIZER_VOCAB)
    runs = tmp_path / "runs"
    one = worker(tokenized, runs, "one")  # in this process: a world of one
    assert one["world_size"] == 1 and one["step"] == STEPS

    torchrun(str(tokenized), str(runs), "two", "moe-two:moe")  # one launch, two runs (a launch costs seconds)
    two = RunRecord.load(runs / "two")
    assert two.status == "completed" and two.summary["world_size"] == 2 and two.config["world_size"] == 2
    assert two.summary["tokens"] == one["tokens"] == STEPS * BATCH * SEQ_LEN
    assert two.summary["tokens_by_source"] == one["tokens_by_source"]  # the same rows, read by two ranks
    diff = max_relative_diff(losses(runs / "one"), losses(runs / "two"))
    print(f"2-process vs 1-process loss: max relative difference {diff:.2e}")
    assert diff < 1e-5, diff
    evals_one = {(r["step"], r["source"]): r["loss"] for r in RunRecord.load(runs / "one").evals()}
    evals_two = {(r["step"], r["source"]): r["loss"] for r in two.evals()}
    assert evals_one.keys() == evals_two.keys() and len(evals_one) == 6  # steps 5 and 10: code, prose, all
    assert max(abs(evals_one[k] - evals_two[k]) / evals_one[k] for k in evals_one) < 1e-5
    assert sorted(p.name for p in (runs / "two" / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]

    # SIGTERM reaches rank 1 alone while it draws batch 6 (step 7): both stop after step 7, rank 0 checkpoints
    torchrun(str(tokenized), str(runs), "resumed", "--signal-rank", "1", "--signal-at", "6")
    stopped = RunRecord.load(runs / "resumed")
    assert stopped.status == "interrupted" and stopped.summary["stopped_by"] == "SIGTERM"
    assert stopped.summary["step"] == 7 and len(losses(runs / "resumed")) == 7
    assert (runs / "resumed" / "checkpoints" / "step_00000007").is_dir()
    torchrun(str(tokenized), str(runs), "resumed")
    resumed = RunRecord.load(runs / "resumed")
    assert resumed.status == "completed" and resumed.summary["resumed_from"].endswith("step_00000007")
    assert losses(runs / "resumed") == losses(runs / "two")  # bit for bit: same reduction order, same data

    # mixture of experts: the routing counts are summed over ranks before the bias step, so the pair keeps the
    # one-process run's expert biases (and losses)
    worker(tokenized, runs, "moe-one", moe=True)
    moe_diff = max_relative_diff(losses(runs / "moe-one"), losses(runs / "moe-two"))
    print(f"MoE 2-process vs 1-process loss: max relative difference {moe_diff:.2e}")
    assert moe_diff < 1e-5, moe_diff
    rows_one, rows_two = (RunRecord.load(runs / r).metrics() for r in ("moe-one", "moe-two"))
    assert [r["moe_tokens_per_expert"] for r in rows_one] == [r["moe_tokens_per_expert"] for r in rows_two]



if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("tokenized", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("run_ids", nargs="+", help="RUN_ID, or RUN_ID:moe; trained in turn in one process group")
    parser.add_argument("--signal-rank", type=int)
    parser.add_argument("--signal-at", type=int)
    options = parser.parse_args()
    from mixlab.training.data_parallel import DataParallelWorld

    world = DataParallelWorld.from_env()
    created = world.init()
    for spec in options.run_ids:
        run_id, _, kind = spec.partition(":")
        worker(options.tokenized, options.runs, run_id, options.signal_rank, options.signal_at, moe=kind == "moe")
    if created:
        world.destroy()
