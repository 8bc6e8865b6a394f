"""Post-training evaluation: what the held-out data says after (and during) SFT, preference training, distillation.

- `ChatEvaluator`: loss and bits per byte on the assistant tokens of held-out dialogues, per source and overall
  (the trainer's evaluator interface, so it runs at every eval step).
- `PreferenceEvaluator`: the objective's loss, reward accuracy and margin on held-out pairs.
- `gsm8k_exact_match`: greedy answers to held-out GSM8K problems, the final number compared exactly; reported
  as it is, near zero for tiny models, with how many replies held a number at all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from mixlab.training.posttrain.dialogues import final_number
from mixlab.training.posttrain.generation import generate
from mixlab.training.posttrain.packing import SFTExample, pack_row


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode without gradients for the block; the model's own mode back afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def model_inputs(model: torch.nn.Module, position_ids: np.ndarray, cu_seqlens: list[np.ndarray], seq_len: int,
                 device: torch.device | str) -> dict[str, torch.Tensor]:
    """Positions and document ids of packed rows, for a model with document masking ({} without)."""
    from mixlab.training.model import segment_ids_from_cu_seqlens

    if not model.config.doc_masking:
        return {}
    return {"position_ids": torch.from_numpy(position_ids).to(device),
            "segment_ids": segment_ids_from_cu_seqlens(cu_seqlens, seq_len).to(device)}


class ChatEvaluator:
    """Assistant-token NLL of held-out dialogues, one per row (no packing: each is scored alone)."""

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, pad_id: int, byte_lengths: np.ndarray,
                 batch_size: int = 8):
        if not examples:
            raise ValueError("no held-out dialogues to evaluate on: raise the held-out fraction or add dialogues")
        self.examples, self.seq_len, self.pad_id = list(examples), seq_len, pad_id
        self.byte_lengths, self.batch_size = byte_lengths, batch_size

    def evaluate(self, model: torch.nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        with evaluating(model):
            return self._evaluate(model, device or "cpu")

    def _evaluate(self, model: torch.nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        nats: dict[str, float] = {}
        tokens_by: dict[str, int] = {}
        bytes_by: dict[str, int] = {}
        for start in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[start:start + self.batch_size]
            rows = [pack_row([e], self.seq_len, self.pad_id) for e in chunk]
            tokens = torch.from_numpy(np.stack([r[0] for r in rows])).to(device)
            mask = torch.from_numpy(np.stack([r[1] for r in rows])).to(device)
            extra = model_inputs(model, np.stack([r[2] for r in rows]), [r[3] for r in rows], self.seq_len, device)
            _, per_token = model(tokens[:, :-1], tokens[:, 1:], reduction="none", **extra)
            per_row = (per_token * mask).sum(-1).double().cpu().numpy()
            counts = mask.sum(-1).cpu().numpy()
            target_bytes = (self.byte_lengths[tokens[:, 1:].cpu().numpy()] * mask.cpu().numpy()).sum(-1)
            for e, value, n, b in zip(chunk, per_row, counts, target_bytes, strict=True):
                for key in (e.source, "all"):
                    nats[key] = nats.get(key, 0.0) + float(value)
                    tokens_by[key] = tokens_by.get(key, 0) + int(n)
                    bytes_by[key] = bytes_by.get(key, 0) + int(b)
        order = sorted(k for k in nats if k != "all") + ["all"]
        return [{"source": key, "loss": nats[key] / max(tokens_by[key], 1),
                 "bpb": nats[key] / math.log(2) / bytes_by[key] if bytes_by[key] else float("nan"),
                 "tokens": tokens_by[key], "dialogues": sum(1 for e in self.examples if key in ("all", e.source))}
                for key in order]


class PreferenceEvaluator:
    """The objective on held-out pairs, without gradients: loss, reward accuracy and margin."""

    def __init__(self, sampler: Any, objective: Any, batch_size: int = 8):
        self.sampler, self.objective, self.batch_size = sampler, objective, batch_size

    def evaluate(self, model: torch.nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        with evaluating(model):
            return self._evaluate(model, device or "cpu")

    def _evaluate(self, model: torch.nn.Module, device: torch.device | str) -> list[dict[str, Any]]:
        totals: dict[str, float] = {}
        n = len(self.sampler.examples)
        for start in range(0, n, self.batch_size):
            indices = list(range(start, min(start + self.batch_size, n)))
            batch = self.sampler.batch_of(indices)
            tokens = torch.from_numpy(batch.tokens).to(device)
            extra = model_inputs(model, batch.position_ids, batch.cu_seqlens, tokens.shape[1] - 1, device)
            _, loss, metrics = self.objective(model, batch, tokens, extra)
            for key, value in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(indices)
        row = {key.removeprefix("rewards/"): value / n for key, value in totals.items()}
        return [{"source": "held-out pairs", "bpb": float("nan"), "pairs": n, **row}]


def gsm8k_exact_match(model: torch.nn.Module, tokenizer: Any, template: Any, problems: Sequence[tuple[str, str]],
                      max_new_tokens: int = 48, think: bool | None = None, device: torch.device | str = "cpu",
                      batch_size: int = 16) -> dict[str, Any]:
    """Greedy replies to (question, worked answer) pairs; a reply is right when its last number equals the
    answer's final number. Problems whose prompt leaves fewer than max_new_tokens of the context are skipped
    and counted."""
    stop = [tokenizer.token_to_id(template.turn_end)]
    right = answered = 0
    shown = []
    encoded = [(q, a, template.encode(tokenizer, [{"role": "user", "content": q}], think=think,
                                      add_generation_prompt=True)[0]) for q, a in problems]
    room = model.config.max_seq_len - max_new_tokens
    fitting = [item for item in encoded if len(item[2]) <= room]
    for start in range(0, len(fitting), batch_size):
        chunk = fitting[start:start + batch_size]
        with evaluating(model):
            replies = generate(model, [p for _, _, p in chunk], max_new_tokens, stop,
                               max_len=model.config.max_seq_len, device=device)
        for (question, answer, _), reply in zip(chunk, replies, strict=True):
            text = tokenizer.decode([int(t) for t in reply if int(t) not in stop])
            got, want = final_number(text), final_number(answer)
            answered += got is not None
            right += got is not None and got == want
            if len(shown) < 3:
                shown.append({"question": question[:120], "reply": text[:160], "expected": want})
    return {"task": "gsm8k_exact_match", "accuracy": right / max(len(fitting), 1), "items": len(fitting),
            "correct": right, "replies_with_a_number": answered,
            "skipped_longer_than_context": len(encoded) - len(fitting), "examples": shown}
