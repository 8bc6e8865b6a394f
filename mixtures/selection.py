"""Selections: mixture leaves that are a source (or several, by pattern) narrowed by per-document metadata.

A schedule's weights name *leaves*. A leaf is either a source of the manifest or a named `Selection`, e.g. the
English web documents with a language score of at least 0.9 that have no near-duplicate. Selections are realised
at the token-shard level from the per-document sidecars that `mixlab tokenize` writes beside every `.ds`
(`<shard>.ds.docs.parquet`, row i = document i of `.ds.index`), so nothing is re-tokenized and a selection's token
count is known before training from the sidecars alone (`leaf_token_counts`).

A realised selection is a `SelectionView`: the same reading interface as `TokenSource` (`len`, `read`,
`doc_ends`, `num_docs`) over the chosen documents laid back to back. It stores the chosen documents as merged
runs of the underlying flat streams, so a window read is usually a single slice of one memory-mapped shard.

`where` filters, one per sidecar column, all of which must hold:
    {"language": "en"}                       equality
    {"language": ["fr", "de"]}               membership
    {"language_score": {"min": 0.9}}         inclusive range (`min`, `max` or both)
    {"minhash_cluster_size": {"max": 1}}     ... on any column: tokens, chars, kind, programming_language, ...
A document whose value is null matches no filter on that column.

Long-document upsampling (`LongDocUpsample(min_tokens, factor)`) repeats every selected document of at least
`min_tokens` tokens `factor` times in all: the view is one pass over the selection followed by `factor - 1`
passes over its long documents only, so the repeats are spread over the stream rather than back to back.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
from mixlab.curation.manifest import ManifestError, ShardManifest
from mixlab.curation.metadata_filter import (  # noqa: F401  (GLOB_CHARS, RANGE_KEYS: re-exported)
    GLOB_CHARS,
    RANGE_KEYS,
    MetadataFilterError,
    MetadataQuery,
    check_condition,
    where_to_dict,
)
from mixlab.curation.token_shards import (
    DocColumnError,
    TokenShardError,
    TokenSource,
    TokenStream,  # noqa: F401  (re-exported: the reading interface a view implements)
    read_doc_metadata,
)

if TYPE_CHECKING:  # schedule.py imports this module: the type only, no import cycle
    from mixlab.mixtures.schedule import MixtureSchedule


class SelectionError(MetadataFilterError):
    """A selection that cannot be realised: unknown source or column, nothing matched, a malformed filter."""


@dataclass(frozen=True)
class LongDocUpsample:
    """Repeat documents of at least `min_tokens` tokens `factor` times in all (factor 1 = no repeat)."""

    min_tokens: int
    factor: int

    def __post_init__(self) -> None:
        for name in ("min_tokens", "factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SelectionError(f"LongDocUpsample.{name} must be a whole number >= 1, got {value!r}")

    def to_dict(self) -> dict[str, int]:
        return {"min_tokens": self.min_tokens, "factor": self.factor}


def _check_filter(selection: str, column: Any, condition: Any) -> Any:
    """`condition` for one column in canonical form (lists as tuples), or SelectionError saying what is allowed."""
    return check_condition(f"selection {selection!r}", column, condition, SelectionError)


@dataclass(frozen=True)
class Selection(MetadataQuery):
    """A named leaf: the documents of `source` (a name, or a glob such as "web-*") whose metadata pass `where`
    (the filter semantics are curation's `MetadataQuery`), with optional long-document upsampling."""

    long_docs: LongDocUpsample | None = None

    error: ClassVar[type[Exception]] = SelectionError
    kind: ClassVar[str] = "selection"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.long_docs, Mapping):
            object.__setattr__(self, "long_docs", LongDocUpsample(**self.long_docs))
        if self.long_docs is not None and not isinstance(self.long_docs, LongDocUpsample):
            raise SelectionError(f"selection {self.name!r}: long_docs must be a LongDocUpsample, got {self.long_docs!r}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "source": self.source, "where": where_to_dict(self.where)}
        if self.long_docs is not None:
            data["long_docs"] = self.long_docs.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], ignored: Iterable[str] = ()) -> Selection:
        if not isinstance(data, Mapping):
            raise SelectionError(f"a selection is a mapping with name, source, where, long_docs; got {data!r}")
        query = super().from_dict({k: v for k, v in data.items() if k != "long_docs"}, ignored)
        long_docs = data.get("long_docs")
        if long_docs is not None:
            if not isinstance(long_docs, Mapping) or set(long_docs) != {"min_tokens", "factor"}:
                raise SelectionError(
                    f"selection {data['name']!r}: long_docs must be {{min_tokens, factor}}, got {long_docs!r}"
                )
            long_docs = LongDocUpsample(**long_docs)
        return cls(name=query.name, source=query.source, where=query.where, long_docs=long_docs)


# ---- filtering the sidecars -----------------------------------------------------------------------
def _mask(table: pa.Table, selection: Selection, source: str) -> np.ndarray:
    """Which rows of `source`'s per-document table pass the selection's filters (bool array)."""
    return selection.mask(table, source)


def _selected_docs(table: pa.Table, selection: Selection, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices of one source's documents that pass the filters (stream order) and their token counts."""
    lengths = table.column("tokens").to_numpy().astype(np.int64, copy=False)
    chosen = np.flatnonzero(_mask(table, selection, source))
    return chosen, lengths[chosen]


def _view_order(per_source: list[tuple[np.ndarray, np.ndarray]], long_docs: LongDocUpsample | None):
    """(source position, doc index, tokens) of every view document: one pass, then the long-doc passes."""
    sources, docs, tokens = [], [], []
    for position, (chosen, lengths) in enumerate(per_source):
        sources.append(np.full(len(chosen), position, dtype=np.int32))
        docs.append(chosen)
        tokens.append(lengths)
    if long_docs is not None and long_docs.factor > 1:
        long = [(p, c[lengths >= long_docs.min_tokens], lengths[lengths >= long_docs.min_tokens])
                for p, (c, lengths) in enumerate(per_source)]
        for _ in range(long_docs.factor - 1):
            for position, chosen, lengths in long:
                sources.append(np.full(len(chosen), position, dtype=np.int32))
                docs.append(chosen)
                tokens.append(lengths)
    if not sources:
        return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(sources), np.concatenate(docs).astype(np.int64), np.concatenate(tokens)


# ---- the view -------------------------------------------------------------------------------------
class SelectionView:
    """The selected documents of one or several token sources as one flat token stream (a `TokenStream`).

    Documents come in source-name order, each source's in stream order, then the long-document repeat passes.
    Internally the view is a list of runs, maximal spans of consecutive documents inside one token shard, kept
    as compact arrays (8 bytes per run and field); reading a window is one slice of one shard's memory map
    unless it crosses the end of a run, and then one slice per run crossed.
    """

    def __init__(self, name: str, sources: Sequence[TokenSource], doc_source: np.ndarray, doc_index: np.ndarray):
        self.name = name
        self.sources = tuple(sources)
        self.split = self.sources[0].split if self.sources else "train"
        self.doc_source = np.asarray(doc_source, dtype=np.int32)  # position in `sources` of each view document
        self.doc_index = np.asarray(doc_index, dtype=np.int64)  # its index in that source's stream
        n = len(self.doc_index)
        starts, ends = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)  # in the source's flat stream
        shard_of = np.empty(n, dtype=np.int64)  # global shard number (over all sources' shards)
        self._arrays: list[np.ndarray] = []  # every shard's tokens as a bare ndarray: cheaper to slice than memmap
        shard_base: list[int] = []  # flat-stream offset of each global shard in its source
        for position, source in enumerate(self.sources):
            first_shard = len(self._arrays)
            bounds = np.cumsum([0, *(len(shard) for shard in source.shards)]).astype(np.int64)
            self._arrays += [shard.tokens.view(np.ndarray) for shard in source.shards]
            shard_base += bounds[:-1].tolist()
            mine = self.doc_source == position
            if not mine.any():
                continue
            source_ends = source.doc_ends.astype(np.int64)
            idx = self.doc_index[mine]
            ends[mine] = source_ends[idx]
            starts[mine] = np.where(idx > 0, source_ends[np.maximum(idx - 1, 0)], 0)
            shard_of[mine] = first_shard + np.searchsorted(bounds, starts[mine], side="right") - 1
        lengths = ends - starts
        self.doc_ends = np.cumsum(lengths, dtype=np.int64)
        # a run breaks where the next document is not the successor of the previous one in the same shard
        breaks = np.ones(n, dtype=bool)
        if n > 1:
            breaks[1:] = (shard_of[1:] != shard_of[:-1]) | (starts[1:] != ends[:-1])
        first = np.flatnonzero(breaks)
        last = np.append(first[1:], n) - 1
        run_shard = shard_of[first]
        # array('q'): compact like numpy, but indexing gives plain ints and `bisect` runs at C speed
        self._run_shard = array("q", run_shard.tolist())
        self._run_start = array("q", (starts[first] - np.asarray(shard_base, np.int64)[run_shard]).tolist()
                                if n else [])  # offset of each run inside its shard
        self._run_offsets = array("q", [0, *self.doc_ends[last].tolist()])  # view offset of each run, then len
        self._length = int(self.doc_ends[-1]) if n else 0

    @property
    def num_docs(self) -> int:
        return len(self.doc_ends)

    @property
    def num_runs(self) -> int:
        return len(self._run_start)

    @property
    def run_offsets(self) -> np.ndarray:
        """View offset where each run starts, then the view's length: a window inside [o[i], o[i+1]) is a single
        slice of one token shard."""
        return np.frombuffer(self._run_offsets, dtype=np.int64)

    def __len__(self) -> int:
        return self._length

    @property
    def num_tokens(self) -> int:
        return self._length

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the view as int64, crossing run (and source) boundaries if needed."""
        if start < 0 or length < 0 or start + length > self._length:
            raise IndexError(f"selection {self.name!r}: read [{start}, {start + length}) outside [0, {self._length})")
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        offsets = self._run_offsets
        run = bisect_right(offsets, start) - 1
        into = self._run_start[run] + start - offsets[run]
        if start + length <= offsets[run + 1]:  # the common case: inside one run
            return self._arrays[self._run_shard[run]][into : into + length].astype(np.int64)
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            take = min(length - filled, offsets[run + 1] - offsets[run] - (into - self._run_start[run]))
            out[filled : filled + take] = self._arrays[self._run_shard[run]][into : into + take]
            filled += take
            run += 1
            if run < len(self._run_start):
                into = self._run_start[run]
        return out

    def document(self, i: int) -> np.ndarray:
        start = int(self.doc_ends[i - 1]) if i > 0 else 0
        return self.read(start, int(self.doc_ends[i]) - start)

    def origin(self, i: int) -> tuple[str, int]:
        """(source name, document index in that source) of view document i."""
        return self.sources[int(self.doc_source[i])].name, int(self.doc_index[i])

    def __repr__(self) -> str:
        names = [s.name for s in self.sources]
        return f"SelectionView({self.name!r}, sources={names}, tokens={len(self)}, docs={self.num_docs}, runs={self.num_runs})"


# ---- leaves of a schedule -------------------------------------------------------------------------
def _load(manifest: ShardManifest | str | Path) -> ShardManifest:
    return manifest if isinstance(manifest, ShardManifest) else ShardManifest.load(manifest)


def _index(selections: Iterable[Selection]) -> dict[str, Selection]:
    by_name: dict[str, Selection] = {}
    for selection in selections:
        if isinstance(selection, Mapping):  # as written in a schedule file
            selection = Selection.from_dict(selection)
        if not isinstance(selection, Selection):
            raise SelectionError(f"selections must be Selection objects (or their dicts), got {selection!r}")
        if selection.name in by_name and by_name[selection.name] != selection:
            raise SelectionError(f"two different selections are named {selection.name!r}; rename one")
        by_name[selection.name] = selection
    return by_name


def _tokenized(manifest: ShardManifest, split: str) -> list[str]:
    return sorted(n for n, e in manifest.sources.items() if any(s.split == split for s in e.token_shards))


def _matched(manifest: ShardManifest, selection: Selection, split: str) -> list[str]:
    """The tokenized sources a selection reads, or SelectionError saying why there are none."""
    known = sorted(manifest.sources)
    matched = selection.matching_sources(known)
    if not matched:
        what = f"source pattern {selection.source!r} matches no source" if selection.is_pattern else (
            f"unknown source {selection.source!r}")
        raise SelectionError(
            f"selection {selection.name!r}: {what} of the manifest at {manifest.root} (known: {known}); "
            "fix `source` or curate that source"
        )
    untokenized = [n for n in matched if n not in _tokenized(manifest, split)]
    if untokenized:
        raise SelectionError(
            f"selection {selection.name!r}: source(s) {untokenized} have no {split!r} token shards; "
            f"run `mixlab tokenize --curated {manifest.root}`"
        )
    return matched


def _selection_tokens(manifest: ShardManifest, selection: Selection, split: str) -> tuple[int, int]:
    """(documents, tokens) of a selection's view from the sidecars alone, by the same rule the view uses."""
    per_source = []
    for source in _matched(manifest, selection, split):
        columns = ["tokens", *(c for c in selection.where if c != "tokens")]
        try:
            table = read_doc_metadata(manifest, source, split, columns=columns)  # only the filtered columns
        except DocColumnError as err:
            raise SelectionError(
                f"selection {selection.name!r}: unknown metadata field(s) {err.unknown} for source {source!r}; "
                f"the per-document columns are {err.columns}"
            ) from err
        except TokenShardError as err:
            raise SelectionError(f"selection {selection.name!r}: {err}") from err
        per_source.append(_selected_docs(table, selection, source))
    _, _, lengths = _view_order(per_source, selection.long_docs)
    return len(lengths), int(lengths.sum())


def _leaf_kind(manifest: ShardManifest, leaf: str, selections: Mapping[str, Selection]) -> str:
    if leaf in selections and leaf in manifest.sources:
        raise SelectionError(
            f"leaf {leaf!r} is both a source of the manifest and a selection; rename the selection"
        )
    if leaf in selections:
        return "selection"
    if leaf in manifest.sources:
        return "source"
    raise SelectionError(
        f"leaf {leaf!r} is neither a source of the manifest at {manifest.root} (known: {sorted(manifest.sources)}) "
        f"nor a selection (defined: {sorted(selections)}); fix the name or add a Selection for it"
    )


def leaf_tokens(
    manifest: ShardManifest | str | Path, leaves: Iterable[str], selections: Iterable[Selection] = (),
    split: str = "train",
) -> dict[str, int]:
    """Tokens of each leaf's stream, known before training: a source's from the manifest, a selection's from
    its sidecars (equal to `len` of its view, long-document repeats included)."""
    manifest, by_name = _load(manifest), _index(selections)
    counts = {}
    for leaf in leaves:
        if _leaf_kind(manifest, leaf, by_name) == "source":
            entry = manifest.source(leaf)
            counts[leaf] = sum(s.tokens or 0 for s in entry.token_shards if s.split == split)
        else:
            counts[leaf] = _selection_tokens(manifest, by_name[leaf], split)[1]
    return counts


def problems_for_leaves(
    manifest: ShardManifest | str | Path,
    leaves: Iterable[str],
    selections: Iterable[Selection] = (),
    split: str = "train",
    stages_by_leaf: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Every reason the leaves cannot be opened: unknown source or leaf, a pattern or selection that matches
    nothing, an unknown metadata field, sidecars missing. Each message names the leaf (and the stages that
    weight it, when `stages_by_leaf` is given) and what to change."""
    manifest = _load(manifest)
    problems: list[str] = []
    try:
        by_name = _index(selections)
    except SelectionError as err:
        return [str(err)]
    stages_by_leaf = stages_by_leaf or {}
    for leaf in dict.fromkeys(leaves):
        stages = stages_by_leaf.get(leaf)
        prefix = f"stage(s) {list(stages)}: " if stages else ""
        try:
            kind = _leaf_kind(manifest, leaf, by_name)
            if kind == "source":
                if leaf not in _tokenized(manifest, split):
                    raise SelectionError(
                        f"source {leaf!r} has no {split!r} token shards; run `mixlab tokenize --curated {manifest.root}`"
                    )
                continue
            selection = by_name[leaf]
            docs, tokens = _selection_tokens(manifest, selection, split)
            if docs == 0 or tokens == 0:
                raise SelectionError(
                    f"selection {leaf!r} matches no document of {_matched(manifest, selection, split)} ({split}) "
                    f"with where {selection.to_dict()['where']}; loosen the filter or drop the selection"
                )
        except (SelectionError, ManifestError) as err:
            problems.append(f"{prefix}{err}")
    return problems


def open_leaves(
    manifest: ShardManifest | str | Path,
    leaves: Iterable[str],
    selections: Iterable[Selection] = (),
    split: str = "train",
    *,
    verify_checksums: bool = True,
) -> dict[str, TokenSource | SelectionView]:
    """A token stream per leaf: a `TokenSource` for a source, a `SelectionView` for a selection. Refuses
    (SelectionError listing every problem) before opening anything when a leaf cannot be realised."""
    manifest, by_name = _load(manifest), _index(selections)
    leaves = list(dict.fromkeys(leaves))
    if problems := problems_for_leaves(manifest, leaves, by_name.values(), split):
        raise SelectionError("cannot open the mixture's leaves:\n  - " + "\n  - ".join(problems))
    opened: dict[str, TokenSource] = {}

    def source(name: str) -> TokenSource:
        if name not in opened:
            opened[name] = TokenSource.from_manifest(manifest, name, split, verify_checksums)
        return opened[name]

    streams: dict[str, TokenSource | SelectionView] = {}
    for leaf in leaves:
        if leaf not in by_name:
            streams[leaf] = source(leaf)
            continue
        selection = by_name[leaf]
        matched = [source(n) for n in _matched(manifest, selection, split)]
        per_source = [_selected_docs(s.doc_metadata(), selection, s.name) for s in matched]
        doc_source, doc_index, _ = _view_order(per_source, selection.long_docs)
        streams[leaf] = SelectionView(leaf, matched, doc_source, doc_index)
    return streams


def open_selection(
    manifest: ShardManifest | str | Path, selection: Selection, split: str = "train", *, verify_checksums: bool = True
) -> SelectionView:
    """One selection realised as a view (see `open_leaves`)."""
    view = open_leaves(manifest, [selection.name], [selection], split, verify_checksums=verify_checksums)
    return view[selection.name]  # type: ignore[return-value]


# ---- thin wrappers taking a schedule ------------------------------------------------------------------
def _stages_by_leaf(schedule: MixtureSchedule) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for stage in schedule.stages:
        for leaf in stage.leaves:  # its weights' leaves and its curriculum's
            found.setdefault(leaf, []).append(stage.name)
    return found


def schedule_leaves(schedule: MixtureSchedule) -> list[str]:
    """The schedule's leaves, sorted: every source and selection its stages weight."""
    return sorted(schedule.sources)


def open_schedule_sources(
    manifest: ShardManifest | str | Path, schedule: MixtureSchedule, split: str = "train", *, verify_checksums: bool = True
) -> dict[str, TokenSource | SelectionView]:
    """A token stream for every leaf of `schedule` (sources and its `selections`), ready for the sampler."""
    return open_leaves(
        manifest, schedule_leaves(schedule), schedule.selections, split,
        verify_checksums=verify_checksums,
    )


def leaf_token_counts(manifest: ShardManifest | str | Path, schedule: MixtureSchedule, split: str = "train") -> dict[str, int]:
    """Tokens available per leaf of `schedule`, from the manifest and sidecars (no token is read)."""
    return leaf_tokens(manifest, schedule_leaves(schedule), schedule.selections, split)


def leaf_problems(manifest: ShardManifest | str | Path, schedule: MixtureSchedule, split: str = "train") -> list[str]:
    """Why the schedule's leaves cannot be realised on this manifest (empty: they can); each message names the
    stages and selection concerned and what to change."""
    return problems_for_leaves(
        manifest, schedule_leaves(schedule), schedule.selections, split, _stages_by_leaf(schedule)
    )
