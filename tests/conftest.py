"""Shared fixtures: a small real raw corpus and its curated form, cached across test runs.

Both live under `.cache/mixlab-tests/corpus` (`make clean` removes them); downloads go to the shared
download cache. Building is idempotent, so after the first run a session pays only for a few checks.
A file lock keeps parallel pytest sessions from building the same directory at once.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mixlab.curation.manifest import ShardManifest

REPO_ROOT = Path(__file__).resolve().parents[1]
# MIXLAB_TEST_CACHE gives a session its own corpus (e.g. two checkouts testing at once)
TEST_CACHE = Path(os.environ.get("MIXLAB_TEST_CACHE") or REPO_ROOT / ".cache" / "mixlab-tests")
TEST_WORKDIR = TEST_CACHE / "corpus"
TEST_MAX_MB = 0.5  # per source: ~45 HTML pages per language, ~30 stdlib files, ~950 math docs, ~3,400 dialogues


@contextmanager
def _locked(name: str) -> Iterator[None]:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    with open(TEST_CACHE / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pytest_collection_modifyitems(config, items) -> None:
    """Longest test files first (seconds per file in tests/durations.json, refreshed by tests/update_durations.py;
    a new file counts as a short one). pytest-xdist hands files to workers in this order (`make test` passes
    --no-loadscope-reorder), so no long file is left to run alone at the end."""
    durations = json.loads((Path(__file__).with_name("durations.json")).read_text())
    order = {name: i for i, name in enumerate(sorted(durations, key=lambda n: -durations[n]))}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: a file's own order is kept


@pytest.fixture(scope="session")
def raw_corpus() -> Path:
    """`raw/` of a small real corpus (all sources) built by `fetch_corpus`; contains `corpus.json`."""
    from mixlab.pipelines.corpus import fetch_corpus

    with _locked("corpus"):
        fetch_corpus(TEST_WORKDIR, max_mb=TEST_MAX_MB)
    return TEST_WORKDIR / "raw"


@pytest.fixture(scope="session")
def curated_dir(raw_corpus: Path) -> Path:
    """`curated/` of the test corpus: Parquet shards per source and a consistent `manifest.json`."""
    from mixlab.pipelines.curate import curate

    curated = TEST_WORKDIR / "curated"
    with _locked("curated"):  # its own lock: a worker that needs only raw/ does not wait for this build
        curate(raw_corpus, curated, tasks=2, workers=2)
    return curated


@pytest.fixture(scope="session")
def curated_manifest(curated_dir: Path) -> ShardManifest:
    return ShardManifest.load(curated_dir)


@pytest.fixture(scope="session")
def tokenized_curated(curated_dir: Path, tmp_path_factory) -> Path:
    """A private copy of the curated fixture, tokenized with a small vocabulary (for training tests)."""
    import shutil

    from mixlab.pipelines.cli import main

    work = tmp_path_factory.mktemp("tokenized") / "curated"
    shutil.copytree(curated_dir, work)
    assert main(["tokenize", "--curated", str(work), "--vocab-size", "600", "--val-fraction", "0.05"]) == 0
    return work
