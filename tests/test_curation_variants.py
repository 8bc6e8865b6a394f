"""Curation variants: only the sources a setting changes are curated again; the rest is the base's, linked."""

import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mixlab.ablations.curation_variants import (
    CurationSettings,
    CurationSettingsError,
    curated_variant,
    curation_label,
    plan_variant,
    recorded_raw_dir,
)
from mixlab.curation import ShardManifest, TokenSource
from mixlab.curation.token_shards import ShardMetadata
from mixlab.curation.tokenizer import tokenizer_id
from mixlab.pipelines.curate import FINGERPRINT


def web_scores(manifest: ShardManifest, source: str) -> dict[str, float]:
    """Document id -> language score of a source's curated shards."""
    scores = {}
    for shard in manifest.source(source).shards:
        for row in pq.read_table(manifest.resolve(shard.path), columns=["id", "metadata"]).to_pylist():
            scores[row["id"]] = row["metadata"]["language_score"]
    return scores


def stamps(root: Path, folders: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file under the folders: anything rewritten or re-run shows here. Not
    fingerprint.json, which `run_source` rewrites on every call (same content) before it decides to run nothing."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for folder in folders for p in sorted((root / folder).rglob("*")) if p.is_file() and p.name != FINGERPRINT}


def assert_valid(manifest: ShardManifest) -> None:
    assert manifest.check() == [] and manifest.verify_checksums() == []


def assert_reused(base: ShardManifest, variant: ShardManifest, name: str) -> None:
    """The source is the base's: same entry, files hard-linked to the base's, never curated in the variant."""
    ours, theirs = variant.source(name), base.source(name)
    assert (ours.docs, ours.shards, ours.token_shards, ours.steps) == (theirs.docs, theirs.shards,
                                                                       theirs.token_shards, theirs.steps)
    for record in [*ours.shards, *ours.token_shards]:
        assert os.path.samefile(variant.resolve(record.path), base.resolve(record.path))
    assert not (variant.root / "logs" / name).exists()


@pytest.fixture(scope="module")
def base(tokenized_curated: Path) -> ShardManifest:
    return ShardManifest.load(tokenized_curated)


@pytest.fixture(scope="module")
def threshold(base: ShardManifest) -> float:
    """A web-en language threshold between the base's median scores: it must drop some of its documents."""
    scores = sorted(set(web_scores(base, "web-en").values()))
    assert len(scores) >= 2, "the fixture's web-en needs two documents with different language scores"
    middle = len(scores) // 2
    return round((scores[middle - 1] + scores[middle]) / 2, 6)


@pytest.fixture(scope="module")
def language_variant(tokenized_curated: Path, threshold: float, tmp_path_factory) -> Path:
    return curated_variant(tokenized_curated, {"web-en.language_threshold": threshold},
                           out_root=tmp_path_factory.mktemp("variants"))


def test_a_language_threshold_variant_recurates_only_web_en(base, language_variant, threshold, raw_corpus):
    variant = ShardManifest.load(language_variant)
    assert_valid(variant)
    assert sorted(variant.sources) == sorted(base.sources)
    kept = web_scores(variant, "web-en")
    expected = {doc for doc, score in web_scores(base, "web-en").items() if score >= threshold}
    assert 0 < len(kept) < base.source("web-en").docs and set(kept) == expected
    assert all(score >= threshold for score in kept.values())
    assert variant.source("web-en").docs == len(kept)
    for name in set(base.sources) - {"web-en"}:
        assert_reused(base, variant, name)
    record = json.loads((language_variant / "variant.json").read_text())
    assert record["settings"] == {"web-en.language_threshold": threshold} and record["curated"] == ["web-en"]
    assert record["hash"] == language_variant.name and record["base"] == str(base.root.resolve())
    assert recorded_raw_dir(base.root, "web-en").resolve() == raw_corpus.resolve()  # found in the base's logs


def test_changed_sources_are_tokenized_with_the_base_tokenizer(base, language_variant):
    variant = ShardManifest.load(language_variant)
    assert variant.tokenizer == base.tokenizer
    entry = variant.source("web-en")
    assert entry.token_shards and entry.tokens["train"] > 0
    assert sum(shard.docs for shard in entry.token_shards) == entry.docs  # every kept document, train or val
    for shard in entry.token_shards:
        assert ShardMetadata.read(variant.resolve(shard.path)).tokenizer == tokenizer_id(base.tokenizer)
    source = TokenSource.from_manifest(variant, "web-en", "train")  # refuses shards of another tokenizer
    assert len(source) == entry.tokens["train"]
    assert "held_out_leakage" in entry.metadata_summary
    # the variant holds out exactly the base's validation documents it kept, and trains on none of the base's
    from mixlab.ablations.tasks.builders import held_out_split

    base_val, _ = held_out_split(base, "web-en")
    variant_val, variant_train = held_out_split(variant, "web-en")
    kept = set(web_scores(variant, "web-en"))
    assert variant_val == base_val & kept and not variant_train & base_val


def test_a_second_call_runs_nothing(tokenized_curated, language_variant, threshold):
    folders = ["logs/web-en", "data", "tokens", "work", "tokenizer"]
    before = stamps(language_variant, folders)
    manifest_before = json.loads((language_variant / "manifest.json").read_text())
    assert any("/completions/" in path for path in before)  # datatrove's markers are among what is watched
    again = curated_variant(tokenized_curated, {"web-en.language_threshold": threshold},
                            out_root=language_variant.parent.parent)
    assert again == language_variant
    assert stamps(language_variant, folders) == before  # no stage ran, no shard was rewritten or re-linked
    assert json.loads((language_variant / "manifest.json").read_text()) == manifest_before
    assert_valid(ShardManifest.load(again))


def test_dedup_off_keeps_every_document_dedup_dropped(base, tokenized_curated, language_variant, tmp_path):
    out = curated_variant(tokenized_curated, {"math.dedup": False}, out_root=tmp_path)
    assert out.name != language_variant.name
    variant = ShardManifest.load(out)
    assert_valid(variant)
    math, before = variant.source("math"), base.source("math")
    assert [s.name for s in before.steps][-1] == "minhash_dedup"
    assert not {"minhash_dedup", "exact_dedup"} & {s.name for s in math.steps}
    first_dedup = next(s for s in before.steps if s.name in ("exact_dedup", "minhash_dedup"))
    assert math.docs == first_dedup.docs_in >= before.docs  # what the base had before any dedup
    assert math.token_shards and variant.tokenizer == base.tokenizer
    for name in set(base.sources) - {"math"}:
        assert_reused(base, variant, name)


def test_settings_equal_to_the_base_recipe_change_nothing(base, tokenized_curated, tmp_path):
    recorded = json.loads((tokenized_curated / "logs" / "math" / "fingerprint.json").read_text())["config"]
    settings = {"math.quality.min_words": recorded["quality"]["min_words"]}
    assert plan_variant(tokenized_curated, settings).recipes == {}
    variant = ShardManifest.load(curated_variant(tokenized_curated, settings, out_root=tmp_path))
    assert_valid(variant)
    for name in base.sources:
        assert_reused(base, variant, name)


def test_bad_settings_name_the_key_and_the_valid_choices(base, tokenized_curated, tmp_path):
    kinds = {name: entry.kind for name, entry in base.sources.items()}
    with pytest.raises(CurationSettingsError, match=r"'web.language_treshold'.*language_threshold"):
        CurationSettings.parse({"web.language_treshold": 0.8}, kinds)
    with pytest.raises(CurationSettingsError, match=r"'web-it.language_threshold'.*web-en"):
        CurationSettings.parse({"web-it.language_threshold": 0.8}, kinds)
    with pytest.raises(CurationSettingsError, match=r"'math.quality.min_wordz'.*quality.min_words"):
        CurationSettings.parse({"math.quality.min_wordz": 3}, kinds)
    with pytest.raises(CurationSettingsError, match="one by one"):
        CurationSettings.parse({"web.gopher": {"min_doc_words": 10}}, kinds)
    with pytest.raises(CurationSettingsError, match="not a number"):
        CurationSettings.parse({"web.language_threshold": "high"}, kinds)
    with pytest.raises(CurationSettingsError, match=r"\[0, 1\]"):
        CurationSettings.parse({"web-en.gopher.max_non_alpha_words_ratio": 1.5}, kinds)
    with pytest.raises(CurationSettingsError, match="dedup off"):
        plan_variant(tokenized_curated, {"web.dedup": False, "web-en.minhash.n_grams": 3})
    with pytest.raises(CurationSettingsError, match="'code-python.language_threshold'"):
        curated_variant(tokenized_curated, {"code-python.language_threshold": 0.5}, out_root=tmp_path)
    assert not (tmp_path / "curated-variants").exists()  # refused before anything was written


def test_settings_hash_and_label():
    one = CurationSettings.parse({"web.language_threshold": 1, "math.dedup": False})
    same = CurationSettings.parse({"math.dedup": False, "web.language_threshold": 1.0})
    other = CurationSettings.parse({"web.language_threshold": 0.9, "math.dedup": False})
    assert one.digest() == same.digest() != other.digest()
    ordered = CurationSettings.parse({"web-en.language_threshold": 0.8, "web.language_threshold": 0.9, "dedup": False})
    assert [s.key for s in ordered.items] == ["dedup", "web.language_threshold", "web-en.language_threshold"]
    assert curation_label({"math.dedup": False}) == "math.dedup=off"
    assert curation_label({"web-en.gopher.max_non_alpha_words_ratio": 0.7}) == "web-en.max_non_alpha_words_ratio=0.7"


def test_source_settings_win_over_kind_settings(tokenized_curated):
    plan = plan_variant(tokenized_curated, {"web.language_threshold": 0.9, "web-en.language_threshold": 0.7,
                                            "dedup": False, "web-de.dedup": True})
    assert plan.recipes["web-en"].language_threshold == 0.7 and plan.recipes["web-fr"].language_threshold == 0.9
    assert plan.recipes["web-de"].minhash is not None and plan.recipes["web-fr"].minhash is None
    assert plan.recipes["math"].minhash is None and plan.reused == []


def test_an_unrecorded_raw_folder_must_be_given(tokenized_curated, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenized_curated / "manifest.json", bare / "manifest.json")  # no logs: nothing records the raw
    with pytest.raises(FileNotFoundError, match="raw_dir="):
        curated_variant(bare, {"math.dedup": False}, out_root=tmp_path)


def test_a_spec_with_a_curation_axis_trains_each_variant_on_its_own_curated_dataset(tokenized_curated, threshold,
                                                                                 tmp_path):
    """`curation.<key>` axes: the variant's run document points at its curated variant, which the launcher
    builds before training (reusing the other sources); the plan works before and after."""
    from mixlab.ablations import AblationSpec, Axis
    from mixlab.ablations.curation_variants import variant_dir
    from mixlab.ablations.launch import plan_lines, prepare_curation_variants, proxy_runs, resolved_config

    spec = AblationSpec(name="lid", base={"runs_dir": str(tmp_path / "runs"), "data": {"curated": str(tokenized_curated)},
                                          "model": {"preset": "tiny"}, "train": {"preset": "tiny", "total_steps": 10}},
                        axes=(Axis("curation.web-en.language_threshold", [threshold]),))
    base_proxy, variant_proxy = proxy_runs(spec)
    settings = {"web-en.language_threshold": threshold}
    assert variant_proxy.variant.curation == settings
    assert variant_proxy.variant.name == f"language_threshold={threshold:g}"
    document = variant_proxy.variant.document(spec.base)
    assert document["data"]["curated"] == str(variant_dir(tokenized_curated, settings))
    assert "curation" not in document  # a curation setting is not a run field
    assert document["eval"]["curated"] == str(tokenized_curated)  # scored on the base's held-out documents
    assert base_proxy.variant.document(spec.base)["data"]["curated"] == str(tokenized_curated)
    assert len(plan_lines(spec, measure=False)) == 4  # planned before the variant exists

    built = prepare_curation_variants(spec, [variant_proxy])
    assert built == [variant_dir(tokenized_curated, settings)]
    variant = ShardManifest.load(built[0])
    assert variant.source("web-en").docs < ShardManifest.load(tokenized_curated).source("web-en").docs
    config = resolved_config(document)
    assert config.curated_dir == built[0]
    from mixlab.pipelines.pretrain import held_out_manifest

    assert held_out_manifest(config, variant).root == Path(tokenized_curated)
    with pytest.raises(Exception, match="web-en.nonsense"):
        AblationSpec(name="bad", base=spec.base, axes=(Axis("curation.web-en.nonsense", [1]),))
