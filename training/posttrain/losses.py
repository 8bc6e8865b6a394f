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


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(student || teacher) over the vocabulary; gradients flow to the student."""
    log_s = F.log_softmax(at_least_fp32(student_logits), dim=-1)
    log_t = F.log_softmax(at_least_fp32(teacher_logits.detach()), dim=-1)
    per_position = (log_s.exp() * (log_s - log_t)).sum(-1)
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sum, count) over each row's masked targets of log p(target): [rows] each."""
    per_token = -F.cross_entropy(at_least_fp32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1),
                                 reduction="none").view_as(targets)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum(-1), weights.sum(-1)
