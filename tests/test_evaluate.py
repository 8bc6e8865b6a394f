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


def _interval_width(row, name="loss"):
    return row[f"{name}_hi"] - row[f"{name}_lo"]


def test_bootstrap_interval_holds_the_point_is_deterministic_and_json_plain():
    torch.manual_seed(0)
    model = Transformer(CFG)
    rng = np.random.default_rng(3)
    windows = {"a": rng.integers(0, 256, size=(24, 17)), "b": rng.integers(0, 256, size=(10, 17))}
    evaluator = HeldOutEvaluator(windows, rng.integers(1, 4, size=256), batch_size=8)
    first, second = evaluator.evaluate(model), evaluator.evaluate(model)
    assert first == second  # same model, same seed: the same interval
    for row in first:
        for name in ("loss", "bpb"):
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], row
            assert _interval_width(row, name) > 0, row
            assert type(row[f"{name}_lo"]) is float and type(row[f"{name}_hi"]) is float
    # another seed draws other resamples: the interval moves a little, the point estimate does not
    other = HeldOutEvaluator(windows, evaluator.token_bytes, batch_size=8, bootstrap_seed=1).evaluate(model)
    assert [r["loss"] for r in other] == [r["loss"] for r in first]
    assert [r["loss_lo"] for r in other] != [r["loss_lo"] for r in first]


def test_bootstrap_interval_shrinks_with_more_windows_and_vanishes_for_identical_ones():
    torch.manual_seed(0)
    model = Transformer(CFG)
    rng = np.random.default_rng(4)
    many = rng.integers(0, 256, size=(160, 17))
    token_bytes = np.ones(256, dtype=np.int64)
    few_row = HeldOutEvaluator({"x": many[:10]}, token_bytes).evaluate(model)[0]
    many_row = HeldOutEvaluator({"x": many}, token_bytes).evaluate(model)[0]
    # 16x the windows: about 4x narrower; half as wide is a safe bound
    assert _interval_width(many_row) < 0.5 * _interval_width(few_row)

    same = np.repeat(many[:1], 12, axis=0)
    row = HeldOutEvaluator({"x": same}, token_bytes).evaluate(model)[0]
    assert _interval_width(row) == pytest.approx(0.0, abs=1e-9)
    assert row["loss_lo"] == pytest.approx(row["loss"])


def test_all_row_interval_is_stratified_and_bootstrap_can_be_turned_off():
    torch.manual_seed(0)
    model = Transformer(CFG)
    rng = np.random.default_rng(5)
    token_bytes = np.ones(256, dtype=np.int64)
    # one source of identical windows: all the "all" row's spread must come from the other source
    windows = {"fixed": np.repeat(rng.integers(0, 256, size=(1, 17)), 30, axis=0),
               "varied": rng.integers(0, 256, size=(30, 17))}
    rows = {r["source"]: r for r in HeldOutEvaluator(windows, token_bytes).evaluate(model)}
    assert _interval_width(rows["fixed"]) == pytest.approx(0.0, abs=1e-9)
    # the fixed source holds half the tokens, so the aggregate's spread is about half the varied source's
    assert _interval_width(rows["all"]) == pytest.approx(0.5 * _interval_width(rows["varied"]), rel=0.35)
    assert rows["all"]["loss_lo"] <= rows["all"]["loss"] <= rows["all"]["loss_hi"]

    plain = HeldOutEvaluator(windows, token_bytes, bootstrap_resamples=0).evaluate(model)
    assert {k for k in plain[0] if not k.startswith("loss_pos_")} == {"source", "loss", "ppl", "bpb", "tokens", "bytes"}
    with pytest.raises(ValueError, match="confidence"):
        HeldOutEvaluator(windows, token_bytes, confidence=1.5)


def test_loss_by_position_bucket_partitions_the_loss_and_matches_a_manual_count():
    """Buckets double from 64 targets; their token-weighted mean is the row's loss, and each bucket's loss is
    the mean nats of exactly its positions (checked against a log_softmax by hand)."""
    from mixlab.training.evaluate import position_buckets, position_losses

    assert position_buckets(256) == [(0, 64), (64, 128), (128, 256)]
    assert position_buckets(1000) == [(0, 64), (64, 128), (128, 256), (256, 512), (512, 1000)]
    assert position_buckets(32) == [(0, 32)]
    torch.manual_seed(0)
    model = Transformer(CFG)
    rng = np.random.default_rng(1)
    windows = {"a": rng.integers(0, 256, size=(3, 129)), "b": rng.integers(0, 256, size=(2, 33))}
    rows = {r["source"]: r for r in HeldOutEvaluator(windows, np.ones(256, dtype=np.int64)).evaluate(model)}
    buckets = position_losses(rows["a"])
    assert [(lo, hi) for lo, hi, _ in buckets] == [(0, 64), (64, 128)]
    idx = torch.from_numpy(windows["a"])
    with torch.no_grad():
        logp = F.log_softmax(model(idx[:, :-1])[0].double(), dim=-1)
    nats = -logp.gather(-1, idx[:, 1:, None])[..., 0]
    for lo, hi, loss in buckets:
        assert loss == pytest.approx(nats[:, lo:hi].mean().item(), rel=1e-6)
    assert sum(loss * (hi - lo) for lo, hi, loss in buckets) / 128 == pytest.approx(rows["a"]["loss"], rel=1e-6)
    # "all": the shared bucket [0, 32) of b is a bucket of its own; a's [0, 64) is not merged with it
    assert set(k for k in rows["all"] if k.startswith("loss_pos_")) == {"loss_pos_0_64", "loss_pos_64_128",
                                                                       "loss_pos_0_32"}
    assert rows["all"]["loss_pos_0_32"] == pytest.approx(rows["b"]["loss_pos_0_32"])
