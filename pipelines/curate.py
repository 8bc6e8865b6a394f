"""Curate every raw source into Parquet shards and write `curated/manifest.json`.

Execution is kept apart from the recipes: `curate` asks an `ExecutorFactory` for an executor per stage
(`local_executor` by default; a Slurm or Ray factory can take its place) and runs the stages in order.

Re-runs are cheap and correct:
- a source whose recipe, task count and raw files are unchanged (its fingerprint) is not re-run;
  datatrove's completion markers skip finished ranks, so an interrupted run resumes;
- when a stage has to run anything, every later stage is cleared first (stale MinHash files break
  stage 2), and a changed fingerprint clears the whole source;
- the accounting merges the per-rank stats of all invocations, not the last invocation's stats.json.

The console gets one line per source (and a progress bar per reading stage on a terminal); datatrove's
own logs stay in `curated/logs/`. The caller's environment is left as it was: the cache variables
datatrove and spaCy need are set only while curation runs (`curation_environment`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseReader
from mixlab.curation import (
    CurationEngine,
    CurationError,
    DecontaminationFilter,
    DocumentProgress,
    ManifestError,
    ShardManifest,
    SourceLayout,
    SourcePipelines,
    attach_drop_samples,
    build_source_entry,
    contamination_counts,
    count_plain_steps,
    detect_reader_kind,
    earlier_sources_digest,
    failed_task_log,
    outside_problem,
    programming_language_counts,
    quiet_datatrove_console,
    remove_source_entries,
    sha256_file,
    shard_score_summaries,
    stage_output_docs,
    stage_read_docs,
)
from mixlab.curation import local_executor as local_executor  # re-exported
from mixlab.curation import preload_heavy_modules as preload_heavy_modules  # re-exported
from mixlab.pipelines.chat import chat_pipeline
from mixlab.pipelines.code import code_pipeline
from mixlab.pipelines.corpus import CORPUS_JSON
from mixlab.pipelines.math import math_pipeline
from mixlab.pipelines.summary import source_line
from mixlab.pipelines.web import web_pipeline

log = logging.getLogger("mixlab.curate")

CURATION_VERSION = 5  # bump when a step changes what it writes: every source is then re-curated
# 3: code keeps its programming language in `programming_language`; `language` is always natural language
# 4: every file of a raw source is read or quarantined (.jsonl/.gz/.zst/.parquet), size guard, unique ids
# 5: decontamination, exact and cross-source MinHash dedup in every recipe; code kinds and per-language rules
CACHE_DIR = ".cache"  # <curated>/work/.cache: HF_HOME and XDG_CACHE_HOME while curation runs (when unset)
FINGERPRINT = "fingerprint.json"
TIMING = "timing.json"

ExecutorFactory = CurationEngine | Callable[[list[PipelineStep], int, int, Path], PipelineExecutor]
RecipeBuilder = Callable[[Path, Path, int], SourcePipelines]  # (raw_dir, curated_dir, tasks)


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


def _has_recipe(source: str) -> bool:
    try:
        recipe_for(source)
    except ValueError:
        return False
    return True


def load_recipe_specs(specs: list[str], raw_dir: str | Path, curated_dir: str | Path,
                      tasks: int = 2) -> dict[str, RecipeBuilder]:
    """Recipes from `--recipe` specs, by source: `module:function` or `SOURCE=module:function`.

    The function is a `RecipeBuilder`: `(raw_dir, curated_dir, tasks) -> SourcePipelines` (e.g. one that
    returns `math_pipeline(raw_dir, curated_dir, tasks=tasks, extra_steps=[MyFilter()])`). Each is called
    once here, so that a bad spec fails before anything runs: the module must import, the attribute must
    exist and be callable, and it must return a `SourcePipelines`, whose `source` (SOURCE when given)
    names the raw source it curates. The module is imported like any Python import (the current
    directory is on the path when run as `mixlab`/`python -m`; set PYTHONPATH otherwise).
    """
    raw_root, curated = _raw_root(Path(raw_dir)), Path(curated_dir)
    recipes: dict[str, RecipeBuilder] = {}
    for spec in specs:
        source, _, target = spec.rpartition("=")
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"--recipe {spec!r}: expected module:function or SOURCE=module:function")
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # a module next to the user, as `python -m` would find it
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"--recipe {spec!r}: cannot import module {module_name!r} ({err}); is it on "
                             "PYTHONPATH (or in the current directory)?") from err
        builder = getattr(module, attr, None)
        if builder is None:
            raise ValueError(f"--recipe {spec!r}: module {module_name!r} ({module.__file__}) has no {attr!r}")
        if not callable(builder):
            raise ValueError(f"--recipe {spec!r}: {module_name}.{attr} is a {type(builder).__name__}, not a "
                             "function (raw_dir, curated_dir, tasks) -> SourcePipelines")
        pipelines = _built(builder, raw_root, curated, tasks, spec)
        name = source or pipelines.source
        if pipelines.source != name:
            raise ValueError(f"--recipe {spec!r}: {module_name}.{attr} builds source {pipelines.source!r}, not "
                             f"{name!r}; pass source={name!r} to the recipe builder")
        if name in recipes:
            raise ValueError(f"--recipe {spec!r}: source {name!r} has two recipes")
        recipes[name] = lambda raw, cur, n, _b=builder, _s=spec: _built(_b, raw, cur, n, _s)
    return recipes


def _built(builder: RecipeBuilder, raw_root: Path, curated: Path, tasks: int, what: str) -> SourcePipelines:
    """Call a recipe builder; a clear error when it does not return a `SourcePipelines`."""
    pipelines = builder(raw_root, curated, tasks)
    if not isinstance(pipelines, SourcePipelines):
        raise ValueError(f"recipe {what!r} returned {type(pipelines).__name__}, not SourcePipelines; a recipe "
                         "builder returns e.g. math_pipeline(raw_dir, curated_dir, tasks=tasks, extra_steps=[...])")
    return pipelines


@contextmanager
def curation_environment(curated_dir: Path) -> Iterator[None]:
    """Set the variables datatrove and spaCy need while curation runs, and give the caller's environment
    back exactly as it was (datatrove's executors also set DATATROVE_* variables in-process).

    HF_HUB_OFFLINE=1 (curation never downloads); HF_HOME and XDG_CACHE_HOME, when unset, point into the
    work directory (`<curated>/work/.cache`), never into the checkout or the installed package. mixlab's own
    download cache stays the shared one (MIXLAB_CACHE is pinned to it first): every curated directory reuses the
    eval-set wheels instead of downloading them again.
    """
    from mixlab.curation import default_cache_dir

    saved = dict(os.environ)
    try:
        cache = curated_dir / "work" / CACHE_DIR
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("MIXLAB_CACHE", str(default_cache_dir()))
        for key, folder in (("HF_HOME", "hf"), ("XDG_CACHE_HOME", "xdg")):
            if not os.environ.get(key):
                os.environ[key] = str(cache / folder)
                (cache / folder).mkdir(parents=True, exist_ok=True)
        yield
    finally:
        for key in set(os.environ) - set(saved):
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _raw_root(raw_dir: Path) -> Path:
    """Accept the `raw/` folder itself or the work directory that contains it (what `fetch_corpus` was given)."""
    if not (raw_dir / CORPUS_JSON).exists() and (raw_dir / "raw").is_dir():
        return raw_dir / "raw"
    return raw_dir


RAW_FILE_GLOBS = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.parquet")  # what marks a folder as a raw source


def raw_source_files(raw_source: Path) -> list[Path]:
    """Every file under a raw source folder, in order: what its reader reads or quarantines (as
    `unsupported_file` when it is not one of the accepted formats) and what its fingerprint covers."""
    return sorted(p for p in raw_source.rglob("*") if p.is_file())


def _raw_sources(raw_dir: Path) -> tuple[Path, list[str]]:
    """The raw root and the sources in it (folders holding raw JSONL or Parquet files); a clear error when
    there are none. A folder without any is not a source, and is named in a warning."""
    raw_root = _raw_root(raw_dir)
    found = []
    if raw_root.is_dir():
        for folder in sorted(p for p in raw_root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if any(next(folder.rglob(pattern), None) for pattern in RAW_FILE_GLOBS) or (
                    detect_reader_kind(folder) != "jsonl"):  # a WARC dump, HTML or code tree, or a saved dataset
                found.append(folder.name)
            elif any(raw_source_files(folder)):
                log.warning("%s: no raw files (%s, WARC, HTML or code trees, saved datasets) in it, not curated",
                            folder, ", ".join(RAW_FILE_GLOBS))
    if not found:
        what = "does not exist" if not raw_dir.exists() else "holds no raw sources (<source>/*.jsonl[.gz|.zst] or *.parquet)"
        raise FileNotFoundError(
            f"{raw_dir}: {what}; build the raw corpus first with `mixlab corpus fetch --out WORKDIR` and "
            "curate WORKDIR/raw (or WORKDIR)"
        )
    return raw_root, found


SIMPLE = (str, int, float, bool, type(None))


def _within(value: Any, root: Path | None) -> Any:
    """A path string inside `root` as `<curated>/relative`, so that a copied or moved curated dir keeps its
    fingerprints (the decontamination filter names its index by an absolute path)."""
    if root is None or not isinstance(value, str) or not value.startswith(("/", str(root))):
        return value
    try:
        return "<curated>/" + Path(value).resolve().relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return value


def step_signature(step: Any, root: Path | None = None) -> dict[str, Any]:
    """What identifies a step for the fingerprint: its class and its plain public settings (strings,
    numbers, lists of them), so that a user's own step, or a changed setting of it, re-curates the source.
    Paths inside `root` (the curated dir) count relative to it."""
    inner = getattr(step, "step", None)  # a CountedStep: the wrapped step is what matters
    target = inner if inner is not None else step
    params = {}
    for key, value in sorted(getattr(target, "__dict__", {}).items()):
        if key.startswith("_") or key == "stats":
            continue
        if isinstance(value, SIMPLE):
            params[key] = _within(value, root)
        elif isinstance(value, list | tuple) and all(isinstance(v, SIMPLE) for v in value):
            params[key] = value
    cls = type(target)
    return {"class": f"{cls.__module__}.{getattr(target, '__qualname__', cls.__qualname__)}", "params": params}


def source_fingerprint(curated_dir: str | Path, source: str) -> str | None:
    """The fingerprint a source was last curated with (what its text depends on: recipe, raw files, tasks, the
    earlier sources' dedup entries), None when it was never curated; unlike shard checksums it does not change
    when the shards are annotated."""
    path = Path(curated_dir) / "logs" / source / FINGERPRINT
    return json.loads(path.read_text()).get("fingerprint") if path.is_file() else None


def _fingerprint(pipelines: SourcePipelines, layout: SourceLayout, tasks: int) -> str:
    """What a source's curated output depends on: the curation version, its recipe and steps, its raw files, the
    task count, and the entries the sources before it hold in the cross-source dedup indexes (a change there
    re-curates it: a document it dropped as a copy of theirs may be gone from them)."""
    files = [(p.relative_to(layout.raw_dir).as_posix(), p.stat().st_size, sha256_file(p))
             for p in raw_source_files(layout.raw_dir)]
    steps = [[step_signature(step, layout.curated_dir) for step in stage.pipeline] for stage in pipelines.stages]
    upstream = {index.name: digest for index in (layout.exact_index, layout.minhash_index)
                if (digest := earlier_sources_digest(index, layout.source)) is not None}
    payload = {"version": CURATION_VERSION, "config": pipelines.config, "tasks": tasks, "raw": files, "steps": steps,
               **({"earlier_sources": upstream} if upstream else {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def raw_doc_count(raw_source: Path, origin: dict[str, Any] | None) -> int:
    """Raw documents of a source (the filter stage's progress total, an estimate): what `corpus.json` records,
    else the lines of its `*.jsonl.gz` and `*.jsonl` files, counted in chunks (a corrupt file counts what can
    be read; other formats are not counted)."""
    if origin and isinstance(origin.get("docs"), int):
        return origin["docs"]
    count = 0
    for path in raw_source_files(raw_source):
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            continue
        try:
            with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as handle:
                while chunk := handle.read(1 << 20):
                    count += chunk.count(b"\n")
        except (OSError, EOFError, zlib.error):
            continue
    return count


def _forget_index_entries(layout: SourceLayout) -> None:
    for index in (layout.exact_index, layout.minhash_index):
        remove_source_entries(index, layout.source)


def _clear(*paths: Path) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def run_source(pipelines: SourcePipelines, layout: SourceLayout, tasks: int, workers: int,
               executor: ExecutorFactory = local_executor, raw_docs: int | None = None,
               console: TextIO | None = None) -> bool:
    """Run the stages of one source; returns whether anything ran.

    When the first stage keeps no document, the later stages are not run (their readers would find no
    files): the source is empty, and its manifest entry still adds up. A stage that fails raises a
    `CurationError` that names the task log holding the traceback.
    """
    fingerprint = _fingerprint(pipelines, layout, tasks)
    fp_path = layout.logs / FINGERPRINT
    if fp_path.exists() and json.loads(fp_path.read_text()).get("fingerprint") != fingerprint:
        log.info("%s: recipe, tasks, raw data or earlier sources changed; curating it from scratch", layout.source)
        _clear(layout.logs, layout.work, layout.output, layout.quarantine, *filter(None, [layout.legacy_output]))
        _forget_index_entries(layout)
    layout.logs.mkdir(parents=True, exist_ok=True)
    fp_path.write_text(json.dumps({"fingerprint": fingerprint, "config": pipelines.config}, default=str, indent=2))
    if getattr(executor, "chains", False):
        return _run_chained(pipelines, layout, workers, executor)

    upstream_ran = False
    first = pipelines.stages[0] if pipelines.stages else None
    for stage in pipelines.stages:
        logging_dir = layout.logs / stage.name
        if upstream_ran:
            _clear(logging_dir, *stage.outputs)  # inputs changed: partial results of this stage are stale
        expected = raw_docs
        if first is not None and stage is not first:
            expected = stage_output_docs(first.pipeline, layout.logs / first.name)
            if expected == 0:  # nothing to read: clear what an earlier run left, run nothing
                _clear(logging_dir, *stage.outputs)
                _forget_index_entries(layout)  # an empty source holds nothing later sources are copies of
                continue
        stage_workers = _stage_workers(stage, workers)
        reads = bool(stage.pipeline) and isinstance(stage.pipeline[0], BaseReader)
        progress = DocumentProgress(f"{layout.source} {stage.name}", expected, stage.tasks,
                                    initial=stage_read_docs(logging_dir) if reads else 0,
                                    stream=console or sys.stderr, enabled=None if reads else False)
        pipeline = [stage.pipeline[0], progress.counter, *stage.pipeline[1:]] if reads else stage.pipeline
        runner = executor(pipeline, stage.tasks, stage_workers, logging_dir)
        if runner.get_incomplete_ranks():
            try:
                with quiet_datatrove_console(logging_dir), progress:
                    runner.run()
            except Exception as err:
                task_log = failed_task_log(logging_dir) or logging_dir / "logs"
                raise CurationError(f"{layout.source}: datatrove stage {stage.name!r} failed: "
                                    f"{type(err).__name__}: {err}; the traceback is in {task_log}") from err
            _check_finished(layout, stage, runner, executor)  # Ray's executor warns rather than raises
            upstream_ran = True
    return upstream_ran


def _stage_workers(stage: Any, workers: int) -> int:
    return max(1, min(workers, stage.tasks, stage.max_workers or workers))


def _check_finished(layout: SourceLayout, stage: Any, runner: PipelineExecutor, executor: ExecutorFactory) -> None:
    """A stage whose ranks did not all write their completion marker failed, whatever the engine reported."""
    incomplete = runner.get_incomplete_ranks()
    if incomplete:
        logging_dir = layout.logs / stage.name
        where = failed_task_log(logging_dir) or logging_dir / ("slurm_logs" if getattr(executor, "chains", False)
                                                               else "logs")
        name = getattr(executor, "name", "the executor")
        raise CurationError(f"{layout.source}: datatrove stage {stage.name!r}: ranks {incomplete} did not finish "
                            f"on {name}; see {where}. Run the same command again to resume: finished ranks are "
                            "skipped")


def _run_chained(pipelines: SourcePipelines, layout: SourceLayout, workers: int, engine: Any) -> bool:
    """An engine that queues jobs (Slurm): the stages from the first unfinished one are submitted at once, each a
    job array that starts after the one before succeeded; then wait for the queue and check every rank finished.

    As in the stage-by-stage path, the stages after one that runs are cleared first; a first stage that kept no
    document leaves the later ones empty (they are cleared, as if never run)."""
    stages = pipelines.stages
    runners = [engine(stage.pipeline, stage.tasks, _stage_workers(stage, workers), layout.logs / stage.name)
               for stage in stages]
    start = next((i for i, runner in enumerate(runners) if runner.get_incomplete_ranks()), None)
    if start is None:
        return False
    for stage in stages[start + 1:]:
        _clear(layout.logs / stage.name, *stage.outputs)  # inputs will change: partial results are stale
    for before, after in zip(runners[start:], runners[start + 1:], strict=False):
        after.depends = before
    try:
        with quiet_datatrove_console(layout.logs / stages[start].name):
            runners[-1].run()  # datatrove submits the chain, dependencies first
    except subprocess.CalledProcessError as err:
        raise CurationError(f"{layout.source}: submitting stage jobs failed: `{' '.join(map(str, err.cmd))}` "
                            f"exited {err.returncode} (sbatch's message is above); the job scripts are in "
                            f"{layout.logs}/*/launch_script.slurm") from err
    engine.wait(runners[start:])
    first = stages[0]
    if (len(stages) > 1 and not runners[0].get_incomplete_ranks()
            and stage_output_docs(first.pipeline, layout.logs / first.name) == 0):
        for stage in stages[1:]:
            _clear(layout.logs / stage.name, *stage.outputs)
        _forget_index_entries(layout)
        return True
    for stage, runner in zip(stages[start:], runners[start:], strict=True):
        _check_finished(layout, stage, runner, engine)
    return True


def curate(
    raw_dir: str | Path,
    curated_dir: str | Path,
    sources: list[str] | tuple[str, ...] | None = None,
    tasks: int = 2,
    workers: int = 2,
    executor: ExecutorFactory = local_executor,
    recipes: dict[str, RecipeBuilder] | None = None,
    console: TextIO | None = None,
) -> ShardManifest:
    """Curate `raw_dir/<source>` for each source into `SourceLayout.output`; write the manifest.

    `raw_dir` is the `raw/` folder `fetch_corpus` wrote, or the work directory holding it; a missing or
    empty one is a FileNotFoundError that says to run `mixlab corpus fetch` first.
    `sources=None` curates every source found in `raw_dir`. Sources already in an existing manifest but
    not curated now keep their entries; token shards of a source that was re-curated are dropped.
    `recipes` maps a source to its own `RecipeBuilder` (see `load_recipe_specs`); a step of it that counts
    nothing itself (a plain `PipelineStep`) is counted by `CountedStep`.
    One line per source is printed on `console` (default stderr), with a progress bar while a stage reads
    documents when `console` is a terminal. A source whose filters drop every document is kept, empty, with
    a WARNING on its console line. The caller's `os.environ` is the same afterwards, even on error.
    """
    raw_root, found = _raw_sources(Path(raw_dir))
    curated = Path(curated_dir)
    corpus = json.loads((raw_root / CORPUS_JSON).read_text()) if (raw_root / CORPUS_JSON).exists() else {}
    if sources:
        wanted = list(sources)
    else:  # every raw source folder that has a recipe; one without (a stray folder, an odd name) is named, not run
        wanted = [s for s in found if s in (recipes or {}) or _has_recipe(s)]
        for source in sorted(set(found) - set(wanted)):
            log.warning("%s: no recipe for this name (web-<lang>, code-*, math*, chat*), not curated; rename the "
                        "folder or give it one with --recipe %s=module:function", raw_root / source, source)
    missing = [s for s in wanted if s not in found]
    if missing:
        raise FileNotFoundError(
            f"{raw_root}: no raw files for {missing} (found {found}); fetch them with "
            f"`mixlab corpus fetch --out WORKDIR --sources {' '.join(missing)}` first"
        )
    out = console or sys.stderr

    # every folder this run may write, checked before the first write (a source name or a `work` symlink that
    # leads out of the curated directory is refused here, not after a cache folder was made outside)
    for source in wanted:
        SourceLayout(source, raw_root / source, curated)
    problem = outside_problem(curated, curated / "work")
    if problem:
        raise ManifestError(f"{curated / 'work'}: {problem}; remove the link and curate again")
    try:
        manifest = ShardManifest.load(curated)
    except ManifestError as err:
        if err.field not in (None, "schema_version"):
            raise  # a manifest with a hostile or mistyped entry is refused, never silently overwritten
        if (curated / "manifest.json").exists():
            log.warning("ignoring the existing manifest (it is re-made): %s", err)
        manifest = ShardManifest()
    before = _comparable(manifest)

    with curation_environment(curated):
        # every recipe first: a bad one fails before any source runs, and the decontamination indexes the recipes
        # share are built here, once, in this process (`decontam_index`), before any worker starts
        built = {}
        for source in wanted:
            builder = (recipes or {}).get(source) or recipe_for(source)
            built[source] = _built(builder, raw_root, curated, tasks, source)
        for source in wanted:
            pipelines = built[source]
            for stage in pipelines.stages:
                stage.pipeline = count_plain_steps(stage.pipeline)
            layout = SourceLayout(source, raw_root / source, curated)
            attach_drop_samples(pipelines, layout)  # examples of dropped documents per reason, for the data card
            origin = corpus.get("sources", {}).get(source)
            log.debug("%s: curating (%d stages)", source, len(pipelines.stages))
            start = time.perf_counter()
            ran = run_source(pipelines, layout, tasks, workers, executor, raw_docs=raw_doc_count(layout.raw_dir, origin),
                             console=console)
            timing_path = layout.logs / TIMING
            if ran:
                seconds = time.perf_counter() - start
                timing = {"seconds": round(seconds, 2), "tasks": tasks, "workers": workers,
                          "executor": getattr(executor, "name", "custom")}
                timing_path.write_text(json.dumps(timing))
            timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
            entry = build_source_entry(pipelines, layout, origin=origin, timing=timing)
            if entry.steps and timing.get("seconds"):
                timing["docs_per_s"] = round(entry.steps[0].docs_in / max(timing["seconds"], 1e-9), 1)
            if (decontamination := decontam_summary(pipelines, layout)) is not None:
                entry.metadata_summary["decontamination"] = decontamination
            if languages := programming_language_counts(entry):
                entry.metadata_summary["programming_languages"] = languages
            old = manifest.sources.get(source)
            if old is not None and not ran:
                entry.tokens, entry.token_shards = old.tokens, old.token_shards
                same_shards = [s.sha256 for s in old.shards] == [s.sha256 for s in entry.shards]
                if same_shards and "scores" in old.metadata_summary:
                    entry.metadata_summary["scores"] = old.metadata_summary["scores"]  # the annotated shards are these
            if "scores" not in entry.metadata_summary and ran and (
                    scores := shard_score_summaries(curated / shard.path for shard in entry.shards)):
                entry.metadata_summary["scores"] = scores  # a recipe that scored its documents (math's scorer)
            manifest.sources[source] = entry
            print(source_line(entry, timing.get("seconds"), "" if ran else "unchanged, not re-run"), file=out,
                  flush=True)
            problems = entry.check_accounting()
            if problems:
                raise ManifestError("curation accounting does not add up:\n" + "\n".join(problems))
    if _comparable(manifest) != before or not (curated / "manifest.json").exists():
        manifest.save(curated)  # an unchanged manifest is not rewritten: a no-op re-run touches nothing
    manifest.root = curated
    return manifest


def decontam_summary(pipelines: SourcePipelines, layout: SourceLayout) -> dict[str, Any] | None:
    """Where a source's decontamination is recorded: the index it used, the eval sets in it, the folder listing
    every removed document (`read_contamination_report`), and the removed documents per eval set (equal to the
    step's `contaminated:<set>` drop counts). None when the source was not decontaminated."""
    step = next((s for stage in pipelines.stages for s in stage.pipeline if isinstance(s, DecontaminationFilter)), None)
    if step is None or step.index_path is None:
        return None
    report = step.report_folder if step.report_folder is not None else layout.decontam_report
    def relative(path: Path) -> str:  # as the manifest records shard paths: from the curated dir
        return Path(os.path.relpath(path.resolve(), layout.curated_dir.resolve())).as_posix()

    return {
        "index": relative(Path(step.index_path)),
        "eval_sets": step.index.names,
        "report": relative(report),
        "removed": contamination_counts(report) if report.is_dir() else {},
    }


def _comparable(manifest: ShardManifest) -> dict[str, Any]:
    data = manifest.to_dict()
    data.pop("created", None)
    return data
