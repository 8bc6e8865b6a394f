"""Hostile manifests and run directories are refused before any read or write outside them.

Every test keeps a sentinel folder next to the dataset (or the runs) and snapshots it — file list, mtimes and
contents — before and after: a manifest or run.json that names `../..`, an absolute path or a symlink pointing out
must leave it exactly as it was, and the error must name the offending entry.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from mixlab.ablations import build_report, select_runs
from mixlab.curation import (
    ManifestError,
    ShardFile,
    ShardManifest,
    SourceLayout,
    TokenizerInfo,
    sha256_file,
    tokenize_manifest,
)
from mixlab.pipelines.cli import main
from mixlab.pipelines.curate import curate
from mixlab.training import CheckpointError, RunRecord, RunStore, TrainingError
from mixlab.training.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint

SOURCE = "math"  # the one source the datasets here keep: small, real, tokenizes in a second
SHARD_NAME = "000_00000.parquet"  # its first curated shard, as curation names it


# ---- the sentinel outside --------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under root (root included): kind, mtime and the bytes of each file or link target."""
    entries: dict[str, Any] = {".": ("dir", root.lstat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        if path.is_symlink():
            entries[path.relative_to(root).as_posix()] = ("link", str(path.readlink()))
        elif path.is_dir():
            entries[path.relative_to(root).as_posix()] = ("dir", stat.st_mtime_ns)
        else:
            entries[path.relative_to(root).as_posix()] = ("file", stat.st_mtime_ns, path.read_bytes())
    return entries


@pytest.fixture
def outside(tmp_path: Path, curated_dir: Path) -> Iterator[Path]:
    """A folder beside the dataset that nothing may touch: a victim folder with a file, a copy of a real curated
    shard (so that a path pointing at it would pass the checksum), and a checkpoint-like folder."""
    root = tmp_path / "outside"
    victim = root / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("must survive\n")
    shard = ShardManifest.load(curated_dir).sources[SOURCE].shards[0]
    shutil.copy2(curated_dir / shard.path, victim / SHARD_NAME)
    (victim / "state.json").write_text(json.dumps({"format": 1, "step": 10, "trainer": {}, "rng": {}}) + "\n")
    before = snapshot(root)
    yield root
    assert snapshot(root) == before, "something outside the dataset was created, modified or deleted"


@pytest.fixture(scope="module")
def one_source(tmp_path_factory, curated_dir: Path) -> Path:
    """The curated fixture holding one source (logs included, so curating again skips it), saved once: the save
    redraws the data card's figures, a second or two that every test would pay again."""
    work = tmp_path_factory.mktemp("one-source") / "curated"
    shutil.copytree(curated_dir, work, symlinks=True)
    manifest = ShardManifest.load(work)
    manifest.sources = {SOURCE: manifest.sources[SOURCE]}
    manifest.save()
    return work


@pytest.fixture
def dataset(tmp_path: Path, one_source: Path) -> Path:
    """A private copy of `one_source` for a test to break."""
    work = tmp_path / "curated"
    shutil.copytree(one_source, work, symlinks=True)
    return work


def edit_manifest(curated: Path, change: Callable[[dict], Any]) -> Path:
    path = curated / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw, indent=2))
    return path


def rename_source(raw: dict, new: str) -> None:
    entry = raw["sources"].pop(SOURCE)
    entry["name"] = new
    raw["sources"][new] = entry


def refused_by_cli(argv: list[str], capsys) -> str:
    """Run a mixlab command that must fail with a clear error (exit 2, not a raw TypeError/KeyError); returns the
    error line."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "TypeError" not in err and "KeyError" not in err
    (line,) = [line for line in err.splitlines() if line.startswith(f"mixlab {argv[0]}: error: ")]
    return line


# ---- manifests: names and paths --------------------------------------------------------------
TRAVERSAL_NAME = "../../outside/victim"


@pytest.mark.parametrize("name", [TRAVERSAL_NAME, "..", ".", "a/b", "/abs", "web en", ""])
def test_a_source_name_that_is_not_a_plain_name_is_refused_on_load(dataset: Path, outside: Path, name: str) -> None:
    path = edit_manifest(dataset, lambda raw: rename_source(raw, name))
    with pytest.raises(ManifestError) as info:
        ShardManifest.load(dataset)
    err = info.value
    assert (err.path, err.source, err.field, err.value) == (path, name, "name", name)
    assert str(path) in str(err) and repr(name) in str(err) and "plain name" in str(err)


def test_mixlab_tokenize_refuses_a_traversing_source_name_before_writing(dataset: Path, outside: Path,
                                                                         capsys) -> None:
    """The tester's case: `tokenize` removed `tokens/../../x` and wrote token shards there."""
    edit_manifest(dataset, lambda raw: rename_source(raw, TRAVERSAL_NAME))
    before = snapshot(dataset)
    err = refused_by_cli(["tokenize", "--curated", str(dataset), "--vocab-size", "300"], capsys)
    assert TRAVERSAL_NAME in err and "manifest.json" in err
    assert snapshot(dataset) == before  # refused before anything, inside the dataset too, was written


def test_curating_again_over_a_hostile_manifest_touches_nothing_outside(dataset: Path, outside: Path,
                                                                        raw_corpus: Path) -> None:
    edit_manifest(dataset, lambda raw: rename_source(raw, TRAVERSAL_NAME))
    before = (dataset / "manifest.json").read_bytes()
    # refused, not followed and not silently replaced (that would drop the entries of the other sources)
    with pytest.raises(ManifestError, match="is not a plain name"):
        curate(raw_corpus, dataset, sources=[SOURCE], tasks=2, workers=2)
    assert (dataset / "manifest.json").read_bytes() == before


def test_source_layout_refuses_names_and_folders_that_lead_outside(dataset: Path, outside: Path,
                                                                   raw_corpus: Path) -> None:
    with pytest.raises(ManifestError, match=r"source name '\.\./x' is not a plain name"):
        SourceLayout("../x", raw_corpus / "../x", dataset)
    shutil.rmtree(dataset / "logs")
    (dataset / "logs").symlink_to(outside / "victim", target_is_directory=True)
    with pytest.raises(ManifestError, match=r"logs/math: resolves to .*outside.*replace the symlink"):
        SourceLayout(SOURCE, raw_corpus / SOURCE, dataset)
    with pytest.raises(ManifestError, match="replace the symlink"):  # curate clears logs/<source>: refused first
        curate(raw_corpus, dataset, sources=[SOURCE], tasks=2, workers=2)


def outside_shard_path(outside: Path, curated: Path, style: str) -> str:
    """A path to the copy of a real shard outside the dataset, in three spellings."""
    target = outside / "victim" / SHARD_NAME
    if style == "absolute":
        return str(target)
    if style == "dotdot":
        return f"data/../../outside/victim/{SHARD_NAME}"
    return f"data/math/../../../outside/victim/{SHARD_NAME}"  # deeper: climbs out of data/math first


@pytest.mark.parametrize("style", ["absolute", "dotdot", "dotdot-deep"])
@pytest.mark.parametrize("kind", ["shards", "token_shards", "tokenizer"])
def test_a_path_leading_outside_the_dataset_is_refused(dataset: Path, outside: Path, curated_dir: Path,
                                                       kind: str, style: str) -> None:
    bad = outside_shard_path(outside, dataset, style)
    sha = sha256_file(outside / "victim" / SHARD_NAME)  # the checksum matches: it must not matter

    def change(raw: dict) -> None:
        entry = raw["sources"][SOURCE]
        if kind == "shards":
            entry["shards"][0]["path"] = bad
            entry["shards"][0]["sha256"] = sha
        elif kind == "token_shards":
            entry["token_shards"] = [{"path": bad, "docs": 1, "bytes": 2, "sha256": sha, "tokens": 1, "split": "train"}]
        else:
            raw["tokenizer"] = {"path": bad, "vocab_size": 300, "sha256": sha, "eos_token": "<|endoftext|>"}

    path = edit_manifest(dataset, change)
    field = {"shards": "shards[0].path", "token_shards": "token_shards[0].path", "tokenizer": "tokenizer.path"}[kind]
    with pytest.raises(ManifestError) as info:
        ShardManifest.load(dataset)
    err = info.value
    assert (err.path, err.field, err.value) == (path, field, bad)
    assert err.source == (None if kind == "tokenizer" else SOURCE)
    assert field in str(err) and bad in str(err) and "relative" in str(err)


@pytest.mark.parametrize("kind", ["shards", "tokenizer"])
def test_verify_checksums_of_an_unloaded_manifest_refuses_outside_paths(dataset: Path, outside: Path,
                                                                         kind: str) -> None:
    """A manifest built in memory (never loaded) still cannot reach out: every path goes through resolve()."""
    target = outside / "victim" / SHARD_NAME
    sha = sha256_file(target)
    manifest = ShardManifest.load(dataset)
    if kind == "shards":
        manifest.sources[SOURCE].shards[0] = ShardFile(path=str(target), docs=1, bytes=1, sha256=sha)
    else:
        manifest.tokenizer = TokenizerInfo(path=f"../outside/victim/{SHARD_NAME}", vocab_size=300, sha256=sha,
                                           eos_token="<|endoftext|>")
    with pytest.raises(ManifestError, match="absolute path|climbs out"):
        manifest.verify_checksums()
    with pytest.raises(ManifestError):  # and it is not saved either
        manifest.save()


def test_a_symlinked_shard_folder_pointing_outside_is_refused(dataset: Path, outside: Path) -> None:
    shutil.rmtree(dataset / "data" / SOURCE)
    (dataset / "data" / SOURCE).symlink_to(outside / "victim", target_is_directory=True)
    with pytest.raises(ManifestError) as info:
        ShardManifest.load(dataset)
    assert info.value.source == SOURCE and info.value.field == "shards[0].path"
    assert "resolves to" in str(info.value) and str((outside / "victim").resolve()) in str(info.value)


def test_a_symlinked_tokens_folder_pointing_outside_stops_tokenize(dataset: Path, outside: Path, capsys) -> None:
    (dataset / "tokens").symlink_to(outside / "victim", target_is_directory=True)
    err = refused_by_cli(["tokenize", "--curated", str(dataset), "--vocab-size", "300"], capsys)
    assert "tokens/math" in err and "replace it with a real folder" in err
    manifest = ShardManifest.load(dataset)  # the tokenizer was trained (inside); no token shard was recorded
    assert not manifest.sources[SOURCE].token_shards
    with pytest.raises(ManifestError, match="tokens/math"):
        tokenize_manifest(dataset, show_progress=False)


def test_a_symlinked_dataset_card_pointing_outside_is_refused_before_the_manifest_is_written(
        dataset: Path, outside: Path) -> None:
    card = dataset / "data" / "README.md"
    card.unlink()
    card.symlink_to(outside / "victim" / "keep.txt")
    before = (dataset / "manifest.json").stat().st_mtime_ns
    manifest = ShardManifest.load(dataset)
    manifest.sources[SOURCE].quarantined += 1
    with pytest.raises(ManifestError, match="README.md.*resolves to"):
        manifest.save()
    assert (dataset / "manifest.json").stat().st_mtime_ns == before


# ---- manifests: schema and types ------------------------------------------------------------
def set_in(*keys: Any, value: Any) -> Callable[[dict], None]:
    def change(raw: dict) -> None:
        node = raw
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


MALFORMED = {
    "newer schema": (set_in("schema_version", value=99), "schema_version", r"schema_version 99 is not supported.*newer"),
    "docs as text": (set_in("sources", SOURCE, "docs", value="many"), "docs", r"docs = 'many' is not a whole number"),
    "shards as a number": (set_in("sources", SOURCE, "shards", value=3), "shards", r"shards = 3 is not a list"),
    "a step count as text": (set_in("sources", SOURCE, "steps", 0, "kept", value="x"), "steps[0].kept",
                             r"steps\[0\]\.kept = 'x' is not a whole number"),
    "dropped as a list": (set_in("sources", SOURCE, "steps", 0, "dropped", value=[1]), "steps[0].dropped",
                          "is not an object"),
    "a boolean count": (set_in("sources", SOURCE, "quarantined", value=True), "quarantined", "not a whole number"),
    "an unknown field": (set_in("sources", SOURCE, "surprise", value=1), "surprise", "not a field of this schema"),
    "a missing field": (lambda raw: raw["sources"][SOURCE].pop("kind"), "kind", r"kind is missing \(required\)"),
    "sources as a list": (set_in("sources", value=[]), "sources", "is not an object"),
    "tokenizer as text": (set_in("tokenizer", value="abc"), "tokenizer", "is not an object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_names_the_field(dataset: Path, outside: Path, case: str, capsys) -> None:
    change, field, message = MALFORMED[case]
    path = edit_manifest(dataset, change)
    with pytest.raises(ManifestError, match=message) as info:
        ShardManifest.load(dataset)
    assert info.value.field == field and info.value.path == path and str(path) in str(info.value)
    before = snapshot(dataset)
    err = refused_by_cli(["tokenize", "--curated", str(dataset), "--vocab-size", "300"], capsys)
    assert field.split("[")[0] in err
    assert snapshot(dataset) == before


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"', "\xff\xfe"])
def test_a_manifest_that_is_not_a_json_object_is_refused(dataset: Path, outside: Path, text: str) -> None:
    (dataset / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ManifestError, match=r"manifest\.json: (not valid JSON|holds a JSON (list|str))"):
        ShardManifest.load(dataset)


def test_a_symlinked_manifest_pointing_outside_is_not_read(dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy2(dataset / "manifest.json", elsewhere / "manifest.json")
    before = snapshot(elsewhere)
    (dataset / "manifest.json").unlink()
    (dataset / "manifest.json").symlink_to(elsewhere / "manifest.json")
    with pytest.raises(ManifestError, match="manifest.json: resolves to"):
        ShardManifest.load(dataset)
    assert snapshot(elsewhere) == before


# ---- run directories ------------------------------------------------------------------------
class Collected(logging.Handler):
    """Warnings of one mixlab logger (the CLI stops them from reaching the root logger, so caplog cannot)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def warnings_of(name: str) -> Iterator[Collected]:
    handler = Collected()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def tiny_checkpoint(checkpoint_dir: Path, step: int) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return save_checkpoint(checkpoint_dir, step, model, optimizer, sampler_state={"position": step})


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A runs folder with one good run: config, a few metrics and evals, a real checkpoint."""
    root = tmp_path / "runs"
    run = RunStore(root).create("good", {"train": {"total_steps": 3}})
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.5)]:
        run.log_metrics(step, loss=loss, lr=1e-3, tokens=64 * step, tokens_by_source={"math": 64 * step})
    run.log_eval(3, "math", loss=3.4, bpb=1.2, tokens=50)
    run.log_eval(3, "all", loss=3.4, bpb=1.2, tokens=50)
    run.status = "completed"
    run.summary.update({"step": 3, "total_steps": 3, "final_loss": 3.5})
    run.save()
    tiny_checkpoint(run.checkpoint_dir, 3)
    return root


def run_json(**overrides: Any) -> dict[str, Any]:
    base = {"schema_version": 1, "run_id": "bad", "status": "completed", "created": "", "updated": "",
            "tags": {}, "config": {}, "summary": {}}
    return {**base, **overrides}


HOSTILE_RUNS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "traversal run_id": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(run_id="../outside"))),
                         r"run_id = '\.\./outside' is not a plain name"),
    "absolute run_id": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(run_id=str(o / "victim")))),
                        "run_id = .* is not a plain name"),
    "run_id of another folder": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(run_id="other"))),
                                 "differs from its folder 'bad'"),
    "newer schema": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(schema_version=99))),
                     "run schema 99 unsupported.*newer mixlab"),
    "corrupt": (lambda d, o: (d / "run.json").write_text('{"schema_version": 1, "run_'), "run.json: unreadable"),
    "a list": (lambda d, o: (d / "run.json").write_text("[]"), "holds a JSON list"),
    "summary as text": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(summary="lots"))),
                        "summary = 'lots' is a str, not dict"),
    "step as text": (lambda d, o: (d / "run.json").write_text(json.dumps(run_json(summary={"step": "ten"}))),
                     "summary.step = 'ten' is a str, not int"),
    "metrics symlinked out": (lambda d, o: ((d / "run.json").write_text(json.dumps(run_json())),
                                            (d / "metrics.jsonl").symlink_to(o / "victim" / "keep.txt")),
                              "metrics.jsonl resolves to .*outside"),
    "checkpoints symlinked out": (lambda d, o: ((d / "run.json").write_text(json.dumps(run_json())),
                                                (d / "checkpoints").symlink_to(o / "victim")),
                                  "checkpoints resolves to .*outside"),
    "run.json symlinked out": (lambda d, o: (d / "run.json").symlink_to(o / "victim" / "state.json"),
                               "run.json resolves to .*outside"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RUNS))
def test_a_hostile_run_directory_is_refused_and_skipped(runs: Path, outside: Path, case: str, capsys) -> None:
    make, message = HOSTILE_RUNS[case]
    bad = runs / "bad"
    bad.mkdir()
    make(bad, outside)
    with pytest.raises(TrainingError, match=message):
        RunRecord.load(bad)
    with warnings_of("mixlab.runs") as seen:
        listed = RunStore(runs).runs()
    assert [r.run_id for r in listed] == ["good"]
    assert any(str(bad) in m for m in seen.messages), seen.messages
    assert [p.name for p, _ in RunStore(runs).unreadable()] == ["bad"]
    capsys.readouterr()
    assert main(["runs", "--runs", str(runs)]) == 0  # `mixlab runs` still lists the good run
    assert "good" in capsys.readouterr().out


def test_a_report_over_a_runs_folder_with_hostile_runs_reports_the_others(runs: Path, outside: Path,
                                                                          tmp_path: Path) -> None:
    for case in ("traversal run_id", "checkpoints symlinked out", "corrupt"):
        bad = runs / case.replace(" ", "-")
        bad.mkdir()
        HOSTILE_RUNS[case][0](bad, outside)
    with warnings_of("mixlab.runs") as seen:
        report = build_report([r.path for r in select_runs(runs)], tmp_path / "report")
    assert report.run_ids == ["good"] and "good" in report.html_path.read_text()
    assert len({m.split(":")[0] for m in seen.messages}) == 3
    with pytest.raises(ValueError, match=r"no run matches.*corrupt \(unreadable\)"):
        select_runs(runs, pattern="nothing-*")


def test_a_run_folder_symlinked_out_of_the_runs_folder_is_skipped(runs: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "linked"
    elsewhere.mkdir(parents=True)
    (elsewhere / "run.json").write_text(json.dumps(run_json(run_id="linked")))
    before = snapshot(elsewhere.parent)
    (runs / "linked").symlink_to(elsewhere, target_is_directory=True)
    with warnings_of("mixlab.runs") as seen:
        assert [r.run_id for r in RunStore(runs).runs()] == ["good"]
    assert any("linked" in m for m in seen.messages)
    with pytest.raises(TrainingError, match="resolves to .*elsewhere"):
        RunStore(runs).get("linked")
    with pytest.raises(TrainingError, match="resolves to .*elsewhere"):
        RunStore(runs).create("linked", {})
    assert snapshot(elsewhere.parent) == before


@pytest.mark.parametrize("run_id", ["../outside", "a/b", "..", ""])
def test_a_run_id_that_is_not_a_plain_name_is_refused(runs: Path, outside: Path, run_id: str) -> None:
    with pytest.raises(TrainingError, match="not a plain name") as info:
        RunStore(runs).create(run_id, {})
    assert info.value.fields == ("run_id",)


def test_a_checkpoint_symlinked_out_of_the_run_is_refused(runs: Path, outside: Path) -> None:
    """`checkpoints/step_00000010 -> outside` (holding a state.json): refused by name, never read or pruned."""
    checkpoints = RunStore(runs).get("good").checkpoint_dir
    link = checkpoints / "step_00000010"
    link.symlink_to(outside / "victim", target_is_directory=True)
    for call in (lambda: latest_checkpoint(checkpoints), lambda: read_checkpoint(link),
                 lambda: load_checkpoint(link, nn.Linear(4, 2)), lambda: tiny_checkpoint(checkpoints, 11)):
        with pytest.raises(CheckpointError, match=r"step_00000010: resolves to .*outside.*delete the symlink"):
            call()
    assert link.is_symlink()


def test_checkpoint_files_symlinked_out_and_bad_state_are_refused(runs: Path, outside: Path) -> None:
    step = latest_checkpoint(RunStore(runs).get("good").checkpoint_dir)
    (step / "model.pt").unlink()
    (step / "model.pt").symlink_to(outside / "victim" / "keep.txt")
    with pytest.raises(CheckpointError, match=r"model\.pt: resolves to .*outside"):
        load_checkpoint(step, nn.Linear(4, 2))
    (step / "model.pt").unlink()
    state = json.loads((step / "state.json").read_text())
    for change, message in [({"format": 99}, "format 99 unsupported.*newer mixlab"),
                            ({"step": 7}, "step = 7 differs from the directory name 'step_00000003'"),
                            ({"step": "3"}, "step = '3' is not a whole number"),
                            ({"rng": []}, "rng = \\[\\] is a list, not an object")]:
        (step / "state.json").write_text(json.dumps({**state, **change}))
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(step)


def test_a_report_leaves_out_a_hostile_manifest_and_says_so(runs: Path, outside: Path, dataset: Path,
                                                           tmp_path: Path) -> None:
    edit_manifest(dataset, lambda raw: rename_source(raw, TRAVERSAL_NAME))
    run = RunStore(runs).get("good")
    run.config["manifest_dir"] = str(dataset)
    run.save()
    with warnings_of("mixlab.report") as seen:
        report = build_report(run.path, tmp_path / "report")
    text = report.html_path.read_text()
    assert "Manifest left out" in text and "plain name" in text
    assert seen.messages and str(dataset) in seen.messages[0]
