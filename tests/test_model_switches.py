"""The model switches beyond the dense Llama: MLA against its formula, intra-document masking (a packed document
sees what it would see alone), MoE losses and balancing, hybrid SSM layers; each one trains, and each one
round-trips through a state dict and is refused by the Llama export."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mixlab.training.errors import ConfigError
from mixlab.training.hf import hf_config
from mixlab.training.model import (
    LatentAttention,
    ModelConfig,
    Transformer,
    position_ids_from_segment_ids,
    rope_tables,
    segment_ids_from_cu_seqlens,
)

torch.set_num_threads(1)

SEQ = 32
MLA = dict(attention="mla", mla_kv_rank=16)
SWITCHES = {
    "mla": MLA,
    "mla_q_rank": {**MLA, "mla_q_rank": 24, "mla_rope_dim": 4},
    "doc_masking": dict(doc_masking=True),
    "moe_aux_loss": dict(n_experts=4, moe_top_k=2, router_z_loss=1e-3),
    "moe_bias": dict(n_experts=4, moe_top_k=2, moe_balance="bias", moe_bias_rate=0.01),
    "moe_shared_first_dense": dict(n_experts=4, moe_top_k=1, n_shared_experts=1, moe_first_dense=1),
    "hybrid": dict(attention_every=2, ssm_state=8),
    "hybrid_doc_masking": dict(attention_every=2, ssm_state=8, doc_masking=True),
    "untied": dict(tie_embeddings=False),
}


def config(**overrides) -> ModelConfig:
    values = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    return ModelConfig(**(values | overrides))


def text_batch(rows: int, length: int) -> torch.Tensor:
    """Byte windows of a stdlib source file: real text, identical on every machine."""
    data = np.frombuffer(Path(F.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
    starts = np.arange(rows) * (len(data) // rows)
    return torch.from_numpy(np.stack([data[s:s + length] for s in starts]))


def packed_segments(rows: int) -> torch.Tensor:
    """Two documents per row, split at 11 (the sampler's offsets form)."""
    return segment_ids_from_cu_seqlens([np.array([0, 11, SEQ], dtype=np.int32)] * rows, SEQ)


@pytest.mark.parametrize("name", list(SWITCHES))
def test_switch_trains_with_finite_gradients_everywhere(name: str):
    torch.manual_seed(0)
    cfg = config(**SWITCHES[name])
    model = Transformer(cfg)
    batch = text_batch(4, SEQ + 1)
    extra = {"segment_ids": packed_segments(4)} if cfg.doc_masking else {}
    opt = model.configure_optimizer(lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(30):
        logits, loss = model(batch[:, :-1], batch[:, 1:], **extra)
        loss.backward()
        if step == 0:
            assert logits.shape == (4, SEQ, 256) and loss.shape == ()
            for pname, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
                assert p.grad.abs().sum() > 0, f"{pname} gets no gradient"
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], (losses[0], losses[-1])
    _, per_token = model(batch[:, :-1], batch[:, 1:], reduction="none", **extra)
    assert per_token.shape == (4, SEQ) and torch.isfinite(per_token).all()


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE from its definition: pair (i, i + d/2) rotated by position x theta^(-2i/d)."""
    d = x.shape[-1]
    angle = positions[:, None].double() * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = angle.cos().float(), angle.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


@pytest.mark.parametrize("q_rank,use_rope", [(0, True), (12, True), (0, False)], ids=["plain", "q_latent", "nope"])
def test_mla_matches_per_head_formula(q_rank: int, use_rope: bool):
    torch.manual_seed(0)
    cfg = config(**MLA, mla_q_rank=q_rank, mla_rope_dim=4)
    attn = LatentAttention(cfg, use_rope=use_rope)
    for p in attn.parameters():  # non-trivial norm gains too
        torch.nn.init.normal_(p, mean=1.0 if p.dim() == 1 else 0.0, std=0.3)
    H, hd, R, T = 4, 8, 4, 7
    x = torch.randn(2, T, cfg.d_model)
    cos, sin = rope_tables(R, cfg.max_seq_len, cfg.rope_theta)
    out = attn(x, cos, sin)

    eps = cfg.norm_eps
    if q_rank:
        q_all = rms(x @ attn.wq_a.weight.T, attn.q_latent_norm.weight, eps) @ attn.wq_b.weight.T
    else:
        q_all = x @ attn.wq.weight.T
    latent = rms(x @ attn.wkv_a.weight.T, attn.kv_norm.weight, eps)
    k_rope = x @ attn.wk_rope.weight.T  # [B, T, R], one for all heads
    positions = torch.arange(T)
    if use_rope:
        k_rope = rotate(k_rope, positions, cfg.rope_theta)
    heads = []
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(H):
        q_h = q_all[..., h * (hd + R):(h + 1) * (hd + R)]
        q_nope, q_rope = q_h[..., :hd], q_h[..., hd:]
        if use_rope:
            q_rope = rotate(q_rope, positions, cfg.rope_theta)
        k_nope = latent @ attn.wk_b.weight.T[:, h * hd:(h + 1) * hd]
        v = latent @ attn.wv_b.weight.T[:, h * hd:(h + 1) * hd]
        Q = torch.cat([q_nope, q_rope], -1)
        K = torch.cat([k_nope, k_rope], -1)
        scores = (Q @ K.transpose(-2, -1)) / math.sqrt(hd + R)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
    expected = torch.cat(heads, -1) @ attn.wo.weight.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_segment_and_position_ids_from_offsets():
    cu = [np.array([0, 3, 3, 8], dtype=np.int32), torch.tensor([0, 8], dtype=torch.int32)]
    seg = segment_ids_from_cu_seqlens(cu, 8)
    assert seg.dtype == torch.long
    assert seg.tolist() == [[0, 0, 0, 2, 2, 2, 2, 2], [0] * 8]  # an empty document leaves its index unused
    assert position_ids_from_segment_ids(seg).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]
    for bad in ([np.array([0, 5])], [np.array([1, 8])], [np.array([0, 6, 4, 8])], []):
        with pytest.raises(ConfigError, match="cu_seqlens"):
            segment_ids_from_cu_seqlens(bad, 8)


@pytest.mark.parametrize("name", ["doc_masking", "mla_doc", "moe_doc", "hybrid_doc_masking"])
def test_packed_document_sees_what_it_sees_alone(name: str):
    overrides = {"mla_doc": {**MLA, "doc_masking": True},
                 "moe_doc": dict(n_experts=4, doc_masking=True)}.get(name, SWITCHES.get(name))
    torch.manual_seed(0)
    model = Transformer(config(**overrides, nope_layers=[1])).eval()  # a RoPE layer and a NoPE (or SSM) layer
    idx = text_batch(2, SEQ)
    seg = packed_segments(2)
    positions = position_ids_from_segment_ids(seg)
    packed, _ = model(idx, position_ids=positions, segment_ids=seg)
    first, _ = model(idx[:, :11])
    second, _ = model(idx[:, 11:])  # from position 0, nothing before it
    torch.testing.assert_close(packed[:, :11], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 11:], second, atol=1e-5, rtol=1e-5)
    derived, _ = model(idx, segment_ids=seg)  # positions derived from the segments
    torch.testing.assert_close(derived, packed)
    unmasked, _ = model(idx)  # without the mask the second document sees the first
    assert not torch.allclose(unmasked[:, 11:], second, atol=1e-3)


def test_doc_masking_inputs_are_checked():
    idx = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match="doc_masking"):
        Transformer(config())(idx, segment_ids=torch.zeros(2, 8, dtype=torch.long))
    model = Transformer(config(doc_masking=True))
    with pytest.raises(ConfigError, match="segment_ids"):
        model(idx, segment_ids=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ConfigError, match="position_ids"):
        model(idx, position_ids=torch.full((2, 8), 64))
    plain, _ = model(idx)  # no segments: one document per row, plain causal attention
    same, _ = model(idx, segment_ids=torch.zeros(2, 8, dtype=torch.long))
    torch.testing.assert_close(plain, same)


def test_moe_losses_counts_and_balancing():
    torch.manual_seed(0)
    model = Transformer(config(n_experts=4, moe_top_k=2, router_z_loss=1e-2, moe_first_dense=1))
    batch = text_batch(2, SEQ + 1)
    logits, loss = model(batch[:, :-1], batch[:, 1:])
    moe = model.moe_layers()
    assert len(moe) == 1 and moe[0].aux_loss.item() > 0
    ce = F.cross_entropy(logits.view(-1, 256), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ce + moe[0].aux_loss)
    stats = model.after_optimizer_step()
    assert sum(stats["moe_tokens_per_expert"][0]) == 2 * SEQ * 2  # every token routed to top_k experts
    counts = torch.tensor(stats["moe_tokens_per_expert"][0], dtype=torch.float)
    assert stats["moe_max_load"] == pytest.approx((counts.max() / counts.mean()).item())
    assert model.after_optimizer_step()["moe_tokens_per_expert"] == [[0, 0, 0, 0]]  # counts were reset
    assert torch.equal(moe[0].expert_bias, torch.zeros(4))  # aux_loss balance leaves the bias alone
    model.eval()
    _, eval_loss = model(batch[:, :-1], batch[:, 1:])
    torch.testing.assert_close(eval_loss, F.cross_entropy(model(batch[:, :-1])[0].view(-1, 256),
                                                         batch[:, 1:].reshape(-1)))
    assert Transformer(config()).after_optimizer_step() == {}


def test_bias_balancing_moves_the_bias_and_round_trips_through_the_state_dict():
    torch.manual_seed(0)
    cfg = config(n_experts=4, moe_top_k=1, moe_balance="bias", moe_bias_rate=0.05)
    model = Transformer(cfg)
    batch = text_batch(2, SEQ + 1)
    for _ in range(3):
        model(batch[:, :-1], batch[:, 1:])
        model.after_optimizer_step()
    bias = model.moe_layers()[0].expert_bias
    assert bias.abs().sum() > 0 and "layers.0.mlp.expert_bias" in model.state_dict()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(1)
    fresh = Transformer(cfg)
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    torch.testing.assert_close(fresh.moe_layers()[0].expert_bias, bias)
    torch.testing.assert_close(fresh.eval()(batch)[0], model.eval()(batch)[0])


@pytest.mark.parametrize("name", ["mla_q_rank", "hybrid", "moe_shared_first_dense", "untied"])
def test_state_dict_round_trip(name: str):
    torch.manual_seed(0)
    cfg = config(**SWITCHES[name])
    model = Transformer(cfg).eval()
    torch.manual_seed(1)
    fresh = Transformer(ModelConfig.from_dict(cfg.to_dict())).eval()
    batch = text_batch(2, SEQ)
    assert not torch.allclose(fresh(batch)[0], model(batch)[0])
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(batch)[0], model(batch)[0])


def test_hybrid_layout_and_optimizer_groups():
    cfg = config(n_layers=4, attention_every=2, ssm_layers=[1], n_experts=4)
    assert cfg.ssm_layers == [0, 1, 2] and ModelConfig.from_dict(cfg.to_dict()) == cfg
    model = Transformer(cfg)
    assert [layer.is_ssm for layer in model.layers] == [True, True, True, False]
    assert hasattr(model.layers[0], "ssm") and not hasattr(model.layers[0], "attn")
    decay, no_decay = model.configure_optimizer(lr=1e-3, weight_decay=0.1).param_groups
    assert "layers.0.ssm.A_log" in no_decay["param_names"] and "layers.0.ssm.dt_up.bias" in no_decay["param_names"]
    assert "layers.0.mlp.router.weight" in decay["param_names"]
    assert all(p.dim() >= 2 for p in decay["params"])


@pytest.mark.parametrize("overrides,field", [
    (dict(attention="gqa"), "attention"),
    (dict(attention="mla"), "mla_kv_rank"),
    (dict(attention="mla", mla_kv_rank=8, mla_rope_dim=3), "mla_rope_dim"),
    (dict(attention="mla", mla_kv_rank=8, qk_norm=True), "qk_norm"),
    (dict(n_experts=2, moe_top_k=3), "moe_top_k"),
    (dict(n_experts=2, moe_first_dense=2), "moe_first_dense"),
    (dict(n_experts=2, moe_balance="loss"), "moe_balance"),
    (dict(n_experts=2, moe_aux_loss=-1.0), "moe_aux_loss"),
    (dict(n_experts=-1), "n_experts"),
    (dict(ssm_layers=[2]), "ssm_layers"),
    (dict(attention_every=0), "attention_every"),
    (dict(attention_every=2, ssm_state=0), "ssm_state"),
    (dict(doc_masking="yes"), "doc_masking"),
])
def test_bad_switch_values_name_the_field(overrides: dict, field: str):
    with pytest.raises(ConfigError, match=field) as err:
        config(**overrides)
    assert f"model.{field}" in err.value.fields


@pytest.mark.parametrize("overrides,field", [
    (MLA, "attention"), (dict(n_experts=4), "n_experts"), (dict(attention_every=2), "ssm_layers"),
    (dict(ssm_layers=[0]), "ssm_layers"),
])
def test_llama_export_refuses_the_new_architectures(overrides: dict, field: str):
    with pytest.raises(ConfigError, match=field):
        hf_config(config(**overrides))


def test_llama_export_accepts_doc_masking_and_unused_sub_knobs():
    exported = hf_config(config(doc_masking=True, mla_kv_rank=8, moe_top_k=1, ssm_state=4))
    assert exported["num_hidden_layers"] == 2
