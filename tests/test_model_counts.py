"""Parameter, active-parameter and FLOP counts of every model switch, each written out by hand from the config
(d_model, layers, heads, ...) and compared with what the model reports; the trainer logs these and compute-matched
ablations are sized by them."""

from __future__ import annotations

import math

import pytest
import torch
from mixlab.training.model import ModelConfig, Transformer

V, D, L, F = 256, 64, 4, 96  # vocab, d_model, layers, dense SwiGLU width
T = 48  # the sequence length FLOPs are counted for


def build(**overrides) -> Transformer:
    values = dict(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, ffn_hidden=F, max_seq_len=64)
    cfg = ModelConfig(**(values | overrides))
    with torch.device("meta"):  # shapes only: counting needs no memory or init
        return Transformer(cfg)


def unique_numel(model: Transformer) -> int:
    """Independent of num_params: every tensor of the state dict once (tied ones share storage), no buffers."""
    buffers = {name for name, _ in model.named_buffers()}
    seen, total = set(), 0
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in buffers or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel()
    return total


def mha_layer(n_heads: int, n_kv: int) -> tuple[int, int]:
    """(matmul params, norm params) of one MHA/GQA/MQA attention plus the two block norms."""
    hd = D // n_heads
    return D * n_heads * hd + 2 * D * n_kv * hd + n_heads * hd * D, 2 * D


def check(model: Transformer, total: int, active: int, flops: int) -> None:
    assert model.num_params() == total == unique_numel(model)
    assert model.num_params(non_embedding=True) == total - V * D
    assert model.active_params() == active
    assert model.active_params(non_embedding=True) == active - V * D
    assert model.activation_ratio() == pytest.approx((active - V * D) / (total - V * D))
    assert model.estimate_flops_per_token(T) == flops


@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_dense_attention_variants(n_heads: int, n_kv: int):
    model = build(n_heads=n_heads, n_kv_heads=n_kv)
    attn, norms = mha_layer(n_heads, n_kv)
    mlp = 3 * D * F
    total = V * D + L * (attn + norms + mlp) + D  # tied lm_head: no extra matrix; + final norm
    matmul = L * (attn + mlp) + V * D  # the tied lm_head still multiplies
    check(model, total, total, 6 * matmul + L * 12 * T * D)


def test_untied_head():
    model = build(tie_embeddings=False)
    attn, norms = mha_layer(4, 2)
    total = 2 * V * D + L * (attn + norms + 3 * D * F) + D
    check(model, total, total, 6 * (L * (attn + 3 * D * F) + V * D) + 12 * L * T * D)
    assert model.activation_ratio() == 1.0


@pytest.mark.parametrize("q_rank", [0, 24])
def test_mla_with_and_without_query_compression(q_rank: int):
    H, hd, R, C = 4, D // 4, 6, 20  # heads, head_dim, rope_dim, kv latent
    model = build(attention="mla", mla_kv_rank=C, mla_q_rank=q_rank, mla_rope_dim=R)
    q_matmul = D * H * (hd + R) if q_rank == 0 else D * q_rank + q_rank * H * (hd + R)
    q_norm = q_rank  # RMSNorm gain of the query latent (none when queries are not compressed)
    kv_matmul = D * C + C * H * hd + C * H * hd + D * R  # latent down, k_nope up, v up, shared k_rope
    attn_matmul = q_matmul + kv_matmul + H * hd * D
    per_layer = attn_matmul + q_norm + C + 2 * D + 3 * D * F
    total = V * D + L * per_layer + D
    score_flops = 6 * T * (H * (hd + R) + H * hd)  # q.k over head_dim + rope_dim, then values over head_dim
    check(model, total, total, 6 * (L * (attn_matmul + 3 * D * F) + V * D) + L * score_flops)


def test_mla_rope_dim_defaults_to_half_a_head():
    model = build(attention="mla", mla_kv_rank=20)
    assert model.layers[0].attn.wk_rope.weight.shape == (D // 4 // 2, D)
    assert model.rope_cos.shape == (64, D // 4 // 2)


def test_moe_with_shared_experts_and_dense_first_layers():
    E, k, S, first_dense = 8, 2, 1, 1
    h = F // k  # expert_hidden 0: the dense width split over the k active experts
    model = build(n_experts=E, moe_top_k=k, n_shared_experts=S, moe_first_dense=first_dense)
    attn, norms = mha_layer(4, 2)
    moe_total = D * E + E * 3 * D * h + S * 3 * D * h  # router, routed experts, shared experts
    moe_active = D * E + k * 3 * D * h + S * 3 * D * h
    dense = 3 * D * F
    n_moe = L - first_dense
    total = V * D + L * (attn + norms) + first_dense * dense + n_moe * moe_total + D
    active = total - n_moe * (moe_total - moe_active)
    flops = 6 * (L * attn + first_dense * dense + n_moe * moe_active + V * D) + 12 * L * T * D
    check(model, total, active, flops)
    assert model.activation_ratio() < 0.75
    assert [layer.is_moe for layer in model.layers] == [False, True, True, True]


def test_moe_explicit_expert_width():
    model = build(n_experts=4, moe_top_k=1, expert_hidden=40)
    attn, norms = mha_layer(4, 2)
    moe_total, moe_active = D * 4 + 4 * 3 * D * 40, D * 4 + 1 * 3 * D * 40
    total = V * D + L * (attn + norms + moe_total) + D
    check(model, total, total - L * (moe_total - moe_active),
          6 * (L * (attn + moe_active) + V * D) + 12 * L * T * D)


def ssm_counts(expand: int, N: int, K: int) -> tuple[int, int, int]:
    """(params, matmul params as training/ssm.py counts them, non-matmul FLOPs per token) of one SSM mixer."""
    Ei, r = expand * D, math.ceil(D / 16)
    params = D * 2 * Ei + (Ei * K + Ei) + Ei * r + (r * Ei + Ei) + 2 * Ei * N + Ei * N + Ei + Ei * D
    #        in_proj      conv + bias    dt_down   dt_up + bias    B, C proj  A_log  D_skip out_proj
    matmul = D * 2 * Ei + Ei * r + r * Ei + 2 * Ei * N + Ei * D  # the conv's FLOPs are in nonmatmul
    nonmatmul = 3 * (2 * K * Ei + 7 * Ei * N)
    return params, matmul, nonmatmul


def test_hybrid_attention_every_other_layer():
    model = build(attention_every=2, ssm_state=8, ssm_expand=2, ssm_conv=4)
    assert model.config.ssm_layers == [0, 2]
    ssm_params, ssm_matmul, ssm_nonmatmul = ssm_counts(2, 8, 4)
    attn, norms = mha_layer(4, 2)
    mlp = 3 * D * F
    total = V * D + 2 * (attn + norms + mlp) + 2 * (ssm_params + 2 * D + mlp) + D
    flops = 6 * (2 * attn + 2 * ssm_matmul + L * mlp + V * D) + 2 * 12 * T * D + 2 * ssm_nonmatmul
    check(model, total, total, flops)


def test_every_switch_at_once():
    """MLA with compressed queries, MoE with a shared expert after one dense layer, SSM layers 0 and 2, untied
    head, NoPE and doc masking (which change no count)."""
    H, hd, R, C, Q = 4, D // 4, 4, 16, 32
    E, k, S = 4, 2, 1
    h = 40
    model = build(attention="mla", mla_kv_rank=C, mla_q_rank=Q, mla_rope_dim=R, n_experts=E, moe_top_k=k,
                  expert_hidden=h, n_shared_experts=S, moe_first_dense=1, attention_every=2, ssm_state=4,
                  ssm_expand=1, ssm_conv=3, tie_embeddings=False, doc_masking=True, nope_layers=[3])
    ssm_params, ssm_matmul, ssm_nonmatmul = ssm_counts(1, 4, 3)
    attn_matmul = D * Q + Q * H * (hd + R) + D * C + 2 * C * H * hd + D * R + H * hd * D
    attn_params = attn_matmul + Q + C
    moe_total = D * E + E * 3 * D * h + S * 3 * D * h
    moe_active = D * E + k * 3 * D * h + S * 3 * D * h
    dense = 3 * D * F
    # layer 0: SSM + dense MLP; 1: MLA + MoE; 2: SSM + MoE; 3: MLA (NoPE) + MoE
    total = 2 * V * D + 2 * ssm_params + 2 * attn_params + dense + 3 * moe_total + L * 2 * D + D
    active = total - 3 * (moe_total - moe_active)
    matmul = 2 * ssm_matmul + 2 * attn_matmul + dense + 3 * moe_active + V * D
    flops = 6 * matmul + 2 * 6 * T * (H * (hd + R) + H * hd) + 2 * ssm_nonmatmul
    check(model, total, active, flops)


def test_smollm3_preset_keeps_its_size_and_flops():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("smollm3-3b"))
    d, layers, vocab, ffn, heads, kv = 2048, 36, 128256, 11008, 16, 4
    hd = d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * ffn
    total = vocab * d + layers * (per_layer + 2 * d) + d
    assert model.num_params() == total and model.active_params() == total
    assert model.num_params() / 1e9 == pytest.approx(3.08, abs=0.01)
    assert model.estimate_flops_per_token(4096) == 6 * (layers * per_layer + vocab * d) + 12 * layers * d * 4096
