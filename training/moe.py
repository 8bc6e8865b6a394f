"""A mixture-of-experts SwiGLU feed-forward: a router picks top-k of E small experts per token, plus optional
always-on shared experts (DeepSeekMoE).

Score functions, chosen by `moe_balance`:
- "aux_loss" / "none": softmax over the experts (Switch/Mixtral). The switch balance loss needs probabilities
  that sum to one, and "none" keeps the same router so that the two are a clean ablation pair.
- "bias": sigmoid per expert (DeepSeek-V3). Each score is independent of the others, so adding the balancing
  bias to one expert shifts only its own chance of being picked.

Gates are the chosen experts' scores renormalised over the k. With top_k == 1 the raw score is kept instead
(Switch Transformer): renormalising one score gives a gate of exactly 1, which carries no gradient to the router.
The balancing bias only decides WHICH experts are chosen; it never enters the gate values.

Dispatch sorts the token-slots by expert and runs each expert once on its contiguous slice (a loop over experts,
none over tokens), then scatters the gated outputs back with index_add.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from mixlab.training.errors import ConfigError, non_negative_number, whole_number

if TYPE_CHECKING:
    from mixlab.training.model import ModelConfig

MOE_BALANCE_METHODS = ("aux_loss", "bias", "none")


def expert_width(cfg: ModelConfig) -> int:
    """Hidden width of one routed expert: `expert_hidden`, or ffn_hidden // moe_top_k when 0 (so k active experts
    cost about what the dense SwiGLU costs)."""
    return cfg.expert_hidden or cfg.ffn_hidden // cfg.moe_top_k


def validate_moe_config(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the field for MoE settings that cannot work."""

    n_experts = whole_number(cfg, "n_experts", 1)
    top_k = whole_number(cfg, "moe_top_k", 1)
    if top_k > n_experts:
        raise ConfigError(f"model.moe_top_k={top_k} exceeds model.n_experts={n_experts}; lower moe_top_k or add "
                          "experts", ["model.moe_top_k", "model.n_experts"])
    whole_number(cfg, "expert_hidden", 0)
    whole_number(cfg, "n_shared_experts", 0)
    if cfg.moe_balance not in MOE_BALANCE_METHODS:
        raise ConfigError(f"model.moe_balance={cfg.moe_balance!r} must be one of {', '.join(MOE_BALANCE_METHODS)}",
                          ["model.moe_balance"])
    for name in ("moe_aux_loss", "moe_bias_rate", "router_z_loss"):
        non_negative_number(cfg, name)
    if expert_width(cfg) < 1:
        raise ConfigError(f"expert width is 0 (ffn_hidden={cfg.ffn_hidden} // moe_top_k={top_k}); set "
                          "model.expert_hidden >= 1", ["model.expert_hidden"])


class MoEFeedForward(nn.Module):
    """Drop-in replacement for the dense SwiGLU: [B, T, D] -> [B, T, D]. After each forward `aux_loss` holds the
    router's training-only loss terms (add it to the LM loss); `tokens_per_expert` counts training routings until
    `update_bias()` reads and resets it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_moe_config(cfg)
        self.d_model, self.n_experts, self.top_k = cfg.d_model, cfg.n_experts, cfg.moe_top_k
        self.expert_hidden = expert_width(cfg)
        self.n_shared_experts = cfg.n_shared_experts
        self.balance: str = cfg.moe_balance
        self.aux_loss_coef, self.bias_rate, self.z_loss_coef = cfg.moe_aux_loss, cfg.moe_bias_rate, cfg.router_z_loss
        D, E, H = self.d_model, self.n_experts, self.expert_hidden
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, D, H))
        self.w_up = nn.Parameter(torch.empty(E, D, H))
        self.w_down = nn.Parameter(torch.empty(E, H, D))
        self.shared_w_gate: nn.Linear | None = None
        self.shared_w_up: nn.Linear | None = None
        self.shared_w_down: nn.Linear | None = None
        if self.n_shared_experts > 0:
            shared = self.n_shared_experts * H
            self.shared_w_gate = nn.Linear(D, shared, bias=False)
            self.shared_w_up = nn.Linear(D, shared, bias=False)
            self.shared_w_down = nn.Linear(shared, D, bias=False)
        # learned outside autograd (update_bias) and part of the model's state: checkpoints must carry it
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # a per-interval statistic, not state: a resumed run starts a fresh interval
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.int64), persistent=False)
        self.aux_loss: torch.Tensor = torch.zeros(())
        n_layers = getattr(cfg, "n_layers", None)
        residual_std = cfg.init_std / math.sqrt(2 * n_layers) if n_layers else cfg.init_std
        self.reset_parameters(cfg.init_std, residual_std)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """Router, gate and up projections N(0, std); down projections (the residual branch's output) N(0,
        residual_std); balancing bias zero."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.w_gate, mean=0.0, std=std)
        nn.init.normal_(self.w_up, mean=0.0, std=std)
        nn.init.normal_(self.w_down, mean=0.0, std=residual_std)
        if self.shared_w_gate is not None:
            nn.init.normal_(self.shared_w_gate.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared_w_up.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared_w_down.weight, mean=0.0, std=residual_std)
        self.expert_bias.zero_()

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens [N, D] -> (expert_idx [N, k], gates [N, k] fp32, router logits [N, E] fp32, scores [N, E] fp32).

        Logits are computed in fp32 even under autocast: near-ties between experts decide the routing."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
        scores = logits.sigmoid() if self.balance == "bias" else logits.softmax(dim=-1)
        _, expert_idx = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1)
        gates = scores.gather(-1, expert_idx)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return expert_idx, gates, logits, scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        n_tokens = flat.shape[0]
        expert_idx, gates, logits, scores = self.route(flat)

        # sort the N*k token-slots by expert so each expert sees one contiguous slice
        slot_expert = expert_idx.reshape(-1)
        order = torch.argsort(slot_expert, stable=True)
        slot_token = order // self.top_k
        counts = torch.bincount(slot_expert, minlength=self.n_experts)
        routed_x = flat[slot_token]
        pieces = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            chunk = routed_x[start:start + n]
            hidden = F.silu(chunk @ self.w_gate[e]) * (chunk @ self.w_up[e])
            pieces.append(hidden @ self.w_down[e])
            start += n
        if pieces:
            routed_y = torch.cat(pieces)
            routed_y = routed_y * gates.reshape(-1)[order].unsqueeze(-1).to(routed_y.dtype)
            out = routed_y.new_zeros(n_tokens, D).index_add_(0, slot_token, routed_y)
        else:  # no tokens at all
            out = flat.new_zeros(n_tokens, D)
        if self.shared_w_gate is not None:
            out = out + self.shared_w_down(F.silu(self.shared_w_gate(flat)) * self.shared_w_up(flat))

        self.aux_loss = self._router_loss(logits, scores, counts, n_tokens)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += counts
        return out.view(B, T, D)

    def _router_loss(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor,
                     n_tokens: int) -> torch.Tensor:
        """Switch balance loss (moe_aux_loss x E x sum_i f_i P_i) plus router z-loss; zero in eval mode."""
        loss = logits.new_zeros(())
        if not self.training or n_tokens == 0:
            return loss
        if self.balance == "aux_loss" and self.aux_loss_coef > 0:
            routed_fraction = counts.to(scores.dtype) / (n_tokens * self.top_k)  # f_i: no gradient, as in Switch
            mean_prob = scores.mean(dim=0)  # P_i: carries the gradient
            loss = loss + self.aux_loss_coef * self.n_experts * (routed_fraction * mean_prob).sum()
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * torch.logsumexp(logits, dim=-1).pow(2).mean()
        return loss

    @torch.no_grad()
    def update_bias(self) -> dict[str, Any]:
        """DeepSeek-V3's aux-loss-free balancing step, meant once per optimizer step: with balance "bias",
        underloaded experts' bias rises and overloaded ones' falls by moe_bias_rate. Always returns the interval's
        load (counts, max/mean) and resets the counts. Under data parallelism, all-reduce `tokens_per_expert`
        first so every rank applies the same update."""
        counts = self.tokens_per_expert.clone()
        total = int(counts.sum())
        mean_count = counts.float().mean()
        if self.balance == "bias" and total > 0:
            self.expert_bias += self.bias_rate * torch.sign(mean_count - counts.float())
        max_load = float(counts.max().float() / mean_count) if total > 0 else 0.0
        self.tokens_per_expert.zero_()
        return {"tokens_per_expert": counts.tolist(), "max_load": max_load}

    def active_matmul_params(self) -> int:
        """Matmul weights one token passes through: router, k routed experts, the shared experts (for FLOPs)."""
        D, H = self.d_model, self.expert_hidden
        return D * self.n_experts + self.top_k * 3 * D * H + 3 * D * (self.n_shared_experts * H)

    def total_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
