"""The selective SSM mixer against a plain token-by-token reference, on packed rows, and as a tiny learner."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mixlab.training.errors import ConfigError
from mixlab.training.ssm import GatedLinearRecurrence, selective_scan

D_MODEL, STATE, EXPAND, CONV = 32, 8, 2, 4


def make_cfg(**overrides):
    """ModelConfig once model.py carries the ssm_* fields, else a namespace with the same names."""
    fields = dict(d_model=D_MODEL, ssm_state=STATE, ssm_expand=EXPAND, ssm_conv=CONV, norm_eps=1e-6, init_std=0.02)
    fields.update(overrides)
    from mixlab.training.model import ModelConfig
    if "ssm_state" in ModelConfig.__dataclass_fields__:
        return ModelConfig(n_heads=4, n_kv_heads=2, **fields)
    return types.SimpleNamespace(**fields)


def make_layer(seed: int = 0, **overrides) -> GatedLinearRecurrence:
    torch.manual_seed(seed)
    layer = GatedLinearRecurrence(make_cfg(**overrides))
    with torch.no_grad():  # livelier weights than init_std=0.02 so the tests see every path's effect
        layer.reset_parameters(0.2, 0.2)
        layer.dt_up.bias.add_(1.0)  # longer steps: decays well below 1 and far from it
    return layer


def reference_forward(layer: GatedLinearRecurrence, x: torch.Tensor) -> torch.Tensor:
    """The layer written token by token: a Python loop over t for the conv and the recurrence."""
    Bsz, T, _ = x.shape
    u_all, z = layer.in_proj(x).chunk(2, dim=-1)
    K = layer.conv_len
    weight, bias = layer.conv.weight[:, 0, :], layer.conv.bias
    conv_out = []
    for t in range(T):
        acc = bias.expand(Bsz, -1)
        for k in range(K):  # tap k sees token t - (K - 1 - k)
            src = t - (K - 1 - k)
            if src >= 0:
                acc = acc + weight[:, k] * u_all[:, src]
        conv_out.append(acc)
    u = F.silu(torch.stack(conv_out, dim=1))
    A = -torch.exp(layer.A_log)
    h = x.new_zeros(Bsz, layer.d_inner, layer.d_state)
    ys = []
    for t in range(T):
        u_t = u[:, t]
        dt = F.softplus(layer.dt_up(layer.dt_down(u_t)))
        B_t, C_t = layer.b_proj(u_t), layer.c_proj(u_t)
        h = torch.exp(dt[:, :, None] * A) * h + (dt * u_t)[:, :, None] * B_t[:, None, :]
        ys.append((h * C_t[:, None, :]).sum(-1) + layer.D_skip * u_t)
    y = torch.stack(ys, dim=1)
    return layer.out_proj(y * F.silu(z))


def test_shapes_and_bad_config() -> None:
    layer = make_layer()
    x = torch.randn(3, 21, D_MODEL)
    assert layer(x).shape == (3, 21, D_MODEL)
    assert layer(x, torch.zeros(3, 21, dtype=torch.long)).shape == (3, 21, D_MODEL)
    assert layer.d_inner == EXPAND * D_MODEL and layer.A_log.shape == (EXPAND * D_MODEL, STATE)
    with pytest.raises(ConfigError, match="ssm_state") as info:
        GatedLinearRecurrence(make_cfg(ssm_state=0))
    assert info.value.fields == ("model.ssm_state",)
    with pytest.raises(ValueError, match="segment_ids"):
        layer(x, torch.zeros(3, 20, dtype=torch.long))


def loop_scan(dt, w, A, B, C, is_start):
    """The recurrence token by token: h = exp(dt A) h + w B (h = 0 before a document start), y = h . C."""
    h, ys = dt.new_zeros(dt.shape[0], dt.shape[2], A.shape[1]), []
    for t in range(dt.shape[1]):
        a = torch.exp(dt[:, t, :, None] * A) * (~is_start[:, t]).to(dt.dtype)[:, None, None]
        h = a * h + w[:, t, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1)


def scan_inputs(dtype: torch.dtype, T: int = 23) -> list[torch.Tensor]:
    dt = torch.rand(2, T, 3, dtype=dtype) * 1.5
    A = -torch.rand(3, 4, dtype=dtype) * 2
    tensors = [dt, torch.randn(2, T, 3, dtype=dtype), A, torch.randn(2, T, 4, dtype=dtype),
               torch.randn(2, T, 4, dtype=dtype)]
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("with_starts", [False, True])
def test_scan_matches_loop_and_gradcheck(with_starts: bool) -> None:
    torch.manual_seed(1)
    starts = torch.zeros(2, 23, dtype=torch.bool)
    if with_starts:  # inside chunks, on a chunk's first offset (4, 8 for L=4), and two in a row
        starts[0, 5] = starts[0, 8] = starts[1, 12] = starts[1, 13] = starts[1, 16] = True
    inputs = scan_inputs(torch.float32)
    ref = loop_scan(*inputs, starts)
    probe = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    for chunk in (1, 3, 4, 8, 23, 40, None):
        out = selective_scan(*inputs, starts if with_starts else None, chunk)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad((out * probe).sum(), inputs)
        for name, g, r in zip("dt w A B C".split(), grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad of {n}: {m}")
    # the hand-written backward against finite differences (float64), across 5 chunks of 4 and 1 of 3
    inputs64 = scan_inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda *t: selective_scan(*t, starts, 4), inputs64)


@pytest.mark.parametrize("chunk", [None, 1, 5, 16])
def test_chunked_layer_matches_sequential_reference(chunk: int | None) -> None:
    layer = make_layer(seed=2)
    layer.chunk_len = chunk
    x = torch.randn(2, 37, D_MODEL, requires_grad=True)
    out = layer(x)
    ref = reference_forward(layer, x)
    assert ref.abs().max() > 1e-2  # a real signal, not two near-zero tensors
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # gradients too: the hand-written scan backward against autograd through the loop
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()])
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *layer.parameters()])
    for (name, _), g, r in zip([("x", x), *layer.named_parameters()], grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_packed_documents_do_not_see_each_other() -> None:
    layer = make_layer(seed=3)
    layer.chunk_len = 6  # document boundaries fall inside chunks and on their edges
    lengths = [13, 5, 18]
    docs = [torch.randn(1, n, D_MODEL) for n in lengths]
    packed = torch.cat(docs, dim=1)
    segment_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    out = layer(packed, segment_ids)
    start = 0
    for doc, n in zip(docs, lengths, strict=True):
        torch.testing.assert_close(out[:, start:start + n], layer(doc), atol=1e-5, rtol=1e-5)
        start += n
    # without segment_ids the later documents do see the earlier ones
    assert (layer(packed)[:, 13:] - out[:, 13:]).abs().max() > 1e-3
    # all one document: the masked conv path equals the plain conv path
    torch.testing.assert_close(layer(packed, torch.zeros_like(segment_ids)), layer(packed), atol=1e-6, rtol=1e-5)


def test_causal() -> None:
    layer = make_layer(seed=4)
    x = torch.randn(2, 30, D_MODEL)
    base = layer(x)
    for t in (0, 7, 17, 29):
        changed = x.clone()
        changed[:, t] += torch.randn(2, D_MODEL)
        out = layer(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0.0, rtol=0.0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4
        if t + 10 < 30:  # the state carries it beyond the conv window
            assert (out[:, t + 10] - base[:, t + 10]).abs().max() > 1e-6


def test_grads_finite_on_every_param() -> None:
    layer = make_layer(seed=5)
    x = torch.randn(2, 40, D_MODEL)
    segment_ids = (torch.arange(40) >= 25).long().expand(2, -1)
    layer(x, segment_ids).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_init() -> None:
    layer = GatedLinearRecurrence(make_cfg())
    layer.reset_parameters(0.02, 0.005)
    dt = F.softplus(layer.dt_up.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    assert dt.max() / dt.min() > 5  # spread over the range, not one value
    torch.testing.assert_close(layer.A_log[3], torch.log(torch.arange(1, STATE + 1, dtype=torch.float32)))
    assert (layer.D_skip == 1).all()
    assert abs(layer.out_proj.weight.std().item() - 0.005) < 0.001
    assert abs(layer.in_proj.weight.std().item() - 0.02) < 0.003


def test_loss_falls_on_shifted_copy() -> None:
    """Predict the token two steps back: the layer must carry information along time."""
    torch.manual_seed(6)
    vocab, shift = 16, 2
    layer = GatedLinearRecurrence(make_cfg())
    model = nn.Sequential(nn.Embedding(vocab, D_MODEL))
    head = nn.Linear(D_MODEL, vocab)
    params = [*model.parameters(), *layer.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        tokens = torch.randint(0, vocab, (16, 32))
        logits = head(layer(model(tokens)))
        loss = F.cross_entropy(logits[:, shift:].reshape(-1, vocab), tokens[:, :-shift].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(vocab)
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0], losses


def test_counts_by_hand() -> None:
    cfg = make_cfg(d_model=48, ssm_state=16, ssm_expand=2, ssm_conv=4)
    layer = GatedLinearRecurrence(cfg)
    d_inner, rank = 96, 3  # 2 x 48; ceil(48 / 16)
    by_hand = (48 * 2 * d_inner  # in_proj
               + d_inner * rank + rank * d_inner  # dt_down, dt_up
               + 2 * d_inner * 16  # b_proj, c_proj
               + d_inner * 48)  # out_proj
    assert layer.active_matmul_params() == by_hand
    biases = 4 * d_inner + d_inner + d_inner  # conv taps (not a matmul), conv bias, dt bias
    others = d_inner * 16 + d_inner  # A_log, D_skip
    assert sum(p.numel() for p in layer.parameters()) == by_hand + biases + others
    conv_fwd = 2 * 4 * d_inner
    scan_fwd = d_inner * 16 * (3 + 2 + 2)  # discretise (dt*A, exp, dt*u*B), update (mul, add), read out (mul, add)
    assert layer.nonmatmul_flops_per_token(256) == 3 * (conv_fwd + scan_fwd)
    assert layer.nonmatmul_flops_per_token(4096) == layer.nonmatmul_flops_per_token(64)  # linear in T
