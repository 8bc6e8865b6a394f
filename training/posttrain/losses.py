"""Preference and distillation losses, on sequence log-probabilities (one value per row).

Notation: `pc`, `pr` are the policy's log-probabilities of the chosen and rejected completions (summed over
their tokens), `rc`, `rr` the reference model's. Each function returns the per-example loss and the implicit
rewards, so that accuracy and margin are reported the same way for every loss.

- DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pc - rc) - (pr - rr))).
- IPO (Azar et al. 2023): ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, on length-normalised log-probabilities.
- KTO (Ethayarajh et al. 2024), unpaired: a desirable completion's loss is lambda_d * (1 - sigmoid(beta *
  (r - z))), an undesirable one's lambda_u * (1 - sigmoid(beta * (z - r))), r = logp - ref_logp and z the
  batch's KL estimate from mismatched prompt-completion pairs, clamped at 0 and not differentiated.
- ORPO (Hong et al. 2024), no reference model: NLL(chosen) - lambda * log sigmoid(log odds(chosen) - log
  odds(rejected)), odds(y) = p / (1 - p) with p the mean per-token probability.
- APO (D'Oosterlinck et al. 2024), SmolLM3's choice: apo-zero pushes the chosen likelihood up and the rejected
  down, (1 - sigmoid(beta rc_ratio)) + sigmoid(beta rr_ratio); apo-down lowers both, keeping the gap,
  sigmoid(beta rc_ratio) + (1 - sigmoid(beta (rc_ratio - rr_ratio))).
- Reverse KL (on-policy distillation): sum_v p_s(v) (log p_s(v) - log p_t(v)) at each student token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from mixlab.training.model import at_least_fp32

PAIRED_LOSSES = ("dpo", "ipo", "orpo", "apo_zero", "apo_down")
PREFERENCE_LOSSES = (*PAIRED_LOSSES, "kto")


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # per example
    chosen_reward: torch.Tensor  # per example (KTO: the completion's reward)
    rejected_reward: torch.Tensor  # per example (KTO: the mismatched pair's, i.e. the KL estimate's terms)


def dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> PreferenceOutput:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return PreferenceOutput(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


def ipo(pc_mean: torch.Tensor, pr_mean: torch.Tensor, rc_mean: torch.Tensor, rr_mean: torch.Tensor,
        beta: float) -> PreferenceOutput:
    """Arguments are per-token means (log-probability / completion tokens)."""
    chosen, rejected = pc_mean - rc_mean, pr_mean - rr_mean
    return PreferenceOutput((chosen - rejected - 1.0 / (2.0 * beta)) ** 2, beta * chosen.detach(),
                            beta * rejected.detach())


def apo_zero(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
             beta: float) -> PreferenceOutput:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    loss = (1 - torch.sigmoid(chosen)) + torch.sigmoid(rejected)
    return PreferenceOutput(loss, chosen.detach(), rejected.detach())


def apo_down(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor,
             beta: float) -> PreferenceOutput:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    loss = torch.sigmoid(chosen) + (1 - torch.sigmoid(chosen - rejected))
    return PreferenceOutput(loss, chosen.detach(), rejected.detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(pc_mean: torch.Tensor, pr_mean: torch.Tensor, nll_chosen: torch.Tensor, lam: float) -> PreferenceOutput:
    """pc_mean, pr_mean: mean per-token log-probabilities; nll_chosen: the chosen completion's mean NLL."""
    pc_mean, pr_mean = pc_mean.clamp(max=-1e-6), pr_mean.clamp(max=-1e-6)
    log_odds = (pc_mean - pr_mean) - (_log1mexp(pc_mean) - _log1mexp(pr_mean))
    loss = nll_chosen - lam * F.logsigmoid(log_odds)
    return PreferenceOutput(loss, lam * pc_mean.detach(), lam * pr_mean.detach())


def kto(logp: torch.Tensor, ref_logp: torch.Tensor, kl_logp: torch.Tensor, kl_ref_logp: torch.Tensor,
        desirable: torch.Tensor, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0) -> PreferenceOutput:
    """logp/ref_logp: each completion; kl_logp/kl_ref_logp: the mismatched pairs of the batch; desirable: bool."""
    z = (kl_logp - kl_ref_logp).mean().clamp(min=0).detach()
    reward = logp - ref_logp
    loss = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (reward - z))),
                       lambda_u * (1 - torch.sigmoid(beta * (z - reward))))
    return PreferenceOutput(loss, beta * reward.detach(), beta * (kl_logp - kl_ref_logp).detach())


def vocab_log_softmax(logits: torch.Tensor, group=None) -> torch.Tensor:
    """log-softmax over the last dimension, which may be one tensor-parallel rank's slice of the vocabulary
    (`group`: the ranks holding the other slices; None or one rank: the plain log-softmax)."""
    logits = at_least_fp32(logits)
    if group is None or group.size() == 1:
        return F.log_softmax(logits, dim=-1)
    import torch.distributed as dist
    from nanotron.parallel.tensor_parallel.distributed_differentiable_primitives import (
        differentiable_all_reduce_sum,
        differentiable_identity,
    )

    peak = logits.detach().amax(dim=-1, keepdim=True)  # a shift for stability: any value works, no gradient
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak
    # the normaliser is summed over the ranks, and so is its gradient: each rank uses it for its own slice only
    total = differentiable_identity(differentiable_all_reduce_sum(shifted.exp().sum(dim=-1, keepdim=True), group),
                                    group)
    return shifted - total.log()


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               group=None) -> torch.Tensor:
    """Mean over masked positions of KL(student || teacher) over the vocabulary; gradients flow to the student.
    With `group`, both logits are this rank's slice of a vocabulary split over the group (the sums over the
    vocabulary are reduced across it, so every rank gets the same loss)."""
    log_s = vocab_log_softmax(student_logits, group)
    log_t = vocab_log_softmax(teacher_logits.detach(), group)
    per_position = (log_s.exp() * (log_s - log_t)).sum(-1)
    if group is not None and group.size() > 1:  # the loss after it is the same on every rank: gradients stay local
        from nanotron.parallel.tensor_parallel.distributed_differentiable_primitives import (
            differentiable_all_reduce_sum,
        )

        per_position = differentiable_all_reduce_sum(per_position, group)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sum, count) over each row's masked targets of log p(target): [rows] each."""
    per_token = -F.cross_entropy(at_least_fp32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 reduction="none").view_as(targets)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum(-1), weights.sum(-1)
