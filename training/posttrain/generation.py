"""Sampling from the plain model: greedy or with a temperature, batched over prompts of different lengths.

No KV cache: each new token re-runs the prefix, which is what tiny CPU models can afford and keeps the model
file free of decoding state. Prompts are right-padded; each row reads the logits at its own last token, and
causal attention keeps the padding after it out of view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


@torch.no_grad()
def generate(model: Callable[..., tuple[torch.Tensor, object]], prompts: Sequence[np.ndarray], max_new_tokens: int,
             stop_ids: Sequence[int], max_len: int, temperature: float = 0.0, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Each prompt's continuation (int64, without the prompt; ending with a stop id when one was drawn), at most
    `max_len` tokens with the prompt. `model(idx) -> (logits, _)`: the plain Transformer or its wrapper.
    temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) with `generator`."""
    lengths = [len(p) for p in prompts]
    if max(lengths) >= max_len:
        raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room to generate within {max_len}; shorten it")
    width = min(max(lengths) + max_new_tokens, max_len)
    rows = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        rows[i, :len(p)] = torch.as_tensor(np.asarray(p, dtype=np.int64))
    rows = rows.to(device)
    at = torch.tensor(lengths, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    for _ in range(max_new_tokens):
        live = ~done & (at < width)
        if not bool(live.any()):
            break
        end = int(at[live].max())  # the finished rows need no more context
        logits, _ = model(rows[:, :end])
        last = logits[torch.arange(len(prompts), device=device), (at - 1).clamp(max=end - 1)].float()
        if temperature > 0:
            probs = torch.softmax(last / temperature, dim=-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
        else:
            token = last.argmax(-1)
        rows[live, at[live]] = token[live]
        done |= live & torch.isin(token, stops)
        at = torch.where(live, at + 1, at)
    return [rows[i, lengths[i]:int(at[i])].cpu().numpy() for i in range(len(prompts))]
