"""Preference data: the JSONL format, its encoding, the sampler and the cached reference log-probabilities.

JSONL, one record per line. Paired (DPO, IPO, ORPO, APO):
    {"id": "p1", "prompt": "What is 2+3?", "chosen": "The answer is 5.", "rejected": "The answer is 6.",
     "source": "gsm8k"}
Unpaired (KTO): {"id": "k1", "prompt": ..., "completion": "...", "label": true}; paired records train KTO
too, as one desirable and one undesirable completion.
`prompt` is a string (one user turn) or a list of {role, content} messages ending with a user turn; a
completion is a string or {"content", "reasoning"}.

Every example is two rows of one batch: (prompt + chosen, prompt + rejected), or for KTO (prompt +
completion, prompt + the next example's completion), the mismatched pair KTO's KL estimate needs. The batch
puts all first rows before all second rows. Only completion tokens count.

Reference log-probabilities are computed once per (reference checkpoint, data, template, seq_len) and cached
as a .npz: every run on the same data and reference reuses them, and a resumed run never recomputes them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mixlab.training.posttrain.packing import EpochSampler, PackedBatch, SFTExample, fingerprint, pack_row


@dataclass
class PreferenceRecord:
    id: str
    source: str
    prompt: list[dict[str, str]]
    completions: tuple[dict[str, str], ...]  # (chosen, rejected), or (completion,) with `desirable`
    desirable: bool | None = None


@dataclass
class PreferenceSet:
    records: list[PreferenceRecord] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)


def _message(value: Any, what: str) -> dict[str, str]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {"role": "assistant", **{k: v for k, v in value.items() if k in ("content", "reasoning")}}
    raise ValueError(f"{what!r} must be a string or an object with a string 'content'")


def _prompt(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "user":
        return [dict(m) for m in value]
    raise ValueError("'prompt' must be a string or a list of messages ending with a user turn")


def parse_preference(record: Any, default_id: str, default_source: str) -> PreferenceRecord:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    prompt = _prompt(record.get("prompt"))
    rid, source = str(record.get("id", default_id)), str(record.get("source") or default_source)
    if "chosen" in record or "rejected" in record:
        return PreferenceRecord(rid, source, prompt, (_message(record.get("chosen"), "chosen"),
                                                      _message(record.get("rejected"), "rejected")))
    if "completion" in record:
        label = record.get("label")
        if not isinstance(label, bool):
            raise ValueError("an unpaired record needs 'label': true (desirable) or false")
        return PreferenceRecord(rid, source, prompt, (_message(record["completion"], "completion"),), label)
    raise ValueError("needs 'chosen' and 'rejected' (paired) or 'completion' and 'label' (unpaired)")


def read_preferences(path: str | Path) -> PreferenceSet:
    """Records of a preference JSONL (format above); unreadable lines are counted by reason, with an example."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preference file here (JSONL: prompt, chosen, rejected per line)")
    out = PreferenceSet()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for n, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                out.records.append(parse_preference(json.loads(line), f"{path.stem}/{n}", path.stem))
            except (json.JSONDecodeError, ValueError) as err:
                out.rejected["unreadable"] += 1
                out.examples.setdefault("unreadable", f"{path}:{n} ({err})")
    return out


def write_preferences(records: Sequence[PreferenceRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for r in records:
            row: dict[str, Any] = {"id": r.id, "source": r.source, "prompt": r.prompt}
            if r.desirable is None:
                row["chosen"], row["rejected"] = r.completions
            else:
                row["completion"], row["label"] = r.completions[0], r.desirable
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@dataclass
class PreferenceExample:
    id: str
    source: str
    prompt: np.ndarray  # int32 ids, the prompt with the assistant header
    first: np.ndarray  # int32 ids: the chosen completion (KTO: the completion)
    second: np.ndarray  # the rejected completion (KTO: the next example's completion)
    desirable: bool | None = None  # KTO's label; None for a pair

    def rows(self) -> tuple[SFTExample, SFTExample]:
        def row(completion: np.ndarray, tag: str) -> SFTExample:
            ids = np.concatenate([self.prompt, completion]).astype(np.int32)
            learned = np.concatenate([np.zeros(len(self.prompt), bool), np.ones(len(completion), bool)])
            return SFTExample(f"{self.id}/{tag}", self.source, ids, learned)

        return row(self.first, "first"), row(self.second, "second")


def _completion_ids(tokenizer: Any, template: Any, prompt: list[dict[str, str]], completion: dict[str, str],
                    think: bool | None, record: str) -> np.ndarray:
    pieces = template.segments([*prompt, completion], think=think, record=record)
    learned = [text for text, trains in pieces if trains]
    return np.asarray(tokenizer.encode(learned[-1], add_special_tokens=False).ids, dtype=np.int32)


def encode_preferences(records: Sequence[PreferenceRecord], tokenizer: Any, template: Any, max_tokens: int,
                       unpaired: bool = False, think: bool | None = None) -> tuple[list[PreferenceExample], Counter]:
    """Examples whose rows fit `max_tokens` (longer completions are cut, a prompt leaving no room is skipped).
    unpaired=True (KTO): pairs split into a desirable and an undesirable completion, each example's second row
    the completion of the next example in file order (the mismatched pair)."""
    from mixlab.curation.chat_template import ChatFormatError

    skipped: Counter = Counter()
    prompts: list[tuple[PreferenceRecord, np.ndarray, list[np.ndarray]]] = []
    for r in records:
        try:
            prompt, _ = template.encode(tokenizer, r.prompt, think=think, add_generation_prompt=True, record=r.id)
            completions = [_completion_ids(tokenizer, template, r.prompt, c, think, r.id) for c in r.completions]
        except ChatFormatError:
            skipped["template"] += 1
            continue
        if len(prompt) >= max_tokens - 1:
            skipped["prompt_too_long"] += 1
            continue
        room = max_tokens - len(prompt)
        prompts.append((r, prompt, [c[:room] for c in completions]))
    if not unpaired:
        examples = [PreferenceExample(r.id, r.source, p, c[0], c[1]) for r, p, c in prompts if r.desirable is None]
        skipped["unpaired_record_in_paired_stage"] += sum(1 for r, _, _ in prompts if r.desirable is not None)
        return examples, +skipped
    singles = []
    for r, p, c in prompts:
        if r.desirable is None:
            singles += [(f"{r.id}/chosen", r, p, c[0], True), (f"{r.id}/rejected", r, p, c[1], False)]
        else:
            singles.append((r.id, r, p, c[0], r.desirable))
    examples = []
    for i, (rid, r, p, completion, label) in enumerate(singles):
        other = singles[(i + 1) % len(singles)][3]
        examples.append(PreferenceExample(rid, r.source, p, completion, other[:max_tokens - len(p)], label))
    return examples, +skipped


class PreferenceSampler(EpochSampler):
    """batch_size examples per step: rows [first of each..., second of each...] with their reference
    log-probabilities (`ref_logps` [2B], from `attach_reference`) and KTO labels (`desirable` [B])."""

    kind = "preference"

    def __init__(self, examples: Sequence[PreferenceExample], seq_len: int, batch_size: int, pad_id: int,
                 seed: int = 0, stage: str = "dpo"):
        if not examples:
            raise ValueError("no preference examples: every record was skipped or none were given")
        self.examples, self.seq_len, self.pad_id, self.stage = list(examples), seq_len, pad_id, stage
        self.reference: np.ndarray | None = None  # [N, 2] summed log-probs of each example's two rows
        arrays = [a for e in self.examples for a in (e.prompt, e.first, e.second)]
        labels = [e.desirable for e in self.examples]
        super().__init__(len(self.examples), batch_size, seed, fingerprint(arrays, seq_len, pad_id, labels),
                         "preference examples")

    def attach_reference(self, logps: np.ndarray) -> None:
        if logps.shape != (len(self.examples), 2):
            raise ValueError(f"reference log-probs of shape {logps.shape}, expected {(len(self.examples), 2)}")
        self.reference = logps

    def batch_of(self, indices: Sequence[int]) -> PackedBatch:
        rows = [e.rows() for e in (self.examples[i] for i in indices)]
        parts = [pack_row([row], self.seq_len, self.pad_id) for row in [r[0] for r in rows] + [r[1] for r in rows]]
        batch = PackedBatch(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                            np.stack([p[2] for p in parts]), [p[3] for p in parts],
                            [self.examples[i].source for i in indices] * 2, self.stage,
                            [[self.examples[i].id] for i in indices] * 2)
        batch.desirable = np.asarray([bool(self.examples[i].desirable) for i in indices])  # type: ignore[attr-defined]
        if self.reference is not None:
            ref = self.reference[np.asarray(indices, dtype=np.int64)]
            batch.ref_logps = np.concatenate([ref[:, 0], ref[:, 1]])  # type: ignore[attr-defined]
        return batch

    def next_batch(self, rank: int = 0, world_size: int = 1) -> PackedBatch:
        return self.batch_of(self._chosen(rank, world_size).tolist())

    def fingerprint(self) -> str:
        return self._fingerprint


def reference_logps(model: torch.nn.Module, sampler: PreferenceSampler, batch_size: int = 8,
                    device: torch.device | str = "cpu") -> np.ndarray:
    """Summed completion log-probabilities [N, 2] of every example's two rows under `model` (in eval mode)."""
    from mixlab.training.posttrain.evaluate import evaluating

    with evaluating(model):
        return _reference_logps(model, sampler, batch_size, device)


def _reference_logps(model: torch.nn.Module, sampler: PreferenceSampler, batch_size: int,
                     device: torch.device | str) -> np.ndarray:
    from mixlab.training.posttrain.evaluate import model_inputs
    from mixlab.training.posttrain.losses import sequence_logps
    from mixlab.training.trainer import masked_targets

    out = np.zeros((len(sampler.examples), 2), dtype=np.float64)
    for start in range(0, len(sampler.examples), batch_size):
        indices = list(range(start, min(start + batch_size, len(sampler.examples))))
        batch = sampler.batch_of(indices)
        tokens = torch.from_numpy(batch.tokens).to(device)
        logits, _ = model(tokens[:, :-1], **model_inputs(model, batch.position_ids, batch.cu_seqlens,
                                                         tokens.shape[1] - 1, device))
        sums, _ = sequence_logps(logits, masked_targets(batch, tokens).clamp(min=0),
                                 torch.from_numpy(batch.loss_mask).to(device))
        sums = sums.double().cpu().numpy()
        out[indices, 0], out[indices, 1] = sums[:len(indices)], sums[len(indices):]
    return out


def cached_reference_logps(model: torch.nn.Module, sampler: PreferenceSampler, cache_dir: str | Path,
                           reference_id: str, device: torch.device | str = "cpu") -> tuple[np.ndarray, Path, bool]:
    """The reference log-probs of the sampler's examples, from `cache_dir` when this reference (its id: the
    checkpoint's path and checksum) has scored the same examples before; else computed and stored.
    Returns (log-probs [N, 2], the cache file, whether it was a hit)."""
    import hashlib

    key = hashlib.sha1(f"{reference_id}|{sampler.fingerprint()}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"reference-logps-{key}.npz"
    if path.exists():
        with np.load(path) as saved:
            if str(saved["reference"]) == reference_id and str(saved["examples"]) == sampler.fingerprint():
                return saved["logps"], path, True
    logps = reference_logps(model, sampler, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, logps=logps, reference=reference_id, examples=sampler.fingerprint())
    tmp.replace(path)
    return logps, path, False
