"""A plain Llama-style decoder, read top to bottom: RMSNorm, RoPE, grouped-query attention, SwiGLU, block, model.

It is an ordinary `nn.Module` with no parallelism inside: data/tensor/pipeline parallelism, activation
checkpointing and compilation are applied from outside, so the same file serves the embedded CPU backend and a
later nanotron backend. Ablation switches (GQA, QK-norm, NoPE layers, z-loss, multi-head latent attention,
intra-document masking, mixture-of-experts MLPs in training/moe.py, SSM mixer layers in training/ssm.py) live in
`ModelConfig` and show up below as small local branches. With every switch off the model, its state-dict names
and its initialisation are the plain Llama decoder's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mixlab.training.config import ConfigDict
from mixlab.training.errors import ConfigError, whole_number
from mixlab.training.moe import MoEFeedForward, expert_width, validate_moe_config
from mixlab.training.ssm import GatedLinearRecurrence, document_starts, validate_ssm_config

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: trains in well under a second per step on one core
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=176, max_seq_len=128),
    # ablation proxies (RegMix-sized): ~1.2M non-embedding params, a short context; cheap on a CPU core
    "proxy": dict(d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=384, max_seq_len=128),
    # the CPU demo: ~3M non-embedding params, learns visibly within a few minutes on 2 cores
    "demo": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=688, max_seq_len=256),
    # longer CPU runs or a single GPU: ~25M non-embedding params
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_hidden=1376, max_seq_len=1024),
    # SmolLM3-3B's shape (hidden 2048, 36 layers, GQA 16/4, NoPE every 4th layer); for counting, not for CPU
    "smollm3-3b": dict(
        vocab_size=128256, d_model=2048, n_layers=36, n_heads=16, n_kv_heads=4, ffn_hidden=11008,
        max_seq_len=4096, rope_theta=50000.0, nope_layers=[i for i in range(36) if (i + 1) % 4 == 0],
    ),
}


@dataclass
class ModelConfig(ConfigDict):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = MODEL_PRESETS

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # < n_heads: grouped-query attention; == n_heads: multi-head; 1: multi-query
    ffn_hidden: int = 688  # SwiGLU hidden width (~8/3 d_model keeps params equal to a 4x GELU MLP)
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (stabilises attention logits)
    z_loss: float = 0.0  # coefficient of mean(logsumexp(logits)^2), added to the training loss only
    nope_layers: list[int] = field(default_factory=list)  # layer indices that use no positional encoding
    # RNoPE shorthand: every Nth layer has no positional encoding (layers N-1, 2N-1, ...; SmolLM3: 4), added to
    # nope_layers
    nope_every: int | None = None
    # YaRN context extension (Peng et al. 2023): factor > 1 stretches RoPE from yarn_original_max_seq_len (default:
    # max_seq_len / factor) to max_seq_len, interpolating the low frequencies, keeping the high ones (the ramp
    # between yarn_beta_fast and yarn_beta_slow rotations) and scaling attention by 0.1 ln(factor) + 1
    yarn_factor: float = 1.0
    yarn_original_max_seq_len: int | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # attention kind: "mha" (multi-head; GQA/MQA through n_kv_heads) or "mla" (DeepSeek-V2 multi-head latent
    # attention: keys and values come from one RMS-normed latent of width mla_kv_rank, queries optionally from one
    # of width mla_q_rank (0: not compressed), plus a decoupled RoPE part of mla_rope_dim per head (0: head_dim //
    # 2) whose key is shared by all heads). MLA ignores n_kv_heads and qk_norm is refused with it.
    attention: str = "mha"
    mla_kv_rank: int = 0
    mla_q_rank: int = 0
    mla_rope_dim: int = 0
    # intra-document masking: with segment_ids given to forward, a token attends only to earlier tokens of its own
    # document in the packed row (and SSM layers reset their state at document starts)
    doc_masking: bool = False
    # mixture of experts (training/moe.py) in place of the dense SwiGLU of layers >= moe_first_dense; 0: dense.
    # expert_hidden 0: ffn_hidden // moe_top_k (fine-grained experts keep the active FFN width). moe_balance:
    # "aux_loss" (Switch balance loss x moe_aux_loss), "bias" (DeepSeek-V3 aux-loss-free, step moe_bias_rate),
    # "none"; router_z_loss: coefficient of the router logits' z-loss
    n_experts: int = 0
    moe_top_k: int = 2
    expert_hidden: int = 0
    n_shared_experts: int = 0
    moe_first_dense: int = 0
    moe_balance: str = "aux_loss"
    moe_aux_loss: float = 0.01
    moe_bias_rate: float = 0.001
    router_z_loss: float = 0.0
    # hybrid models: layers whose mixer is the gated linear recurrence of training/ssm.py instead of attention
    ssm_layers: list[int] = field(default_factory=list)
    # shorthand: only layers N-1, 2N-1, ... keep attention, the others become SSM layers (added to ssm_layers)
    attention_every: int | None = None
    ssm_state: int = 16
    ssm_expand: int = 2
    ssm_conv: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}",
                              ["model.d_model", "model.n_heads"])
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}",
                              ["model.n_heads", "model.n_kv_heads"])
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (d_model / n_heads) must be even for RoPE",
                              ["model.d_model", "model.n_heads"])
        if self.nope_every is not None:
            if isinstance(self.nope_every, bool) or not isinstance(self.nope_every, int) or self.nope_every < 1:
                raise ConfigError(f"model.nope_every={self.nope_every!r} must be a whole number >= 1 (or null)",
                                  ["model.nope_every"])
            self.nope_layers = [*self.nope_layers, *range(self.nope_every - 1, self.n_layers, self.nope_every)]
        if isinstance(self.yarn_factor, bool) or not isinstance(self.yarn_factor, int | float) or self.yarn_factor < 1:
            raise ConfigError(f"model.yarn_factor={self.yarn_factor!r} must be a number >= 1 (1: no YaRN scaling)",
                              ["model.yarn_factor"])
        if not self.yarn_beta_fast > self.yarn_beta_slow > 0:
            raise ConfigError(f"model.yarn_beta_fast={self.yarn_beta_fast} must exceed model.yarn_beta_slow="
                              f"{self.yarn_beta_slow} > 0", ["model.yarn_beta_fast", "model.yarn_beta_slow"])
        bad = [i for i in self.nope_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"model.nope_layers {bad} outside 0..{self.n_layers - 1}", ["model.nope_layers"])
        self.nope_layers = sorted(set(int(i) for i in self.nope_layers))
        self._validate_attention()
        self._validate_moe()
        self._validate_hybrid()

    def _validate_attention(self) -> None:
        if self.attention not in ("mha", "mla"):
            raise ConfigError(f"model.attention={self.attention!r} must be 'mha' (multi-head/GQA/MQA) or 'mla' "
                              "(multi-head latent attention)", ["model.attention"])
        for name in ("mla_kv_rank", "mla_q_rank", "mla_rope_dim"):
            whole_number(self, name, 0)
        if not isinstance(self.doc_masking, bool):
            raise ConfigError(f"model.doc_masking={self.doc_masking!r} must be true or false", ["model.doc_masking"])
        if self.attention != "mla":
            return
        if self.mla_kv_rank < 1:
            raise ConfigError("attention='mla' needs model.mla_kv_rank >= 1 (the width of the key/value latent, "
                              f"e.g. {max(1, self.d_model // 2)})", ["model.mla_kv_rank"])
        if self.mla_rope_head_dim < 2 or self.mla_rope_head_dim % 2:
            raise ConfigError(f"MLA's decoupled RoPE width {self.mla_rope_head_dim} (model.mla_rope_dim, 0: head_dim "
                              f"// 2 = {self.head_dim // 2}) must be even and >= 2; set model.mla_rope_dim",
                              ["model.mla_rope_dim"])
        if self.qk_norm:
            raise ConfigError("qk_norm is for attention='mha'; MLA normalises its latents instead: set "
                              "model.qk_norm=false", ["model.qk_norm", "model.attention"])

    def _validate_moe(self) -> None:
        if whole_number(self, "n_experts", 0) == 0:
            return
        validate_moe_config(self)
        if whole_number(self, "moe_first_dense", 0) >= self.n_layers:
            raise ConfigError(f"model.moe_first_dense={self.moe_first_dense} leaves no MoE layer among "
                              f"n_layers={self.n_layers}; lower it (or set n_experts=0 for a dense model)",
                              ["model.moe_first_dense"])

    def _validate_hybrid(self) -> None:
        if self.attention_every is not None:
            whole_number(self, "attention_every", 1)
            self.ssm_layers = [*self.ssm_layers,
                               *(i for i in range(self.n_layers) if (i + 1) % self.attention_every)]
        if not isinstance(self.ssm_layers, list | tuple) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in self.ssm_layers):
            raise ConfigError(f"model.ssm_layers={self.ssm_layers!r} must be a list of layer indices",
                              ["model.ssm_layers"])
        bad = [i for i in self.ssm_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"model.ssm_layers {bad} outside 0..{self.n_layers - 1}", ["model.ssm_layers"])
        self.ssm_layers = sorted(set(int(i) for i in self.ssm_layers))
        if self.ssm_layers:
            validate_ssm_config(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mla_rope_head_dim(self) -> int:
        """Width of MLA's decoupled RoPE part of each query head and of the shared rotated key."""
        return self.mla_rope_dim or self.head_dim // 2

    @property
    def moe_expert_hidden(self) -> int:
        """Hidden width of one routed expert (training/moe.py's rule)."""
        return expert_width(self)

    @property
    def rope_table_dim(self) -> int:
        """Width of the cos/sin tables: whole heads for MHA, the decoupled RoPE part for MLA."""
        return self.mla_rope_head_dim if self.attention == "mla" else self.head_dim


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or as it is when it is already wider (fp64 runs: the numerical checks of the backends)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even under autocast: the mean of squares is where low precision hurts
        xf = at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, factor: float, original_len: int,
                  beta_fast: float, beta_slow: float) -> tuple[torch.Tensor, float]:
    """YaRN's frequencies and attention factor: a frequency that turns fewer than beta_slow times over the
    original context is interpolated (divided by factor), one that turns more than beta_fast times is kept, and a
    linear ramp over the dimensions blends between; attention logits scale by (0.1 ln factor + 1)^2 through cos/sin."""
    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns `rotations` times in original_len
        return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: high frequency, kept as it is; 0: low frequency, interpolated
    return inv_freq / factor * (1 - keep) + inv_freq * keep, 0.1 * math.log(factor) + 1.0


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                cfg: ModelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of position * frequency, shape [max_seq_len, head_dim]; halves layout (not interleaved, as HF Llama).
    With `cfg.yarn_factor > 1` the frequencies and the attention factor are YaRN's."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    scale = 1.0
    if cfg is not None and cfg.yarn_factor > 1:
        original = cfg.yarn_original_max_seq_len or int(max_seq_len / cfg.yarn_factor)
        inv_freq, scale = yarn_inv_freq(inv_freq, head_dim, theta, cfg.yarn_factor, original, cfg.yarn_beta_fast,
                                        cfg.yarn_beta_slow)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its position's angle; x is [B, H, T, D], cos/sin [T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (at_least_fp32(x) * cos + at_least_fp32(rotated) * sin).type_as(x)


def segment_ids_from_cu_seqlens(cu_seqlens: Sequence[np.ndarray | torch.Tensor], seq_len: int) -> torch.Tensor:
    """Document index of every position, LongTensor [B, seq_len], from per-row document offsets [0, ..., seq_len]
    (the sampler's SampledBatch.cu_seqlens): positions in [o_i, o_{i+1}) get i. Move it to the model's device."""
    if len(cu_seqlens) == 0:
        raise ConfigError("cu_seqlens is empty; pass one offsets array per row of the batch (the sampler's "
                          "packing=\"documents\")", ["model.doc_masking"])
    positions = torch.arange(seq_len)
    rows = []
    for r, offsets in enumerate(cu_seqlens):
        o = torch.as_tensor(offsets).detach().cpu().long()
        if o.dim() != 1 or len(o) < 2 or int(o[0]) != 0 or int(o[-1]) != seq_len or bool((o[1:] < o[:-1]).any()):
            raise ConfigError(f"cu_seqlens[{r}]={o.tolist()[:8]} must be non-decreasing offsets from 0 to "
                              f"seq_len={seq_len}", ["model.doc_masking"])
        rows.append(torch.searchsorted(o[1:], positions, right=True))
    return torch.stack(rows)


def position_ids_from_segment_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] counting from 0 at each document start (where the segment id changes)."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    is_start = document_starts(segment_ids)[0]
    is_start[:, 0] = True
    return index - torch.where(is_start, index, torch.zeros_like(index)).cummax(dim=1).values


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = use_rope
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D]; cos/sin the whole [max_seq_len, head_dim] tables or already gathered per position
        [B, 1, T, head_dim]; mask None (causal) or boolean [B, 1, T, T], True where a query may attend."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:  # NoPE layers skip this and rely on the causal mask for order
            cos, sin = positions_of(cos, sin, T)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # enable_gqa shares each k/v head with n_heads / n_kv_heads query heads without materialising copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def positions_of(cos: torch.Tensor, sin: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole tables [max_seq_len, d] -> the first T rows; tables gathered per position ([B, 1, T, d]) pass."""
    return (cos[:T], sin[:T]) if cos.dim() == 2 else (cos, sin)


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """The factor YaRN scales cos/sin by (so rotated logits scale by its square); 1 without YaRN."""
    return 0.1 * math.log(cfg.yarn_factor) + 1.0 if cfg.yarn_factor > 1 else 1.0


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2). Keys and values of all heads are decoded from one latent
    c_kv = RMSNorm(x W_kv_a) of width mla_kv_rank, which is what an inference cache would hold; queries come from
    x directly or, with mla_q_rank > 0, from their own normed latent. RoPE is not applied to the decoded keys (it
    would not commute with the decoding); a separate rope_dim part carries position instead: each head gets its
    own rotated q_rope, and one rotated k_rope, computed from x, is shared by all heads. Per head

        q = [q_nope (head_dim), q_rope (rope_dim)],  k = [k_nope (head_dim, from c_kv), k_rope (rope_dim, shared)],
        v = v (head_dim, from c_kv),  softmax scale 1 / sqrt(head_dim + rope_dim).

    NoPE layers leave the rope part unrotated. Under YaRN the rotated part's logits scale by the factor squared
    through cos/sin, so q_nope is scaled by it too: all logits scale alike, as in the MHA path."""

    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.n_heads, cfg.head_dim, cfg.mla_rope_head_dim
        self.use_rope, self.compress_q = use_rope, cfg.mla_q_rank > 0
        self.nope_scale = yarn_attention_factor(cfg) ** 2 if use_rope else 1.0
        H, D, R = self.n_heads, self.head_dim, self.rope_dim
        if self.compress_q:
            self.wq_a = nn.Linear(cfg.d_model, cfg.mla_q_rank, bias=False)
            self.q_latent_norm = RMSNorm(cfg.mla_q_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.mla_q_rank, H * (D + R), bias=False)
        else:
            self.wq = nn.Linear(cfg.d_model, H * (D + R), bias=False)
        self.wkv_a = nn.Linear(cfg.d_model, cfg.mla_kv_rank, bias=False)
        self.kv_norm = RMSNorm(cfg.mla_kv_rank, cfg.norm_eps)
        self.wk_b = nn.Linear(cfg.mla_kv_rank, H * D, bias=False)
        self.wv_b = nn.Linear(cfg.mla_kv_rank, H * D, bias=False)
        self.wk_rope = nn.Linear(cfg.d_model, R, bias=False)
        self.wo = nn.Linear(H * D, cfg.d_model, bias=False)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, n_heads * (head_dim + rope_dim)], from x or through the query latent."""
        return self.wq_b(self.q_latent_norm(self.wq_a(x))) if self.compress_q else self.wq(x)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """As Attention.forward; cos/sin here are rope_dim wide."""
        B, T, _ = x.shape
        H, D, R = self.n_heads, self.head_dim, self.rope_dim
        q_nope, q_rope = self.queries(x).view(B, T, H, D + R).transpose(1, 2).split([D, R], dim=-1)
        latent = self.kv_norm(self.wkv_a(x))
        k_nope = self.wk_b(latent).view(B, T, H, D).transpose(1, 2)
        v = self.wv_b(latent).view(B, T, H, D).transpose(1, 2)
        k_rope = self.wk_rope(x).view(B, 1, T, R)
        if self.use_rope:
            cos, sin = positions_of(cos, sin, T)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
            if self.nope_scale != 1.0:
                q_nope = q_nope * self.nope_scale
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, H, T, R)], dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=1.0 / math.sqrt(D + R))
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.w_down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-norm residual block: a token mixer (attention, or the SSM on ssm_layers) then an MLP (the dense SwiGLU,
    or the MoE on layers >= moe_first_dense when n_experts > 0). Dense blocks keep the names attn_norm/attn and
    mlp_norm/mlp; SSM layers name their mixer ssm_norm/ssm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_ssm = layer_idx in cfg.ssm_layers
        self.is_moe = cfg.n_experts > 0 and layer_idx >= cfg.moe_first_dense
        if self.is_ssm:
            self.ssm_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.ssm = GatedLinearRecurrence(cfg)
        else:
            attention = LatentAttention if cfg.attention == "mla" else Attention
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.attn = attention(cfg, use_rope=layer_idx not in cfg.nope_layers)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if self.is_moe:
            self.mlp = MoEFeedForward(cfg)
        else:
            self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.is_ssm:  # the recurrence is causal by construction; segment_ids reset its state per document
            x = x + self.ssm(self.ssm_norm(x), segment_ids)
        else:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # derived tables, not state: kept out of the state dict so checkpoints hold only learned weights
        cos, sin = rope_tables(cfg.rope_table_dim, cfg.max_seq_len, cfg.rope_theta, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def use_rope_theta(self, theta: float) -> None:
        """Rebuild the RoPE tables for another base, weights unchanged: a long-context stage raises theta mid-run
        (mixtures Stage.rope_theta). The tables are derived state, so nothing else changes."""
        cos, sin = rope_tables(self.config.rope_table_dim, self.config.max_seq_len, theta, self.config)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def moe_layers(self) -> list[nn.Module]:
        """The MoEFeedForward modules, first layer first."""
        return [layer.mlp for layer in self.layers if layer.is_moe]

    def ssm_mixers(self) -> list[nn.Module]:
        """The GatedLinearRecurrence modules, first layer first."""
        return [layer.ssm for layer in self.layers if layer.is_ssm]

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; output projections of residual branches scaled by 1/sqrt(2 n_layers)
        (GPT-2) so the residual stream's variance does not grow with depth. MoE and SSM modules initialise
        themselves with the same two stds (their own parameters need their own rules, e.g. the SSM's decays)."""
        residual_std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        self_initialising = self.moe_layers() + self.ssm_mixers()
        owned = {id(p) for module in self_initialising for p in module.parameters()}
        for name, p in self.named_parameters():
            if id(p) in owned:
                continue
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=self.config.init_std)
        for module in self_initialising:
            module.reset_parameters(self.config.init_std, residual_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
        position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, V] in fp32, loss). reduction="mean" gives the training loss (cross-entropy
        plus z-loss plus the MoE layers' router losses); reduction="none" gives per-token cross-entropy [B, T] in
        nats, which held-out eval needs.

        Packed rows: position_ids [B, T] (RoPE positions, restarting at each document) and, with doc_masking on,
        segment_ids [B, T] (document index within the row, see segment_ids_from_cu_seqlens): attention is causal
        within a document only and SSM layers restart per document. segment_ids without position_ids derives the
        positions from them."""
        cfg = self.config
        B, T = idx.shape
        if T > cfg.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds model.max_seq_len={cfg.max_seq_len}", ["model.max_seq_len"])
        mask = None
        if segment_ids is not None:
            if not cfg.doc_masking:
                raise ConfigError("segment_ids were given but model.doc_masking is off; set doc_masking=true to "
                                  "mask attention between documents (or pass position_ids only)",
                                  ["model.doc_masking"])
            if segment_ids.shape != (B, T):
                raise ConfigError(f"segment_ids {tuple(segment_ids.shape)} must have the shape of idx {(B, T)}")
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & causal).unsqueeze(1)
            if position_ids is None:
                position_ids = position_ids_from_segment_ids(segment_ids)
        cos, sin = self.rope_cos, self.rope_sin
        if position_ids is not None:
            if position_ids.shape != (B, T):
                raise ConfigError(f"position_ids {tuple(position_ids.shape)} must have the shape of idx {(B, T)}")
            if T and not 0 <= int(position_ids.min()) <= int(position_ids.max()) < cfg.max_seq_len:
                raise ConfigError(f"position_ids must lie in [0, max_seq_len={cfg.max_seq_len})")
            cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)  # [B, 1, T, d]
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, segment_ids)
        logits = at_least_fp32(self.lm_head(self.norm(x)))
        if targets is None:
            return logits, None
        flat = logits.view(-1, logits.size(-1))
        if reduction == "none":
            return logits, F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)
        loss = F.cross_entropy(flat, targets.reshape(-1))
        if cfg.z_loss > 0:  # keeps logits from drifting large (PaLM); a tiny pull of log Z towards 0
            loss = loss + cfg.z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
        for moe in self.moe_layers():  # balance loss and router z-loss of this forward (0 in eval mode)
            loss = loss + moe.aux_loss
        return logits, loss

    @torch.no_grad()
    def after_optimizer_step(self) -> dict[str, Any]:
        """Once after every optimizer step: the MoE layers' aux-loss-free bias step (moe_balance="bias"; other
        balances only read and reset their routing counts). Returns {"moe_tokens_per_expert": one list per MoE
        layer, "moe_max_load": the largest max/mean expert load over the layers}, {} without MoE."""
        stats = [moe.update_bias() for moe in self.moe_layers()]
        if not stats:
            return {}
        return {"moe_tokens_per_expert": [s["tokens_per_expert"] for s in stats],
                "moe_max_load": max(float(s["max_load"]) for s in stats)}

    # ---- facts the trainer needs, kept next to the thing they describe --------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); non_embedding drops the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def active_params(self, non_embedding: bool = False) -> int:
        """Parameters one token uses: num_params with each MoE layer's expert matrices replaced by what a token
        passes through (router + top-k routed + shared experts); equal to num_params without MoE."""
        n = self.num_params(non_embedding)
        for moe in self.moe_layers():
            n += moe.active_matmul_params() - sum(p.numel() for p in moe.parameters() if p.dim() >= 2)
        return n

    def activation_ratio(self) -> float:
        """Active / total non-embedding parameters (1.0 for a dense model)."""
        return self.active_params(non_embedding=True) / self.num_params(non_embedding=True)

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward = 3 x forward), Chinchilla/PaLM accounting, T = seq_len:

            6 x active matmul params                     (lm_head counted even when tied, embedding lookup not;
                                                          MoE and SSM layers: their active_matmul_params())
          + 6 x T x (d_qk + d_v) per attention layer     (scores q.k: 2 T d_qk, values: 2 T d_v per token, x 3;
                                                          MHA/GQA/MQA: d_qk = d_v = n_heads x head_dim, i.e.
                                                          12 x T x d_model; MLA: d_qk = n_heads x (head_dim +
                                                          rope_dim), d_v = n_heads x head_dim)
          + nonmatmul_flops_per_token(T) per SSM layer   (scan and conv, training/ssm.py)

        The full T x T score matrix is counted (no causal halving), and doc masking is not credited."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        special = self.moe_layers() + self.ssm_mixers()
        owned = {id(p) for module in special for p in module.parameters()}
        matmul = sum(p.numel() for n, p in self.named_parameters()
                     if p.dim() >= 2 and not n.startswith("tok_emb") and id(p) not in owned)
        if cfg.tie_embeddings:  # the lm_head matmul still runs; its weight is the embedding's
            matmul += cfg.vocab_size * cfg.d_model
        matmul += sum(module.active_matmul_params() for module in special)
        if cfg.attention == "mla":
            d_qk, d_v = cfg.n_heads * (cfg.head_dim + cfg.mla_rope_head_dim), cfg.n_heads * cfg.head_dim
        else:
            d_qk = d_v = cfg.n_heads * cfg.head_dim
        n_attention = sum(not layer.is_ssm for layer in self.layers)
        ssm = sum(mixer.nonmatmul_flops_per_token(T) for mixer in self.ssm_mixers())
        return 6 * matmul + 6 * T * (d_qk + d_v) * n_attention + ssm

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
    ) -> torch.optim.AdamW:
        """AdamW with decay on the weight matrices of attention and MLP only. Norm gains and the token embedding
        (= the tied lm_head) are not decayed: pulling gains towards 0 fights the normalisation, and SmolLM3
        excludes the embedding too. Biases (1-D: the SSM's dt bias and D skip, any router bias) are not decayed,
        nor the SSM's A_log, whose decay would drift every state's memory towards one fixed timescale (as Mamba).
        MoE's expert_bias is a buffer, outside the optimizer. Groups carry parameter names so checkpoints can
        store state by name."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            decayed = p.dim() >= 2 and not name.startswith("tok_emb") and not name.endswith("A_log")
            (decay if decayed else no_decay).append((name, p))
        groups = [
            {"params": [p for _, p in decay], "param_names": [n for n, _ in decay], "weight_decay": weight_decay},
            {"params": [p for _, p in no_decay], "param_names": [n for n, _ in no_decay], "weight_decay": 0.0},
        ]
        fused = next(self.parameters()).is_cuda
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of idx [B, T] (no KV cache: recomputes the window, fine for demo-sized models)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.max_seq_len:])
            logits = logits[:, -1, :] / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
