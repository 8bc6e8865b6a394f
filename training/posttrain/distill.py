"""On-policy distillation: the student samples, a larger mixlab checkpoint (the teacher) scores the samples,
and the loss is the reverse KL, KL(student || teacher), over the vocabulary at every sampled token.

Reverse KL is mode-seeking: the student learns where the teacher puts mass on the student's own outputs, the
states it will actually visit (GKD, Agarwal et al. 2024; on-policy distillation in Qwen3 and Thinking Machines'
write-up). The trainer's `objective=` hook runs it: each step the PromptSampler gives prompts, the student
samples continuations without gradients, then both models score prompt + sample and only the sampled
positions carry loss. Sampling draws from torch's generator, which every checkpoint saves, so a resumed run
samples what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mixlab.training.posttrain.generation import generate
from mixlab.training.posttrain.losses import reverse_kl
from mixlab.training.posttrain.packing import EpochSampler, PackedBatch, fingerprint


@dataclass
class DistillConfig:
    teacher: str = ""  # a mixlab checkpoint (or run directory): same tokenizer, any size
    max_new_tokens: int = 32
    temperature: float = 1.0


class PromptSampler(EpochSampler):
    """batch_size prompts per step, right-padded to seq_len + 1 (`prompt_lens` says where each ends)."""

    kind = "prompts"

    def __init__(self, prompts: Sequence[np.ndarray], ids: Sequence[str], sources: Sequence[str], seq_len: int,
                 batch_size: int, pad_id: int, seed: int = 0, stage: str = "distill"):
        keep = [i for i, p in enumerate(prompts) if 0 < len(p) <= seq_len]
        if not keep:
            raise ValueError(f"no prompt fits seq_len={seq_len}")
        self.prompts = [np.asarray(prompts[i], dtype=np.int64) for i in keep]
        self.ids, self.sources = [ids[i] for i in keep], [sources[i] for i in keep]
        self.seq_len, self.pad_id, self.stage = seq_len, pad_id, stage
        super().__init__(len(self.prompts), batch_size, seed, fingerprint(self.prompts, seq_len, pad_id), "prompts")

    def next_batch(self, rank: int = 0, world_size: int = 1) -> PackedBatch:
        chosen = self._chosen(rank, world_size).tolist()
        tokens = np.full((len(chosen), self.seq_len + 1), self.pad_id, dtype=np.int64)
        for row, i in enumerate(chosen):
            tokens[row, :len(self.prompts[i])] = self.prompts[i]
        lens = np.asarray([len(self.prompts[i]) for i in chosen])
        mask = np.zeros((len(chosen), self.seq_len), dtype=bool)  # filled in by the objective once sampled
        positions = np.tile(np.arange(self.seq_len, dtype=np.int64), (len(chosen), 1))
        offsets = [np.asarray([0, self.seq_len], dtype=np.int32)] * len(chosen)
        batch = PackedBatch(tokens, mask, positions, offsets, [self.sources[i] for i in chosen], self.stage,
                            [[self.ids[i]] for i in chosen])
        batch.prompt_lens = lens  # type: ignore[attr-defined]
        return batch


class DistillObjective:
    """Reverse KL to the teacher on the student's own samples (the trainer's Objective)."""

    rows_per_example = 1
    name = "distill"

    def __init__(self, teacher: torch.nn.Module, config: DistillConfig, stop_ids: Sequence[int], pad_id: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config, self.stop_ids, self.pad_id = config, list(stop_ids), pad_id

    def __call__(self, forward: Callable[..., Any], batch: Any, tokens: torch.Tensor,
                 extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        device, width = tokens.device, tokens.shape[1]
        lens = np.asarray(batch.prompt_lens)
        prompts = [tokens[i, :n].cpu().numpy() for i, n in enumerate(lens)]
        samples = generate(forward, prompts, self.config.max_new_tokens, self.stop_ids, max_len=width,
                           temperature=self.config.temperature, device=device)
        full = torch.full_like(tokens, self.pad_id)
        mask = torch.zeros(tokens.shape[0], width - 1, dtype=torch.bool, device=device)
        for i, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            n, k = len(prompt), len(sample)
            full[i, :n] = torch.as_tensor(prompt, device=device)
            full[i, n:n + k] = torch.as_tensor(sample, device=device)
            mask[i, n - 1:n - 1 + k] = True  # the logits at position t predict token t + 1: the sampled ones
        inputs = full[:, :-1]
        student, _ = forward(inputs)
        with torch.no_grad():
            teacher, _ = self.teacher(inputs)
        if not bool(mask.any()):  # nothing sampled (every prompt fills the row): no signal, a zero loss
            return student, student.sum() * 0.0, {"distill/reverse_kl": 0.0, "distill/sampled_tokens": 0.0}
        loss = reverse_kl(student, teacher, mask)
        return student, loss, {"distill/reverse_kl": loss.item(),
                               "distill/sampled_tokens": float(mask.sum().item()) / tokens.shape[0]}
