"""FastMinhashDedupSignature writes datatrove's MinHash signature files byte for byte, and the four stages
remove the same documents with either signature step (real documents of the test corpus, several sources).

Each source's documents get near copies of some of them (a word dropped every 40), so that the clusters
compared are not empty."""

from __future__ import annotations

import filecmp
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer
from mixlab.curation.dedup import MinhashSettings, minhash_stages
from mixlab.curation.fast_minhash import FastMinhashDedupSignature, FastSimplify, splits_per_whitespace_run
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer

# (source, datatrove's step's words, the fast step's words): the same splitting, as the recipes configure it
SOURCES = [
    ("web-en", "en", WarmSpacyTokenizer("en")),
    ("web-en", "en", "en"),
    ("web-de", "de", WarmSpacyTokenizer("de")),
    ("web-es", "es", WarmSpacyTokenizer("es")),  # Spanish has a special case spanning whitespace ("EE. UU.")
    ("web-ru", "ru", WarmSpacyTokenizer("ru")),
    ("code-python", RegexWordTokenizer("code"), RegexWordTokenizer("code")),
    ("math", RegexWordTokenizer("math"), RegexWordTokenizer("math")),
    ("chat", RegexWordTokenizer("chat"), RegexWordTokenizer("chat")),
]


def near_copy(text: str) -> str:
    words = text.split(" ")
    return " ".join(w for i, w in enumerate(words) if i % 40 != 39)


def source_ranks(curated_dir: Path, source: str, limit: int = 400) -> list[list[Document]]:
    """Two ranks of the source's curated documents, with near copies of every 4th document of rank 0 spread over
    both, and an exact copy of one."""
    manifest = ShardManifest.load(curated_dir)
    docs: list[Document] = []
    for shard in manifest.source(source).shards:
        table = pq.read_table(manifest.resolve(shard.path), columns=["id", "text"])
        docs += [Document(text=t, id=str(i)) for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist(),
                                                             strict=True)]
    docs = docs[:limit]
    half = len(docs) // 2
    rank0, rank1 = docs[:half], docs[half:]
    copies = [Document(text=near_copy(d.text), id=f"{d.id}#near") for d in rank0[::4] if len(d.text.split()) > 60]
    exact = [Document(text=rank0[1].text, id=f"{rank0[1].id}#exact")]  # equal signatures: the records tie
    return [rank0 + copies[: len(copies) // 2] + exact, rank1 + copies[len(copies) // 2:]]


def write_signatures(step_class, folder: Path, config: MinhashConfig, words, ranks: list[list[Document]],
                     **kwargs) -> list[Path]:
    for rank, docs in enumerate(ranks):
        step_class(str(folder), config=config, language=words, **kwargs).run(iter(docs), rank, len(ranks))
    return sorted(p.relative_to(folder) for p in folder.rglob("*.minhash.sig"))


def assert_same_files(stock: Path, fast: Path, config: MinhashConfig, ranks: int) -> None:
    files = sorted(p.relative_to(stock) for p in stock.rglob("*.minhash.sig"))
    assert len(files) == config.num_buckets * ranks
    assert sorted(p.relative_to(fast) for p in fast.rglob("*.minhash.sig")) == files
    different = [str(f) for f in files if not filecmp.cmp(stock / f, fast / f, shallow=False)]
    assert not different, f"signature files differ from datatrove's: {different}"
    assert any((stock / f).stat().st_size for f in files)


@pytest.mark.parametrize(("source", "stock_words", "fast_words"), SOURCES,
                         ids=[f"{s}-{type(w).__name__}" for s, _, w in SOURCES])
def test_signature_files_equal_datatrove_byte_for_byte(curated_dir: Path, tmp_path: Path, source: str,
                                                       stock_words, fast_words) -> None:
    config = MinhashSettings().config()
    ranks = source_ranks(curated_dir, source)
    write_signatures(MinhashDedupSignature, tmp_path / "stock", config, stock_words, ranks)
    write_signatures(FastMinhashDedupSignature, tmp_path / "fast", config, fast_words, ranks)
    assert_same_files(tmp_path / "stock", tmp_path / "fast", config, len(ranks))


@pytest.mark.parametrize("config", [
    MinhashConfig(n_grams=3, num_buckets=5, hashes_per_bucket=4, seed=7, hash_config=HashConfig(precision=32)),
    MinhashConfig(n_grams=1, hash_config=HashConfig(precision=64, hash_fc="sha1")),
    MinhashConfig(n_grams=5, hash_config=HashConfig(precision=32, hash_fc="sha1")),
], ids=["xxhash32-3gram", "sha1-64-1gram", "sha1-32"])
def test_other_hash_settings_and_tiny_batches_stay_byte_identical(curated_dir: Path, tmp_path: Path,
                                                                  config: MinhashConfig) -> None:
    """32-bit and sha1 hashes, other n-grams and seeds; batches of 7 shingles make every long document take the
    running-minimum path over many chunks, and `spill_bytes=1` sends every batch to the bucket files."""
    ranks = source_ranks(curated_dir, "web-fr", limit=30)
    write_signatures(MinhashDedupSignature, tmp_path / "stock", config, "fr", ranks)
    write_signatures(FastMinhashDedupSignature, tmp_path / "fast", config, WarmSpacyTokenizer("fr"), ranks,
                     batch_shingles=7, spill_bytes=1)
    assert_same_files(tmp_path / "stock", tmp_path / "fast", config, len(ranks))


def run_stages(work: Path, ranks: list[list[Document]], words, stock_signatures: bool) -> set[str]:
    """`minhash_stages` end to end (stage 1 swapped for datatrove's when `stock_signatures`): the removed ids."""
    settings = MinhashSettings(across_sources=False)
    stages = minhash_stages(work, settings, words)
    signature_steps = ([MinhashDedupSignature(str(work / "signatures"), config=settings.config(), language=words)]
                       if stock_signatures else stages.signatures)
    for rank, docs in enumerate(ranks):
        for step in signature_steps:
            step.run(iter(docs), rank, len(ranks))
    for bucket in range(stages.buckets_tasks):
        for step in stages.buckets:
            step.run(None, bucket, stages.buckets_tasks)
    for step in stages.clusters:
        step.run(None, 0, 1)
    kept = set()
    for rank, docs in enumerate(ranks):
        copies = [Document(text=d.text, id=d.id) for d in docs]
        kept |= {d.id for d in stages.filter.run(iter(copies), rank, len(ranks))}
    return {d.id for r in ranks for d in r} - kept


@pytest.mark.parametrize(("source", "words"), [("web-en", WarmSpacyTokenizer("en")),
                                               ("math", RegexWordTokenizer("math"))])
def test_stages_one_to_four_remove_the_same_documents(curated_dir: Path, tmp_path: Path, source: str,
                                                      words) -> None:
    ranks = source_ranks(curated_dir, source)
    stages = minhash_stages(tmp_path / "probe", MinhashSettings(), words)
    assert isinstance(stages.signatures[0], FastMinhashDedupSignature)  # what `mixlab curate` runs
    removed_stock = run_stages(tmp_path / "stock", ranks, words, stock_signatures=True)
    removed_fast = run_stages(tmp_path / "fast", ranks, words, stock_signatures=False)
    near = {d.id for r in ranks for d in r if d.id.endswith(("#near", "#exact"))}
    assert near and near <= removed_stock  # the clusters compared are real ones
    assert removed_fast == removed_stock


def test_per_run_words_need_a_tokenizer_that_splits_runs_alone() -> None:
    simplify = FastSimplify(MinhashConfig().norm_config)
    assert splits_per_whitespace_run(WarmSpacyTokenizer("es"), simplify)  # "EE. UU." cannot survive simplifying
    assert splits_per_whitespace_run(RegexWordTokenizer("code"), simplify)

    class Pairs(WordTokenizer):  # words are pairs of whitespace runs: not per run
        def word_tokenize(self, text: str) -> list[str]:
            runs = text.split()
            return [" ".join(runs[i:i + 2]) for i in range(0, len(runs), 2)]

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    assert not splits_per_whitespace_run(Pairs("xx"), simplify)
    spanning = SpaCyTokenizer("en")
    spanning.tokenizer.tokenizer.add_special_case("new york", [{"ORTH": "new york"}])
    assert not splits_per_whitespace_run(spanning, simplify)


def test_a_tokenizer_not_split_per_run_still_gives_datatrove_files(curated_dir: Path, tmp_path: Path) -> None:
    spanning = SpaCyTokenizer("en")
    spanning.tokenizer.tokenizer.add_special_case("the", [{"ORTH": "t"}, {"ORTH": "he"}])
    spanning.tokenizer.tokenizer.add_special_case("of the", [{"ORTH": "of the"}])
    config = replace(MinhashSettings().config(), n_grams=2)
    ranks = source_ranks(curated_dir, "web-en", limit=10)
    write_signatures(MinhashDedupSignature, tmp_path / "stock", config, spanning, ranks)
    write_signatures(FastMinhashDedupSignature, tmp_path / "fast", config, spanning, ranks)
    assert_same_files(tmp_path / "stock", tmp_path / "fast", config, len(ranks))


def test_fast_simplify_equals_datatrove_simplify_text(curated_dir: Path) -> None:
    from datatrove.utils.text import TextNormConfig, simplify_text

    texts = [d.text for s in ("web-de", "web-fr", "web-ru", "math") for r in source_ranks(curated_dir, s, 20)
             for d in r] + ["  Ça  ́ va? \u0301 x ", "e\u0301\u0302\u0303 ", "\u0301", "",
                        "Monday, 12.5 March — «Ça» 3,14 ‽ lone \ud800 surrogate", "ASCII: a-b_c (d) 1.2!"]
    for config in (TextNormConfig(), TextNormConfig(norm_whitespace=False), TextNormConfig(norm_numbers=False),
                   TextNormConfig(norm_weekdays=True, norm_monthnames=True), TextNormConfig(remove_punctuation=False),
                   TextNormConfig(lowercase=False, norm_unicode_diacritics=False)):
        fast, for_runs = FastSimplify(config), FastSimplify(config, for_runs=True)
        assert [fast(t) for t in texts] == [simplify_text(t, config) for t in texts]
        assert [for_runs(t).split() for t in texts] == [simplify_text(t, config).split() for t in texts]
