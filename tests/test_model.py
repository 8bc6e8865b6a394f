"""The model's math: shapes, GQA, causality, RoPE/NoPE, tied weights, the ablation switches, and that it learns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mixlab.training import ConfigError, TrainConfig
from mixlab.training.model import Attention, ModelConfig, Transformer, apply_rope, rope_tables

torch.set_num_threads(1)  # tiny models: a second thread only adds sync (and stalls on a busy machine)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", **overrides)


def real_text_batch(batch_size: int, seq_len: int) -> torch.Tensor:
    """Byte-level (vocab 256) windows of a stdlib source file: real, offline, identical on every machine."""
    data = np.frombuffer(Path(F.__file__).read_bytes(), dtype=np.uint8).astype(np.int64)
    starts = np.arange(batch_size) * (len(data) // batch_size)
    return torch.from_numpy(np.stack([data[s:s + seq_len + 1] for s in starts]))


def test_shapes_and_reductions():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 256, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 256) and loss is None
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    assert logits.shape == (3, 16, 256) and loss.shape == ()
    _, per_token = model(idx[:, :-1], idx[:, 1:], reduction="none")
    assert per_token.shape == (3, 16)
    torch.testing.assert_close(per_token.mean(), loss)
    assert abs(loss.item() - math.log(256)) < 0.1  # small init: close to uniform
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_gqa_equals_explicit_repeat_of_kv_heads():
    torch.manual_seed(0)
    cfg = tiny(n_heads=4, n_kv_heads=2)
    attn = Attention(cfg, use_rope=True)
    x = torch.randn(2, 10, cfg.d_model)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    out = attn(x, cos, sin)

    B, T, H, D = 2, 10, 4, cfg.head_dim
    q = attn.wq(x).view(B, T, H, D).transpose(1, 2)
    k = attn.wk(x).view(B, T, 2, D).transpose(1, 2)
    v = attn.wv(x).view(B, T, 2, D).transpose(1, 2)
    q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query heads 0,1 share kv head 0
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = Transformer(tiny())
    idx = torch.randint(0, 256, (1, 32))
    changed = idx.clone()
    changed[0, 20] = (idx[0, 20] + 1) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    D = 16
    cos, sin = rope_tables(D, 64, 10000.0)
    q, k = torch.randn(D), torch.randn(D)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, D), cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k.view(1, 1, 1, D), cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum().item()

    assert score(7, 3) == pytest.approx(score(40, 36), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)
    # a rotation: norms are preserved
    torch.testing.assert_close(apply_rope(q.view(1, 1, 1, D), cos[9:10], sin[9:10]).norm(), q.norm())


def test_nope_layer_ignores_the_order_of_the_prefix():
    """Without RoPE, attention sees its keys as a set: permuting the prefix doesn't change the last output."""
    torch.manual_seed(0)
    cfg = tiny(nope_layers=[1])
    model = Transformer(cfg)
    assert [layer.attn.use_rope for layer in model.layers] == [True, False]
    x = torch.randn(1, 12, cfg.d_model)
    cos, sin = model.rope_cos, model.rope_sin
    perm = torch.cat([torch.randperm(11), torch.tensor([11])])
    nope, rope = model.layers[1].attn, model.layers[0].attn
    torch.testing.assert_close(nope(x, cos, sin)[:, -1], nope(x[:, perm], cos, sin)[:, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rope(x, cos, sin)[:, -1], rope(x[:, perm], cos, sin)[:, -1], atol=1e-4)
    with pytest.raises(ValueError, match="nope_layers"):
        tiny(nope_layers=[5])


def test_rnope_every_nth_layer_is_the_smollm3_pattern():
    smollm3 = ModelConfig.preset("smollm3-3b")
    assert ModelConfig.from_dict({**smollm3.to_dict(), "nope_layers": [], "nope_every": 4}).nope_layers == \
        smollm3.nope_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35]
    cfg = tiny(n_layers=5, nope_every=2, nope_layers=[0])
    assert cfg.nope_layers == [0, 1, 3]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a round trip does not add layers again
    assert [layer.attn.use_rope for layer in Transformer(cfg).layers] == [False, False, True, False, True]
    with pytest.raises(ValueError, match="nope_every"):
        tiny(nope_every=0)


def test_configs_share_dict_round_trip_and_presets():
    for cls, name in ((ModelConfig, "demo"), (TrainConfig, "demo")):
        config = cls.preset(name, seed=3) if cls is TrainConfig else cls.preset(name, vocab_size=512)
        assert cls.from_dict(config.to_dict()) == config and type(config) is cls
        with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} fields \['bogus'\]"):
            cls.from_dict({**config.to_dict(), "bogus": 1})
        with pytest.raises(ConfigError, match=rf"unknown {cls.__name__} preset 'huge'; choose from .*'tiny'"):
            cls.preset("huge")
    assert ModelConfig.preset("tiny").d_model == 64 and TrainConfig.preset("tiny").total_steps == 60


def test_tied_embeddings_share_one_tensor():
    tied, untied = Transformer(tiny()), Transformer(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 256 * 64
    assert tied.num_params(non_embedding=True) == tied.num_params() - 256 * 64


def test_qk_norm_and_z_loss_switches():
    torch.manual_seed(0)
    base = Transformer(tiny())
    qk = Transformer(tiny(qk_norm=True))
    assert qk.num_params() - base.num_params() == 2 * 2 * 16  # 2 layers x (q_norm + k_norm) x head_dim
    idx = torch.randint(0, 256, (2, 9))
    logits, loss = qk(idx[:, :-1], idx[:, 1:])
    assert torch.isfinite(loss)

    torch.manual_seed(0)
    plain = Transformer(tiny())
    torch.manual_seed(0)
    zl = Transformer(tiny(z_loss=1e-2))
    logits, ce = plain(idx[:, :-1], idx[:, 1:])
    _, total = zl(idx[:, :-1], idx[:, 1:])
    expected = ce + 1e-2 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(total, expected)
    _, per_token = zl(idx[:, :-1], idx[:, 1:], reduction="none")  # eval: pure cross-entropy
    torch.testing.assert_close(per_token.mean(), ce)


def test_optimizer_groups_decay_only_matrices():
    model = Transformer(tiny())
    opt = model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "tok_emb.weight" in no_decay["param_names"]
    assert all(n.endswith("norm.weight") for n in no_decay["param_names"] if n != "tok_emb.weight")
    assert all(p.dim() == 2 for p in decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_smollm3_preset_has_the_published_size():
    with torch.device("meta"):  # no memory: 3B parameters
        model = Transformer(ModelConfig.preset("smollm3-3b"))
    assert model.num_params() / 1e9 == pytest.approx(3.08, abs=0.01)
    assert [i for i, layer in enumerate(model.layers) if not layer.attn.use_rope] == [3, 7, 11, 15, 19, 23, 27, 31, 35]
    assert model.estimate_flops_per_token(4096) > 6 * model.num_params()


def test_tiny_model_overfits_a_fixed_batch_of_real_text():
    torch.manual_seed(0)
    model = Transformer(tiny())
    opt = model.configure_optimizer(lr=1e-2, weight_decay=0.0)
    batch = real_text_batch(4, 64)
    losses = []
    for _ in range(120):
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.5, (losses[0], losses[-1])


def test_generate_extends_the_sequence():
    torch.manual_seed(0)
    model = Transformer(tiny())
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=5, top_k=10)
    assert out.shape == (2, 8) and out.max() < 256


def test_yarn_frequencies_and_attention_factor_match_the_formula_as_transformers_computes_it():
    """YaRN against transformers' own implementation of the paper's formula (a real LlamaConfig, nothing downloaded):
    the same inverse frequencies and attention factor, and cos/sin scaled by it."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = tiny(max_seq_len=512, yarn_factor=4.0, yarn_original_max_seq_len=128, rope_theta=10000.0)
    hf = transformers.LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads, max_position_embeddings=512,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 128})
    hf_inv_freq, hf_factor = _compute_yarn_parameters(hf)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg)
    plain_cos, _ = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    factor = 0.1 * math.log(4.0) + 1
    assert hf_factor == pytest.approx(factor)
    positions = torch.arange(cfg.max_seq_len, dtype=torch.float64)
    expected = torch.outer(positions, hf_inv_freq.double())
    torch.testing.assert_close(cos[:, : cfg.head_dim // 2], (expected.cos() * factor).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin[:, cfg.head_dim // 2:], (expected.sin() * factor).float(), atol=1e-5, rtol=1e-5)
    # the highest frequency is kept, the lowest interpolated by the factor
    assert torch.allclose(cos[:, 0], plain_cos[:, 0] * factor, atol=1e-6)
    assert not torch.allclose(cos[:, cfg.head_dim // 2 - 1], plain_cos[:, cfg.head_dim // 2 - 1] * factor, atol=1e-3)
    model = Transformer(cfg)  # trains: a finite loss and gradients at the extended length
    _, loss = model(torch.randint(0, cfg.vocab_size, (2, 512)), torch.randint(0, cfg.vocab_size, (2, 512)))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="yarn_factor"):
        tiny(yarn_factor=0.5)
