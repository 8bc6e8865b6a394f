"""Tokenizer training on real curated shards (CPython stdlib code and reference prose)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mixlab.curation.manifest import ShardManifest, sha256_file
from mixlab.curation.splits import TokenizeConfig, split_source
from mixlab.curation.token_shards import TokenSource, tokenize_manifest
from mixlab.curation.tokenizer import (
    EOS_TOKEN,
    TokenizerConfig,
    TokenizerError,
    byte_length_rule,
    byte_symbol_table,
    iter_training_texts,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_path,
    train_tokenizer,
)
from stdlib_corpus import build_curated_dir, stdlib_code_docs, write_source
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = build_curated_dir(tmp_path_factory.mktemp("tokenizer"))
    train_tokenizer(root, TokenizerConfig(vocab_size=1000), show_progress=False)
    return root


def real_texts(root: Path) -> list[str]:
    manifest = ShardManifest.load(root)
    texts = []
    for source in manifest.sources.values():
        for shard in source.shards:
            texts.extend(
                pq.read_table(manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist()[:15]
            )
    return texts


def test_manifest_records_the_trained_tokenizer(trained: Path):
    manifest = ShardManifest.load(trained)
    info = manifest.tokenizer
    assert info is not None and info.path == "tokenizer/tokenizer.json"
    assert info.vocab_size == 1000 and info.eos_token == EOS_TOKEN
    assert info.sha256 == sha256_file(tokenizer_path(trained))
    tokenizer = load_tokenizer(tokenizer_path(trained))
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    record = json.loads((trained / "tokenizer" / "training.json").read_text())
    assert set(record["sources"]) == {"code", "prose"}
    assert all(s["bytes_used"] > 0 for s in record["sources"].values())


def test_round_trip_is_exact_on_real_text(trained: Path):
    tokenizer = load_tokenizer(tokenizer_path(trained))
    texts = real_texts(trained) + ["naïve café — 日本語 Ελληνικά 12345\r\n\ttabs  and  spaces\n"]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids) == text
    code = texts[0]
    assert len(tokenizer.encode(code).ids) < len(code.encode()) / 2  # it learned merges, not just bytes


def test_token_byte_lengths_sum_to_utf8_bytes(trained: Path):
    path = tokenizer_path(trained)
    lengths = token_byte_lengths(path)
    tokenizer = load_tokenizer(path)
    assert lengths.shape == (1000,) and lengths.dtype == np.int64
    assert lengths[tokenizer.token_to_id(EOS_TOKEN)] == 0
    specials = len(TokenizerConfig().special_tokens)
    assert (lengths[specials:] >= 1).all()  # every non-special token stands for at least one byte
    for text in [*real_texts(trained), "ünïcödé ✓ 🚀"]:
        ids = tokenizer.encode(text).ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))
    assert token_byte_lengths(path) is lengths  # cached: the evaluator calls it often


def test_byte_symbol_table_is_the_byte_level_alphabet():
    table = byte_symbol_table()
    assert sorted(table.values()) == list(range(256))
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())


def test_per_source_byte_budget_samples_across_shards(tmp_path: Path):
    root = build_curated_dir(tmp_path)
    train_tokenizer(root, TokenizerConfig(vocab_size=600, max_bytes_per_source=200_000), show_progress=False)
    record = json.loads((root / "tokenizer" / "training.json").read_text())
    for sample in record["sources"].values():
        assert 0 < sample["bytes_used"] <= 200_000 + 70_000  # at most one document over the budget
        assert sample["docs_used"] < sample["docs_read"]
    # systematic sampling reaches the second code shard instead of stopping inside the first
    first_shard_docs = ShardManifest.load(root).sources["code"].shards[0].docs
    assert record["sources"]["code"]["docs_read"] > first_shard_docs


def test_bad_inputs_give_clear_errors(tmp_path: Path):
    with pytest.raises(TokenizerError, match="too small"):
        TokenizerConfig(vocab_size=100)
    with pytest.raises(TokenizerError, match="no tokenizer here"):
        load_tokenizer(tmp_path / "nothing.json")
    root = build_curated_dir(tmp_path / "curated")
    missing = root / "prose" / "00000.parquet"
    missing.unlink()
    with pytest.raises(TokenizerError, match=str(missing)):
        train_tokenizer(root, TokenizerConfig(vocab_size=300), show_progress=False)


def test_byte_lengths_refuse_a_non_byte_level_tokenizer(tmp_path: Path):
    word_level = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    word_level.save(str(path))
    with pytest.raises(TokenizerError, match="token byte lengths are not defined"):
        token_byte_lengths(path)


BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
ODD_TEXT = "ünïcödé ✓ 🚀 日本語 Ελληνικά\ttab"  # characters a small alphabet lacks: byte fallback


def sentencepiece_bpe(texts: list[str], path: Path) -> Path:
    """A SentencePiece-style BPE: Metaspace (`▁`, dummy prefix), byte fallback, a 60-character alphabet."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=900, limit_alphabet=60,
                                                       special_tokens=["<unk>", "</s>", *BYTE_TOKENS]))
    tok.save(str(path))
    return path


def unigram_with_byte_fallback(texts: list[str], path: Path) -> Path:
    """A Unigram trained by `tokenizers`, given SentencePiece's 256 `<0xNN>` pieces and byte_fallback (the
    trainer has no such option: the pieces are added to the vocabulary, as sentencepiece lays them out)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=900, special_tokens=["<unk>", "</s>"],
                                                           unk_token="<unk>"))
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"] += [[piece, -100.0] for piece in BYTE_TOKENS]
    spec["model"]["byte_fallback"] = True
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def wordpiece(texts: list[str], path: Path, lowercase: bool = False) -> Path:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=["[UNK]", "[SEP]"]))
    tok.save(str(path))
    return path


@pytest.mark.parametrize("build", [sentencepiece_bpe, unigram_with_byte_fallback])
def test_sentencepiece_style_byte_lengths_add_up_to_the_document(trained: Path, tmp_path: Path, build):
    """`▁` is one space byte and `<0xNN>` one byte: a document's sum is its UTF-8 size plus the dummy prefix."""
    texts = real_texts(trained)
    path = build(texts, tmp_path / "tokenizer.json")
    rule = byte_length_rule(path)
    assert rule.kind == "metaspace" and rule.prefix_bytes == 1 and not rule.exact
    lengths, tokenizer = token_byte_lengths(path), load_tokenizer(path)
    fallback = 0
    for text in [*texts, ODD_TEXT, " starts with a space"]:
        encoding = tokenizer.encode(text)
        fallback += sum(t in BYTE_TOKENS for t in encoding.tokens)
        prefix = 0 if text.startswith(" ") else 1  # Metaspace prepends `▁` unless the text starts with one
        assert lengths[encoding.ids].sum() == len(text.encode("utf-8")) + prefix, text[:40]
    assert fallback > 0  # the byte-fallback path was exercised
    assert lengths[tokenizer.token_to_id("</s>")] == 0


def test_wordpiece_counts_one_whitespace_byte_per_word(trained: Path, tmp_path: Path):
    """WordPiece drops whitespace, so exactness is impossible: a word-start token counts one byte for it, and
    the sum is the UTF-8 size less the whitespace bytes plus the word-start tokens (the stated bound)."""
    texts = real_texts(trained)
    path = wordpiece(texts, tmp_path / "tokenizer.json")
    assert byte_length_rule(path).kind == "wordpiece"
    lengths, tokenizer = token_byte_lengths(path), load_tokenizer(path)
    assert lengths[tokenizer.token_to_id("[SEP]")] == 0
    errors = []
    for text in texts:
        encoding = tokenizer.encode(text)
        assert tokenizer.token_to_id("[UNK]") not in encoding.ids  # trained on these texts
        whitespace = sum(len(ch.encode("utf-8")) for ch in text if ch.isspace())
        word_starts = sum(not t.startswith("##") for t in encoding.tokens)
        size = len(text.encode("utf-8"))
        assert lengths[encoding.ids].sum() == size - whitespace + word_starts
        errors.append(abs(lengths[encoding.ids].sum() - size) / size)
    assert float(np.median(errors)) < 0.15  # one byte per word is close to the whitespace of prose and code


def test_byte_lengths_refuse_kinds_that_cannot_be_made_right(trained: Path, tmp_path: Path):
    texts = real_texts(trained)[:10]
    with pytest.raises(TokenizerError, match="BertNormalizer normalizer changes the text"):
        token_byte_lengths(wordpiece(texts, tmp_path / "uncased.json", lowercase=True))
    no_fallback = json.loads(sentencepiece_bpe(texts, tmp_path / "sp.json").read_text())
    no_fallback["model"]["byte_fallback"] = False
    (tmp_path / "no_fallback.json").write_text(json.dumps(no_fallback))
    with pytest.raises(TokenizerError, match="without byte_fallback"):
        token_byte_lengths(tmp_path / "no_fallback.json")


def shard_of_text(manifest: ShardManifest, source: str) -> dict[str, int]:
    """Which shard of `source` each text is in."""
    where = {}
    for index, shard in enumerate(manifest.source(source).shards):
        for text in pq.read_table(manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist():
            where[text] = index
    return where


def test_byte_budget_sample_spreads_over_all_shards(tmp_path: Path):
    """A source 4x its budget: every shard contributes about a quarter, not the first shard all of it."""
    root = tmp_path / "curated"
    manifest = ShardManifest()
    manifest.sources["code"] = write_source(root, "code", "code", stdlib_code_docs(), shards=4)
    manifest.save(root)
    entry = manifest.sources["code"]
    assert entry.bytes == sum(s.text_bytes for s in entry.shards) > sum(s.bytes for s in entry.shards)
    held_out = TokenizeConfig()
    budget = split_source(manifest, "code", held_out).train_bytes // 4
    stats: dict = {}
    texts = list(iter_training_texts(manifest, TokenizerConfig(max_bytes_per_source=budget), stats))
    where = shard_of_text(manifest, "code")
    per_shard = Counter(where[t] for t in texts)
    assert set(per_shard) == {0, 1, 2, 3}, per_shard
    assert max(per_shard.values()) <= 2 * min(per_shard.values())
    assert 0.8 * budget <= stats["code"].bytes_used <= budget + 12_000  # at most one document over


def test_validation_documents_never_reach_the_tokenizer(tmp_path: Path):
    root = build_curated_dir(tmp_path / "curated")
    split = TokenizeConfig(val_fraction=0.1)
    config = TokenizerConfig(vocab_size=600, held_out=split)
    manifest = ShardManifest.load(root)
    stats: dict = {}
    stream = set(iter_training_texts(manifest, config, stats))
    for name in manifest.sources:
        val_ids = split_source(manifest, name, split).val_ids
        assert val_ids and stats[name].docs_held_out == len(val_ids)
        rows = [
            row
            for shard in manifest.source(name).shards
            for row in pq.read_table(manifest.resolve(shard.path), columns=["id", "text"]).to_pylist()
        ]
        assert not {r["text"] for r in rows if r["id"] in val_ids} & stream
        assert {r["text"] for r in rows if r["id"] not in val_ids} <= stream  # under budget: all the rest

    # the documents tokenization holds out are exactly the ones the tokenizer was trained without
    info = train_tokenizer(root, config, show_progress=False)
    assert info.held_out == split.val_settings()
    tokenize_manifest(root, None, split, show_progress=False)
    tokenizer = load_tokenizer(tokenizer_path(root))
    for name in manifest.sources:
        val = TokenSource.from_manifest(root, name, "val")
        decoded = {tokenizer.decode(val.document(i)[:-1].tolist()) for i in range(val.num_docs)}
        assert decoded and not decoded & stream

    # a different split would put text the tokenizer saw into validation: refused, with the fix
    with pytest.raises(TokenizerError, match=r"trained without the validation split.*held_out="):
        tokenize_manifest(root, None, TokenizeConfig(val_fraction=0.05), show_progress=False)
