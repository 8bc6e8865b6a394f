"""Selections on the real tokenized test corpus: per-document sidecars beside the token shards, views over the
selected documents, long-document upsampling, token counts known before opening, and the refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.splits import TokenizeConfig, split_source
from mixlab.curation.token_shards import (
    DOCS_SUFFIX,
    TokenShardError,
    TokenSource,
    TokenStream,
    open_token_sources,
    read_doc_metadata,
)
from mixlab.curation.tokenizer import load_tokenizer, tokenizer_path
from mixlab.mixtures.selection import (
    LongDocUpsample,
    Selection,
    SelectionError,
    SelectionView,
    leaf_problems,
    leaf_token_counts,
    leaf_tokens,
    open_leaves,
    open_schedule_sources,
    open_selection,
    problems_for_leaves,
)

VAL_FRACTION = 0.05  # what conftest's `tokenized_curated` passes to `mixlab tokenize`
WEB = ["web-de", "web-en", "web-es", "web-fr", "web-ru"]


@pytest.fixture(scope="module")
def manifest(tokenized_curated: Path) -> ShardManifest:
    return ShardManifest.load(tokenized_curated)


@pytest.fixture(scope="module")
def sources(tokenized_curated: Path) -> dict[str, TokenSource]:
    return open_token_sources(tokenized_curated)


def curated_rows(manifest: ShardManifest, source: str, split: str) -> list[dict]:
    """The curated documents of one split in token-stream order, read straight from the curated Parquet."""
    val_ids = split_source(manifest, source, TokenizeConfig(val_fraction=VAL_FRACTION)).val_ids
    rows = []
    for shard in manifest.source(source).shards:
        for row in pq.read_table(manifest.resolve(shard.path)).to_pylist():
            if row["text"] and (row["id"] in val_ids) == (split == "val"):
                rows.append({"id": row["id"], "text": row["text"], **row["metadata"]})
    return rows


def concatenation(view: SelectionView, sources: dict[str, TokenSource]) -> np.ndarray:
    """The view's tokens rebuilt from the underlying documents (TokenSource.document), one by one."""
    parts = [sources[name].document(i) for name, i in (view.origin(k) for k in range(view.num_docs))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# ---- sidecars --------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "val"])
def test_sidecars_hold_one_row_per_document_with_the_curated_ids_in_order(manifest, split):
    for name in manifest.sources:
        source = TokenSource.from_manifest(manifest, name, split)
        table = source.doc_metadata()
        expected = curated_rows(manifest, name, split)
        assert table.num_rows == source.num_docs == len(expected) > 0
        assert table.column("id").to_pylist() == [r["id"] for r in expected]
        assert table.column("language").to_pylist() == [r["language"] for r in expected]
        assert table.column("minhash_cluster_size").to_pylist() == [r["minhash_cluster_size"] for r in expected]
        lengths = np.diff(source.doc_ends.astype(np.int64), prepend=0)
        assert np.array_equal(table.column("tokens").to_numpy(), lengths)
        for record in (r for r in manifest.source(name).token_shards if r.split == split):
            assert manifest.resolve(f"{record.path}{DOCS_SUFFIX}").is_file()
        # read without opening the token shards: the same table
        assert read_doc_metadata(manifest, name, split).equals(table)


def test_every_sidecar_row_describes_the_document_at_its_index(manifest):
    """Decoding document i of the token stream gives the text of sidecar row i (the alignment, for all docs)."""
    tokenizer = load_tokenizer(tokenizer_path(manifest.root))
    for name in ("chat", "math", "web-fr"):
        source = TokenSource.from_manifest(manifest, name)
        texts = {r["id"]: r["text"] for r in curated_rows(manifest, name, "train")}
        ids = source.doc_metadata(["id"]).column("id").to_pylist()
        for i, doc_id in enumerate(ids):
            assert tokenizer.decode(source.document(i)[:-1].tolist()) == texts[doc_id]


def test_tokenize_refuses_curated_rows_that_do_not_line_up(manifest, tmp_path: Path):
    """The write-time check: the same row count as the shard's documents, and sampled documents re-encode."""
    from mixlab.curation.token_shards import _curated_rows, _eos_encoder

    encoder = _eos_encoder(tokenizer_path(manifest.root), manifest.tokenizer.eos_token)
    curated = manifest.sources["math"].shards[0]
    record = next(r for r in manifest.sources["math"].token_shards if r.path.endswith("train/00000.ds"))
    shard = TokenSource.from_manifest(manifest, "math").shards[0]
    assert record.docs == shard.num_docs
    val_ids = split_source(manifest, "math", TokenizeConfig(val_fraction=VAL_FRACTION)).val_ids
    rows = _curated_rows(manifest.resolve(curated.path), "train", val_ids, shard, encoder)
    assert rows.column("id").to_pylist() == shard.doc_metadata(["id"]).column("id").to_pylist()
    with pytest.raises(TokenShardError, match="cannot be lined up with the index"):
        _curated_rows(manifest.resolve(curated.path), "train", frozenset(), shard, encoder)  # val docs counted too
    table = pq.read_table(manifest.resolve(curated.path))
    reordered = tmp_path / "reordered.parquet"
    pq.write_table(table.take(np.roll(np.arange(table.num_rows), 1)), reordered)  # same rows, shifted by one
    with pytest.raises(TokenShardError, match="does not re-encode"):
        _curated_rows(reordered, "train", val_ids, shard, encoder)


def test_columns_are_the_curated_metadata_fields(sources):
    columns = sources["chat"].doc_metadata().column_names
    assert columns[:2] == ["id", "tokens"]
    for field in ("language", "language_score", "programming_language", "minhash_cluster_size", "chars", "kind"):
        assert field in columns
    with pytest.raises(TokenShardError, match="no per-document column"):
        sources["chat"].doc_metadata(["no_such_field"])


# ---- selections over metadata ----------------------------------------------------------------------
def check_view(view: SelectionView, sources: dict[str, TokenSource]) -> np.ndarray:
    """The view reads exactly the concatenation of its documents; doc_ends are their cumulative lengths."""
    expected = concatenation(view, sources)
    assert isinstance(view, TokenStream) and len(view) == len(expected) == int(view.doc_ends[-1])
    assert np.array_equal(view.read(0, len(view)), expected)
    lengths = [len(sources[n].document(i)) for n, i in (view.origin(k) for k in range(view.num_docs))]
    assert np.array_equal(view.doc_ends, np.cumsum(lengths))
    return expected


def selected_ids(view: SelectionView, sources: dict[str, TokenSource]) -> list[str]:
    ids = {name: s.doc_metadata(["id"]).column("id").to_pylist() for name, s in sources.items()}
    return [ids[name][i] for name, i in (view.origin(k) for k in range(view.num_docs))]


def test_selection_by_language(manifest, sources):
    view = open_selection(manifest, Selection("chat-en", "chat", {"language": "en"}))
    rows = curated_rows(manifest, "chat", "train")
    assert selected_ids(view, sources) == [r["id"] for r in rows if r["language"] == "en"]
    assert 0 < view.num_docs < len(rows)
    check_view(view, sources)
    assert view.num_runs < view.num_docs  # consecutive selected documents merge into runs
    several = open_selection(manifest, Selection("chat-fr-de", "chat", {"language": ["fr", "de"]}))
    assert selected_ids(several, sources) == [r["id"] for r in rows if r["language"] in ("fr", "de")]


def test_selection_by_score_range_is_inclusive(manifest, sources):
    rows = curated_rows(manifest, "chat", "train")
    scores = sorted({r["language_score"] for r in rows if r["language_score"] is not None})
    low, high = scores[len(scores) // 4], scores[3 * len(scores) // 4]  # both bounds are scores of real docs
    view = open_selection(manifest, Selection("chat-mid", "chat", {"language_score": {"min": low, "max": high}}))
    expected = [r["id"] for r in rows if r["language_score"] is not None and low <= r["language_score"] <= high]
    assert selected_ids(view, sources) == expected
    assert {low, high} <= {r["language_score"] for r in rows if r["id"] in set(expected)}
    check_view(view, sources)


def test_selection_by_duplicate_cluster_size_partitions_the_source(manifest, sources):
    unique = open_selection(manifest, Selection("chat-unique", "chat", {"minhash_cluster_size": {"max": 1}}))
    dups = open_selection(manifest, Selection("chat-dups", "chat", {"minhash_cluster_size": {"min": 2}}))
    rows = curated_rows(manifest, "chat", "train")
    assert selected_ids(unique, sources) == [r["id"] for r in rows if r["minhash_cluster_size"] == 1]
    assert unique.num_docs > 0 and dups.num_docs > 0
    assert unique.num_docs + dups.num_docs == sources["chat"].num_docs
    assert len(unique) + len(dups) == len(sources["chat"])


def test_selection_by_document_length(manifest, sources):
    lengths = np.diff(sources["math"].doc_ends.astype(np.int64), prepend=0)
    cut = int(np.median(lengths))
    view = open_selection(manifest, Selection("math-long", "math", {"tokens": {"min": cut}}))
    assert view.num_docs == int((lengths >= cut).sum())
    # a float bound against the integer column compares as a number (no silent truncation)
    assert open_selection(manifest, Selection("m", "math", {"tokens": {"min": cut - 0.5}})).num_docs == int(
        (lengths >= cut).sum()
    )
    assert open_selection(manifest, Selection("m", "math", {"tokens": [float(cut)]})).num_docs == int(
        (lengths == cut).sum()
    )
    assert all(len(sources["math"].document(i)) >= cut for _, i in map(view.origin, range(view.num_docs)))
    check_view(view, sources)


def test_a_glob_reads_several_sources_in_name_order(manifest, sources):
    everything = open_selection(manifest, Selection("web", "web-*"))
    assert [s.name for s in everything.sources] == WEB
    assert len(everything) == sum(len(sources[n]) for n in WEB)
    # whole sources: one run per token shard, so a window read is one slice unless it crosses a shard's end
    assert everything.num_runs == sum(len(sources[n].shards) for n in WEB)
    check_view(everything, sources)
    romance = open_selection(manifest, Selection("web-fr-es", "web-*", {"language": ["fr", "es"]}))
    assert {name for name, _ in map(romance.origin, range(romance.num_docs))} == {"web-es", "web-fr"}
    assert len(romance) == len(sources["web-es"]) + len(sources["web-fr"])
    check_view(romance, sources)


def test_window_reads_are_exact_across_run_boundaries(manifest, sources):
    view = open_selection(manifest, Selection("chat-en", "chat", {"language": "en"}))
    expected = concatenation(view, sources)
    assert view.num_runs > 10  # the selection is scattered: many runs to cross
    boundaries = view.run_offsets[1:-1].tolist()
    for boundary in boundaries:
        start = max(0, boundary - 7)
        assert np.array_equal(view.read(start, 15), expected[start : start + 15])
    rng = np.random.default_rng(0)
    for _ in range(500):
        length = int(rng.integers(0, 700))
        start = int(rng.integers(0, len(view) - length + 1))
        window = view.read(start, length)
        assert window.dtype == np.int64 and np.array_equal(window, expected[start : start + length])
    assert np.array_equal(view.read(len(view) - 3, 3), expected[-3:])
    with pytest.raises(IndexError, match="chat-en"):
        view.read(len(view) - 3, 4)
    with pytest.raises(IndexError):
        view.read(-1, 2)


def test_long_documents_are_upsampled(manifest, sources):
    lengths = np.diff(sources["chat"].doc_ends.astype(np.int64), prepend=0)
    cut = int(np.quantile(lengths, 0.9))
    long = set(np.flatnonzero(lengths >= cut).tolist())
    selection = Selection("chat-longx3", "chat", long_docs=LongDocUpsample(min_tokens=cut, factor=3))
    view = open_selection(manifest, selection)
    counts = np.bincount(view.doc_index, minlength=len(lengths))
    assert all(counts[i] == (3 if i in long else 1) for i in range(len(lengths)))
    assert view.num_docs == len(lengths) + 2 * len(long)
    assert len(view) == len(sources["chat"]) + 2 * int(lengths[sorted(long)].sum())
    first_pass = view.doc_index[: len(lengths)]
    assert np.array_equal(first_pass, np.arange(len(lengths)))  # one pass in order, then the repeat passes
    check_view(view, sources)
    assert leaf_tokens(manifest, ["chat-longx3"], [selection]) == {"chat-longx3": len(view)}


def test_token_counts_before_opening_equal_the_views(manifest, sources):
    selections = [
        Selection("chat-en", "chat", {"language": "en"}),
        Selection("hq", "web-*", {"language_score": {"min": 0.95}}),
        Selection("math-short", "math", {"tokens": {"max": 200}}, LongDocUpsample(100, 2)),
    ]
    leaves = ["math", *(s.name for s in selections)]
    counts = leaf_tokens(manifest, leaves, selections)
    streams = open_leaves(manifest, leaves, selections)
    assert counts == {leaf: len(stream) for leaf, stream in streams.items()}
    assert counts["math"] == manifest.sources["math"].tokens["train"]
    assert isinstance(streams["math"], TokenSource) and isinstance(streams["hq"], SelectionView)
    assert 0 < counts["hq"] < sum(len(sources[n]) for n in WEB)
    val = open_leaves(manifest, ["chat-en"], selections, split="val")["chat-en"]
    assert val.split == "val" and len(val) == leaf_tokens(manifest, ["chat-en"], selections, split="val")["chat-en"]


# ---- refusals ---------------------------------------------------------------------------------------
def test_problems_name_the_selection_and_what_to_change(manifest):
    selections = [
        Selection("nowhere", "no-such-source"),
        Selection("no-pattern", "books-*"),
        Selection("nothing", "chat", {"language": "xx"}),
        Selection("bad-field", "chat", {"quality": {"min": 0.5}}),
        Selection("bad-type", "chat", {"language": {"min": 1}}),
        Selection("fine", "chat", {"language": "en"}),
    ]
    leaves = [s.name for s in selections] + ["math", "unknown-leaf"]
    problems = problems_for_leaves(manifest, leaves, selections, stages_by_leaf={"nothing": ["decay"]})
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "selection 'nowhere': unknown source 'no-such-source'" in text and "known: ['chat'" in text
    assert "selection 'no-pattern': source pattern 'books-*' matches no source" in text
    assert "stage(s) ['decay']: selection 'nothing' matches no document" in text and "loosen the filter" in text
    assert "selection 'bad-field': unknown metadata field(s) ['quality']" in text and "language_score" in text
    assert "selection 'bad-type'" in text and "cannot be compared with column 'language' of type string" in text
    assert "leaf 'unknown-leaf' is neither a source" in text and "add a Selection" in text
    with pytest.raises(SelectionError, match="cannot open the mixture's leaves") as err:
        open_leaves(manifest, leaves, selections)
    assert "nowhere" in str(err.value) and "unknown-leaf" in str(err.value)
    assert problems_for_leaves(manifest, ["fine", "math"], selections) == []
    shadow = problems_for_leaves(manifest, ["math"], [Selection("math", "math", {"language": "en"})])
    assert shadow and "both a source of the manifest and a selection" in shadow[0]


def test_selection_filters_are_checked_when_written():
    with pytest.raises(SelectionError, match="min` and/or `max"):
        Selection("s", "chat", {"language_score": {"above": 0.5}})
    with pytest.raises(SelectionError, match="is not a number"):
        Selection("s", "chat", {"language_score": {"min": "high"}})
    with pytest.raises(SelectionError, match="min 2 > max 1"):
        Selection("s", "chat", {"tokens": {"min": 2, "max": 1}})
    with pytest.raises(SelectionError, match="non-empty list"):
        Selection("s", "chat", {"language": []})
    with pytest.raises(SelectionError, match="cannot contain"):
        Selection("web-*", "web-*")
    with pytest.raises(SelectionError, match="factor must be a whole number"):
        LongDocUpsample(min_tokens=100, factor=0)


def test_selection_dicts_round_trip():
    selection = Selection("ml", "web-*", {"language": ["fr", "de"], "language_score": {"min": 0.9}},
                          LongDocUpsample(512, 2))
    data = selection.to_dict()
    assert data == {"name": "ml", "source": "web-*", "long_docs": {"min_tokens": 512, "factor": 2},
                    "where": {"language": ["fr", "de"], "language_score": {"min": 0.9}}}
    assert Selection.from_dict(data) == selection and hash(Selection.from_dict(data)) == hash(selection)
    with pytest.raises(SelectionError, match="unknown keys"):
        Selection.from_dict({**data, "weight": 1})


def test_a_tokenized_dir_without_sidecars_says_to_retokenize(tokenized_curated: Path, tmp_path: Path):
    copy = Path(shutil.copytree(tokenized_curated, tmp_path / "curated"))
    manifest = ShardManifest.load(copy)
    record = next(r for r in manifest.sources["chat"].token_shards if r.split == "train")
    manifest.resolve(f"{record.path}{DOCS_SUFFIX}").unlink()
    problems = problems_for_leaves(manifest, ["chat-en"], [Selection("chat-en", "chat", {"language": "en"})])
    assert len(problems) == 1 and "missing" in problems[0] and "re-run `mixlab tokenize`" in problems[0]
    with pytest.raises(TokenShardError, match="re-run `mixlab tokenize`"):
        TokenSource.from_manifest(manifest, "chat").doc_metadata()
    assert len(TokenSource.from_manifest(manifest, "chat")) > 0  # the tokens themselves still open


def test_a_sidecar_that_does_not_match_its_shard_is_refused(tokenized_curated: Path, tmp_path: Path):
    copy = Path(shutil.copytree(tokenized_curated, tmp_path / "curated"))
    manifest = ShardManifest.load(copy)
    records = [r for r in manifest.sources["chat"].token_shards if r.split == "train"]
    first, second = (manifest.resolve(f"{r.path}{DOCS_SUFFIX}") for r in records[:2])
    table = pq.read_table(first)
    pq.write_table(table.slice(0, table.num_rows - 1), first)  # a row lost: no longer one per document
    with pytest.raises(TokenShardError, match="rows"):
        TokenSource.from_manifest(manifest, "chat").doc_metadata()
    shutil.copyfile(second, first)  # another shard's sidecar
    with pytest.raises(TokenShardError, match="another version"):
        read_doc_metadata(manifest, "chat")


def test_a_sidecar_symlinked_out_of_the_dataset_is_refused(tokenized_curated: Path, tmp_path: Path):
    copy = Path(shutil.copytree(tokenized_curated, tmp_path / "curated"))
    manifest = ShardManifest.load(copy)
    record = next(r for r in manifest.sources["math"].token_shards if r.split == "train")
    sidecar = manifest.resolve(f"{record.path}{DOCS_SUFFIX}")
    outside = tmp_path / "outside.parquet"
    shutil.move(sidecar, outside)
    sidecar.symlink_to(outside)
    with pytest.raises(Exception, match="outside|replace it with a real"):
        TokenSource.from_manifest(manifest, "math")


# ---- through a schedule -----------------------------------------------------------------------------
def test_schedule_wrappers_open_and_count_its_leaves(manifest):
    from mixlab.mixtures.schedule import MixtureSchedule

    schedule = MixtureSchedule.constant({"math": 0.5, "web-fr": 0.5})
    streams = open_schedule_sources(manifest, schedule)
    assert sorted(streams) == ["math", "web-fr"]
    assert leaf_token_counts(manifest, schedule) == {k: len(v) for k, v in streams.items()}
    assert leaf_problems(manifest, schedule) == []
    wrong = MixtureSchedule.constant({"math": 0.5, "web-xx": 0.5})
    problems = leaf_problems(manifest, wrong)
    assert len(problems) == 1 and "stage(s) ['constant']" in problems[0] and "'web-xx'" in problems[0]


def test_a_schedule_with_selections_opens_them_as_views(manifest, sources):
    from mixlab.mixtures.schedule import MixtureSchedule, Stage

    selections = (
        Selection("chat-en", "chat", {"language": "en"}),
        Selection("web-hq", "web-*", {"language_score": {"min": 0.95}}, LongDocUpsample(400, 2)),
    )
    schedule = MixtureSchedule(
        (Stage("stable", {"chat-en": 0.5, "web-hq": 0.3, "math": 0.2}, 0.8),
         Stage("decay", {"chat-en": 0.2, "web-hq": 0.3, "math": 0.5}, 0.2)),
        selections=selections,
    )
    assert leaf_problems(manifest, schedule) == []
    streams = open_schedule_sources(manifest, schedule)
    assert sorted(streams) == ["chat-en", "math", "web-hq"]
    assert leaf_token_counts(manifest, schedule) == {k: len(v) for k, v in streams.items()}
    check_view(streams["web-hq"], sources)
    restored = MixtureSchedule.from_dict(schedule.to_dict())
    assert tuple(restored.selections) == selections
    broken = MixtureSchedule(
        (Stage("stable", {"chat-en": 0.5, "web-xx": 0.5}, 0.8), Stage("decay", {"chat-en": 1.0}, 0.2)),
        selections=(Selection("chat-en", "chat", {"language": "xx"}),),
    )
    problems = leaf_problems(manifest, broken)
    assert len(problems) == 2
    assert "stage(s) ['stable', 'decay']: selection 'chat-en' matches no document" in problems[0]
    assert "stage(s) ['stable']: leaf 'web-xx' is neither a source" in problems[1]
