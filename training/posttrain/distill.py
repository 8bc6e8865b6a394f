"""On-policy distillation: the student samples, a larger mixlab checkpoint (the teacher) scores the samples,
and the loss is the reverse KL, KL(student || teacher), over the vocabulary at every sampled token.

Reverse KL is mode-seeking: the student learns where the teacher puts mass on the student's own outputs, the
states it will actually visit (GKD, Agarwal et al. 2024; on-policy distillation in Qwen3 and Thinking Machines'
write-up). The trainer's `objective=` hook runs it: each step the PromptSampler gives prompts, the student
samples continuations without gradients, then both models score prompt + sample and only the sampled
positions carry loss. Each batch carries its own sampling seed (the sampler's seed, step and data-parallel
rank), so a resumed run samples what the uninterrupted one would have, and both backends sample alike.

On the nanotron backend the pipeline cannot decode, so rank 0 samples with the student's weights gathered
into the plain model (as a rollout engine synced with the trainer does); the last pipeline stage scores the
samples with the teacher and computes the reverse KL over its tensor-parallel slice of the vocabulary.
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
        seed = int(np.random.SeedSequence([self.seed, self.step - 1, rank]).generate_state(1)[0])
        mask = np.zeros((len(chosen), self.seq_len), dtype=bool)  # filled in by the objective once sampled
        positions = np.tile(np.arange(self.seq_len, dtype=np.int64), (len(chosen), 1))
        offsets = [np.asarray([0, self.seq_len], dtype=np.int32)] * len(chosen)
        batch = PackedBatch(tokens, mask, positions, offsets, [self.sources[i] for i in chosen], self.stage,
                            [[self.ids[i]] for i in chosen])
        batch.prompt_lens = lens  # type: ignore[attr-defined]
        batch.sample_seed = seed  # type: ignore[attr-defined]
        return batch


class DistillObjective:
    """Reverse KL to the teacher on the student's own samples (the trainer's Objective)."""

    rows_per_example = 1
    name = "distill"
    metric_names = ("distill/reverse_kl", "distill/sampled_tokens")

    def __init__(self, teacher: torch.nn.Module, config: DistillConfig, stop_ids: Sequence[int], pad_id: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.config, self.stop_ids, self.pad_id = config, list(stop_ids), pad_id

    def sample(self, model: Callable[..., Any], tokens: torch.Tensor, prompt_lens: Sequence[int],
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows with each prompt followed by the model's sample, and the mask of the positions whose logits
        predict a sampled token (over tokens[:, 1:])."""
        device, width = tokens.device, tokens.shape[1]
        prompts = [tokens[i, :n].cpu().numpy() for i, n in enumerate(prompt_lens)]
        samples = generate(model, prompts, self.config.max_new_tokens, self.stop_ids, max_len=width,
                           temperature=self.config.temperature, generator=torch.Generator().manual_seed(seed),
                           device=device)
        full = torch.full_like(tokens, self.pad_id)
        mask = torch.zeros(tokens.shape[0], width - 1, dtype=torch.bool, device=device)
        for i, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
            n, k = len(prompt), len(sample)
            full[i, :n] = torch.as_tensor(prompt, device=device)
            full[i, n:n + k] = torch.as_tensor(sample, device=device)
            mask[i, n - 1:n - 1 + k] = True  # the logits at position t predict token t + 1: the sampled ones
        return full, mask

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        logits, _ = self.teacher(inputs)
        return logits

    def from_logits(self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                    group: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and metrics from the student's and teacher's logits at every position (or, with `group`,
        this rank's slice of the vocabulary); rows without a sampled token give a zero loss."""
        loss = reverse_kl(student, teacher, mask, group) if bool(mask.any()) else student.sum() * 0.0
        return loss, {"distill/reverse_kl": loss.detach(),
                      "distill/sampled_tokens": mask.sum().to(loss.dtype) / mask.shape[0]}

    def __call__(self, forward: Callable[..., Any], batch: Any, tokens: torch.Tensor,
                 extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        full, mask = self.sample(forward, tokens, np.asarray(batch.prompt_lens), batch.sample_seed)
        inputs = full[:, :-1]
        student, _ = forward(inputs)
        loss, metrics = self.from_logits(student, self.teacher_logits(inputs), mask)
        return student, loss, {name: float(value.item()) for name, value in metrics.items()}
