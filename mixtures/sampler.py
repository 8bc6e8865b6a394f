"""The mixture sampler: batches of fixed-length windows drawn from several token sources by a schedule.

Everything random is a pure function of the seed and a counter, so the sampler's state is a handful of
integers and a resumed run continues bit for bit:
- the source of each sequence in step `s` comes from a Philox stream keyed by the seed with counter `s`;
- each source is cut into fixed windows of `seq_len + 1` tokens (stride `seq_len`, as nanotron does) over its
  flat token stream, visited in a permutation keyed by (seed, source, epoch) that is recomputed, not stored;
- per source only the position in that permutation (cursor) and the epoch are kept.
Epochs per source are the repetition the playbook warns about; tokens per source are the realised mixture
that the report plots.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from mixlab.curation import TokenSource
from mixlab.mixtures.schedule import MixtureSchedule

SAMPLER_STATE_VERSION = 1
_SOURCE_CHOICE_STREAM = 0  # third Philox counter word: separates the purposes of random draws
_PERMUTATION_STREAM = 1


class SamplerStateError(ValueError):
    """A saved sampler state that does not fit this sampler; the message says what changed."""


@dataclass
class SampledBatch:
    """One global batch: `tokens[:, :-1]` are inputs, `tokens[:, 1:]` targets."""

    tokens: np.ndarray  # int64 [batch_size, seq_len + 1]
    sources: list[str]  # source of each row
    stage: str
    step: int  # the step this batch belongs to (0-based)


@dataclass
class _SourceCursor:
    cursor: int = 0  # next position in the current epoch's permutation
    epoch: int = 0
    tokens: int = 0  # tokens consumed (seq_len per sequence: the trained positions)
    sequences: int = 0


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _philox(seed: int, stream_key: int, counter_high: int, purpose: int) -> np.random.Generator:
    """A generator for one (seed, stream, counter) cell; the low counter word stays free for the draws."""
    bits = np.random.Philox(
        key=np.array([seed, stream_key], dtype=np.uint64), counter=[0, counter_high, purpose, 0]
    )
    return np.random.Generator(bits)


class MixtureSampler:
    """Deterministic, resumable batches from several `TokenSource`s following a `MixtureSchedule`.

    `total_tokens` is the training budget: progress = tokens drawn / total_tokens decides the stage.
    Sources missing from the schedule get weight zero; schedule sources missing from `sources` are an error.
    """

    def __init__(
        self,
        schedule: MixtureSchedule,
        sources: Mapping[str, TokenSource],
        seq_len: int,
        batch_size: int,
        total_tokens: int,
        seed: int = 0,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        schedule.check_sources(sources)
        self.schedule = schedule
        self.sources = dict(sorted(sources.items()))
        self.names = list(self.sources)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.total_tokens = int(total_tokens)
        self.seed = int(seed)
        self.tokens_per_step = seq_len * batch_size
        self.total_steps = max(1, math.ceil(self.total_tokens / self.tokens_per_step))
        self.num_windows = {name: max(0, (len(src) - 1) // seq_len) for name, src in self.sources.items()}
        for stage in schedule.stages:
            for name, weight in stage.weights.items():
                if weight > 0 and self.num_windows[name] == 0:
                    raise ValueError(
                        f"source {name!r} has {len(self.sources[name])} tokens, fewer than one window of "
                        f"{seq_len + 1}; give it more data, a shorter seq_len, or weight 0 in stage {stage.name!r}"
                    )
        # cumulative weights per stage, over self.names; the last entry is exactly 1
        self._cumulative = []
        for stage in schedule.stages:
            weights = stage.normalized_weights
            cum = np.cumsum([weights.get(name, 0.0) for name in self.names])
            cum[-1] = 1.0
            self._cumulative.append(cum)
        self.step = 0
        self.state = {name: _SourceCursor() for name in self.names}
        self._permutations: dict[str, tuple[int, np.ndarray]] = {}

    # ---- the stream -------------------------------------------------------------------------
    def stage_index(self, step: int | None = None) -> int:
        """Index of the stage in force at `step` (default: the next step). This is the rule that switches stages."""
        step = self.step if step is None else step
        return self.schedule.stage_index_at(step / self.total_steps)

    def stage_start_step(self, stage: int | str) -> int:
        """First step (0-based `next_batch` call) drawn from `stage` (an index, negative counts from the end, or a
        name), by exactly the rule `stage_index` switches with. A stage too short to get a step of its own starts
        where the next one does; a stage that starts after the budget gives `total_steps` or more.

        Pin the LR decay to the data's decay stage with it: `TrainConfig(decay_start_step=
        sampler.stage_start_step(-1))` (divided by grad_accum when one optimizer step draws several batches).
        """
        index = self._stage_position(stage)
        if index == 0:
            return 0
        # stage_index is non-decreasing in the step: start at the exact-arithmetic boundary, then settle on the
        # first step the float rule actually puts in this stage (or a later one)
        step = max(0, math.ceil(self.schedule.boundaries[index] * self.total_steps))
        while step > 0 and self.stage_index(step - 1) >= index:
            step -= 1
        while self.stage_index(step) < index:
            step += 1
        return step

    def _stage_position(self, stage: int | str) -> int:
        names = [s.name for s in self.schedule.stages]
        if isinstance(stage, str):
            if stage not in names:
                raise ValueError(f"no stage named {stage!r} in the mixture schedule; stages: {names}")
            return names.index(stage)
        if not -len(names) <= stage < len(names):
            raise ValueError(f"stage index {stage} out of range for the {len(names)} stages {names}")
        return stage % len(names)

    def sources_for_step(self, step: int) -> list[str]:
        """The source of every row of step `step`: a pure function of (seed, step, schedule)."""
        uniforms = _philox(self.seed, 0, step, _SOURCE_CHOICE_STREAM).random(self.batch_size)
        cum = self._cumulative[self.stage_index(step)]
        return [self.names[i] for i in np.searchsorted(cum, uniforms, side="right")]

    def permutation(self, name: str, epoch: int) -> np.ndarray:
        """Window order of `name` in `epoch`; cached for the current epoch only."""
        cached = self._permutations.get(name)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = _philox(self.seed, _name_key(name), epoch, _PERMUTATION_STREAM).permutation(
            self.num_windows[name]
        )
        self._permutations[name] = (epoch, order)
        return order

    def _next_window(self, name: str) -> np.ndarray:
        state = self.state[name]
        window = int(self.permutation(name, state.epoch)[state.cursor])
        state.cursor += 1
        if state.cursor == self.num_windows[name]:
            state.cursor, state.epoch = 0, state.epoch + 1
        state.tokens += self.seq_len
        state.sequences += 1
        return self.sources[name].read(window * self.seq_len, self.seq_len + 1)

    def next_batch(self) -> SampledBatch:
        names = self.sources_for_step(self.step)
        stage = self.schedule.stages[self.stage_index()].name
        tokens = np.stack([self._next_window(name) for name in names])
        batch = SampledBatch(tokens=tokens, sources=names, stage=stage, step=self.step)
        self.step += 1
        return batch

    def __iter__(self):
        while self.step < self.total_steps:
            yield self.next_batch()

    # ---- accounting -------------------------------------------------------------------------
    def tokens_by_source(self) -> dict[str, int]:
        return {name: s.tokens for name, s in self.state.items()}

    def epochs_by_source(self) -> dict[str, float]:
        """Passes over each source so far (1.5 = every window seen once and half of them twice)."""
        return {
            name: s.epoch + s.cursor / self.num_windows[name] if self.num_windows[name] else 0.0
            for name, s in self.state.items()
        }

    def expected_epochs(self) -> dict[str, float]:
        """Epochs each source will reach by the end of the budget, if the schedule is followed."""
        result = dict.fromkeys(self.names, 0.0)
        starts = [self.stage_start_step(i) for i in range(len(self.schedule.stages))]
        ends = [*starts[1:], self.total_steps]
        for stage, start, end in zip(self.schedule.stages, starts, ends, strict=True):
            steps = max(0, min(end, self.total_steps) - start)
            for name, weight in stage.normalized_weights.items():
                if self.num_windows.get(name):
                    result[name] += steps * self.batch_size * weight / self.num_windows[name]
        return result

    # ---- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state: enough to continue the exact same stream."""
        return {
            "version": SAMPLER_STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "total_tokens": self.total_tokens,
            "schedule_fingerprint": self.schedule.fingerprint(),
            "sources": {
                name: {
                    "cursor": s.cursor,
                    "epoch": s.epoch,
                    "tokens": s.tokens,
                    "sequences": s.sequences,
                    "num_windows": self.num_windows[name],
                }
                for name, s in self.state.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a saved position; the continued stream is bit-identical to an uninterrupted run.

        A changed token budget (a run extended or shortened) is accepted with a warning: stage boundaries
        move with it, so the warning says when that changes the stage in force. A changed schedule or
        changed data raise unless `strict=False` (e.g. a new decay mix started from a stable checkpoint),
        which warns and continues from the saved cursors. Seed, seq_len and batch_size must match.
        """
        if state.get("version") != SAMPLER_STATE_VERSION:
            raise SamplerStateError(
                f"sampler state version {state.get('version')!r}, expected {SAMPLER_STATE_VERSION}"
            )
        for key in ("seed", "seq_len", "batch_size"):
            if state[key] != getattr(self, key):
                raise SamplerStateError(
                    f"saved sampler has {key}={state[key]} but this one has {getattr(self, key)}; "
                    f"windows and draws depend on it, so resume with {key}={state[key]}"
                )
        changes = []
        if state["schedule_fingerprint"] != self.schedule.fingerprint():
            changes.append("the mixture schedule changed")
        if state["total_tokens"] != self.total_tokens:
            self._warn_budget_change(int(state["total_tokens"]), int(state["step"]))
        saved_sources = state["sources"]
        for name in self.names:
            if name in saved_sources and saved_sources[name]["num_windows"] != self.num_windows[name]:
                changes.append(
                    f"source {name!r} has {self.num_windows[name]} windows, {saved_sources[name]['num_windows']} "
                    "when saved (its data changed)"
                )
        new_sources = [n for n in self.names if n not in saved_sources]
        if new_sources:
            changes.append(f"sources {new_sources} are new (they start at epoch 0)")
        if changes:
            message = "sampler state does not match: " + "; ".join(changes)
            if strict:
                raise SamplerStateError(
                    message + ". Pass strict=False to continue anyway from the saved position."
                )
            warnings.warn(message + "; continuing from the saved position", stacklevel=2)

        self.step = int(state["step"])
        self.state = {name: _SourceCursor() for name in self.names}
        for name, saved in saved_sources.items():
            if name not in self.state:
                continue  # a source dropped from this run: its history stays in the old checkpoint
            cursor, epoch = int(saved["cursor"]), int(saved["epoch"])
            if cursor >= self.num_windows[name] > 0:  # fewer windows now: start the next epoch
                cursor, epoch = 0, epoch + 1
            self.state[name] = _SourceCursor(cursor, epoch, int(saved["tokens"]), int(saved["sequences"]))
        self._permutations.clear()

    def _warn_budget_change(self, saved_total_tokens: int, step: int) -> None:
        saved_steps = max(1, math.ceil(saved_total_tokens / self.tokens_per_step))
        before = self.schedule.stages[self.schedule.stage_index_at(step / saved_steps)].name
        now = self.schedule.stages[self.stage_index(step)].name
        moved = f"; at step {step} the stage changes from {before!r} to {now!r}" if before != now else ""
        warnings.warn(
            f"total_tokens changed from {saved_total_tokens} to {self.total_tokens}: stage boundaries move "
            f"to steps {[self.stage_start_step(i) for i in range(len(self.schedule.stages))]}{moved}",
            stacklevel=3,
        )


def val_windows(source: TokenSource, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Held-out evaluation windows [N, seq_len + 1] int64 from a (validation) source.

    Windows have stride `seq_len` so that every target token is scored once; with `max_windows` they are
    evenly spaced over the whole source, so every document region is represented and the set never changes
    between evaluations.
    """
    count = max(0, (len(source) - 1) // seq_len)
    if max_windows is not None and count > max_windows:
        picks = np.linspace(0, count - 1, max_windows).round().astype(np.int64)
    else:
        picks = np.arange(count, dtype=np.int64)
    if len(picks) == 0:
        return np.zeros((0, seq_len + 1), dtype=np.int64)
    return np.stack([source.read(int(w) * seq_len, seq_len + 1) for w in picks])
