"""Held-out evaluation per source: loss, perplexity and bits per byte.

Bits per byte is the number to compare across tokenizers and mixtures: nats per token depend on how many bytes a
token covers, bpb = total nats / (ln 2 x total UTF-8 bytes of the predicted tokens) does not.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from mixlab.training.checkpoint import load_checkpoint, read_checkpoint
from mixlab.training.errors import CheckpointError, ConfigError
from mixlab.training.model import ModelConfig, Transformer


class HeldOutEvaluator:
    """Fixed windows per source, scored the same way at every eval so curves are comparable across steps and runs.

    windows: source -> int64 [N, T+1] (inputs are [:, :-1], targets [:, 1:]); token_bytes: UTF-8 byte length of
    each token id (0 for special tokens such as EOS: they are scored in the loss but add no bytes).
    """

    def __init__(self, windows: dict[str, np.ndarray], token_bytes: np.ndarray, batch_size: int = 16):
        if not windows:
            raise ConfigError("HeldOutEvaluator needs at least one source of windows: give it a source's val split "
                              "with at least one window of seq_len + 1 tokens")
        for source, w in windows.items():
            if w.ndim != 2 or w.shape[1] < 2:
                raise ConfigError(f"eval windows for {source!r} must be [N, T+1] with T >= 1, got {w.shape}")
        self.windows = {s: np.ascontiguousarray(w, dtype=np.int64) for s, w in windows.items()}
        self.token_bytes = np.asarray(token_bytes, dtype=np.int64)
        self.batch_size = batch_size

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        """One row per source plus a token-weighted "all" row: source, loss, ppl, bpb, tokens, bytes."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        rows, total_nats, total_tokens, total_bytes = [], 0.0, 0, 0
        try:
            for source, windows in self.windows.items():
                nats, tokens, nbytes = 0.0, 0, 0
                for start in range(0, len(windows), self.batch_size):
                    batch = torch.from_numpy(windows[start:start + self.batch_size]).to(device)
                    _, per_token = model(batch[:, :-1], batch[:, 1:], reduction="none")
                    nats += per_token.double().sum().item()  # sum in fp64: thousands of windows add up
                    targets = windows[start:start + self.batch_size, 1:]
                    tokens += targets.size
                    nbytes += int(self.token_bytes[targets].sum())
                rows.append(_row(source, nats, tokens, nbytes))
                total_nats, total_tokens, total_bytes = total_nats + nats, total_tokens + tokens, total_bytes + nbytes
        finally:
            model.train(was_training)
        rows.append(_row("all", total_nats, total_tokens, total_bytes))
        return rows



def _row(source: str, nats: float, tokens: int, nbytes: int) -> dict[str, Any]:
    loss = nats / tokens if tokens else float("nan")
    return {
        "source": source,
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / (math.log(2) * nbytes) if nbytes else float("nan"),
        "tokens": tokens,
        "bytes": nbytes,
    }


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[Transformer, int]:
    """Rebuild the model a checkpoint was trained with and load its weights; returns (model, step)."""
    meta = read_checkpoint(checkpoint)
    if meta.model_config is None:
        raise CheckpointError(f"{checkpoint}: checkpoint has no model_config, so the model cannot be rebuilt; "
                              "load its weights with training.load_checkpoint into a model you build yourself")
    model = Transformer(ModelConfig.from_dict(meta.model_config))
    load_checkpoint(checkpoint, model, restore_rng=False)
    return model.to(device), meta.step


def evaluate_checkpoint(
    checkpoint: str | Path,
    evaluator: HeldOutEvaluator,
    device: torch.device | str = "cpu",
    run: Any | None = None,
) -> list[dict[str, Any]]:
    """Score a saved checkpoint standalone; with a RunRecord, also log the rows at the checkpoint's step."""
    model, step = load_model(checkpoint, device)
    rows = evaluator.evaluate(model, device)
    if run is not None:
        for row in rows:
            run.log_eval(step, row["source"], **{k: v for k, v in row.items() if k != "source"})
    return [{"step": step, **row} for row in rows]
