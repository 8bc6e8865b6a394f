"""Curate every raw source into Parquet shards and write `curated/manifest.json`.

Execution is kept apart from the recipes: `curate` asks an `ExecutorFactory` for an executor per stage
(`local_executor` by default; a Slurm or Ray factory can take its place) and runs the stages in order.

Re-runs are cheap and correct:
- a source whose recipe, task count and raw files are unchanged (its fingerprint) is not re-run;
  datatrove's completion markers skip finished ranks, so an interrupted run resumes;
- when a stage has to run anything, every later stage is cleared first (stale MinHash files break
  stage 2), and a changed fingerprint clears the whole source;
- the accounting merges the per-rank stats of all invocations, not the last invocation's stats.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    ManifestError,
    ShardManifest,
    SourceLayout,
    SourcePipelines,
    build_source_entry,
    quiet_datatrove_console,
)
from mixlab.pipelines.chat import chat_pipeline
from mixlab.pipelines.code import code_pipeline
from mixlab.pipelines.corpus import CORPUS_JSON, REPO_ROOT
from mixlab.pipelines.math import math_pipeline
from mixlab.pipelines.web import web_pipeline

log = logging.getLogger("mixlab.curate")

CURATION_VERSION = 2  # bump when a step changes what it writes: every source is then re-curated
FINGERPRINT = "fingerprint.json"
TIMING = "timing.json"

ExecutorFactory = Callable[[list[PipelineStep], int, int, Path], PipelineExecutor]
RecipeBuilder = Callable[[Path, Path, int], SourcePipelines]  # (raw_dir, curated_dir, tasks)


PRELOADED_MODULES = ("spacy", "trafilatura", "fasttext", "pyarrow.parquet")


def preload_heavy_modules() -> None:
    """Import once in the parent so forked workers inherit them: `import spacy` alone takes ~3.5 s
    (thinc imports torch), which a fresh worker would pay again for every stage."""
    import importlib

    for name in PRELOADED_MODULES:
        importlib.import_module(name)


def local_executor(pipeline: list[PipelineStep], tasks: int, workers: int, logging_dir: Path) -> PipelineExecutor:
    """datatrove's LocalPipelineExecutor with forked workers (that inherit the preloaded modules);
    with one worker it runs the tasks in-process."""
    preload_heavy_modules()
    return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                 start_method="fork")


def recipe_for(source: str) -> RecipeBuilder:
    """The recipe of a source, by name: web-<lang>, code-*, math*, chat*."""
    if source.startswith("web-"):
        language = source.removeprefix("web-").split("-")[0]
        return lambda raw, cur, tasks: web_pipeline(raw, cur, language=language, source=source, tasks=tasks)
    if source.startswith("code"):
        return lambda raw, cur, tasks: code_pipeline(raw, cur, source=source, tasks=tasks)
    if source.startswith("math"):
        return lambda raw, cur, tasks: math_pipeline(raw, cur, source=source, tasks=tasks)
    if source.startswith("chat"):
        return lambda raw, cur, tasks: chat_pipeline(raw, cur, source=source, tasks=tasks)
    raise ValueError(f"no curation recipe for source {source!r} (expected web-<lang>, code-*, math*, chat*)")


def ensure_writable_caches(cache_root: Path | None = None) -> None:
    """datatrove and spaCy write under ~/.cache unless told otherwise; point them at a writable folder."""
    root = cache_root or REPO_ROOT / ".cache" / "mixlab"
    os.environ.setdefault("HF_HOME", str(root / "hf"))
    os.environ.setdefault("XDG_CACHE_HOME", str(root / "xdg"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for key in ("HF_HOME", "XDG_CACHE_HOME"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)


def _raw_root(raw_dir: Path) -> Path:
    """Accept the `raw/` folder itself or the work directory that contains it (what `fetch_corpus` was given)."""
    if not (raw_dir / CORPUS_JSON).exists() and (raw_dir / "raw").is_dir():
        return raw_dir / "raw"
    return raw_dir


def _raw_sources(raw_dir: Path) -> tuple[Path, list[str]]:
    """The raw root and the sources in it (folders holding `*.jsonl.gz`); a clear error when there are none."""
    raw_root = _raw_root(raw_dir)
    found = []
    if raw_root.is_dir():
        found = sorted(p.name for p in raw_root.iterdir() if p.is_dir() and any(p.glob("*.jsonl.gz")))
    if not found:
        what = "does not exist" if not raw_dir.exists() else "holds no raw sources (<source>/*.jsonl.gz)"
        raise FileNotFoundError(
            f"{raw_dir}: {what}; build the raw corpus first with `mixlab corpus fetch --out WORKDIR` and "
            "curate WORKDIR/raw (or WORKDIR)"
        )
    return raw_root, found


def _fingerprint(pipelines: SourcePipelines, raw_source: Path, tasks: int) -> str:
    files = [(p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in sorted(raw_source.glob("*.jsonl.gz"))]
    payload = {"version": CURATION_VERSION, "config": pipelines.config, "tasks": tasks, "raw": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _clear(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def run_source(pipelines: SourcePipelines, layout: SourceLayout, tasks: int, workers: int,
               executor: ExecutorFactory = local_executor) -> bool:
    """Run the stages of one source; returns whether anything ran."""
    fingerprint = _fingerprint(pipelines, layout.raw_dir, tasks)
    fp_path = layout.logs / FINGERPRINT
    if fp_path.exists() and json.loads(fp_path.read_text()).get("fingerprint") != fingerprint:
        log.info("%s: recipe, tasks or raw data changed; curating it from scratch", layout.source)
        _clear(layout.logs, layout.work, layout.output, layout.quarantine)
    layout.logs.mkdir(parents=True, exist_ok=True)
    fp_path.write_text(json.dumps({"fingerprint": fingerprint, "config": pipelines.config}, default=str, indent=2))

    upstream_ran = False
    for stage in pipelines.stages:
        logging_dir = layout.logs / stage.name
        if upstream_ran:
            _clear(logging_dir, *stage.outputs)  # inputs changed: partial results of this stage are stale
        stage_workers = max(1, min(workers, stage.tasks, stage.max_workers or workers))
        runner = executor(stage.pipeline, stage.tasks, stage_workers, logging_dir)
        if runner.get_incomplete_ranks():
            with quiet_datatrove_console():
                runner.run()
            upstream_ran = True
    return upstream_ran


def curate(
    raw_dir: str | Path,
    curated_dir: str | Path,
    sources: list[str] | tuple[str, ...] | None = None,
    tasks: int = 2,
    workers: int = 2,
    executor: ExecutorFactory = local_executor,
    recipes: dict[str, RecipeBuilder] | None = None,
) -> ShardManifest:
    """Curate `raw_dir/<source>` for each source into `curated_dir/<source>/*.parquet`; write the manifest.

    `raw_dir` is the `raw/` folder `fetch_corpus` wrote, or the work directory holding it; a missing or
    empty one is a FileNotFoundError that says to run `mixlab corpus fetch` first.
    `sources=None` curates every source found in `raw_dir`. Sources already in an existing manifest but
    not curated now keep their entries; token shards of a source that was re-curated are dropped.
    """
    ensure_writable_caches()
    raw_root, found = _raw_sources(Path(raw_dir))
    curated = Path(curated_dir)
    corpus = json.loads((raw_root / CORPUS_JSON).read_text()) if (raw_root / CORPUS_JSON).exists() else {}
    wanted = list(sources) if sources else found
    missing = [s for s in wanted if s not in found]
    if missing:
        raise FileNotFoundError(
            f"{raw_root}: no raw files for {missing} (found {found}); fetch them with "
            f"`mixlab corpus fetch --out WORKDIR --sources {' '.join(missing)}` first"
        )

    try:
        manifest = ShardManifest.load(curated)
    except ManifestError as err:
        if (curated / "manifest.json").exists():
            log.warning("ignoring the existing manifest: %s", err)
        manifest = ShardManifest()
    before = _comparable(manifest)

    for source in wanted:
        builder = (recipes or {}).get(source) or recipe_for(source)
        pipelines = builder(raw_root, curated, tasks)
        layout = SourceLayout(source, raw_root / source, curated)
        log.info("%s: curating (%d stages)", source, len(pipelines.stages))
        start = time.perf_counter()
        ran = run_source(pipelines, layout, tasks, workers, executor)
        timing_path = layout.logs / TIMING
        if ran:
            seconds = time.perf_counter() - start
            timing = {"seconds": round(seconds, 2), "tasks": tasks, "workers": workers}
            timing_path.write_text(json.dumps(timing))
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        entry = build_source_entry(pipelines, layout, origin=corpus.get("sources", {}).get(source), timing=timing)
        if entry.steps and timing.get("seconds"):
            timing["docs_per_s"] = round(entry.steps[0].docs_in / max(timing["seconds"], 1e-9), 1)
        old = manifest.sources.get(source)
        if old is not None and not ran:
            entry.tokens, entry.token_shards = old.tokens, old.token_shards
        manifest.sources[source] = entry
        log.info("%s: %d docs kept of %d read, %d quarantined%s", source, entry.docs,
                 entry.steps[0].docs_in if entry.steps else 0, entry.quarantined,
                 f", {timing['seconds']} s" if timing else "")
        problems = entry.check_accounting()
        if problems:
            raise ManifestError("curation accounting does not add up:\n" + "\n".join(problems))
    if _comparable(manifest) != before or not (curated / "manifest.json").exists():
        manifest.save(curated)  # an unchanged manifest is not rewritten: a no-op re-run touches nothing
    manifest.root = curated
    return manifest


def _comparable(manifest: ShardManifest) -> dict[str, Any]:
    data = manifest.to_dict()
    data.pop("created", None)
    return data
