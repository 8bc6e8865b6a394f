"""Token shards written by datatrove's DocumentTokenizer from real curated Parquet, read back by mixlab."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mixlab.curation.manifest import ManifestError, ShardManifest, sha256_file
from mixlab.curation.token_shards import (
    ShardMetadata,
    TokenizeConfig,
    TokenShard,
    TokenShardError,
    TokenSource,
    open_token_sources,
    select_val_ids,
    token_size_for_vocab,
    tokenize_manifest,
)
from mixlab.curation.tokenizer import TokenizerError, load_tokenizer, tokenizer_id, tokenizer_path
from stdlib_corpus import build_curated_dir, build_tokenized_dir


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    return build_tokenized_dir(tmp_path_factory.mktemp("tokens"))


@pytest.fixture
def tokenized_copy(tokenized: Path, tmp_path: Path) -> Path:
    """A private copy for tests that break files on purpose."""
    return Path(shutil.copytree(tokenized, tmp_path / "curated"))


def test_manifest_records_token_shards_per_split(tokenized: Path):
    manifest = ShardManifest.load(tokenized)
    assert manifest.verify_checksums() == []
    for source in manifest.sources.values():
        assert set(source.tokens) == {"train", "val"}
        for split in ("train", "val"):
            shards = [s for s in source.token_shards if s.split == split]
            assert shards and source.tokens[split] == sum(s.tokens for s in shards)
        assert sum(s.docs for s in source.token_shards) == source.docs  # every document in exactly one split
        assert (
            sum(s.docs for s in source.token_shards if s.split == "val") == 8
        )  # min_val_docs on a tiny source
        for shard in source.token_shards:
            path = manifest.resolve(shard.path)
            assert path.suffix == ".ds" and path.stat().st_size == shard.bytes == 2 * shard.tokens
            assert sha256_file(path) == shard.sha256


def test_files_follow_the_datatrove_nanotron_format(tokenized: Path):
    manifest = ShardManifest.load(tokenized)
    eos = load_tokenizer(tokenizer_path(tokenized)).token_to_id(manifest.tokenizer.eos_token)
    shard = manifest.sources["code"].token_shards[0]
    path = manifest.resolve(shard.path)
    name, token_size = Path(f"{path}.metadata").read_text().splitlines()[0].rsplit("|", 1)
    assert name == tokenizer_id(manifest.tokenizer) and token_size == "2"
    tokens = np.fromfile(path, dtype="<u2")
    ends = np.fromfile(f"{path}.index", dtype="<u8")
    assert len(ends) == shard.docs and ends[-1] == len(tokens) == shard.tokens
    assert (tokens[ends.astype(np.int64) - 1] == eos).all()  # every document ends with EOS
    assert np.count_nonzero(tokens == eos) == shard.docs  # and EOS appears nowhere else
    assert tokens.max() < manifest.tokenizer.vocab_size


def test_documents_round_trip_to_the_curated_text(tokenized: Path):
    manifest = ShardManifest.load(tokenized)
    tokenizer = load_tokenizer(tokenizer_path(tokenized))
    for name, entry in manifest.sources.items():
        originals = Counter()
        for shard in entry.shards:
            originals.update(
                pq.read_table(manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist()
            )
        decoded = Counter()
        for split in ("train", "val"):
            source = TokenSource.from_manifest(manifest, name, split)
            for i in range(source.num_docs):
                decoded[tokenizer.decode(source.document(i)[:-1].tolist())] += 1
        assert decoded == originals


def test_flat_stream_crosses_shard_boundaries(tokenized: Path):
    source = open_token_sources(tokenized)["code"]
    assert len(source.shards) == 2
    flat = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in source.shards])
    assert len(source) == len(flat) == source.num_tokens
    boundary = len(source.shards[0])
    assert np.array_equal(source.read(boundary - 5, 10), flat[boundary - 5 : boundary + 5])
    assert np.array_equal(source.flat(), flat)
    assert source.doc_ends[-1] == len(flat) and len(source.doc_ends) == source.num_docs
    assert np.array_equal(source.document(source.shards[0].num_docs), source.shards[1].document(0))
    with pytest.raises(IndexError):
        source.read(len(source) - 2, 5)


def test_retokenizing_is_deterministic(tokenized_copy: Path):
    before = {
        s.path: s.sha256 for e in ShardManifest.load(tokenized_copy).sources.values() for s in e.token_shards
    }
    tokenize_manifest(tokenized_copy, show_progress=False)
    after = {
        s.path: s.sha256 for e in ShardManifest.load(tokenized_copy).sources.values() for s in e.token_shards
    }
    assert before == after


def test_val_split_is_a_small_stable_share_of_the_text():
    ids = [f"doc-{i}" for i in range(1000)]
    sizes = [100 + (i * 37) % 900 for i in range(1000)]
    val = select_val_ids(ids, sizes, val_fraction=0.03, min_val_docs=8, max_val_fraction=0.2)
    held = sum(size for i, size in zip(ids, sizes, strict=True) if i in val)
    assert 0.03 * sum(sizes) <= held < 0.03 * sum(sizes) + 1000  # stops at the first document past 3%
    assert val == select_val_ids(list(reversed(ids)), list(reversed(sizes)), 0.03, 8, 0.2)  # order-free
    # a tiny source: at least min_val_docs if they fit in 20% of its text, never one huge document
    tiny = select_val_ids(
        ids[:10], [50_000] + [1000] * 9, val_fraction=0.03, min_val_docs=8, max_val_fraction=0.2
    )
    assert "doc-0" not in tiny and 1 <= len(tiny) <= 8
    assert select_val_ids(ids[:1], [100], 0.03, 8, 0.2) == frozenset()  # one document: all for training
    assert token_size_for_vocab(65536) == 2 and token_size_for_vocab(65537) == 4


def test_changed_token_shard_is_refused(tokenized_copy: Path):
    manifest = ShardManifest.load(tokenized_copy)
    path = manifest.resolve(manifest.sources["prose"].token_shards[0].path)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TokenShardError, match=rf"{path}: checksum mismatch.*mixlab tokenize"):
        TokenSource.from_manifest(manifest, "prose", "train")
    path.unlink()
    with pytest.raises(TokenShardError, match=rf"{path}: token shard of 'prose' listed in the manifest is missing.*mixlab tokenize"):
        TokenSource.from_manifest(manifest, "prose", "train")


def test_token_size_must_match_the_vocabulary(tokenized_copy: Path):
    manifest = ShardManifest.load(tokenized_copy)
    path = manifest.resolve(manifest.sources["code"].token_shards[0].path)
    meta = ShardMetadata.read(path)
    with pytest.raises(TokenShardError, match=r"2-byte tokens but the tokenizer has 100000 tokens"):
        TokenShard(path, vocab_size=100_000)
    ShardMetadata("other-tokenizer", meta.token_size, meta.tokens).write(path)
    with pytest.raises(TokenShardError, match="made by tokenizer 'other-tokenizer'"):
        TokenShard(path, vocab_size=1000, tokenizer=tokenizer_id(manifest.tokenizer))
    ShardMetadata(meta.tokenizer, meta.token_size, meta.tokens + 1).write(path)
    with pytest.raises(TokenShardError, match="truncated or changed"):
        TokenShard(path)


def test_changed_or_missing_curated_shard_stops_tokenization(tokenized_copy: Path):
    shard = tokenized_copy / "code" / "00001.parquet"
    shard.write_bytes(shard.read_bytes() + b"junk")
    with pytest.raises(TokenShardError, match=rf"{shard}: checksum mismatch.*mixlab curate"):
        tokenize_manifest(tokenized_copy, show_progress=False)
    shard.unlink()
    with pytest.raises(TokenShardError, match=rf"{shard}: curated shard of 'code'.*missing"):
        tokenize_manifest(tokenized_copy, show_progress=False)


def test_tokenizing_needs_a_tokenizer(tmp_path: Path):
    root = build_curated_dir(tmp_path)
    with pytest.raises(ManifestError, match="no tokenizer"):
        tokenize_manifest(root, show_progress=False)


def test_changed_or_missing_tokenizer_is_named_with_the_fix(tokenized_copy: Path):
    manifest = ShardManifest.load(tokenized_copy)
    path = manifest.resolve(manifest.tokenizer.path)
    path.write_text(path.read_text().replace("<|endoftext|>", "<|endoftext|> "))
    assert any(p.startswith(f"{path}: checksum mismatch") for p in manifest.verify_checksums())
    with pytest.raises(TokenizerError, match=rf"{path}: checksum mismatch.*tokenizer.*mixlab tokenize"):
        tokenize_manifest(tokenized_copy, show_progress=False)
    path.unlink()
    with pytest.raises(TokenizerError, match=rf"{path}: tokenizer listed in the manifest is missing"):
        tokenize_manifest(tokenized_copy, show_progress=False)


def test_tokenize_config_is_the_only_way_to_set_the_split(tokenized_copy: Path):
    with pytest.raises(TypeError):
        tokenize_manifest(tokenized_copy, val_fraction=0.5, show_progress=False)  # type: ignore[call-arg]
    manifest = tokenize_manifest(tokenized_copy, None, TokenizeConfig(), sources=["code"], show_progress=False)
    assert manifest.sources["code"].tokens["val"] > 0


def _datatrove_reference(manifest: ShardManifest, curated: str, split: str, val_ids: frozenset[str], out: Path) -> Path:
    """One curated shard tokenized the stock way (datatrove's executor: ParquetReader -> split filter ->
    DocumentTokenizer, unshuffled); returns the `.ds` it wrote."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.tokens import DocumentTokenizer

    LocalPipelineExecutor(
        pipeline=[
            ParquetReader(str(manifest.root), glob_pattern=curated, read_metadata=False),
            LambdaFilter(lambda doc: (str(doc.id) in val_ids) == (split == "val")),
            DocumentTokenizer(
                output_folder=str(out / "ds"), tokenizer_name_or_path=str(tokenizer_path(manifest.root)),
                eos_token=manifest.tokenizer.eos_token, shuffle_documents=False,
            ),
        ],
        tasks=1, workers=1, logging_dir=str(out / "logs"),
    ).run()
    return out / "ds" / "00000_unshuffled.ds"


def test_token_shards_are_byte_for_byte_what_datatrove_writes(tokenized: Path, tmp_path: Path):
    """The fast writer (one Arrow read, one encode pass per shard) against datatrove's own DocumentTokenizer."""
    from mixlab.curation.splits import source_val_ids

    manifest = ShardManifest.load(tokenized)
    compared = 0
    for name, entry in manifest.sources.items():
        val_ids = source_val_ids(manifest, name, TokenizeConfig())
        for i, curated in enumerate(entry.shards):
            for split in ("train", "val"):
                ours = tokenized / "tokens" / name / split / f"{i:05d}.ds"
                reference = _datatrove_reference(manifest, curated.path, split, val_ids, tmp_path / f"{name}{i}{split}")
                if not ours.exists():  # no document of this split in this shard: datatrove wrote no token
                    assert reference.stat().st_size == 0
                    continue
                assert ours.read_bytes() == reference.read_bytes()
                assert Path(f"{ours}.index").read_bytes() == Path(f"{reference}.index").read_bytes()
                tokens = ShardMetadata.read(ours).tokens
                assert Path(f"{reference}.metadata").read_text().splitlines()[1] == str(tokens)
                compared += 1
    assert compared >= 4  # code: 2 shards x 2 splits, prose: 1 shard (val documents are spread by id hash)


def test_routing_keeps_the_documents_datatrove_reads(tmp_path: Path):
    """Empty and null texts are skipped and a null id is `"None"`, as datatrove's ParquetReader does."""
    import pyarrow as pa
    from datatrove.pipeline.readers import ParquetReader
    from mixlab.curation.token_shards import route_rows

    texts = ["first", "", None, "fourth", "fifth"]
    ids = ["a", "b", "c", None, "e"]
    pq.write_table(pa.table({"text": texts, "id": ids}), tmp_path / "shard.parquet")
    read = [str(doc.id) for doc in ParquetReader(str(tmp_path), read_metadata=False).run()]
    batch = pq.read_table(tmp_path / "shard.parquet").to_batches()[0]
    row_ids, positions, in_val = route_rows(batch, pa.array(["e", "b"], pa.string()))
    assert [row_ids[int(p)].as_py() for p in positions] == read == ["a", "None", "e"]
    assert in_val.tolist() == [False, False, True]
