"""The preference objective: the trainer's loss for a PreferenceSampler's batches (`train(..., objective=)`).

It scores the batch's two rows per example with the policy, takes the reference log-probabilities the batch
carries (cached once, `preferences.cached_reference_logps`) and applies one loss of `losses`. Its metrics are
the implicit rewards: accuracy (chosen above rejected; for KTO, the reward's sign agrees with the label) and
margin, logged with every metrics row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mixlab.training.errors import ConfigError
from mixlab.training.posttrain import losses
from mixlab.training.trainer import masked_targets


@dataclass
class PreferenceConfig:
    loss: str = "dpo"  # dpo | ipo | kto | orpo | apo_zero | apo_down
    beta: float = 0.1  # DPO/IPO/KTO/APO temperature; ORPO's lambda
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in losses.PREFERENCE_LOSSES:
            raise ConfigError(f"preference loss {self.loss!r}: choose one of {losses.PREFERENCE_LOSSES}",
                              ["posttrain.loss"])
        if self.beta <= 0:
            raise ConfigError(f"posttrain.beta={self.beta} must be > 0", ["posttrain.beta"])

    @property
    def needs_reference(self) -> bool:
        return self.loss != "orpo"


class PreferenceObjective:
    rows_per_example = 2

    def __init__(self, config: PreferenceConfig):
        self.config = config
        self.name = config.loss

    @property
    def metric_names(self) -> tuple[str, ...]:
        if self.config.loss == "kto":
            return ("rewards/accuracy", "rewards/kl")
        return ("rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected")

    def __call__(self, forward: Callable[..., Any], batch: Any, tokens: torch.Tensor,
                 extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        logits, _ = forward(tokens[:, :-1], **extra)
        mask = torch.from_numpy(np.asarray(batch.loss_mask, dtype=bool)).to(tokens.device)
        sums, counts = losses.sequence_logps(logits, masked_targets(batch, tokens).clamp(min=0), mask)
        ref = getattr(batch, "ref_logps", None)
        desirable = np.asarray(getattr(batch, "desirable", np.zeros(sums.shape[0] // 2)), dtype=bool)
        loss, metrics = self.from_sequence_logps(
            sums, counts, None if ref is None else torch.as_tensor(np.asarray(ref), device=sums.device),
            torch.from_numpy(desirable).to(sums.device))
        return logits, loss, {key: value.item() for key, value in metrics.items()}

    def from_sequence_logps(self, sums: torch.Tensor, counts: torch.Tensor, ref: torch.Tensor | None,
                            desirable: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its metrics (detached tensors) from each row's summed completion log-probability and
        token count, rows [first of each example..., second of each...]: what both backends compute."""
        cfg = self.config
        n = sums.shape[0] // 2
        first, second = sums[:n], sums[n:]
        first_count, second_count = counts[:n].clamp(min=1), counts[n:].clamp(min=1)
        if cfg.needs_reference:
            if ref is None:
                raise ConfigError(f"loss {cfg.loss!r} needs reference log-probabilities on the batch: attach them "
                                  "with PreferenceSampler.attach_reference (posttrain does)", ["posttrain.loss"])
            ref = ref.to(sums.dtype)
            ref_first, ref_second = ref[:n], ref[n:]
        if cfg.loss == "dpo":
            out = losses.dpo(first, second, ref_first, ref_second, cfg.beta)
        elif cfg.loss == "ipo":
            out = losses.ipo(first / first_count, second / second_count, ref_first / first_count,
                             ref_second / second_count, cfg.beta)
        elif cfg.loss == "apo_zero":
            out = losses.apo_zero(first, second, ref_first, ref_second, cfg.beta)
        elif cfg.loss == "apo_down":
            out = losses.apo_down(first, second, ref_first, ref_second, cfg.beta)
        elif cfg.loss == "orpo":
            out = losses.orpo(first / first_count, second / second_count, -first / first_count, cfg.beta)
        else:
            out = losses.kto(first, ref_first, second, ref_second, desirable, cfg.beta, cfg.kto_desirable_weight,
                             cfg.kto_undesirable_weight)
            agree = torch.where(desirable, out.chosen_reward > 0, out.chosen_reward < 0).float()
            return out.loss.mean(), {"rewards/accuracy": agree.mean(), "rewards/kl": out.rejected_reward.mean()}
        margin = out.chosen_reward - out.rejected_reward
        return out.loss.mean(), {"rewards/accuracy": (margin > 0).float().mean(), "rewards/margin": margin.mean(),
                                 "rewards/chosen": out.chosen_reward.mean(),
                                 "rewards/rejected": out.rejected_reward.mean()}
