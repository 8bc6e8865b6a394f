"""The mixture sampler: batches of fixed-length windows drawn from several token streams by a schedule.

Everything random is a pure function of the seed and a counter, so the sampler's state is a handful of
integers and a resumed run continues bit for bit, whatever the data-parallel degree:
- the leaf (source or selection) of every row comes from uniforms drawn per block of steps
  (`block_steps(batch_size)` steps at once, a Philox stream keyed by the seed with the block as counter)
  and the weights in force at each step (`ResolvedSchedule.weights_matrix`, or a `set_weights` override,
  which holds from the next step to the end of its stage, and is saved in the state);
- each leaf is cut into fixed windows of `seq_len + 1` tokens (stride `seq_len`, as nanotron does) over its
  flat token stream, visited in a permutation keyed by (seed, leaf, pass, seq_len) that is recomputed, not
  stored; per leaf only the pass number, the position in the pass (cursor) and the grid's seq_len are kept.
  Whatever the weights do (stage boundaries, curricula, adaptive policies), a leaf's windows are served in
  its permutation's order: none twice within a pass, none skipped;
- a stage with another seq_len puts a leaf on another window grid. The first time a leaf is drawn at the
  new seq_len it starts a new pass on that grid (its partial pass on the old grid is closed and counted in
  `epochs_by_source` as the fraction it reached); going back to the old seq_len later starts yet another
  pass, never a repeat of an old permutation;
- data parallelism: the global batch is fixed; rank r of dp takes rows [r*B/dp, (r+1)*B/dp), and every rank
  advances every leaf's cursor (reading only its own rows), so the state is the same on all ranks and a
  run resumes bit-identically with another dp;
- `packing="documents"` adds, per row, position ids that restart at every document start inside the row
  and `cu_seqlens` offsets of its documents (from the leaf's `doc_ends`). A row that starts inside a
  document counts that document's positions from 0: positions then never exceed the row length, so a
  stage's seq_len bounds them, and with intra-document masking the earlier part is not visible anyway.
Speed without state: the window starts of a run of steps (up to a block, inside one stage) are computed at
once per leaf from its pass order (the "plan"), and a rank's rows of the next steps are read ahead in one
gather per shard from strided window views of the memory maps (about 8 MiB at most), so batches are views
into that read-ahead. Cursors move only as steps are served, so a state saved at any step is the same however
plans were cut; memory is bounded by the data (permutations, document ends), never by the number of steps.
Epochs per leaf are the repetition the playbook warns about; tokens per leaf are the realised mixture
that the report plots.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from mixlab.curation import TokenSource, TokenStream
from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError

SAMPLER_STATE_VERSION = 2
_SOURCE_CHOICE_STREAM = 0  # third Philox counter word: separates the purposes of random draws
_PERMUTATION_STREAM = 1
_MAX_BLOCK_STEPS = 1024
_BLOCK_DRAWS = 2**20  # uniforms cached per block at most (8 MiB)
PACKINGS = ("window", "documents")


class SamplerStateError(ValueError):
    """A saved sampler state that does not fit this sampler; the message says what changed."""


@dataclass
class SampledBatch:
    """One batch (the global batch, or one data-parallel rank's rows of it): `tokens[:, :-1]` are inputs,
    `tokens[:, 1:]` targets. `starts` are the rows' offsets in their leaf's stream (which tokens were seen).
    Arrays may be views of the sampler's read-ahead: copy them before writing into them."""

    tokens: np.ndarray  # int64 [rows, seq_len + 1]
    sources: list[str]  # leaf of each row
    stage: str
    step: int  # the step this batch belongs to (0-based)
    seq_len: int = 0
    position_ids: np.ndarray | None = None  # int64 [rows, seq_len], packing="documents"
    cu_seqlens: list[np.ndarray] | None = None  # per row: int32 document offsets, 0 first, seq_len last
    starts: np.ndarray | None = None  # int64 [rows]


@dataclass
class _SourceCursor:
    """Position of one leaf: pass `epoch` on the grid of `seq_len`, `cursor` windows into it."""

    cursor: int = 0  # next position in the current pass's permutation
    epoch: int = 0  # pass number (passes on every grid count)
    seq_len: int | None = None  # grid of the current pass; None before the first draw
    tokens: int = 0  # tokens consumed (seq_len per sequence: the trained positions)
    sequences: int = 0
    closed: list[list[int]] = field(default_factory=list)  # [seq_len, cursor] of passes left at a grid change

    def to_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "epoch": self.epoch, "seq_len": self.seq_len, "tokens": self.tokens,
                "sequences": self.sequences, "closed": [list(c) for c in self.closed]}


@dataclass
class _Override:
    """Weights set by `set_weights`: in force from `from_step` to the end of stage `stage`."""

    weights: np.ndarray  # over the sampler's names, sums to 1
    from_step: int
    stage: int
    cause: str


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _philox(seed: int, stream_key: int, counter_high: int, purpose: int, extra: int = 0) -> np.random.Generator:
    """A generator for one (seed, stream, counter, extra) cell; the low counter word stays free for the draws."""
    bits = np.random.Philox(
        key=np.array([seed, stream_key], dtype=np.uint64), counter=[0, counter_high, purpose, extra]
    )
    return np.random.Generator(bits)


def block_steps(batch_size: int) -> int:
    """Steps whose leaf choices are drawn at once: part of the stream's definition (fixed by batch_size)."""
    return max(1, min(_MAX_BLOCK_STEPS, _BLOCK_DRAWS // batch_size))


def _shard_arrays(source: Any) -> tuple[list[int], list[np.ndarray]] | None:
    """Shard starts and plain arrays of a TokenSource: slicing a bare ndarray is several times cheaper than
    slicing the memmap object or calling `read`. None for other streams (a selection view reads itself)."""
    if not isinstance(source, TokenSource) or not source.shards:
        return None
    starts = [0, *np.cumsum([len(shard) for shard in source.shards]).tolist()]
    return starts, [shard.tokens.view(np.ndarray) for shard in source.shards]


class MixtureSampler:
    """Deterministic, resumable batches from several token streams following a `MixtureSchedule`.

    The budget is `total_steps`, or `total_tokens` (steps = ceil(total_tokens / (batch_size * seq_len))).
    Leaves missing from the schedule get weight zero; schedule leaves with weight but missing from `sources`
    are an error. A hierarchical schedule is flattened with the sources' token counts.
    """

    def __init__(
        self,
        schedule: MixtureSchedule,
        sources: Mapping[str, TokenStream],
        seq_len: int,
        batch_size: int,
        total_tokens: int | None = None,
        seed: int = 0,
        *,
        total_steps: int | None = None,
        packing: Literal["window", "documents"] = "window",
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if (total_tokens is None) == (total_steps is None):
            raise ValueError("give the budget as exactly one of total_tokens= or total_steps=")
        self.schedule = schedule
        self.sources = dict(sorted(sources.items()))
        self.names = list(self.sources)
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = int(seed)
        self.packing = packing
        self.tokens_per_step = seq_len * batch_size
        if total_steps is not None:
            if total_steps < 1:
                raise ValueError(f"total_steps must be >= 1, got {total_steps}")
            self.total_steps = int(total_steps)
            self.total_tokens = self.total_steps * self.tokens_per_step
        else:
            self.total_tokens = int(total_tokens)
            self.total_steps = max(1, math.ceil(self.total_tokens / self.tokens_per_step))
        if not schedule.is_flat:
            schedule = schedule.flatten({name: len(src) for name, src in self.sources.items()})
        self._flat_schedule = schedule
        self.resolved = schedule.resolve(self.total_steps, batch_size, seq_len)
        self._columns = self._schedule_columns(self.resolved)
        self._check_windows()
        self._index = {name: i for i, name in enumerate(self.names)}
        self._lengths = [len(src) for src in self.sources.values()]
        self._arrays = [_shard_arrays(src) for src in self.sources.values()]
        self._views: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        self._all_ends: np.ndarray | None = None
        self._windows: dict[tuple[int, int], int] = {}
        self.num_windows = {name: self.windows(name, seq_len) for name in self.names}
        self._block_steps = block_steps(batch_size)
        self._reset_position(0)
        self._override: _Override | None = None

    # ---- schedule -----------------------------------------------------------------------------
    def _schedule_columns(self, resolved: Any) -> np.ndarray:
        """Column of each schedule leaf in `self.names`; -1 for a leaf that is never weighted (and not given)."""
        columns = []
        for leaf in resolved.sources:
            columns.append(self.names.index(leaf) if leaf in self.sources else -1)
        missing_by_stage: dict[str, list[str]] = {}
        for stage in resolved.stages:
            for step in {stage.start_step, max(stage.start_step, stage.end_step - 1)}:
                weights = resolved.weights_at_step(step)
                missing = sorted(n for n, w in weights.items() if w > 0 and n not in self.sources)
                if missing:
                    missing_by_stage.setdefault(stage.name, []).extend(m for m in missing if m not in
                                                                       missing_by_stage.get(stage.name, []))
        if missing_by_stage:
            name, missing = next(iter(missing_by_stage.items()))
            raise ScheduleError(
                f"stage {name!r} weights sources {missing} that are not available "
                f"(available: {self.names}); tokenize them or remove them from the schedule"
            )
        return np.array(columns, dtype=np.int64)

    def _check_windows(self) -> None:
        for stage in self.resolved.stages:
            for step in {stage.start_step, max(stage.start_step, stage.end_step - 1)}:
                for name, weight in self.resolved.weights_at_step(step).items():
                    if weight > 0 and (len(self.sources[name]) - 1) // stage.seq_len < 1:
                        raise ValueError(
                            f"source {name!r} has {len(self.sources[name])} tokens, fewer than one window of "
                            f"{stage.seq_len + 1}; give it more data, a shorter seq_len, or weight 0 in stage "
                            f"{stage.name!r}"
                        )

    def windows(self, name: str, seq_len: int | None = None) -> int:
        """Windows of `seq_len + 1` tokens (stride seq_len) in leaf `name`: the length of one pass."""
        seq_len = seq_len or self.seq_len
        key = (self.names.index(name), seq_len)
        if key not in self._windows:
            self._windows[key] = max(0, (len(self.sources[name]) - 1) // seq_len)
        return self._windows[key]

    def stage_index(self, step: int | None = None) -> int:
        """Index of the stage in force at `step` (default: the next step). This is the rule that switches stages."""
        return self.resolved.stage_index_at_step(self.step if step is None else step)

    def stage_start_step(self, stage: int | str) -> int:
        """First step (0-based `next_batch` call) drawn from `stage` (an index, negative counts from the end, or a
        name). A stage too short to get a step of its own starts where the next one does; a stage that starts
        after the budget gives `total_steps` or more.

        Pin the LR decay to the data's decay stage with it: `TrainConfig(decay_start_step=
        sampler.stage_start_step(-1))` (divided by grad_accum when one optimizer step draws several batches).
        """
        return self.resolved.stage_start_step(stage)

    def seq_len_at_step(self, step: int) -> int:
        return self.resolved.stages[self.stage_index(step)].seq_len

    # ---- weights ------------------------------------------------------------------------------
    def _schedule_weights(self, start: int, end: int) -> np.ndarray:
        """[end - start, len(names)] weights of the schedule (past the budget: the last stage's)."""
        out = np.zeros((end - start, len(self.names)))
        keep = self._columns >= 0
        matrix = self.resolved.weights_matrix(start, end)
        out[:, self._columns[keep]] = matrix[:, keep]
        return out

    def _weights(self, start: int, end: int) -> np.ndarray:
        """Weights in force at steps [start, end): the schedule's, or the override inside its stage."""
        matrix = self._schedule_weights(start, end)
        override = self._override
        if override is not None and end > override.from_step:
            first = max(start, override.from_step)
            stage = self.resolved.stages[override.stage]
            last_stage = override.stage == len(self.resolved.stages) - 1
            stop = end if last_stage else min(end, max(stage.end_step, first))
            if stop > first:
                matrix[first - start : stop - start] = override.weights
        return matrix

    def current_weights(self) -> dict[str, float]:
        """Weights the next step draws with (over every leaf, sums to 1)."""
        row = self._weights(self.step, self.step + 1)[0]
        return {name: float(w) for name, w in zip(self.names, row, strict=True)}

    def set_weights(self, weights: Mapping[str, float], cause: str = "") -> None:
        """Draw with `weights` from the next step on, until the end of the stage in force (the next stage takes
        the schedule's weights again). Leaves not named get weight 0; the weights are normalised. Saved in
        `state_dict`. Windows keep their per-leaf order: no window is repeated or skipped by a change."""
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"set_weights: unknown leaves {unknown}; this sampler draws from {self.names}")
        vector = np.zeros(len(self.names))
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, int | float | np.floating | np.integer):
                raise ValueError(f"set_weights: weight of {name!r} must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"set_weights: weight of {name!r} must be finite and >= 0, got {weight}")
            vector[self._index[name]] = float(weight)
        if vector.sum() <= 0:
            raise ValueError(f"set_weights: all weights are zero ({dict(weights)}); give one leaf a positive weight")
        vector /= vector.sum()
        seq_len = self.seq_len_at_step(self.step)
        empty = [n for n, w in zip(self.names, vector, strict=True) if w > 0 and not self.windows(n, seq_len)]
        if empty:
            raise ValueError(f"set_weights: leaves {empty} have no window of {seq_len + 1} tokens at step "
                             f"{self.step}; give them weight 0")
        self._sync()
        self._override = _Override(vector, self.step, self.stage_index(self.step), str(cause))
        self._block = -1  # the uniforms stay valid; the choices are recomputed with the new weights
        self._plan = self._chunk = None

    # ---- source choice ------------------------------------------------------------------------
    def _uniforms(self, block: int) -> np.ndarray:
        k = self._block_steps
        return _philox(self.seed, 0, block, _SOURCE_CHOICE_STREAM).random((k, self.batch_size))

    def _choices(self, block: int, uniforms: np.ndarray) -> np.ndarray:
        """Leaf index of every row of every step of `block`, by the weights in force at each step."""
        k = self._block_steps
        weights = self._weights(block * k, (block + 1) * k)
        choices = np.empty((k, self.batch_size), dtype=np.int64)
        # rows with the same weights share one cumulative table (a stage without curriculum: the whole block)
        changes = np.flatnonzero(np.any(weights[1:] != weights[:-1], axis=1)) + 1
        bounds = [0, *changes.tolist(), k]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            row = weights[a]
            cumulative = np.cumsum(row / row.sum())
            cumulative[np.flatnonzero(row > 0)[-1] :] = 1.0  # never land on a trailing zero-weight leaf
            choices[a:b] = np.searchsorted(cumulative, uniforms[a:b], side="right")
        return choices

    def _block_choices(self, step: int) -> np.ndarray:
        block = step // self._block_steps
        if block != self._block:
            if block != self._uniform_block:
                self._uniform_block, self._block_uniforms = block, self._uniforms(block)
            self._block, self._block_rows = block, self._choices(block, self._block_uniforms)
        return self._block_rows[step - block * self._block_steps]

    def sources_for_step(self, step: int) -> list[str]:
        """The leaf of every row of step `step`: a pure function of (seed, step, schedule, weight override)."""
        return [self.names[i] for i in self._block_choices(step).tolist()]

    # ---- windows ------------------------------------------------------------------------------
    def permutation(self, name: str, epoch: int, seq_len: int | None = None) -> np.ndarray:
        """Window order of `name` in pass `epoch` on the grid of `seq_len` (default: the run's)."""
        seq_len = seq_len or self.seq_len
        i = self._index[name]
        cached = self._permutations[i]
        if cached is not None and cached[0] == (epoch, seq_len):
            return cached[1]
        order = _philox(self.seed, _name_key(name), epoch, _PERMUTATION_STREAM, seq_len).permutation(
            self.windows(name, seq_len)
        )
        self._permutations[i] = ((epoch, seq_len), order)
        return order

    # ---- the plan: window starts of a run of steps, computed at once --------------------------
    def _build_plan(self, step: int) -> None:
        """Window starts of every row of steps [step, end): same block, same stage, bounded memory.

        Each leaf's draws in the plan take the next positions of its pass order (passes wrap; a leaf on another
        grid starts a new pass), exactly as drawing row by row would. The cursors themselves move only in
        `_sync`, so a state saved at any step is the same however the plans were cut."""
        self._sync()
        block_start = step // self._block_steps * self._block_steps
        self._block_choices(step)  # loads the step's block
        seq_len = self._stage_seq_len
        end = int(min(block_start + self._block_steps, self._stage_end))
        rows = self._block_rows[step - block_start : end - block_start]
        flat = rows.ravel()
        counts = np.bincount(flat, minlength=len(self.names))
        order = np.argsort(flat, kind="stable")
        starts = np.empty(len(flat), dtype=np.int64)
        taken = 0
        for leaf in np.flatnonzero(counts).tolist():
            need = int(counts[leaf])
            state = self._cursors[leaf]
            epoch, cursor = state.epoch, state.cursor
            if state.seq_len != seq_len and cursor:
                epoch, cursor = epoch + 1, 0
            windows = self.windows(self.names[leaf], seq_len)
            parts = []
            while need:
                take = min(need, windows - cursor)
                parts.append(self.permutation(self.names[leaf], epoch, seq_len)[cursor : cursor + take])
                need -= take
                cursor += take
                if cursor == windows:
                    epoch, cursor = epoch + 1, 0
            starts[order[taken : taken + counts[leaf]]] = np.concatenate(parts) * seq_len
            taken += int(counts[leaf])
        self._plan = (step, end, seq_len, rows, starts.reshape(rows.shape))
        self._chunk = None

    def _sync(self) -> None:
        """Move the cursors over the steps served from the plan since the last sync."""
        plan = self._plan
        if plan is None or self._synced >= self.step:
            return
        first, _, seq_len, rows, _ = plan
        served = rows[self._synced - first : self.step - first].ravel()
        counts = np.bincount(served, minlength=len(self.names))
        for leaf in np.flatnonzero(counts).tolist():
            count = int(counts[leaf])
            state = self._cursors[leaf]
            if state.seq_len != seq_len:
                if state.cursor:  # close the partial pass on the old grid: a new pass starts on this one
                    state.closed.append([state.seq_len, state.cursor])
                    state.cursor, state.epoch = 0, state.epoch + 1
                state.seq_len = seq_len
            position = state.cursor + count
            windows = self.windows(self.names[leaf], seq_len)
            state.epoch += position // windows
            state.cursor = position % windows
            state.tokens += count * seq_len
            state.sequences += count
        self._synced = self.step

    @property
    def state(self) -> dict[str, _SourceCursor]:
        """Per-leaf position (cursor, pass, grid) and counts after the steps drawn so far."""
        self._sync()
        return dict(zip(self.names, self._cursors, strict=True))

    def next_batch(self, dp_rank: int = 0, dp_size: int = 1) -> SampledBatch:
        """The next step's rows [dp_rank*B/dp_size, (dp_rank+1)*B/dp_size) of the global batch. Every rank
        advances all leaves' cursors, so all ranks keep the same state."""
        if dp_size != 1 or dp_rank != 0:
            self._check_rank(dp_rank, dp_size)
        step = self.step
        if not self._stage_begin <= step < self._stage_end:
            self._enter_stage(step)
        plan = self._plan
        if plan is None or not plan[0] <= step < plan[1]:
            self._build_plan(step)
            plan = self._plan
        chunk = self._chunk
        if chunk is None or chunk[0] != (dp_rank, dp_size) or not chunk[1] <= step < chunk[2]:
            chunk = self._read_ahead(step, dp_rank, dp_size)
        first, _, seq_len, rows, starts = plan
        per_rank = self.batch_size // dp_size
        lo = dp_rank * per_rank
        k = (step - chunk[1]) * per_rank
        names = self.names
        batch = SampledBatch(
            tokens=chunk[3][k : k + per_rank], sources=[names[i] for i in rows[step - first, lo : lo + per_rank].tolist()],
            stage=self._stage_name, step=step, seq_len=seq_len, starts=starts[step - first, lo : lo + per_rank].copy(),
        )
        if chunk[4] is not None:
            batch.position_ids, batch.cu_seqlens = chunk[4][k : k + per_rank], chunk[5][k : k + per_rank]
        self.step += 1
        return batch

    def _read_ahead(self, step: int, dp_rank: int, dp_size: int) -> tuple:
        """Read this rank's rows of the next steps of the plan at once (about 8 MiB of tokens at most): one
        gather per leaf and shard instead of a copy per row. Returns and caches the chunk."""
        first, end, seq_len, rows, starts = self._plan
        per_rank = self.batch_size // dp_size
        lo = dp_rank * per_rank
        stop = min(end, step + max(1, 2**20 // (per_rank * (seq_len + 1))))
        leaves = rows[step - first : stop - first, lo : lo + per_rank].ravel()
        my_starts = starts[step - first : stop - first, lo : lo + per_rank].ravel()
        tokens = self._gather(leaves, my_starts, seq_len + 1)
        positions = cu = None
        if self.packing == "documents":
            positions, cu = self._document_offsets(leaves, my_starts, seq_len)
        self._chunk = ((dp_rank, dp_size), step, stop, tokens, positions, cu)
        return self._chunk

    def _gather(self, leaves: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows [start, start + length) of their leaves' streams, int64 [len(starts), length]; starts are on the
        grid of `length - 1`, so rows are taken whole from a strided window view of each shard."""
        seq_len = length - 1
        out = np.empty((len(starts), length), dtype=np.int64)
        for leaf in np.unique(leaves).tolist():
            index = np.flatnonzero(leaves == leaf)
            windows = starts[index] // seq_len
            served = np.zeros(len(index), dtype=bool)
            for low, high, view in self._window_views(leaf, seq_len):
                pick = (windows >= low) & (windows < high)
                if pick.any():
                    out[index[pick]] = view[windows[pick] - low]
                    served |= pick
            source = self.sources[self.names[leaf]]
            for i in index[~served].tolist():  # crosses into the next shard, or a stream without shards
                out[i] = source.read(int(starts[i]), length)
        return out

    def _window_views(self, leaf: int, seq_len: int) -> list[tuple[int, int, np.ndarray]]:
        """Per shard of a TokenSource: windows [low, high) that lie inside it, as a read-only strided view
        [high - low, seq_len + 1] of the shard's memmap (no copy). Empty for other streams."""
        key = (leaf, seq_len)
        if key not in self._views:
            views = []
            arrays = self._arrays[leaf]
            for s, shard in enumerate(arrays[1] if arrays is not None else []):
                begin, end = arrays[0][s], arrays[0][s + 1]
                low, high = -(-begin // seq_len), max(0, end - 1) // seq_len
                if high > low:
                    base = shard[low * seq_len - begin :]
                    views.append((low, high, np.lib.stride_tricks.as_strided(
                        base, shape=(high - low, seq_len + 1), strides=(seq_len * base.itemsize, base.itemsize),
                        writeable=False)))
            self._views[key] = views
        return self._views[key]

    def _check_rank(self, dp_rank: int, dp_size: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size or self.batch_size % dp_size:
            raise ValueError(
                f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size and a global batch "
                f"({self.batch_size}) that is a multiple of dp_size"
            )

    def _enter_stage(self, step: int) -> None:
        index = self.stage_index(step)
        stage = self.resolved.stages[index]
        last = index == len(self.resolved.stages) - 1
        self._stage_begin = min(stage.start_step, step)
        self._stage_end = math.inf if last else stage.end_step
        self._stage_seq_len, self._stage_name = stage.seq_len, stage.name

    def __iter__(self) -> Iterator[SampledBatch]:
        while self.step < self.total_steps:
            yield self.next_batch()

    # ---- document boundaries ------------------------------------------------------------------
    def doc_ends(self, name: str) -> np.ndarray:
        """Cumulative end of every document in leaf `name`'s stream, int64."""
        i = self._index[name]
        ends = self._global_ends()
        return ends[self._doc_spans[i] : self._doc_spans[i + 1]] - self._stream_bases[i]

    def _global_ends(self) -> np.ndarray:
        """Document ends of all leaves in one array, leaf i's shifted by the tokens of leaves before it: one
        search finds the documents of every row of a batch, whatever its leaves. Built on first use."""
        if self._all_ends is None:
            ends = [np.asarray(src.doc_ends).astype(np.int64) for src in self.sources.values()]
            self._stream_bases = np.concatenate(([0], np.cumsum(self._lengths)[:-1])).astype(np.int64)
            self._doc_spans = np.concatenate(([0], np.cumsum([len(e) for e in ends]))).astype(np.int64)
            self._all_ends = np.concatenate([e + base for e, base in zip(ends, self._stream_bases, strict=True)]
                                            or [np.zeros(0, dtype=np.int64)])
        return self._all_ends

    def _document_offsets(
        self, leaves: list[int], starts: np.ndarray, seq_len: int
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Position ids (restarting at each document start) and cu_seqlens of rows [start, start + seq_len)."""
        ends = self._global_ends()
        rows = len(leaves)
        begin = starts + self._stream_bases[leaves]
        first = np.searchsorted(ends, begin, side="right")  # first document end after the row's start
        counts = np.searchsorted(ends, begin + seq_len, side="left") - first  # ends strictly inside the row
        total = int(counts.sum())
        row_of = np.repeat(np.arange(rows), counts)
        before = np.cumsum(counts) - counts
        offsets = ends[first[row_of] + np.arange(total) - before[row_of]] - begin[row_of]
        # every row's cu_seqlens is a view of one buffer: [0, inner ends..., seq_len] back to back
        width = counts + 2
        head = np.cumsum(width) - width
        buffer = np.empty(total + 2 * rows, dtype=np.int32)
        buffer[head] = 0
        buffer[head + width - 1] = seq_len
        buffer[head[row_of] + 1 + np.arange(total) - before[row_of]] = offsets
        cu = [buffer[a : a + w] for a, w in zip(head.tolist(), width.tolist(), strict=True)]
        # positions: each document segment counts from 0 (segments are consecutive buffer entries of a row)
        is_last = np.zeros(len(buffer), dtype=bool)
        is_last[head + width - 1] = True
        is_first = np.zeros(len(buffer), dtype=bool)
        is_first[head] = True
        seg_starts = buffer[~is_last].astype(np.int64)
        seg_lengths = buffer[~is_first] - seg_starts
        seg_starts += np.repeat(np.arange(rows, dtype=np.int64) * seq_len, width - 1)
        positions = np.arange(rows * seq_len, dtype=np.int64) - np.repeat(seg_starts, seg_lengths)
        positions = positions.reshape(rows, seq_len)
        return positions, cu

    # ---- accounting -------------------------------------------------------------------------
    def tokens_by_source(self) -> dict[str, int]:
        return {name: s.tokens for name, s in self.state.items()}

    def epochs_by_source(self) -> dict[str, float]:
        """Passes over each leaf so far (1.5 = every window seen once and half of them twice); a pass closed at a
        seq_len change counts with the fraction it reached."""
        result = {}
        for name, s in self.state.items():
            full = s.epoch - len(s.closed)
            partial = sum(cursor / self.windows(name, grid) for grid, cursor in s.closed)
            current = s.cursor / self.windows(name, s.seq_len) if s.seq_len and self.windows(name, s.seq_len) else 0.0
            result[name] = full + partial + current
        return result

    def expected_epochs(self) -> dict[str, float]:
        """Passes each leaf will reach by the end of the budget if the schedule is followed (each stage counts
        on its own seq_len grid)."""
        result = dict.fromkeys(self.names, 0.0)
        for stage in self.resolved.stages:
            for name, rows in self.resolved.expected_rows(stage.index).items():
                if name in result and rows > 0 and self.windows(name, stage.seq_len):
                    result[name] += rows / self.windows(name, stage.seq_len)
        return result

    # ---- checkpointing -----------------------------------------------------------------------
    def _reset_position(self, step: int) -> None:
        self.step = step
        self._cursors = [_SourceCursor() for _ in self.names]
        self._plan: tuple | None = None  # (first step, end step, seq_len, leaf of each row, row starts)
        self._chunk: tuple | None = None  # (rank key, first step, end step, tokens, position ids, cu_seqlens)
        self._synced = step
        self._permutations: list[tuple[tuple[int, int], np.ndarray] | None] = [None] * len(self.names)
        self._block = self._uniform_block = -1
        self._stage_begin, self._stage_end = 0, -1  # forces _enter_stage on the next draw

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable state: enough to continue the exact same stream (with any dp)."""
        override = self._override
        return {
            "version": SAMPLER_STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "total_steps": self.total_steps,
            "total_tokens": self.total_tokens,
            "schedule_fingerprint": self.schedule.fingerprint(),
            "weights_override": None if override is None else {
                "weights": {n: float(w) for n, w in zip(self.names, override.weights, strict=True) if w > 0},
                "from_step": override.from_step,
                "stage": self.resolved.stages[override.stage].name,
                "cause": override.cause,
            },
            "sources": {
                name: {**s.to_dict(), "stream_tokens": len(self.sources[name])} for name, s in self.state.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a saved position; the continued stream is bit-identical to an uninterrupted run, with any dp.

        A changed budget (a run extended or shortened) is accepted with a warning: stage boundaries move with
        it, so the warning says when that changes the stage in force. A changed schedule or changed data raise
        unless `strict=False` (e.g. a new decay mix started from a stable checkpoint), which warns and continues
        from the saved cursors. Seed, seq_len and batch_size must match; the data-parallel degree and the packing
        may change (the state is the same for every rank and packing only adds document offsets).
        """
        version = state.get("version")
        if version != SAMPLER_STATE_VERSION:
            old = " (written before per-stage seq_len, blocked draws and weight overrides; its stream cannot be " \
                  "continued: start a new run id, or train from the checkpoint's weights with a new sampler)" \
                if version == 1 else ""
            raise SamplerStateError(f"sampler state version {version!r}, expected {SAMPLER_STATE_VERSION}{old}")
        for key in ("seed", "seq_len", "batch_size"):
            if state[key] != getattr(self, key):
                raise SamplerStateError(
                    f"saved sampler has {key}={state[key]} but this one has {getattr(self, key)}; "
                    f"windows and draws depend on it, so resume with {key}={state[key]}"
                )
        changes = []
        if state["schedule_fingerprint"] != self.schedule.fingerprint():
            changes.append("the mixture schedule changed")
        if state["total_steps"] != self.total_steps:
            self._warn_budget_change(int(state["total_steps"]), int(state["total_tokens"]), int(state["step"]))
        saved_sources = state["sources"]
        for name in self.names:
            if name in saved_sources and saved_sources[name]["stream_tokens"] != len(self.sources[name]):
                changes.append(
                    f"source {name!r} has {len(self.sources[name])} tokens, {saved_sources[name]['stream_tokens']} "
                    "when saved (its data changed)"
                )
        new_sources = [n for n in self.names if n not in saved_sources]
        if new_sources:
            changes.append(f"sources {new_sources} are new (they start at epoch 0)")
        saved_override = state.get("weights_override")
        override = None
        if saved_override is not None:
            stage_names = [s.name for s in self.resolved.stages]
            unknown = sorted(set(saved_override["weights"]) - set(self.names))
            if unknown or saved_override["stage"] not in stage_names:
                changes.append(f"the saved weight override ({saved_override['cause'] or 'no cause'}) names leaves "
                               f"{unknown} or stage {saved_override['stage']!r} this sampler does not have (dropped)")
            else:
                vector = np.array([float(saved_override["weights"].get(n, 0.0)) for n in self.names])
                override = _Override(vector / vector.sum(), int(saved_override["from_step"]),
                                     stage_names.index(saved_override["stage"]), str(saved_override["cause"]))
        if changes:
            message = "sampler state does not match: " + "; ".join(changes)
            if strict:
                raise SamplerStateError(message + ". Pass strict=False to continue anyway from the saved position.")
            warnings.warn(message + "; continuing from the saved position", stacklevel=2)

        self._reset_position(int(state["step"]))
        self._override = override
        for name, saved in saved_sources.items():
            if name not in self._index:
                continue  # a source dropped from this run: its history stays in the old checkpoint
            cursor = self._cursors[self._index[name]]
            cursor.cursor, cursor.epoch = int(saved["cursor"]), int(saved["epoch"])
            cursor.seq_len = None if saved["seq_len"] is None else int(saved["seq_len"])
            cursor.tokens, cursor.sequences = int(saved["tokens"]), int(saved["sequences"])
            cursor.closed = [[int(g), int(c)] for g, c in saved["closed"]]
            if cursor.seq_len and cursor.cursor >= self.windows(name, cursor.seq_len) > 0:
                cursor.cursor, cursor.epoch = 0, cursor.epoch + 1  # fewer windows now: start the next pass

    def _warn_budget_change(self, saved_steps: int, saved_tokens: int, step: int) -> None:
        now = self.resolved.stages[self.stage_index(step)].name
        try:
            saved = self._flat_schedule.resolve(saved_steps, self.batch_size, self.seq_len)
            before = saved.stages[saved.stage_index_at_step(step)].name
        except ScheduleError:  # the schedule did not fit the old budget: nothing to compare with
            before = now
        moved = f"; at step {step} the stage changes from {before!r} to {now!r}" if before != now else ""
        warnings.warn(
            f"the budget changed from {saved_steps} steps ({saved_tokens} tokens) to {self.total_steps} steps "
            f"({self.total_tokens} tokens): stage boundaries move to steps "
            f"{[s.start_step for s in self.resolved.stages]}{moved}",
            stacklevel=3,
        )


def val_windows(source: TokenStream, seq_len: int, max_windows: int | None = None) -> np.ndarray:
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

