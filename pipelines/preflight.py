"""`mixlab preflight RUN.yaml`: the run's objects built as `pretrain` builds them, handed to training.preflight.

Nothing here writes to the run's directory or the curated directory: checkpoints and downstream tasks built for
the check go to a temporary directory that is removed afterwards, and the global RNG and thread settings are put
back. See training/preflight.py for what each check proves.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mixlab.curation import ManifestError, ShardManifest
from mixlab.mixtures import MixtureSampler, MixtureSchedule, open_schedule_sources
from mixlab.pipelines.pretrain import (
    PretrainError,
    align_lr_decay,
    build_evaluator,
    build_sampler,
    evaluated_sources,
    held_out_manifest,
    load_run_config,
    plan_run,
    resolved_schedule,
    sampler_packing,
    tokenized_manifest,
)
from mixlab.pipelines.run_config import (
    RunConfig,
    apply_overrides,
    read_run_document,
    run_config_from_document,
)
from mixlab.training import ConfigError, RunRecord
from mixlab.training.preflight import (
    CHECK_NAMES,
    EVAL,
    FIXES,
    PARALLEL_LAYOUT,
    PLAN,
    TOKEN_SHARDS,
    CheckResult,
    TrainingSetup,
    check_checkpoint_round_trip,
    check_eval,
    check_parallel_layout,
    check_plan,
    check_rank_seeds,
    check_throughput_and_memory,
    check_token_shards,
    guarded,
)


def load_preflight_config(config_file: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config as `mixlab train` reads it; data that is not tokenized yet still gives a config (the model's
    vocab_size from its preset) so that the token shards check can say what is missing."""
    try:
        return load_run_config(config_file, overrides)
    except (PretrainError, ManifestError):
        document = apply_overrides(read_run_document(config_file), overrides)
        return run_config_from_document(document)


def world_from_env(tp: int = 1) -> int:
    """The data-parallel degree a launcher planned (WORLD_SIZE / tp), 1 without one."""
    world = os.environ.get("WORLD_SIZE")
    if not world:
        return 1
    try:
        size = int(world)
    except ValueError as err:
        raise ConfigError(f"WORLD_SIZE={world!r} is not a whole number: unset it or pass --dp", ["--dp"]) from err
    if size < 1 or size % tp:
        raise ConfigError(f"WORLD_SIZE={size} is not a multiple of --tp {tp}: pass --dp and --tp", ["--dp", "--tp"])
    return size // tp


def _existing_tokenizer(config: RunConfig) -> tuple[str | None, Path]:
    """The tokenizer sha256 an existing run (runs_dir/run_id/run.json) was trained with; read only."""
    run_path = Path(config.runs_dir) / config.run_id
    if not (run_path / "run.json").exists():
        return None, run_path
    return RunRecord.load(run_path).config.get("tokenizer_sha256"), run_path


def _sampler_factory(manifest: ShardManifest, schedule: MixtureSchedule, config: RunConfig):
    """New samplers at step 0 over streams opened once (build_sampler's sampler, without re-hashing the shards
    for every copy: the token shards check verified them)."""
    streams: dict[str, Any] = {}

    def new_sampler() -> MixtureSampler:
        if not streams:
            streams.update(open_schedule_sources(manifest, schedule, verify_checksums=False))
        return build_sampler(manifest, schedule, config.train, sampler_packing(config.model), sources=streams)

    return new_sampler


def _task_factory(scored: ShardManifest, config: RunConfig, workdir: Path):
    """The downstream tasks of eval.tasks, built (when the dataset has none yet) into `workdir`, not into the
    curated directory."""
    if not config.eval.tasks:
        return None

    def build():
        from mixlab.ablations.tasks import ClozeEvaluator

        tasks_dir = workdir / "tasks"
        existing = scored.root / "tasks"
        if existing.is_dir() and not tasks_dir.exists():
            shutil.copytree(existing, tasks_dir)
        scorer = ClozeEvaluator.for_curated(scored.root, max_seq_len=config.train.seq_len,
                                            max_items=config.eval.task_items, batch_size=config.eval.batch_size,
                                            tasks_dir=tasks_dir)
        if config.eval.tasks != "all":
            scorer = scorer.select(config.eval.tasks)
        return scorer

    return build


def _skipped(names: tuple[str, ...], why: str) -> list[CheckResult]:
    return [CheckResult(name, "SKIP", why) for name in names]


def preflight(config: RunConfig, dp: int = 1, tp: int = 1, steps: int = 5, *,
              memory_limit_bytes: int | None = None, pp: int | None = None) -> list[CheckResult]:
    """Run every check on the run `config` describes, in a temporary directory; one CheckResult per check, in
    CHECK_NAMES order. A failing check does not stop the others."""
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory(prefix="mixlab-preflight-") as tmp:
            return _preflight(config, dp, tp, steps, memory_limit_bytes, Path(tmp), pp)
    finally:
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.set_num_threads(threads)


def _preflight(config: RunConfig, dp: int, tp: int, steps: int, memory_limit_bytes: int | None,
               workdir: Path, pp: int | None = None) -> list[CheckResult]:
    try:
        manifest = tokenized_manifest(config.curated_dir)
        schedule = resolved_schedule(config, manifest)
    except Exception as err:  # noqa: BLE001 - no data: every check that needs it is skipped, with the reason
        failed = CheckResult(TOKEN_SHARDS, "FAIL", f"{type(err).__name__}: {err}",
                             f"point data.curated at a tokenized curated directory (`mixlab curate`, then `mixlab "
                             f"tokenize --curated {config.curated_dir}`)")
        return [failed, *_skipped(CHECK_NAMES[1:-1], "needs the tokenized data"),
                check_rank_seeds(TrainingSetup(config.model, config.train, _no_sampler), dp, tp)]
    train_config = config.train
    flat = schedule
    try:
        plan = plan_run(config, manifest)
        flat = plan.schedule or schedule  # the flat schedule the plan resolved (a hierarchy's leaves)
        plan_result = check_plan(plan, config.model)  # never raises: an error inside is its FAIL
    except Exception as err:  # noqa: BLE001
        plan_result = CheckResult(PLAN, "FAIL", f"{type(err).__name__}: {err}", FIXES[PLAN])
    new_sampler = _sampler_factory(manifest, flat, config)
    try:
        sampler = new_sampler() if not plan_result.failed else None
    except Exception:  # noqa: BLE001 - unreadable data: the token shards check (and those that train) say why
        sampler = None
    if sampler is not None:
        try:  # the trainer starts the LR decay with the last data stage; a warmup that overlaps it is refused
            train_config = align_lr_decay(train_config, sampler)
        except ConfigError as err:
            plan_result = CheckResult(PLAN, "FAIL", str(err), FIXES[PLAN])

    def token_shards() -> CheckResult:
        sha, run_path = _existing_tokenizer(config)
        return check_token_shards(manifest, evaluated_sources(manifest, flat), config.model.vocab_size, sha, run_path)

    results = [guarded(TOKEN_SHARDS, token_shards), plan_result]  # guarded: reading run.json may raise

    setup = TrainingSetup(config.model, train_config, new_sampler, train_config.resolved_device())

    def evaluator():
        scored = held_out_manifest(config, manifest)
        return build_evaluator(scored, evaluated_sources(scored, flat), train_config.seq_len, config.eval)

    def eval_check() -> CheckResult:
        scored = held_out_manifest(config, manifest)
        return check_eval(setup, evaluator, evaluated_sources(scored, flat), _task_factory(scored, config, workdir))

    eval_result = guarded(EVAL, eval_check)  # guarded: the held-out manifest may not load
    results.append(eval_result)
    ckpt_result = check_checkpoint_round_trip(setup, workdir=workdir / "round-trip")
    results.append(ckpt_result)
    results.append(check_throughput_and_memory(
        setup, steps, eval_seconds=eval_result.measured.get("eval_seconds"),
        checkpoint_seconds=ckpt_result.measured.get("save_seconds"), memory_limit_bytes=memory_limit_bytes))
    results.append(check_rank_seeds(replace(setup, sampler_factory=_no_sampler), dp, tp))
    if config.backend == "nanotron" or (pp or 1) > 1:  # the layout nanotron would cut the model into
        layout = replace(config.parallel, tp=tp if tp > 1 else config.parallel.tp, pp=pp or config.parallel.pp,
                         dp=config.parallel.dp or dp)
        results.append(guarded(PARALLEL_LAYOUT, lambda: check_parallel_layout(setup, layout)))
    return results


def _no_sampler():
    raise ConfigError("this check needs no data")
