"""Existing tokenizers, several vocabulary sizes, and `mixlab tokenizer compare`, on the real curated test corpus
with real shipped tokenizers: Anthropic's 65k byte-level BPE (litellm wheel) and Mistral's 32k sentencepiece BPE
with byte fallback (mistral-common wheel), both fetched through the Downloads cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mixlab.curation.manifest import ShardManifest, sha256_file
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer
from mixlab.curation.token_shards import TokenSource, read_doc_metadata
from mixlab.curation.tokenizer import (
    TokenizerError,
    byte_length_rule,
    install_tokenizer,
    load_tokenizer,
    sentencepiece_to_tokenizer_json,
    token_byte_lengths,
)
from mixlab.curation.tokenizer_compare import compare_tokenizers, sample_documents, write_comparison
from mixlab.pipelines.cli import main
from mixlab.pipelines.corpus import Downloads, default_cache_dir
from mixlab.pipelines.tokenize import candidates_from_args
from mixlab.training.errors import ConfigError
from stdlib_corpus import copy_untokenized_sources

LITELLM_WHEEL = ("litellm", "1.60.0")
MISTRAL_WHEEL = ("mistral-common", "1.5.1")
DOCS_PER_GROUP = 4


@pytest.fixture(scope="module")
def anthropic_json() -> Path:
    root = Downloads(default_cache_dir()).wheel(*LITELLM_WHEEL)
    return root / "litellm" / "litellm_core_utils" / "tokenizers" / "anthropic_tokenizer.json"


@pytest.fixture(scope="module")
def mistral_model() -> Path:
    return Downloads(default_cache_dir()).wheel(*MISTRAL_WHEEL) / "mistral_common" / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def mistral_json(mistral_model: Path, tmp_path_factory) -> Path:
    return sentencepiece_to_tokenizer_json(mistral_model, tmp_path_factory.mktemp("spm") / "mistral.json")


@pytest.fixture(scope="module")
def comparison(tokenized_curated: Path, anthropic_json: Path, mistral_model: Path, tmp_path_factory):
    mixlab_bpe = tokenized_curated / "tokenizer"
    return compare_tokenizers(
        tokenized_curated,
        [f"mixlab={mixlab_bpe}", f"claude={anthropic_json}", f"mistral={mistral_model}"],
        docs_per_group=DOCS_PER_GROUP,
        scratch_dir=tmp_path_factory.mktemp("compare"),
    )


def _first_docs(curated: Path, group_by: str, group: str, n: int) -> list[tuple[str, str, str]]:
    """(text, domain, language) of the first n documents of a group, read straight from the shards."""
    manifest = ShardManifest.load(curated)
    out = []
    for name in sorted(manifest.sources):
        entry = manifest.sources[name]
        for shard in entry.shards:
            for row in pq.read_table(manifest.resolve(shard.path), columns=["text", "metadata"]).to_pylist():
                meta = row["metadata"] or {}
                domain, language = meta.get("kind") or entry.kind, meta.get("language") or "unknown"
                if row["text"] and (domain if group_by == "domain" else language) == group and len(out) < n:
                    out.append((row["text"], domain, language))
    return out


def _words(text: str, domain: str, language: str) -> int:
    splitter = WarmSpacyTokenizer(language) if domain == "web" else RegexWordTokenizer(domain)
    return len(splitter.word_tokenize(text))


@pytest.mark.parametrize("group_by,group", [("language", "ru"), ("language", "de"), ("domain", "code"),
                                            ("domain", "chat")])
def test_fertility_by_hand_equals_the_table(comparison, tokenized_curated, anthropic_json, group_by, group):
    docs = _first_docs(tokenized_curated, group_by, group, DOCS_PER_GROUP)
    assert len(docs) == DOCS_PER_GROUP
    tokenizer = load_tokenizer(anthropic_json)
    words = sum(_words(*doc) for doc in docs)
    tokens = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text, _, _ in docs)
    nbytes = sum(len(text.encode("utf-8")) for text, _, _ in docs)
    row = comparison.row("claude", group_by, group)
    assert (row.docs, row.words, row.tokens, row.bytes) == (DOCS_PER_GROUP, words, tokens, nbytes)
    assert row.fertility == pytest.approx(tokens / words)
    assert row.bytes_per_token == pytest.approx(nbytes / tokens)


def test_byte_level_has_no_fallback_and_sentencepiece_does(comparison, tokenized_curated, mistral_json):
    for row in comparison.rows:
        if row.tokenizer in ("mixlab", "claude"):
            assert row.byte_fallback_tokens == 0 and row.unk_tokens == 0, row
    assert comparison.tokenizers["mixlab"]["kind"] == "bpe-bytelevel"
    assert comparison.tokenizers["mistral"]["kind"] == "bpe+bytefallback"
    assert comparison.tokenizers["mistral"]["bits_per_byte"] == "exact + 1 byte/doc (dummy prefix)"
    assert comparison.tokenizers["mixlab"]["bits_per_byte"] == "exact"
    mistral_rows = [r for r in comparison.rows if r.tokenizer == "mistral"]
    assert any(r.byte_fallback_share > 0 for r in mistral_rows)
    # the count by hand: <0xNN> tokens in the first Russian documents
    tokenizer = load_tokenizer(mistral_json)
    docs = _first_docs(tokenized_curated, "language", "ru", DOCS_PER_GROUP)
    fallback = sum(sum(1 for t in tokenizer.encode(text, add_special_tokens=False).tokens
                       if re.fullmatch(r"<0x[0-9A-F]{2}>", t)) for text, _, _ in docs)
    assert comparison.row("mistral", "language", "ru").byte_fallback_tokens == fallback
    # the converted sentencepiece model is lossless on real text: byte fallback really covers every character
    for text, _, _ in docs:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text


def test_sample_is_deterministic_first_docs_per_group(tokenized_curated):
    manifest = ShardManifest.load(tokenized_curated)
    first, again = sample_documents(manifest, 3), sample_documents(manifest, 3)
    assert first == again
    ru = [d.text for d in first if d.language == "ru"][:3]
    assert ru == [text for text, _, _ in _first_docs(tokenized_curated, "language", "ru", 3)]


def test_written_into_the_card_folder(comparison, tokenized_curated):
    paths = write_comparison(tokenized_curated, comparison)
    assert {p.parent for p in paths.values()} == {tokenized_curated / "data"}
    table = json.loads(paths["json"].read_text())
    row = comparison.row("mistral", "domain", "math")
    (stored,) = [r for r in table["rows"] if (r["tokenizer"], r["group_by"], r["group"]) == ("mistral", "domain", "math")]
    assert stored["tokens"] == row.tokens and stored["fertility"] == pytest.approx(row.fertility)
    markdown = paths["markdown"].read_text()
    assert "## Per language" in markdown and f"{row.fertility:.3f}" in markdown
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare(tokenized_curated, anthropic_json, capsys):
    assert main(["tokenizer", "compare", "--curated", str(tokenized_curated), "--tokenizer", str(anthropic_json),
                 "--tokenizer", f"own={tokenized_curated / 'tokenizer' / 'tokenizer.json'}",
                 "--tokenizer", str(tokenized_curated / "tokenizer"), "--docs-per-group", "2", "--json"]) == 0
    out = capsys.readouterr().out
    table = json.loads(out[: out.rindex("}") + 1])
    assert set(table["tokenizers"]) == {"anthropic_tokenizer", "own", tokenized_curated.name}
    assert (tokenized_curated / "data" / "tokenizer_compare.png").is_file()


# ---- tokenizing with existing tokenizers and several vocabulary sizes ---------------------------
@pytest.fixture()
def small_curated(curated_dir: Path, tmp_path: Path) -> Path:
    """Two small web sources of the curated fixture, in a directory of their own, untokenized."""
    return copy_untokenized_sources(curated_dir, tmp_path / "curated", ("web-de", "web-ru"))


def test_tokenize_several_vocab_sizes_and_an_existing_tokenizer(small_curated, anthropic_json, capsys):
    assert main(["tokenize", "--curated", str(small_curated), "--vocab-sizes", "300,400",
                 "--tokenizer", f"claude={anthropic_json}", "--val-fraction", "0.1"]) == 0
    base = ShardManifest.load(small_curated)
    val_ids = {}
    for name, vocab in (("bpe-300", 300), ("bpe-400", 400), ("claude", 65000)):
        folder = small_curated / "tokenized" / name
        manifest = ShardManifest.load(folder)
        info = manifest.tokenizer
        assert info.vocab_size == vocab and info.sha256 == sha256_file(folder / info.path)
        assert [s.sha256 for s in manifest.sources["web-de"].shards] == [s.sha256 for s in base.sources["web-de"].shards]
        source = TokenSource.from_manifest(manifest, "web-de")
        assert source.shards[0].tokens.dtype == np.dtype("<u2") and int(source.flat().max()) < vocab
        val_ids[name] = sorted(read_doc_metadata(manifest, "web-ru", "val", ["id"]).column("id").to_pylist())
        if name.startswith("bpe"):
            lengths = token_byte_lengths(folder / info.path)  # bits per byte: token bytes add up to text bytes
            first_id = read_doc_metadata(manifest, "web-de", "train", ["id"]).column("id")[0].as_py()
            rows = pq.read_table(folder / manifest.sources["web-de"].shards[0].path, columns=["id", "text"]).to_pylist()
            (text,) = [row["text"] for row in rows if str(row["id"]) == first_id]
            assert int(lengths[source.document(0)].sum()) == len(text.encode("utf-8"))
        else:
            assert info.eos_token == "<EOT>" and info.kind == "bpe-bytelevel" and info.held_out is None
    assert val_ids["bpe-300"] == val_ids["bpe-400"] == val_ids["claude"] and val_ids["claude"]
    assert base.tokenizer is None  # the base directory is left untokenized
    assert "[bpe-400]" in capsys.readouterr().out
    # with no --tokenizer, compare takes every candidate tokenized above
    assert main(["tokenizer", "compare", "--curated", str(small_curated), "--docs-per-group", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert set(json.loads(out[: out.rindex("}") + 1])["tokenizers"]) == {"bpe-300", "bpe-400", "claude"}


def test_bad_tokenizer_options_are_refused(small_curated, tmp_path, anthropic_json, monkeypatch):
    with pytest.raises(ConfigError, match="twice"):
        candidates_from_args([300, 300], [])
    monkeypatch.setenv("MIXLAB_DEBUG", "1")  # the CLI re-raises the error it would print
    with pytest.raises(ConfigError, match="--vocab-size"):
        main(["tokenize", "--curated", str(small_curated), "--vocab-size", "300", "--tokenizer", str(anthropic_json)])
    spec = json.loads(anthropic_json.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<EOT>"]
    spec["model"]["vocab"].pop("<EOT>", None)
    no_eos = tmp_path / "no_eos.json"
    no_eos.write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="--eos-token"):
        install_tokenizer(small_curated, no_eos)
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        sentencepiece_to_tokenizer_json(anthropic_json, tmp_path / "x.json")


def test_bits_per_byte_is_defined_for_real_shipped_tokenizers(tokenized_curated, anthropic_json, mistral_json):
    """Mistral's sentencepiece BPE (`▁`, `<0xNN>` fallback, a dummy prefix its decoder strips) sums to the
    document's UTF-8 size plus exactly the 1-byte prefix; the byte-level claude tokenizer sums to it exactly."""
    manifest = ShardManifest.load(tokenized_curated)
    texts = [text for name in sorted(manifest.sources) for shard in manifest.sources[name].shards[:1]
             for text in pq.read_table(manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist()[:5]]
    assert len(texts) >= 20
    rule = byte_length_rule(mistral_json)
    assert (rule.kind, rule.prefix_bytes) == ("metaspace", 1)
    for path, prefix in ((mistral_json, 1), (anthropic_json, 0)):
        lengths, tokenizer = token_byte_lengths(path), load_tokenizer(path)
        fallback = 0
        for text in texts:
            encoding = tokenizer.encode(text, add_special_tokens=False)
            fallback += sum(bool(re.fullmatch(r"<0x[0-9A-F]{2}>", t)) for t in encoding.tokens)
            assert int(lengths[encoding.ids].sum()) == len(text.encode("utf-8")) + prefix, (path.name, text[:40])
        assert (fallback > 0) == (prefix == 1), path.name  # the mistral documents go through byte fallback too
