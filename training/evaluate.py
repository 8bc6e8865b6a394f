"""Held-out evaluation per source: loss, perplexity and bits per byte.

Bits per byte is the number to compare across tokenizers and mixtures: nats per token depend on how many bytes a
token covers, bpb = total nats / (ln 2 x total UTF-8 bytes of the predicted tokens) does not.

Every row also carries the loss by position bucket (`loss_pos_<lo>_<hi>`, buckets doubling from 64 tokens): after a
context extension the late buckets show whether the model uses the longer context (their loss falls below the
early ones) or breaks down past the old length (it rises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

    Each row also carries a bootstrap interval (`loss_lo, loss_hi, bpb_lo, bpb_hi`) over the eval windows, so a
    difference between two runs can be told from eval noise: windows are resampled with replacement
    `bootstrap_resamples` times (0: no interval) from a fixed `bootstrap_seed`, so the same model always gets the
    same interval.
    """

    def __init__(self, windows: dict[str, np.ndarray], token_bytes: np.ndarray, batch_size: int = 16,
                 bootstrap_resamples: int = 1000, confidence: float = 0.95, bootstrap_seed: int = 0):
        if not windows:
            raise ConfigError("HeldOutEvaluator needs at least one source of windows: give it a source's val split "
                              "with at least one window of seq_len + 1 tokens")
        for source, w in windows.items():
            if w.ndim != 2 or w.shape[1] < 2:
                raise ConfigError(f"eval windows for {source!r} must be [N, T+1] with T >= 1, got {w.shape}")
        if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 0:
            raise ConfigError(f"bootstrap_resamples={bootstrap_resamples!r} must be a whole number >= 0 (0: no interval)")
        if not 0.0 < confidence < 1.0:
            raise ConfigError(f"confidence={confidence!r} must be strictly between 0 and 1, e.g. 0.95")
        self.windows = {s: np.ascontiguousarray(w, dtype=np.int64) for s, w in windows.items()}
        self.token_bytes = np.asarray(token_bytes, dtype=np.int64)
        self.batch_size = batch_size
        self.bootstrap_resamples = bootstrap_resamples
        self.confidence = confidence
        self.bootstrap_seed = bootstrap_seed

    @torch.no_grad()
    def window_sums(self, model: nn.Module, device: torch.device | str | None = None) -> dict[str, WindowSums]:
        """Per source, the nats, target tokens and target bytes of each window: what both the point estimate and
        the bootstrap are computed from."""
        device = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: dict[str, WindowSums] = {}
        try:
            for source, windows in self.windows.items():
                nats, by_position = [], []
                buckets = position_buckets(windows.shape[1] - 1)
                starts = [lo for lo, _ in buckets]
                for start in range(0, len(windows), self.batch_size):
                    batch = torch.from_numpy(windows[start:start + self.batch_size]).to(device)
                    _, per_token = model(batch[:, :-1], batch[:, 1:], reduction="none")
                    per_token = per_token.double().cpu().numpy()  # fp64: thousands of windows add up
                    nats.append(per_token.sum(axis=1))
                    by_position.append(np.add.reduceat(per_token, starts, axis=1))
                targets = windows[:, 1:]
                out[source] = WindowSums(
                    nats=np.concatenate(nats),
                    tokens=np.full(len(windows), targets.shape[1], dtype=np.int64),
                    bytes=self.token_bytes[targets].sum(axis=1),
                    position_nats=np.concatenate(by_position),
                    buckets=buckets,
                )
        finally:
            model.train(was_training)
        return out

    def evaluate(self, model: nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]:
        """One row per source plus a token-weighted "all" row: source, loss, ppl, bpb, tokens, bytes, and the
        bootstrap interval loss_lo, loss_hi, bpb_lo, bpb_hi."""
        return self.rows(self.window_sums(model, device))

    def rows(self, sums: dict[str, WindowSums]) -> list[dict[str, Any]]:
        """Eval rows from per-window sums (the model-free half of `evaluate`)."""
        rng = np.random.default_rng(self.bootstrap_seed)
        rows, resampled = [], []
        for source, ws in sums.items():
            row = _row(source, float(ws.nats.sum()), int(ws.tokens.sum()), int(ws.bytes.sum()))
            row.update(self._position_losses([ws]))
            if self.bootstrap_resamples:
                draws = bootstrap_sums(ws, self.bootstrap_resamples, rng)
                row.update(_interval(row, draws, self.confidence))
                resampled.append(draws)
            rows.append(row)
        total = _row("all", sum(float(ws.nats.sum()) for ws in sums.values()),
                     sum(int(ws.tokens.sum()) for ws in sums.values()), sum(int(ws.bytes.sum()) for ws in sums.values()))
        total.update(self._position_losses(list(sums.values())))
        if resampled:
            # stratified: each source was resampled within itself; the aggregate is token-weighted like the point
            stacked = np.sum(resampled, axis=0)
            total.update(_interval(total, stacked, self.confidence))
        rows.append(total)
        return rows

    @staticmethod
    def _position_losses(sums: list[WindowSums]) -> dict[str, float]:
        """Mean loss of each position bucket over the windows of `sums` (keys `loss_pos_<lo>_<hi>`, hi exclusive)."""
        nats: dict[tuple[int, int], float] = {}
        tokens: dict[tuple[int, int], int] = {}
        for ws in sums:
            if ws.position_nats is None or not len(ws.position_nats):
                continue
            for (lo, hi), n in zip(ws.buckets, ws.position_nats.sum(axis=0).tolist(), strict=True):
                nats[lo, hi] = nats.get((lo, hi), 0.0) + n
                tokens[lo, hi] = tokens.get((lo, hi), 0) + len(ws.position_nats) * (hi - lo)
        return {f"loss_pos_{lo}_{hi}": nats[lo, hi] / tokens[lo, hi] for lo, hi in sorted(nats)}


def position_buckets(seq_len: int, first: int = 64) -> list[tuple[int, int]]:
    """Target positions [lo, hi) of the eval's position buckets: [0, 64), [64, 128), [128, 256), ... doubling up to
    seq_len (the last bucket ends at seq_len; a window shorter than `first` is one bucket)."""
    edges = [0]
    while edges[-1] < seq_len:
        edges.append(min(max(first, 2 * edges[-1]), seq_len))
    return list(zip(edges[:-1], edges[1:], strict=True))


def position_losses(row: dict[str, Any]) -> list[tuple[int, int, float]]:
    """(lo, hi, loss) of an eval row's position buckets, in position order (what a report or the CLI prints)."""
    out = []
    for key, value in row.items():
        if key.startswith("loss_pos_") and isinstance(value, int | float):
            lo, hi = key.removeprefix("loss_pos_").split("_")
            out.append((int(lo), int(hi), float(value)))
    return sorted(out)


@dataclass
class WindowSums:
    """Per-window totals of one source's eval: nats (fp64), target tokens and target UTF-8 bytes, each [N]."""

    nats: np.ndarray
    tokens: np.ndarray
    bytes: np.ndarray
    position_nats: np.ndarray | None = None  # [N, buckets]: nats of each window's position buckets
    buckets: list[tuple[int, int]] | None = None  # the buckets' target positions [lo, hi)


def bootstrap_sums(ws: WindowSums, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, 3] totals (nats, tokens, bytes) of `resamples` draws of N windows with replacement."""
    n = len(ws.nats)
    per_window = np.stack([ws.nats, ws.tokens.astype(np.float64), ws.bytes.astype(np.float64)], axis=1)  # [N, 3]
    out = np.empty((resamples, 3), dtype=np.float64)
    chunk = max(1, 4_000_000 // max(n, 1))  # bound the [chunk, N] index array to ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = per_window[idx].sum(axis=1)
    return out


def _interval(point: dict[str, Any], draws: np.ndarray, confidence: float) -> dict[str, float]:
    """Percentile interval of loss and bpb over resampled totals; widened to hold the point estimate, which a
    percentile interval can miss by a rounding error (identical windows) or with very few windows."""
    nats, tokens, nbytes = draws[:, 0], draws[:, 1], draws[:, 2]
    tail = (1.0 - confidence) / 2 * 100
    out: dict[str, float] = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, values in (("loss", nats / tokens), ("bpb", nats / (math.log(2) * nbytes))):
            finite = values[np.isfinite(values)]
            if not finite.size or not math.isfinite(point[name]):
                out[f"{name}_lo"] = out[f"{name}_hi"] = float("nan")
                continue
            lo, hi = np.percentile(finite, [tail, 100 - tail])
            out[f"{name}_lo"] = float(min(lo, point[name]))
            out[f"{name}_hi"] = float(max(hi, point[name]))
    return out


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
    if not isinstance(meta.model_config, dict):
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
