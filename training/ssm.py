"""A gated selective state-space mixer (Mamba-1 style, written plainly) that a hybrid model interleaves with
attention.

Per layer, with d_inner = ssm_expand x d_model and N = ssm_state:

    u, z   = in_proj(x).chunk(2)                       # [B, T, d_inner] each
    u      = silu(causal depthwise conv1d(u))          # kernel ssm_conv, one filter per channel, with bias
    dt     = softplus(dt_up(dt_down(u)))               # low rank: d_inner -> ceil(d_model / 16) -> d_inner (+bias)
    B, C   = b_proj(u), c_proj(u)                      # [B, T, N]: input- and output-dependent, "selective"
    A      = -exp(A_log)                               # [d_inner, N], A_log = log(1..N) at init (S4D-real)
    a_t    = exp(dt_t * A),  b_t = dt_t * B_t * u_t    # zero-order-hold-style discretisation, [B, T, d_inner, N]
    h_t    = a_t * h_{t-1} + b_t                       # one decay per (channel, state): a diagonal recurrence
    y_t    = sum_N(h_t * C_t) + D_skip * u_t
    out    = out_proj(y * silu(z))

The low-rank dt projection follows Mamba (its dt_rank = ceil(d_model / 16)); it costs 2 x d_inner x rank
instead of d_inner^2 per token, and dt only needs a few directions.

The scan (`selective_scan`). Mamba-2's segment-sum trick (an [L, L] decay matrix per chunk) relies on one
scalar decay per head; here the decay differs per (channel, state), so that matrix would be [B, L, L, d_inner, N],
L times the size of the states themselves. Instead a two-level scan does the minimum work and keeps every
exponent <= 0 (cumulative dt x A, in fp32), so nothing can overflow:
1. cut time into chunks of L; scan all chunks at once from a zero state (a Python loop over the L offsets, each
   step vectorised over batch x chunks);
2. carry the state across chunk boundaries (a loop over the T / L chunks, on [B, d_inner, N] tensors), the
   decay over a whole chunk being exp(A x sum of dt over it);
3. add each chunk's carried-in state times exp(A x cumsum(dt)) to the local states.
That is 2L + T/L small Python steps instead of T. The backward pass is the same scheme run backwards in time
(grad_h_t = gy_t C_t + a_{t+1} grad_h_{t+1}), written by hand and fused with the discretisation and read-out, so
autograd keeps one [B, T, d_inner, N] tensor (the states) and no per-step ones. Measured on one CPU thread
(B=8, T=256, d_model=256), L=16..256 differ by <20% and L=64 was fastest: slices that stay in cache matter
more than the number of Python steps, hence DEFAULT_CHUNK_LEN.

Packed rows: with `segment_ids` [B, T] (document index within a row) the state resets at each document start
(a_t = 0 there) and the conv drops inputs from earlier documents, so a document's outputs do not depend on what
it was packed with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from mixlab.training.errors import whole_number

if TYPE_CHECKING:
    from mixlab.training.model import ModelConfig

# softplus(dt) starts log-uniform in [DT_MIN, DT_MAX] (Mamba's init): slow and fast memories side by side
DT_MIN, DT_MAX = 1e-3, 1e-1


def validate_ssm_config(cfg: ModelConfig | Any) -> None:
    """Raise ConfigError naming the field for SSM settings that cannot work."""
    for name in ("ssm_state", "ssm_expand", "ssm_conv"):
        whole_number(cfg, name, 1)


def dt_rank_for(d_model: int) -> int:
    """Width of the low-rank dt projection (Mamba's choice)."""
    return math.ceil(d_model / 16)


DEFAULT_CHUNK_LEN = 64  # see the module docstring


def _to_chunks(x: torch.Tensor, chunk_len: int, fill: float) -> torch.Tensor:
    """[B, T, *rest] -> [L, B, n_chunks, *rest], contiguous (offset-major, so each offset's slice is one block);
    T is padded with `fill` to a whole number of chunks."""
    batch, seq_len = x.shape[:2]
    n_chunks = -(-seq_len // chunk_len)
    pad = n_chunks * chunk_len - seq_len
    if pad:
        x = torch.cat([x, x.new_full((batch, pad, *x.shape[2:]), fill)], dim=1)
    return x.view(batch, n_chunks, chunk_len, *x.shape[2:]).movedim(2, 0).contiguous()


def _from_chunks(x: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Inverse of _to_chunks: [L, B, n_chunks, *rest] -> [B, seq_len, *rest]."""
    chunk_len, batch, n_chunks = x.shape[:3]
    return x.movedim(0, 2).reshape(batch, n_chunks * chunk_len, *x.shape[3:])[:, :seq_len]


class _SelectiveScan(torch.autograd.Function):
    """y_t = sum_n C_t[n] h_t[:, n] with h_t = exp(dt_t A) keep_t * h_{t-1} + w_t B_t (w = dt * u), fused so
    that autograd never holds per-step [.., d_inner, N] tensors: the forward saves only the states h, and the
    backward runs the reverse recurrence grad_h_t = gy_t C_t + a_{t+1} grad_h_{t+1} by the same chunk scheme.

    Inputs are in the offset-major chunk layout of _to_chunks: dt, w [L, B, nc, E]; A [E, N]; B, C [L, B, nc, N];
    keep [L, B, nc] (0 at a document's first token) or None. Every exponent is (cumulative dt) x A <= 0."""

    @staticmethod
    def forward(ctx: Any, dt: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                keep: torch.Tensor | None) -> torch.Tensor:
        chunk_len = dt.shape[0]
        cum_dt = dt.clone()  # log of the running decay within a chunk is cum_dt x A
        for i in range(1, chunk_len):  # a running sum per offset: 4x faster than cumsum over dim 0 on CPU
            cum_dt[i] += cum_dt[i - 1]
        kept = keep.cumprod(0) if keep is not None else None  # 1 while no document has started in the chunk
        states = torch.empty(*dt.shape, A.shape[1], dtype=dt.dtype, device=dt.device)
        # 1. every chunk from a zero state, all chunks at once
        torch.mul(w[0].unsqueeze(-1), B[0].unsqueeze(-2), out=states[0])
        for i in range(1, chunk_len):
            a_i = torch.exp(dt[i].unsqueeze(-1) * A)
            if keep is not None:
                a_i = a_i * keep[i, :, :, None, None]
            b_i = w[i].unsqueeze(-1) * B[i].unsqueeze(-2)
            torch.addcmul(b_i, a_i, states[i - 1], out=states[i])
        ctx.save_for_backward(dt, w, A, B, C, keep, states, cum_dt, kept)
        if states.shape[2] == 1:  # one chunk: nothing to carry
            return torch.matmul(states, C.unsqueeze(-1)).squeeze(-1)
        # 2. the state entering each chunk
        chunk_decay = _decay(cum_dt[-1], A, kept[-1] if kept is not None else None)
        carried = torch.empty_like(states[0])
        state = torch.zeros_like(carried[:, 0])
        for c in range(carried.shape[1]):
            carried[:, c] = state
            state = torch.addcmul(states[-1][:, c], chunk_decay[:, c], state)
        # 3. add the carried-in state, decayed to each offset
        for i in range(chunk_len):
            states[i].addcmul_(_decay(cum_dt[i], A, kept[i] if kept is not None else None), carried)
        return torch.matmul(states, C.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dt, w, A, B, C, keep, states, cum_dt, kept = ctx.saved_tensors
        chunk_len = dt.shape[0]
        grad_y = grad_y.contiguous()
        # 1. reverse recurrence inside each chunk from a zero gradient past the chunk's end
        grad_local = torch.empty_like(states)
        torch.mul(grad_y[-1].unsqueeze(-1), C[-1].unsqueeze(-2), out=grad_local[-1])
        for i in range(chunk_len - 2, -1, -1):
            a_next = torch.exp(dt[i + 1].unsqueeze(-1) * A)
            if keep is not None:
                a_next = a_next * keep[i + 1, :, :, None, None]
            g_i = grad_y[i].unsqueeze(-1) * C[i].unsqueeze(-2)
            torch.addcmul(g_i, a_next, grad_local[i + 1], out=grad_local[i])
        # 2. the gradient entering each chunk's last state from later chunks (a_{next start} x grad_h there)
        n_chunks = states.shape[2]
        kept_after = None  # 1 while no document starts after offset i within the chunk
        if keep is not None:
            kept_after = torch.ones_like(keep)
            kept_after[:-1] = keep.flip(0).cumprod(0).flip(0)[1:]
        grad_in = torch.zeros_like(states[0])
        if n_chunks > 1:
            a_first = _decay(dt[0], A, keep[0] if keep is not None else None)
            chunk_decay = _decay(cum_dt[-1], A, kept[-1] if kept is not None else None)
            carry = torch.zeros_like(grad_in[:, 0])
            for c in range(n_chunks - 1, -1, -1):
                grad_in[:, c] = carry
                carry = a_first[:, c] * grad_local[0][:, c] + chunk_decay[:, c] * carry
        # 3. per offset: the full state gradient, then what it says about dt, w, A, B
        grad_dt, grad_w = torch.empty_like(dt), torch.empty_like(w)
        grad_B = torch.empty_like(B)
        grad_A = torch.zeros_like(A)
        for i in range(chunk_len):
            grad_h = grad_local[i]
            if n_chunks > 1:
                decay_to_end = _decay(cum_dt[-1] - cum_dt[i], A, kept_after[i] if kept_after is not None else None)
                grad_h = torch.addcmul(grad_h, decay_to_end, grad_in)
            b_i = w[i].unsqueeze(-1) * B[i].unsqueeze(-2)
            grad_log_a = grad_h * (states[i] - b_i)  # = grad_h * a_i * h_{i-1}
            grad_dt[i] = (grad_log_a * A).sum(-1)
            grad_A += torch.einsum("bcen,bce->en", grad_log_a, dt[i])
            grad_w[i] = torch.matmul(grad_h, B[i].unsqueeze(-1)).squeeze(-1)
            grad_B[i] = torch.matmul(w[i].unsqueeze(-2), grad_h).squeeze(-2)
        grad_C = torch.matmul(grad_y.unsqueeze(-2), states).squeeze(-2)
        return grad_dt, grad_w, grad_A, grad_B, grad_C, None


def _decay(log_scale: torch.Tensor, A: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """exp(log_scale x A) per (channel, state), zeroed where a document boundary cuts the span (kept = 0)."""
    decay = torch.exp(log_scale.unsqueeze(-1) * A)
    return decay * kept[..., None, None] if kept is not None else decay


def selective_scan(dt: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   is_start: torch.Tensor | None = None, chunk_len: int | None = None) -> torch.Tensor:
    """y [B, T, E] of the selective recurrence, in fp32 (or fp64): h_t = exp(dt_t A) * h_{t-1} + w_t B_t (h reset to zero
    where is_start), y_t = h_t . C_t; dt, w [B, T, E], A [E, N], B, C [B, T, N], is_start [B, T] bool."""
    seq_len = dt.shape[1]
    chunk = min(chunk_len or DEFAULT_CHUNK_LEN, seq_len)
    dtype = torch.promote_types(dt.dtype, torch.float32)  # fp32 under autocast too; fp64 stays fp64 (gradcheck)
    keep = None if is_start is None else _to_chunks((~is_start).to(dtype), chunk, 1.0)
    dt, w, B, C = (_to_chunks(t.to(dtype), chunk, 0.0) for t in (dt, w, B, C))
    y = _SelectiveScan.apply(dt, w, A.to(dtype), B, C, keep)
    return _from_chunks(y, seq_len)


def document_starts(segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is_start [B, T] bool, doc_index [B, T]): a document starts where the id changes; doc_index counts starts,
    so comparing it is right even if ids repeat non-adjacently (0, 1, 0)."""
    is_start = torch.zeros_like(segment_ids, dtype=torch.bool)
    is_start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return is_start, is_start.long().cumsum(dim=1)


class GatedLinearRecurrence(nn.Module):
    """The selective SSM mixer: [B, T, d_model] -> [B, T, d_model], causal. See the module docstring."""

    def __init__(self, cfg: ModelConfig | Any):
        super().__init__()
        validate_ssm_config(cfg)
        self.d_model, self.d_state, self.conv_len = cfg.d_model, cfg.ssm_state, cfg.ssm_conv
        self.d_inner = cfg.ssm_expand * cfg.d_model
        self.dt_rank = dt_rank_for(cfg.d_model)
        self.chunk_len: int | None = None  # None: DEFAULT_CHUNK_LEN
        d_inner = self.d_inner
        self.in_proj = nn.Linear(cfg.d_model, 2 * d_inner, bias=False)
        # padding is done by hand in _conv (left only, so the conv stays causal)
        self.conv = nn.Conv1d(d_inner, d_inner, kernel_size=self.conv_len, groups=d_inner, bias=True)
        self.dt_down = nn.Linear(d_inner, self.dt_rank, bias=False)
        self.dt_up = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.b_proj = nn.Linear(d_inner, self.d_state, bias=False)
        self.c_proj = nn.Linear(d_inner, self.d_state, bias=False)
        self.A_log = nn.Parameter(torch.empty(d_inner, self.d_state))
        self.D_skip = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, cfg.d_model, bias=False)
        self.reset_parameters(cfg.init_std, cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float, residual_std: float) -> None:
        """in_proj/dt/B/C projections N(0, std), out_proj N(0, residual_std); the dt bias is softplus^-1 of a
        log-uniform draw in [DT_MIN, DT_MAX]; A_log = log(1..N) per channel; D_skip = 1; conv: PyTorch's init."""
        for linear in (self.in_proj, self.dt_down, self.dt_up, self.b_proj, self.c_proj):
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        nn.init.normal_(self.out_proj.weight, mean=0.0, std=residual_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
        self.dt_up.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D_skip.fill_(1.0)
        self.conv.reset_parameters()

    def _conv(self, u: torch.Tensor, doc_index: torch.Tensor | None) -> torch.Tensor:
        """Causal depthwise conv over time of u [B, T, d_inner]; with doc_index, inputs from another document
        are dropped (each lag masked separately)."""
        K = self.conv_len
        if doc_index is None:
            return F.conv1d(F.pad(u.transpose(1, 2), (K - 1, 0)), self.conv.weight, self.conv.bias,
                            groups=self.d_inner).transpose(1, 2)
        weight = self.conv.weight[:, 0, :]  # [d_inner, K]; tap K-1 multiplies the current token
        out = u * weight[:, K - 1] + self.conv.bias
        for lag in range(1, min(K, u.shape[1])):
            same_doc = (doc_index[:, lag:] == doc_index[:, :-lag]).unsqueeze(-1).to(u.dtype)
            shifted = F.pad(u[:, :-lag] * same_doc, (0, 0, lag, 0))
            out = out + shifted * weight[:, K - 1 - lag]
        return out

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        is_start = doc_index = None
        if segment_ids is not None:
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids {tuple(segment_ids.shape)} must be [B, T] = {(B, T)}")
            is_start, doc_index = document_starts(segment_ids)
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self._conv(u, doc_index))
        dt = F.softplus(self.dt_up(self.dt_down(u))).float()  # [B, T, d_inner]
        B_t, C_t = self.b_proj(u).float(), self.c_proj(u).float()  # [B, T, N]
        A = -torch.exp(self.A_log.float())  # [d_inner, N]
        y = selective_scan(dt, dt * u.float(), A, B_t, C_t, is_start, self.chunk_len) + self.D_skip * u.float()
        return self.out_proj(y.type_as(x) * F.silu(z))

    # ---- counts the trainer's FLOP estimate needs ------------------------------------------------------------
    def active_matmul_params(self) -> int:
        """Weights every token multiplies through: in_proj (D x 2E), dt_down + dt_up (2 x E x rank), b_proj and
        c_proj (2 x E x N), out_proj (E x D); biases are excluded (E = d_inner, D = d_model). The depthwise conv is
        not a matmul: its FLOPs are in nonmatmul_flops_per_token, once."""
        linears = (self.in_proj, self.dt_down, self.dt_up, self.b_proj, self.c_proj, self.out_proj)
        return sum(m.weight.numel() for m in linears)

    def nonmatmul_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token outside the matmuls: 3 x forward (backward ~ 2 x forward), where
        forward = 2 K E (conv: a multiply and an add per tap) + 7 E N (scan: dt*A, exp, (dt*u)*B to discretise;
        a*h + b to update; h*C summed over N to read out), E = d_inner, N = ssm_state, K = ssm_conv.
        Per-channel O(E) terms (softplus, silu, gate, skip) are left out. Linear in T, so seq_len does not enter
        (it is taken for parity with attention, whose cost grows with T)."""
        del seq_len
        forward = 2 * self.conv_len * self.d_inner + 7 * self.d_inner * self.d_state
        return 3 * forward
