"""The work-directory layout: `curated/data/` loads as a dataset, the tokenizer folder loads with AutoTokenizer,
the dataset card says what is there, and downloads are cached outside the checkout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mixlab.curation.datacard import card_path, read_front_matter
from mixlab.curation.manifest import DATA_DIR, SCHEMA_VERSION, ManifestError, ShardManifest, SourceEntry
from mixlab.curation.token_shards import TokenSource, tokenize_manifest
from mixlab.curation.tokenizer import (
    EOS_TOKEN,
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TokenizerConfig,
    load_tokenizer,
    train_tokenizer,
)
from mixlab.pipelines.corpus import default_cache_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS_CHECKED = 30  # a few documents of every source: code, prose in five languages, math, chat


def loadable_sources(manifest: ShardManifest) -> dict[str, SourceEntry]:
    return {name: entry for name, entry in manifest.sources.items() if entry.docs > 0}


@pytest.fixture(scope="module")
def tokenized(curated_dir: Path, tmp_path_factory) -> Path:
    """A private copy of the curated fixture with a small trained tokenizer and token shards."""
    work = Path(shutil.copytree(curated_dir, tmp_path_factory.mktemp("layout") / "curated"))
    train_tokenizer(work, TokenizerConfig(vocab_size=600), show_progress=False)
    tokenize_manifest(work, show_progress=False)
    return work


def test_curated_parquet_lives_under_data(curated_dir: Path, curated_manifest: ShardManifest) -> None:
    for name, entry in curated_manifest.sources.items():
        assert entry.shards, name
        for shard in entry.shards:
            assert shard.path.startswith(f"{DATA_DIR}/{name}/") and shard.path.endswith(".parquet"), shard.path
    # nothing but the card and one folder of Parquet per source in what users load
    data = curated_dir / DATA_DIR
    assert {p.name for p in data.iterdir()} == {"README.md", *curated_manifest.sources}
    assert {p.suffix for p in data.glob("*/*")} == {".parquet"}
    for kept_elsewhere in ("logs", "work"):
        assert (curated_dir / kept_elsewhere).is_dir() and not (data / kept_elsewhere).exists()


def test_dataset_card_front_matter_lists_every_nonempty_source(curated_dir: Path,
                                                                curated_manifest: ShardManifest) -> None:
    header = read_front_matter(curated_dir / DATA_DIR / "README.md")
    configs = {c["config_name"]: c for c in header["configs"]}
    assert set(configs) == {"default", *loadable_sources(curated_manifest)}
    assert configs["default"]["default"] is True
    assert sorted(configs["default"]["data_files"][0]["path"]) == sorted(
        f"{name}/*.parquet" for name in loadable_sources(curated_manifest))
    for name in loadable_sources(curated_manifest):
        assert configs[name]["data_files"] == [{"split": "train", "path": f"{name}/*.parquet"}]
    assert {"en", "de", "fr", "es", "ru"} <= set(header["language"])
    body = (curated_dir / DATA_DIR / "README.md").read_text()
    for name, entry in curated_manifest.sources.items():
        assert f"| {name} | {entry.kind} | {entry.docs:,} |" in body
        assert " → ".join(f"{s.name} {s.kept:,}" for s in entry.steps) in body
    assert "MPL-2.0" in body and "not tokenized" in body


def test_load_dataset_reads_the_data_folder_offline(curated_dir: Path, curated_manifest: ShardManifest,
                                                     tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    data = str(curated_dir / DATA_DIR)
    everything = datasets.load_dataset(data, cache_dir=str(tmp_path / "hf"))["train"]
    sources = loadable_sources(curated_manifest)
    assert everything.num_rows == sum(e.docs for e in sources.values())
    assert everything.column_names == ["text", "id", "metadata"]
    assert sorted({m["source"] for m in everything["metadata"]}) == sorted(sources)
    for name in ("math", "web-de"):
        one = datasets.load_dataset(data, name=name, cache_dir=str(tmp_path / "hf"))["train"]
        assert one.num_rows == sources[name].docs
        assert {m["source"] for m in one["metadata"]} == {name}
        first_shard = curated_manifest.resolve(sources[name].shards[0].path)
        assert set(pq.read_table(first_shard, columns=["id"]).column(0).to_pylist()) <= set(one["id"])


def test_duckdb_reads_the_glob(curated_dir: Path, curated_manifest: ShardManifest) -> None:
    import duckdb

    glob = (curated_dir / DATA_DIR / "*" / "*.parquet").as_posix()
    rows = duckdb.sql(f"SELECT metadata.source, count(*) FROM read_parquet('{glob}') GROUP BY 1").fetchall()
    assert dict(rows) == {name: e.docs for name, e in loadable_sources(curated_manifest).items()}


def test_a_source_without_documents_gets_no_config(curated_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """An empty source in the card would point load_dataset at an empty glob, which fails."""
    copy = tmp_path / "curated"
    shutil.copytree(curated_dir / DATA_DIR / "math", copy / DATA_DIR / "math")
    manifest = ShardManifest.load(curated_dir)
    manifest.sources = {"math": manifest.sources["math"],
                        "web-xx": SourceEntry(name="web-xx", kind="web", docs=0)}
    manifest.save(copy)
    header = read_front_matter(card_path(manifest))
    assert [c["config_name"] for c in header["configs"]] == ["default", "math"]
    assert "`web-xx` (no documents survived curation)" in card_path(manifest).read_text()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset(str(copy / DATA_DIR), cache_dir=str(tmp_path / "hf"))["train"]
    assert loaded.num_rows == manifest.sources["math"].docs


def test_card_follows_the_manifest_after_tokenization(tokenized: Path) -> None:
    manifest = ShardManifest.load(tokenized)
    body = card_path(manifest).read_text()
    assert "not tokenized" not in body
    for name, entry in manifest.sources.items():
        assert f"{entry.tokens['train']:,} / {entry.tokens['val']:,}" in body, name
    assert f"`../{manifest.tokenizer.path}`" in body


def test_tokenizer_folder_loads_with_auto_tokenizer(tokenized: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    folder = tokenized / "tokenizer"
    config = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] > 0
    assert json.loads((folder / SPECIAL_TOKENS_MAP_FILE).read_text())["eos_token"] == EOS_TOKEN
    auto = AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    assert auto.eos_token == EOS_TOKEN and auto.eos_token_id == ours.token_to_id(EOS_TOKEN)
    assert auto.pad_token == "<|pad|>" and auto.bos_token is None
    assert {"<|im_start|>", "<|im_end|>"} <= set(auto.all_special_tokens)
    manifest = ShardManifest.load(tokenized)
    texts = []
    for entry in manifest.sources.values():
        texts += pq.read_table(manifest.resolve(entry.shards[0].path), columns=["text"]).column(0).to_pylist()[:5]
    assert len(texts) >= TEXTS_CHECKED
    for text in texts:
        ids = auto.encode(text)
        assert ids == ours.encode(text).ids  # no BOS/EOS added: the same ids as mixlab's own tokenizer
        assert auto.decode(ids) == text


def test_auto_tokenizer_eos_is_the_token_shard_eos(tokenized: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(str(tokenized / "tokenizer")).eos_token_id
    for name in ("math", "chat"):
        source = TokenSource.from_manifest(tokenized, name, "train")
        ends = [int(source.document(i)[-1]) for i in range(min(source.num_docs, 50))]
        assert ends and set(ends) == {eos_id}, name


def test_a_tokenizer_brought_from_elsewhere_gets_the_transformers_files(tokenized: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    work = Path(shutil.copytree(tokenized, tmp_path / "curated"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(work / "tokenizer" / "tokenizer.json", outside / "tokenizer.json")
    shutil.rmtree(work / "tokenizer")
    manifest = ShardManifest.load(work)
    manifest.tokenizer = None
    manifest.save()
    tokenize_manifest(work, outside, show_progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(work / "tokenizer"))
    assert auto.eos_token_id == load_tokenizer(outside).token_to_id(EOS_TOKEN)


def test_an_old_layout_manifest_says_to_curate_again(tmp_path: Path) -> None:
    old = {"schema_version": SCHEMA_VERSION - 1, "sources": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ManifestError, match=r"older mixlab.*<curated>/<source>/.*`mixlab curate"):
        ShardManifest.load(tmp_path)


def test_download_cache_is_the_users_not_the_checkout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MIXLAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "mixlab" / "downloads"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "mixlab" / "downloads"
    monkeypatch.setenv("MIXLAB_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    for variable in ("MIXLAB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable)
    assert not default_cache_dir().is_relative_to(REPO_ROOT)
