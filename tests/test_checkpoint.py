"""Checkpoints: a resumed run reproduces the uninterrupted one bit for bit (losses, evals, weights, optimizer),
after a clean stop or a crash; writes are atomic, pruned, and independent of wrappers and parameter order."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from training import HeldOutEvaluator, ModelConfig, RunStore, TrainConfig, train
from training.checkpoint import (
    canonical_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from training.model import Transformer

torch.set_num_threads(1)  # tiny models: a second thread only adds sync (and stalls on a busy machine)


def stdlib_bytes() -> dict[str, np.ndarray]:
    """Two real byte-level sources (vocab 256): this repo's Python stdlib modules of two kinds."""
    import pathlib
    import typing
    code = [Path(typing.__file__).read_bytes(), Path(pathlib.__file__).read_bytes()]
    return {name: np.frombuffer(data, np.uint8).astype(np.int64) for name, data in zip(["typing", "pathlib"], code, strict=True)}


@dataclass
class SampledBatch:
    tokens: np.ndarray
    sources: list[str]
    stage: str
    step: int


class ByteSampler:
    """Test stand-in for mixtures.MixtureSampler; its whole position is (seed, draws)."""

    def __init__(self, corpora: dict[str, np.ndarray], batch_size: int, seq_len: int, seed: int = 0,
                 crash_at_draw: int | None = None):
        self.corpora, self.batch_size, self.seq_len, self.seed = dict(sorted(corpora.items())), batch_size, seq_len, seed
        self.draws, self.crash_at_draw = 0, crash_at_draw

    def next_batch(self) -> SampledBatch:
        if self.draws == self.crash_at_draw:
            raise RuntimeError("simulated node failure")
        rng = np.random.default_rng([self.seed, self.draws])
        names = list(self.corpora)
        sources = [names[i] for i in rng.integers(len(names), size=self.batch_size)]
        rows = []
        for name in sources:
            start = int(rng.integers(0, len(self.corpora[name]) - self.seq_len - 1))
            rows.append(self.corpora[name][start:start + self.seq_len + 1])
        self.draws += 1
        return SampledBatch(np.stack(rows), sources, "stable", self.draws - 1)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.draws = state["seed"], state["draws"]


MODEL = ModelConfig.preset("tiny", qk_norm=True)
TRAIN = TrainConfig(total_steps=12, batch_size=4, seq_len=32, grad_accum=2, lr=3e-3, warmup_steps=3,
                    decay_fraction=0.5, log_every=1, eval_every=4, checkpoint_every=5, keep_last_checkpoints=2,
                    progress_bar=False, threads=1)


def evaluator(corpora: dict[str, np.ndarray]) -> HeldOutEvaluator:
    windows = {name: data[-4 * 33:].reshape(4, 33) for name, data in corpora.items()}
    return HeldOutEvaluator(windows, np.ones(256, dtype=np.int64), batch_size=4)


def final_weights(run) -> dict[str, torch.Tensor]:
    return torch.load(latest_checkpoint(run.checkpoint_dir) / "model.pt", weights_only=True)


def losses(run) -> list[tuple[int, float, float, float]]:
    return [(m["step"], m["loss"], m["lr"], m["grad_norm"]) for m in run.metrics()]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    corpora = stdlib_bytes()
    store = RunStore(tmp_path)

    straight = store.create("straight", config={})
    train(straight, MODEL, TRAIN, ByteSampler(corpora, 4, 32), evaluator(corpora))

    # a clean stop (preemption) after step 6, then a fresh process state and a fresh sampler
    stopped = store.create("stopped", config={})
    summary = train(stopped, MODEL, TRAIN, ByteSampler(corpora, 4, 32), evaluator(corpora), stop_after=6)
    assert summary["step"] == 6 and store.get("stopped").status == "interrupted"
    torch.manual_seed(1234), np.random.seed(99), random.seed(7)
    summary = train(stopped, MODEL, TRAIN, ByteSampler(corpora, 4, 32), evaluator(corpora))
    assert summary["resumed_from"].endswith("step_00000006")

    # a crash in step 8 (checkpoints at 5): logs of steps 6-7 are dropped and redone
    crashed = store.create("crashed", config={})
    with pytest.raises(RuntimeError, match="simulated node failure"):
        train(crashed, MODEL, TRAIN, ByteSampler(corpora, 4, 32, crash_at_draw=14), evaluator(corpora))
    assert store.get("crashed").status == "failed" and crashed.metrics()[-1]["step"] == 7
    train(crashed, MODEL, TRAIN, ByteSampler(corpora, 4, 32), evaluator(corpora))

    reference = losses(straight)
    assert [s for s, *_ in reference] == list(range(1, 13))
    for run in (stopped, crashed):
        assert losses(run) == reference  # exact float equality: loss, lr and grad norm of every step
        assert [(e["step"], e["source"], e["loss"]) for e in run.evals()] == \
            [(e["step"], e["source"], e["loss"]) for e in straight.evals()]
        a, b = final_weights(straight), final_weights(run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        opt_a = torch.load(latest_checkpoint(straight.checkpoint_dir) / "optimizer.pt", weights_only=True)
        opt_b = torch.load(latest_checkpoint(run.checkpoint_dir) / "optimizer.pt", weights_only=True)
        for name, state in opt_a["state"].items():
            assert all(torch.equal(state[k], opt_b["state"][name][k]) for k in state)
        assert store.get(run.run_id).summary["tokens_by_source"] == store.get("straight").summary["tokens_by_source"]
        assert store.get(run.run_id).status == "completed"
    assert [p.name for p in list_checkpoints(crashed.checkpoint_dir)] == ["step_00000010", "step_00000012"]

    # resuming a finished run does nothing and keeps its summary
    again = train(straight, MODEL, TRAIN, ByteSampler(corpora, 4, 32), evaluator(corpora))
    assert again["step"] == 12 and losses(straight) == reference


def test_resume_refuses_a_different_model_and_a_silent_restart(tmp_path):
    corpora = stdlib_bytes()
    run = RunStore(tmp_path).create("r", config={})
    cfg = TrainConfig(total_steps=4, batch_size=2, seq_len=16, warmup_steps=0, checkpoint_every=2, progress_bar=False,
                      threads=1)
    train(run, MODEL, cfg, ByteSampler(corpora, 2, 16), stop_after=2)
    with pytest.raises(ValueError, match="another model config"):
        train(run, ModelConfig.preset("tiny", n_layers=3), cfg, ByteSampler(corpora, 2, 16))
    with pytest.raises(ValueError, match="already has checkpoints"):
        train(run, MODEL, TrainConfig(**{**cfg.to_dict(), "resume": False}), ByteSampler(corpora, 2, 16))


def test_save_is_atomic_pruned_and_restores_rng(tmp_path):
    torch.manual_seed(0)
    model = Transformer(MODEL)
    root = tmp_path / "ckpts"
    for step in (1, 2, 3):
        save_checkpoint(root, step, model, None, sampler_state={"draws": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000003"]

    # debris of a crash: a half-written temp dir and a step dir without state.json are never "latest"
    (root / ".tmp-step_00000009-1").mkdir()
    (root / "step_00000008").mkdir()
    assert latest_checkpoint(root).name == "step_00000003"

    # a sampler state that is not plain JSON is refused and leaves nothing behind
    with pytest.raises(TypeError, match="not plain JSON"):
        save_checkpoint(root, 4, model, None, sampler_state={"order": np.arange(3)})
    assert not (root / "step_00000004").exists() and not list(root.glob(".tmp-*"))

    path = save_checkpoint(root, 5, model, None, sampler_state={"draws": 5})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(42), np.random.seed(42), random.seed(42)
    ckpt = load_checkpoint(path, Transformer(MODEL))
    assert ckpt.step == 5 and ckpt.sampler_state == {"draws": 5}
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert read_checkpoint(path).state["lr_schedule"] == {"position": 5}


class DataParallelLike(nn.Module):
    """What DDP/FSDP wrappers do to names: everything under `module.`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_checkpoints_are_independent_of_wrappers_and_parameter_order(tmp_path):
    assert canonical_name("module._orig_mod.layers.0.attn.wq.weight") == "layers.0.attn.wq.weight"
    torch.manual_seed(0)
    inner = Transformer(MODEL)
    wrapped = DataParallelLike(inner)
    opt = inner.configure_optimizer(1e-3, 0.1)
    idx = torch.randint(0, 256, (2, 17))
    for _ in range(2):
        inner(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, 2, wrapped, opt, sampler_state={})
    assert not any(k.startswith("module.") for k in torch.load(path / "model.pt", weights_only=True))

    # load into an unwrapped model whose optimizer lists parameters in reverse order, in one group
    torch.manual_seed(1)
    fresh = Transformer(MODEL)
    named = list(fresh.named_parameters())[::-1]
    fresh_opt = torch.optim.AdamW([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=1.0)
    load_checkpoint(path, fresh, fresh_opt)
    for (name, p), (_, q) in zip(inner.named_parameters(), fresh.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg_sq"], fresh_opt.state[q]["exp_avg_sq"]), name
    assert fresh_opt.param_groups[0]["lr"] != 1.0  # hyper-parameters come from the checkpoint
