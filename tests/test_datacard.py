"""The data card (`curated/card/README.md`): figures, the funnel per step, examples of dropped documents, and the
report's link to it, on the real test corpus."""

from __future__ import annotations

import gzip
import html
import json
import re
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from mixlab.curation import datacard
from mixlab.curation.datacard import data_card, data_card_path, write_data_card
from mixlab.curation.drop_samples import attach_drop_samples, dropped_dir, read_drop_samples
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.stages import SourceLayout
from mixlab.pipelines.curate import curate, recipe_for

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLED_SOURCES = ("math", "web-en")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def card_copy(curated_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the curated fixture whose manifest was saved again (which writes the card)."""
    copy = tmp_path / "curated"
    shutil.copytree(curated_dir, copy, ignore=shutil.ignore_patterns("card"))
    ShardManifest.load(copy).save()
    return copy


def funnel_table(card: str, source: str) -> list[list[str]]:
    section = card[card.index(f"### {source}\n"):]
    section = section[:section.index("\n### ")] if "\n### " in section else section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| step ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_saving_a_manifest_writes_the_card_with_valid_pngs_linked_relatively(card_copy: Path) -> None:
    manifest = ShardManifest.load(card_copy)
    card_path = data_card_path(manifest)
    text = card_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"languages.png", "length.png", "scores.png", "clusters.png", "funnel.png"} <= set(links)
    for link in links:
        assert not link.startswith("/") and "/" not in link  # relative, next to the card
        width, height = png_size(card_path.parent / link)
        assert width > 100 and height > 100
    assert not list((card_copy / "data").rglob("*.png"))  # data/ holds only what users load
    assert "../card/README.md" in (card_copy / "data" / "README.md").read_text()


def test_the_funnel_table_has_the_manifests_numbers(card_copy: Path) -> None:
    manifest = ShardManifest.load(card_copy)
    text = data_card_path(manifest).read_text()
    for name, entry in manifest.sources.items():
        rows = funnel_table(text, name)
        assert [r[0] for r in rows] == [s.name for s in entry.steps]
        for row, step in zip(rows, entry.steps, strict=True):
            assert [int(c.replace(",", "")) for c in row[1:4]] == [step.docs_in, step.kept, step.dropped_total]
            for reason, n in step.dropped.items():
                assert f"{reason} {n:,}" in row[4]
        assert entry.steps[0].docs_in == entry.steps[-1].kept + sum(s.dropped_total for s in entry.steps)


def test_histograms_match_the_shards_and_are_not_recounted_on_an_unchanged_save(card_copy: Path,
                                                                                 monkeypatch) -> None:
    manifest = ShardManifest.load(card_copy)
    histograms = json.loads((card_copy / "card" / "histograms.json").read_text())
    for name, entry in manifest.sources.items():
        assert sum(histograms[name]["histograms"]["length"]) == entry.docs
        assert sum(histograms[name]["histograms"]["scores"]["language_score"]) == entry.docs
        dup = {int(k): v for k, v in histograms[name]["histograms"]["clusters"]["dup_cluster_size"].items()}
        assert dup == {int(k): v for k, v in entry.metadata_summary["dup_cluster_size_histogram"].items()}
    pngs = {p.name: p.stat().st_mtime_ns for p in (card_copy / "card").glob("*.png")}

    counted: list[Path] = []
    real = datacard._shard_histograms
    monkeypatch.setattr(datacard, "_shard_histograms", lambda path: counted.append(path) or real(path))
    manifest.save()
    assert counted == []  # nothing changed: no Parquet read, no figure drawn
    assert {p.name: p.stat().st_mtime_ns for p in (card_copy / "card").glob("*.png")} == pngs

    entry = manifest.sources["math"]
    entry.shards[0].sha256 = "0" * 64  # as if the shard had been rewritten (e.g. by `mixlab classify annotate`)
    write_data_card(manifest)
    assert counted == [card_copy / entry.shards[0].path, *[card_copy / s.path for s in entry.shards[1:]]]


def _raw_texts(raw: Path, source: str) -> dict[str, str]:
    texts = {}
    for path in sorted((raw / source).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                texts[row["id"]] = row["text"]
    return texts


@pytest.fixture(scope="module")
def sampled(raw_corpus: Path, tmp_path_factory) -> tuple[Path, Path, str]:
    """Two sources curated with drop samples attached, math with one broken raw record (a real record cut in
    half) that the reader quarantines. Returns (raw dir, curated dir, the broken line)."""
    work = tmp_path_factory.mktemp("sampled")
    raw, curated = work / "raw", work / "curated"
    raw.mkdir()
    shutil.copy(raw_corpus / "corpus.json", raw / "corpus.json")
    for source in SAMPLED_SOURCES:
        shutil.copytree(raw_corpus / source, raw / source)
    with gzip.open(raw / "math" / "00000.jsonl.gz", "rt", encoding="utf-8") as handle:
        first = handle.readline().rstrip("\n")
    broken = first[: len(first) // 2]
    (raw / "math" / "zz-broken.jsonl").write_text(broken + "\n", encoding="utf-8")

    def sampling(source: str):
        base = recipe_for(source)

        def build(raw_root: Path, curated_root: Path, tasks: int):
            pipelines = base(raw_root, curated_root, tasks)
            attach_drop_samples(pipelines, SourceLayout(source, Path(raw_root) / source, Path(curated_root)))
            return pipelines
        return build

    curate(raw, curated, sources=list(SAMPLED_SOURCES), tasks=2, workers=2,
           recipes={s: sampling(s) for s in SAMPLED_SOURCES})
    return raw, curated, broken


def test_drop_samples_exist_per_reason_and_are_raw_documents(sampled: tuple[Path, Path, str]) -> None:
    raw, curated, _ = sampled
    manifest = ShardManifest.load(curated)
    assert manifest.check() == []  # sampling the drops changes no count
    math_texts, web_ids = _raw_texts(raw, "math"), set(_raw_texts(raw, "web-en"))
    for name in SAMPLED_SOURCES:
        layout = SourceLayout(name, raw / name, curated)
        samples = read_drop_samples(dropped_dir(layout))
        per_file = Counter((p.name, json.loads(line)["reason"]) for p in dropped_dir(layout).glob("*.jsonl")
                           for line in p.read_text().splitlines())
        assert per_file and max(per_file.values()) <= 3  # the writer keeps 3 per reason and rank
        for step in manifest.sources[name].steps:
            if step.name == "read":  # the reader quarantines (examples from quarantine/, tested below)
                continue
            for reason, count in step.dropped.items():
                if reason.startswith("quarantine_"):
                    continue  # an extractor's timeouts and errors are quarantined, not sampled
                examples = samples.get((step.name, reason), [])
                assert 1 <= len(examples) <= min(3, count), (name, step.name, reason)
                for sample in examples:
                    if name == "math":  # the filters see math's raw text as it is
                        assert sample.text == math_texts[sample.id][:500]
                        assert sample.text_chars == len(math_texts[sample.id])
                    else:  # web: the filters see the text extracted from the raw HTML
                        assert sample.id in web_ids
        assert not set(samples) - {(s.name, r) for s in manifest.sources[name].steps for r in s.dropped}


def test_the_card_shows_counts_and_escaped_examples_per_reason(sampled: tuple[Path, Path, str]) -> None:
    raw, curated, broken = sampled
    manifest = ShardManifest.load(curated)
    path = data_card(curated)
    assert path == curated / "card" / "README.md"
    text = path.read_text()
    math = manifest.sources["math"]
    quarantined = {r: n for s in math.steps for r, n in s.dropped.items() if r.startswith("quarantine_")}
    assert sum(quarantined.values()) == math.quarantined == 1
    (reason,) = quarantined
    block = text[text.index(f"<code>{reason}</code>: 1 dropped (1 example)"):]
    assert html.escape(broken[:80]) in block[:block.index("</details>")]  # the broken raw record, escaped
    samples = read_drop_samples(dropped_dir(SourceLayout("math", raw / "math", curated)))
    for (step, reason), examples in samples.items():
        count = next(s.dropped[reason] for s in math.steps if s.name == step)
        assert f"<code>{reason}</code>: {count:,} dropped ({len(examples)} example" in text
        for sample in examples:
            assert f"<pre>{html.escape(sample.text)}</pre>" in text
    assert "<pre>" in text and "<script" not in text.lower()


def test_the_report_links_to_the_data_card(card_copy: Path, tmp_path: Path) -> None:
    from mixlab.ablations import build_report
    from mixlab.training import RunStore

    run = RunStore(tmp_path / "runs").create("good", {"train": {"total_steps": 2}})
    for step, loss in [(1, 5.0), (2, 4.0)]:
        run.log_metrics(step, loss=loss, lr=1e-3, tokens=64 * step, tokens_by_source={"math": 64 * step})
    run.status = "completed"
    run.save()
    out = tmp_path / "report"
    page = build_report(run.path, out, manifest_dir=card_copy).html_path.read_text()
    (href,) = re.findall(r"<a href='([^']+)'>[^<]*card/README.md</a>", page)
    assert (out / href).resolve() == (card_copy / "card" / "README.md").resolve()


def test_drop_samples_are_not_written_through_a_symlink_out_of_the_curated_dir(raw_corpus: Path,
                                                                                 tmp_path: Path) -> None:
    from mixlab.curation.manifest import ManifestError

    curated, outside = tmp_path / "curated", tmp_path / "outside"
    outside.mkdir()
    layout = SourceLayout("math", raw_corpus / "math", curated)
    layout.work.mkdir(parents=True)
    dropped_dir(layout).symlink_to(outside)
    pipelines = recipe_for("math")(raw_corpus, curated, 2)
    with pytest.raises(ManifestError, match="dropped: resolves to .*outside"):
        attach_drop_samples(pipelines, layout)
    assert not any(getattr(step, "exclusion_writer", None) for stage in pipelines.stages for step in stage.pipeline)


def test_mixlab_curate_samples_drops_itself_and_names_the_card(raw_corpus: Path, tmp_path: Path, capsys) -> None:
    """`mixlab curate` attaches the drop samplers on its own (no `attach_drop_samples` call here) and prints where
    the card is; the card shows examples for the math filter's drops."""
    from mixlab.pipelines.cli import main

    out = tmp_path / "curated"
    assert main(["curate", "--raw", str(raw_corpus), "--out", str(out), "--sources", "math"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data card:"))
    card = Path(line.split()[2])
    assert card == data_card_path(ShardManifest.load(out)) and card.is_file()
    quality = next(s for s in ShardManifest.load(out).source("math").steps if s.name == "math_quality")
    assert quality.dropped_total > 0
    samples = read_drop_samples(dropped_dir(SourceLayout("math", raw_corpus / "math", out)))
    assert {reason for step, reason in samples if step == "math_quality"} == set(quality.dropped)
    text = card.read_text()
    for reason, count in quality.dropped.items():
        assert f"<code>{html.escape(reason)}</code>: {count:,} dropped (" in text
        assert f"<code>{html.escape(reason)}</code>: {count:,} dropped (no example" not in text
