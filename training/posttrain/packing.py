"""SFT examples packed into fixed-length rows, best-fit decreasing, with document masking.

Each row holds whole dialogues (one truncated only when it is longer than a row). The batch carries what the
trainer's intra-document attention needs (`position_ids`, `cu_seqlens`, restarting per dialogue) and a
`loss_mask` over the targets: a target is learned only when it is an assistant token of the same dialogue as
its input, so no loss falls on user turns, on padding, or across two packed dialogues.

`PackedSFTSampler` is the trainer's Sampler: deterministic for a seed, a new order of rows every epoch, and
resumable from `state_dict()` (the step; the rows are rebuilt from the same examples).
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SFTExample:
    id: str
    source: str
    ids: np.ndarray  # int32 token ids
    learned: np.ndarray  # bool, per token: an assistant token (loss on predicting it)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncodedSet:
    examples: list[SFTExample] = field(default_factory=list)
    truncated: int = 0  # longer than a row: cut to its length
    rejected: Counter = field(default_factory=Counter)  # reason -> dialogues skipped


def encode_dialogues(dialogues: Sequence[Any], tokenizer: Any, template: Any, max_tokens: int,
                     think: bool | None = None) -> EncodedSet:
    """Dialogues (posttrain.dialogues.Dialogue) as examples of at most `max_tokens` tokens. A dialogue the template
    refuses, or with no learned token left after truncation, is counted in `rejected` by reason."""
    from mixlab.curation.chat_template import ChatFormatError

    out = EncodedSet()
    for dialogue in dialogues:
        mode = dialogue.think if dialogue.think is not None else think
        if mode is None and any(m.get("reasoning") for m in dialogue.messages):
            mode = True  # a dialogue with a reasoning trace trains the think mode unless told otherwise
        try:
            ids, learned = template.encode(tokenizer, dialogue.messages, think=mode, record=dialogue.id)
        except ChatFormatError:
            out.rejected["template"] += 1
            continue
        if len(ids) > max_tokens:
            ids, learned = ids[:max_tokens], learned[:max_tokens]
            out.truncated += 1
        if not learned[1:].any():  # the first token is never a target
            out.rejected["nothing_learned_after_truncation"] += 1
            continue
        out.examples.append(SFTExample(dialogue.id, dialogue.source, ids, learned))
    return out


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `capacity`: longest first, each into the bin it fills
    best (the least room left that still fits it). Ties keep input order, so the result is deterministic."""
    if any(n > capacity or n <= 0 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]; truncate examples to the row length first")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            left, b = capacity - lengths[i], len(bins) - 1
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, b))
    return bins


@dataclass
class PackedBatch:
    tokens: np.ndarray  # int64 [rows, seq_len + 1]
    loss_mask: np.ndarray  # bool [rows, seq_len], over tokens[:, 1:]
    position_ids: np.ndarray  # int64 [rows, seq_len]
    cu_seqlens: list[np.ndarray]  # per row: int32 offsets of its dialogues (and padding), 0 .. seq_len
    sources: list[str]  # the source with most learned tokens in each row
    stage: str
    ids: list[list[str]]  # dialogue ids of each row


def pack_row(examples: Sequence[SFTExample], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """One row of seq_len + 1 tokens from whole examples: (tokens, loss_mask, position_ids, cu_seqlens)."""
    width = seq_len + 1
    tokens = np.full(width, pad_id, dtype=np.int64)
    learned = np.zeros(width, dtype=bool)
    doc = np.full(width, -1, dtype=np.int64)
    positions = np.zeros(width, dtype=np.int64)
    at, starts = 0, []
    for d, example in enumerate(examples):
        n = len(example)
        if at + n > width:
            raise ValueError(f"examples of {at + n} tokens do not fit a row of {width}")
        tokens[at:at + n], learned[at:at + n], doc[at:at + n] = example.ids, example.learned, d
        positions[at:at + n] = np.arange(n)
        starts.append(at)
        at += n
    if at < width:  # padding: one more "document" of its own, never learned
        doc[at:] = len(examples)
        positions[at:] = np.arange(width - at)
        starts.append(at)
    # a target is learned when it is an assistant token of the input's own dialogue
    loss_mask = learned[1:] & (doc[1:] == doc[:-1])
    offsets = sorted({s for s in starts if s < seq_len} | {0, seq_len})
    return tokens, loss_mask, positions[:-1], np.asarray(offsets, dtype=np.int32)


class EpochSampler:
    """A fixed list of items (packed rows, preference examples) in a new seeded order every epoch, batch_size per
    step; `next_batch(rank, world)` gives a data-parallel rank its share, every rank advancing the same state.
    Resumable from `state_dict()`: the step, checked against a fingerprint of the items."""

    kind = "epochs"

    def __init__(self, count: int, batch_size: int, seed: int, fingerprint: str, what: str):
        if count < batch_size:
            raise ValueError(f"{count} {what}, fewer than batch_size={batch_size}: lower train.batch_size, or add data")
        self.count, self.batch_size, self.seed, self.step = count, batch_size, seed, 0
        self._fingerprint = fingerprint

    @property
    def steps_per_epoch(self) -> int:
        return self.count // self.batch_size

    def _chosen(self, rank: int, world_size: int) -> np.ndarray:
        """The items of this step for this rank (and the step advances)."""
        epoch, within = divmod(self.step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        chosen = order[within * self.batch_size:(within + 1) * self.batch_size]
        share = self.batch_size // world_size
        self.step += 1
        return chosen[rank * share:(rank + 1) * share]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "step": self.step, "seed": self.seed, "items": self._fingerprint,
                "count": self.count, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("kind", "seed", "items", "count", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"saved {key}={state.get(key)!r} but this sampler has {mine[key]!r}: build it from "
                                 "the same data, tokenizer, template, seed, seq_len and batch_size")
        self.step = int(state["step"])


def fingerprint(arrays: Sequence[np.ndarray], *facts: Any) -> str:
    digest = hashlib.sha1(repr(facts).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


class PackedSFTSampler(EpochSampler):
    """SFT examples packed into rows (best-fit decreasing), the rows in a new order every epoch."""

    kind = "packed_sft"

    def __init__(self, examples: Sequence[SFTExample], seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 stage: str = "sft", pack: bool = True):
        """pack=False: one example per row (for a backend without document masking: nothing to attend across)."""
        if not examples:
            raise ValueError("no SFT examples to pack: the dialogues were all rejected or none were given")
        self.examples, self.seq_len, self.pad_id, self.stage = list(examples), seq_len, pad_id, stage
        too_long = [e.id for e in self.examples if len(e) > seq_len + 1]
        if too_long:
            raise ValueError(f"{len(too_long)} examples exceed seq_len + 1 = {seq_len + 1} tokens (e.g. "
                             f"{too_long[0]!r}): encode them with max_tokens=seq_len + 1")
        self.rows = (best_fit_decreasing([len(e) for e in self.examples], seq_len + 1) if pack
                     else [[i] for i in range(len(self.examples))])
        arrays = [a for e in self.examples for a in (e.ids, e.learned)]
        super().__init__(len(self.rows), batch_size, seed, fingerprint(arrays, seq_len, pad_id, pack), "packed rows")

    def packing_efficiency(self) -> float:
        """Share of row tokens that are dialogue tokens (the rest is padding)."""
        return sum(len(e) for e in self.examples) / (len(self.rows) * (self.seq_len + 1))

    def next_batch(self, rank: int = 0, world_size: int = 1) -> PackedBatch:
        chosen = self._chosen(rank, world_size)
        parts = [pack_row([self.examples[i] for i in self.rows[r]], self.seq_len, self.pad_id) for r in chosen]
        sources = []
        for r in chosen:
            weight: Counter = Counter()
            for i in self.rows[r]:
                weight[self.examples[i].source] += int(self.examples[i].learned.sum())
            sources.append(weight.most_common(1)[0][0])
        return PackedBatch(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]),
                           np.stack([p[2] for p in parts]), [p[3] for p in parts], sources, self.stage,
                           [[self.examples[i].id for i in self.rows[r]] for r in chosen])
