"""Checkpoints: a resumed run reproduces the uninterrupted one bit for bit (losses, evals, weights, optimizer),
after a clean stop or a crash; writes are atomic, pruned, and independent of wrappers and parameter order."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from byte_sampler import ByteSampler
from mixlab.training import (
    CheckpointError,
    HeldOutEvaluator,
    ModelConfig,
    ResumeError,
    RunStore,
    TrainConfig,
    train,
)
from mixlab.training.checkpoint import (
    canonical_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mixlab.training.model import Transformer

torch.set_num_threads(1)  # tiny models: a second thread only adds sync (and stalls on a busy machine)


def stdlib_bytes() -> dict[str, np.ndarray]:
    """Two real byte-level sources (vocab 256): this repo's Python stdlib modules of two kinds."""
    import pathlib
    import typing
    code = [Path(typing.__file__).read_bytes(), Path(pathlib.__file__).read_bytes()]
    return {name: np.frombuffer(data, np.uint8).astype(np.int64) for name, data in zip(["typing", "pathlib"], code, strict=True)}


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
    # refused before the run is touched: its status stays
    with pytest.raises(ResumeError, match="'r' already has checkpoints.*use a new run id"):
        train(run, MODEL, TrainConfig(**{**cfg.to_dict(), "resume": False}), ByteSampler(corpora, 2, 16))
    assert RunStore(tmp_path).get("r").status == "interrupted"
    # a failed resume marks the run failed, with the error in its summary
    with pytest.raises(ResumeError, match="run 'r': its checkpoint .*step_00000002 was trained with another model"):
        train(run, ModelConfig.preset("tiny", n_layers=3), cfg, ByteSampler(corpora, 2, 16))
    failed = RunStore(tmp_path).get("r")
    assert failed.status == "failed" and failed.summary["step"] == 2
    assert failed.summary["error"].startswith("ResumeError: run 'r': its checkpoint")
    # and the right call continues it
    assert train(run, MODEL, cfg, ByteSampler(corpora, 2, 16))["step"] == 4
    done = RunStore(tmp_path).get("r")
    assert done.status == "completed" and "error" not in done.summary


def test_unreadable_checkpoint_files_name_the_file_and_the_fix(tmp_path):
    path = save_checkpoint(tmp_path, 3, Transformer(MODEL), None, sampler_state={})
    (path / "model.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"model.pt: cannot be loaded .*delete .*step_00000003"):
        load_checkpoint(path, Transformer(MODEL))
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_checkpoint(path)
    with pytest.raises(ValueError):  # every training error is a ValueError, which the CLI prints plainly
        read_checkpoint(path)


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
    with pytest.raises(CheckpointError, match="step_00000004: checkpoint state is not plain JSON"):
        save_checkpoint(root, 4, model, None, sampler_state={"order": np.arange(3)})
    assert not (root / "step_00000004").exists() and not list(root.glob(".tmp-*"))

    path = save_checkpoint(root, 5, model, None, sampler_state={"draws": 5})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(42), np.random.seed(42), random.seed(42)
    ckpt = load_checkpoint(path, Transformer(MODEL))
    assert ckpt.step == 5 and ckpt.sampler_state == {"draws": 5}
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert read_checkpoint(path).step == 5


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
