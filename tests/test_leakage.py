"""Held-out leakage on real stdlib text: a validation document copied (lightly edited) into another
source's training data is found; the clean corpus has none; counts land in the manifest."""

from __future__ import annotations

from mixlab.curation import ShardManifest, TokenizeConfig, held_out_leakage, record_leakage
from mixlab.curation.splits import split_source
from stdlib_corpus import stdlib_code_docs, stdlib_prose_docs, write_source


def _manifest(root, prose_extra=()):
    manifest = ShardManifest()
    manifest.sources["code"] = write_source(root, "code", "code", stdlib_code_docs(), shards=2)
    manifest.sources["prose"] = write_source(root, "prose", "web", [*stdlib_prose_docs(), *prose_extra], shards=1)
    manifest.save(root)
    return manifest


def _jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text):
        words = text.split()
        return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_every_reported_leak_is_a_real_near_duplicate(tmp_path):
    # this corpus is not deduplicated: pydoc's topics "if" and "else" are the same page, and one of them
    # lands in the held-out split; distinct stdlib modules do not look alike
    manifest = _manifest(tmp_path)
    report = held_out_leakage(manifest, TokenizeConfig())
    assert report.checked["code"] >= 8 and report.checked["prose"] >= 8
    assert report.leaked["code"] == 0
    texts = {d["id"]: d["text"] for d in [*stdlib_code_docs(), *stdlib_prose_docs()]}
    for source, examples in report.examples.items():
        for ex in examples:
            assert _jaccard(texts[ex["val_id"]], texts[ex["train_id"]]) >= 0.6, (source, ex)


def test_a_copied_validation_document_is_found_in_the_other_source(tmp_path):
    split = TokenizeConfig()
    clean = _manifest(tmp_path / "clean")
    val_id = sorted(split_source(clean, "code", split).val_ids)[0]
    original = next(d for d in stdlib_code_docs() if d["id"] == val_id)
    copy = {"id": "prose/copied", "text": original["text"].replace("def ", "def  ", 1) + "\n# copied",
            "metadata": {"path": "copied"}}

    manifest = _manifest(tmp_path / "leaky", prose_extra=[copy])
    report = held_out_leakage(manifest, split)
    assert report.leaked["code"] == 1  # the copy, and nothing else
    assert report.examples["code"] == [{"val_id": val_id, "train_source": "prose", "train_id": "prose/copied"}]

    record_leakage(manifest, report)
    saved = ShardManifest.load(tmp_path / "leaky").source("code").metadata_summary["held_out_leakage"]
    assert saved["val_near_duplicates_in_train"] == 1 and saved["val_docs"] == report.checked["code"]
