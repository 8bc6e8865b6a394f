"""A plain Llama-style decoder, read top to bottom: RMSNorm, RoPE, grouped-query attention, SwiGLU, block, model.

It is an ordinary `nn.Module` with no parallelism inside: data/tensor/pipeline parallelism, activation
checkpointing and compilation are applied from outside, so the same file serves the embedded CPU backend and a
later nanotron backend. Ablation switches (GQA, QK-norm, NoPE layers, z-loss) live in `ModelConfig` and show up
below as small local branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from mixlab.training.config import ConfigDict
from mixlab.training.errors import ConfigError

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

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.nope_every is not None:
            if isinstance(self.nope_every, bool) or not isinstance(self.nope_every, int) or self.nope_every < 1:
                raise ConfigError(f"nope_every={self.nope_every!r} must be a whole number >= 1 (or null)")
            self.nope_layers = [*self.nope_layers, *range(self.nope_every - 1, self.n_layers, self.nope_every)]
        if isinstance(self.yarn_factor, bool) or not isinstance(self.yarn_factor, int | float) or self.yarn_factor < 1:
            raise ConfigError(f"yarn_factor={self.yarn_factor!r} must be a number >= 1 (1: no YaRN scaling)")
        if not self.yarn_beta_fast > self.yarn_beta_slow > 0:
            raise ConfigError(f"yarn_beta_fast={self.yarn_beta_fast} must exceed yarn_beta_slow={self.yarn_beta_slow} > 0")
        bad = [i for i in self.nope_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(f"nope_layers {bad} outside 0..{self.n_layers - 1}")
        self.nope_layers = sorted(set(int(i) for i in self.nope_layers))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even under autocast: the mean of squares is where low precision hurts
        xf = x.float()
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
    return (x.float() * cos + rotated.float() * sin).type_as(x)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:  # NoPE layers skip this and rely on the causal mask for order
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        # enable_gqa shares each k/v head with n_heads / n_kv_heads query heads without materialising copies
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
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
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, use_rope=layer_idx not in cfg.nope_layers)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
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
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; output projections of residual branches scaled by 1/sqrt(2 n_layers)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        residual_std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=self.config.init_std)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx [B, T] -> (logits [B, T, V] in fp32, loss). reduction="mean" gives the training loss (cross-entropy
        plus z-loss); reduction="none" gives per-token cross-entropy [B, T] in nats, which held-out eval needs."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, self.rope_cos, self.rope_sin)
        logits = self.lm_head(self.norm(x)).float()
        if targets is None:
            return logits, None
        flat = logits.view(-1, logits.size(-1))
        if reduction == "none":
            return logits, F.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)
        loss = F.cross_entropy(flat, targets.reshape(-1))
        if self.config.z_loss > 0:  # keeps logits from drifting large (PaLM); a tiny pull of log Z towards 0
            loss = loss + self.config.z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean()
        return logits, loss

    # ---- facts the trainer needs, kept next to the thing they describe --------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); non_embedding drops the token embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if non_embedding else n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward): 6 x matmul params + 12 x layers x d_model x seq_len for
        attention scores and values (Chinchilla/PaLM accounting; the lm_head matmul counts even when tied,
        the embedding lookup does not)."""
        cfg = self.config
        T = seq_len or cfg.max_seq_len
        matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() >= 2 and not n.startswith("tok_emb"))
        if cfg.tie_embeddings:  # the lm_head matmul still runs; its weight is the embedding's
            matmul += cfg.vocab_size * cfg.d_model
        return 6 * matmul + 12 * cfg.n_layers * cfg.d_model * T

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
    ) -> torch.optim.AdamW:
        """AdamW with decay on the weight matrices of attention and MLP only. Norm gains and the token embedding
        (= the tied lm_head) are not decayed: pulling gains towards 0 fights the normalisation, and SmolLM3
        excludes the embedding too. Groups carry parameter names so checkpoints can store state by name."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and not name.startswith("tok_emb") else no_decay).append((name, p))
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
