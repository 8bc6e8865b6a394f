"""Held-out eval: loss, perplexity and bits per byte checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mixlab.training import (
    HeldOutEvaluator,
    ModelConfig,
    RunStore,
    Transformer,
    evaluate_checkpoint,
    save_checkpoint,
)

torch.set_num_threads(1)
CFG = ModelConfig.preset("tiny")


def test_uniform_model_gives_the_hand_computed_bits_per_byte():
    """Zero (tied) embeddings make every logit 0: each target costs exactly ln 256 nats = 8 bits."""
    model = Transformer(CFG)
    with torch.no_grad():
        model.tok_emb.weight.zero_()
    token_bytes = np.zeros(256, dtype=np.int64)
    token_bytes[[10, 11, 12]] = [1, 3, 2]  # token 13 is "special": scored, but no bytes
    windows = {"a": np.array([[13, 10, 11]]), "b": np.array([[10, 12, 13], [11, 11, 10]])}
    rows = {r["source"]: r for r in HeldOutEvaluator(windows, token_bytes, batch_size=1).evaluate(model)}

    # a: targets 10, 11 -> 2 tokens, 1 + 3 bytes, 2 x 8 bits
    assert rows["a"]["loss"] == pytest.approx(math.log(256)) and rows["a"]["ppl"] == pytest.approx(256)
    assert rows["a"]["tokens"] == 2 and rows["a"]["bytes"] == 4 and rows["a"]["bpb"] == pytest.approx(16 / 4)
    # b: targets 12, 13, 11, 10 -> 4 tokens, 2 + 0 + 3 + 1 bytes
    assert rows["b"]["tokens"] == 4 and rows["b"]["bytes"] == 6 and rows["b"]["bpb"] == pytest.approx(32 / 6)
    # all: 6 tokens, 10 bytes, 48 bits
    assert rows["all"]["tokens"] == 6 and rows["all"]["bpb"] == pytest.approx(48 / 10)


def test_trained_weights_match_a_manual_log_softmax_and_the_all_row_is_token_weighted():
    torch.manual_seed(0)
    model = Transformer(CFG)
    rng = np.random.default_rng(0)
    token_bytes = rng.integers(0, 4, size=256)
    windows = {"short": rng.integers(0, 256, size=(3, 9)), "long": rng.integers(0, 256, size=(5, 33))}
    rows = {r["source"]: r for r in HeldOutEvaluator(windows, token_bytes, batch_size=2).evaluate(model)}

    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for name, w in windows.items():
        idx = torch.from_numpy(w)
        with torch.no_grad():
            logp = F.log_softmax(model(idx[:, :-1])[0].double(), dim=-1)
        nats = -logp.gather(-1, idx[:, 1:, None]).sum().item()
        nbytes = int(token_bytes[w[:, 1:]].sum())
        assert rows[name]["loss"] == pytest.approx(nats / w[:, 1:].size, rel=1e-6)
        assert rows[name]["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
        total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + w[:, 1:].size, total_bytes + nbytes
    assert rows["all"]["tokens"] == 3 * 8 + 5 * 32
    assert rows["all"]["loss"] == pytest.approx(total_nats / total_tokens, rel=1e-6)
    assert rows["all"]["loss"] != pytest.approx((rows["short"]["loss"] + rows["long"]["loss"]) / 2, rel=1e-6)
    assert rows["all"]["bpb"] == pytest.approx(total_nats / (math.log(2) * total_bytes), rel=1e-6)


def test_evaluate_checkpoint_standalone_matches_the_live_model_and_logs(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CFG)
    model.train()
    windows = {"x": np.random.default_rng(1).integers(0, 256, size=(4, 17))}
    evaluator = HeldOutEvaluator(windows, np.ones(256, dtype=np.int64), batch_size=3)
    live = evaluator.evaluate(model)
    assert model.training  # eval mode only while scoring

    run = RunStore(tmp_path).create("ev", config={})
    path = save_checkpoint(run.checkpoint_dir, 7, model, None, sampler_state={},
                           configs={"model_config": CFG.to_dict()})
    rows = evaluate_checkpoint(path, evaluator, run=run)
    assert [r["step"] for r in rows] == [7, 7]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in live], rel=1e-6)
    logged = run.evals()
    assert [(e["step"], e["source"]) for e in logged] == [(7, "x"), (7, "all")]
    assert logged[0]["bpb"] == pytest.approx(live[0]["loss"] / math.log(2), rel=1e-6)


def test_bad_windows_are_rejected():
    with pytest.raises(ValueError, match=r"\[N, T\+1\]"):
        HeldOutEvaluator({"x": np.zeros(5, dtype=np.int64)}, np.ones(256))
    with pytest.raises(ValueError, match="at least one source"):
        HeldOutEvaluator({}, np.ones(256))
