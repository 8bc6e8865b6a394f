"""Pre-training recipe: a tokenized curated directory + a mixture schedule + model/train configs → a run.

This is the glue between stages and nothing more: the manifest says where the token shards are, the
mixtures package turns the schedule into a sampler, the training package trains and evaluates, and
everything the run did lands in its run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from mixlab.curation import ShardManifest, open_token_sources, token_byte_lengths
from mixlab.mixtures import MixturePolicy, MixtureSampler, MixtureSchedule, open_schedule_sources, val_windows
from mixlab.mixtures.planner import MixturePlan, plan_for_manifest
from mixlab.pipelines.run_config import (
    EvalConfig,
    RunConfig,
    apply_overrides,
    read_run_document,
    run_config_from_document,
)
from mixlab.training import (
    ConfigError,
    HeldOutEvaluator,
    ModelConfig,
    RunRecord,
    RunStore,
    TrainConfig,
    train,
)
from mixlab.training.data_parallel import DataParallelWorld
from mixlab.training.monitor import TrainingMonitor

log = logging.getLogger("mixlab.pretrain")


class PretrainError(ValueError):
    """A run that cannot start or continue as asked; the message names the directory and the fix."""


def run_document(config: RunConfig, manifest: ShardManifest, policy: MixturePolicy | None = None) -> dict[str, Any]:
    """What run.json keeps: the run's document plus facts derived when it started (not inputs)."""
    document = {
        **config.to_dict(),
        "manifest_dir": str(Path(config.curated_dir).resolve()),
        # the token ids mean nothing without the tokenizer: eval and resume refuse another one
        "tokenizer_sha256": manifest.tokenizer.sha256,
    }
    if policy is not None:  # a policy built in Python has no document; name its class so the run says it had one
        document["python_policy"] = f"{type(policy).__module__}.{type(policy).__qualname__}"
    return document


def load_run_config(config_file: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config of `mixlab train`: the file's document (or the defaults), then each `a.b=value` override;
    `model.vocab_size` comes from the curated directory's tokenizer."""
    document: dict[str, Any] = read_run_document(config_file) if config_file else {}
    document = apply_overrides(document, overrides)
    curated = (document.get("data") or {}).get("curated")
    vocab_size = tokenized_manifest(curated).tokenizer.vocab_size if curated else None
    return run_config_from_document(document, vocab_size=vocab_size)


def resolved_schedule(config: RunConfig, manifest: ShardManifest) -> MixtureSchedule:
    """The run's schedule; none given means the demo's stable+decay schedule over the tokenized sources."""
    if config.schedule is not None:
        return config.schedule
    from mixlab.pipelines.demo import demo_schedule

    return demo_schedule({n for n, s in manifest.sources.items() if s.tokens.get("train")})


def tokenized_manifest(curated_dir: str | Path) -> ShardManifest:
    manifest = ShardManifest.load(curated_dir)
    if manifest.tokenizer is None or not any(s.token_shards for s in manifest.sources.values()):
        raise PretrainError(f"{manifest.root}: not tokenized yet; run `mixlab tokenize --curated {manifest.root}` first")
    return manifest


def check_same_tokenizer(run_config: dict[str, Any], manifest: ShardManifest, run_path: Path) -> None:
    """Token shards re-made with another tokenizer would be read as garbage by the run's model."""
    expected = run_config.get("tokenizer_sha256")
    if expected and expected != manifest.tokenizer.sha256:
        raise PretrainError(
            f"{run_path}: the run was trained with tokenizer {expected[:12]}, but {manifest.root} now holds "
            f"{manifest.tokenizer.sha256[:12]}; re-tokenize with the run's tokenizer or start a new run id"
        )


def sampler_steps(train_config: TrainConfig) -> int:
    """Batches the sampler serves over the run: an optimizer step draws grad_accum of them."""
    return train_config.steps * train_config.grad_accum


def plan_run(config: RunConfig, manifest: ShardManifest,
             schedule: MixtureSchedule | Mapping[str, Any] | str | Path | None = None) -> MixturePlan:
    """The planner's view of the run (`schedule`: a document to plan instead of the config's, e.g. one that
    could not be built, so that every problem in it is listed)."""
    return plan_for_manifest(manifest, resolved_schedule(config, manifest) if schedule is None else schedule,
                             total_steps=sampler_steps(config.train), batch_size=config.train.batch_size,
                             seq_len=config.train.seq_len, limits=config.plan)


def check_stage_seq_lens(plan: MixturePlan, model: ModelConfig) -> None:
    """A stage with a longer context than the model has positions for cannot train; say which field to change."""
    for stage in plan.stages:
        if stage.seq_len > model.max_seq_len:
            raise ConfigError(
                f"mixture stage {stage.name!r} has seq_len {stage.seq_len}, more than model.max_seq_len="
                f"{model.max_seq_len}: shorten the stage's seq_len or raise the model's maximum",
                [f"mixture.stages.{stage.index}.seq_len", "model.max_seq_len"])


def sampler_packing(model: ModelConfig) -> str:
    """"documents" (rows carry document offsets) for a model that masks attention by document, else "window"."""
    return "documents" if model.doc_masking else "window"


def build_sampler(manifest: ShardManifest, schedule: MixtureSchedule, train_config: TrainConfig,
                  packing: str = "window", sources: dict[str, Any] | None = None) -> MixtureSampler:
    """The sampler over the train split of every leaf the (flat) schedule names; `packing="documents"` adds the
    document offsets that intra-document masking (model.doc_masking) needs. `sources`: streams already opened
    (open_schedule_sources) for several samplers over the same data."""
    return MixtureSampler(
        schedule,
        sources if sources is not None else open_schedule_sources(manifest, schedule),  # selections are views
        seq_len=train_config.seq_len,
        batch_size=train_config.batch_size,
        seed=train_config.seed,
        total_steps=sampler_steps(train_config),
        packing=packing,
    )


def evaluated_sources(manifest: ShardManifest, schedule: MixtureSchedule) -> list[str]:
    """Sources whose held-out split the run is scored on: those the schedule names, and those its selections
    draw from (a selection's held-out documents are its source's)."""
    names = set(manifest.sources)
    chosen = {leaf for leaf in schedule.sources if leaf in names}
    for selection in schedule.selections:
        chosen.update(selection.matching_sources(names))
    return sorted(chosen)


def build_evaluator(manifest: ShardManifest, sources: list[str], seq_len: int, eval_config: EvalConfig) -> HeldOutEvaluator:
    """Fixed held-out windows from the val split of each source; bits-per-byte from the tokenizer's byte table."""
    val = open_token_sources(manifest, split="val", sources=sources)
    windows = {name: val_windows(src, seq_len, eval_config.windows_per_source) for name, src in val.items()}
    too_small = sorted(name for name, w in windows.items() if not len(w))
    if too_small:
        log.warning("no held-out window of %d tokens in %s: not evaluated (raise the val fraction)", seq_len + 1, too_small)
    windows = {name: w for name, w in windows.items() if len(w)}
    if not windows:
        raise PretrainError(f"{manifest.root}: no source has enough held-out tokens for a window of {seq_len + 1}")
    token_bytes: np.ndarray = token_byte_lengths(manifest.resolve(manifest.tokenizer.path))
    return HeldOutEvaluator(windows, token_bytes, batch_size=eval_config.batch_size,
                            bootstrap_resamples=eval_config.bootstrap_resamples)


def held_out_manifest(config: RunConfig, manifest: ShardManifest) -> ShardManifest:
    """The dataset whose held-out split and tasks the run is scored on: `eval.curated` (a curation variant's base)
    when set, which must use the same tokenizer, else the training data's own."""
    if not config.eval.curated:
        return manifest
    scored = tokenized_manifest(config.eval.curated)
    if scored.tokenizer.sha256 != manifest.tokenizer.sha256:
        raise PretrainError(f"eval.curated={config.eval.curated}: its tokenizer is not the one of data.curated="
                            f"{config.curated_dir}, so their token ids mean different things; score a dataset "
                            "tokenized with the same tokenizer (a curation variant's base is)")
    return scored


def build_task_scorer(manifest: ShardManifest, config: RunConfig):
    """The downstream cloze tasks of `eval.tasks` (None without), scored with the dataset's tokenizer at the
    run's context length; the tasks are built from the dataset's held-out documents the first time."""
    wanted = config.eval.tasks
    if not wanted:
        return None
    from mixlab.ablations.tasks import ClozeEvaluator

    scorer = ClozeEvaluator.for_curated(manifest.root, max_seq_len=config.train.seq_len,
                                        max_items=config.eval.task_items, batch_size=config.eval.batch_size)
    if wanted != "all":
        try:
            scorer = scorer.select(wanted)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"eval.tasks={wanted}: {err} (built from {manifest.root}'s held-out documents, "
                              f"listed in {manifest.root / 'tasks' / 'tasks.json'})", ["eval.tasks"]) from err
    return scorer


def align_lr_decay(train_config: TrainConfig, sampler: MixtureSampler) -> TrainConfig:
    """With a staged mixture, the WSD learning-rate decay starts exactly where the last data stage starts
    (SmolLM3 anneals on its richest mix), computed by the sampler's own stage rule."""
    stages = sampler.schedule.stages
    if train_config.schedule != "wsd" or train_config.decay_start_step is not None or len(stages) < 2:
        return train_config
    # the sampler counts batches; an optimizer step draws grad_accum of them
    start = sampler.stage_start_step(-1) // train_config.grad_accum
    if start < train_config.warmup_steps:
        last = stages[-1]
        # the bound that places the last stage's start: its own, or (running to the end) the one before it
        placing = next(((i, s.bound[0]) for i, s in ((len(stages) - 1, last), (len(stages) - 2, stages[-2]))
                        if s.bound is not None), None)
        raise ConfigError(
            f"the mixture's last stage {last.name!r} starts at step {start}, where the "
            f"learning-rate decay starts too, but the warmup lasts until step {train_config.warmup_steps}: shorten "
            "the warmup, lengthen the run, or start the last stage later",
            ["train.warmup_steps", "train.total_steps",
             *([f"mixture.stages.{placing[0]}.{placing[1]}"] if placing else [])])
    return replace(train_config, decay_start_step=start)


def pretrain(config: RunConfig, policy: MixturePolicy | None = None) -> RunRecord:
    """Train (or resume) the run and return its record; evals land in the record as training goes.

    The planner runs first and refuses (PlanError, every refusal listed) before the run directory is touched.
    `policy` is a mixture policy built in Python (e.g. a `RulePolicy` with your own rules); it replaces the run
    config's `policy` section, and resuming the run needs the same policy again.
    Under torchrun every process calls this: rank 0 creates (or reopens) the run, the others wait for it at a
    barrier, load it, and train their share of each batch (training.trainer.train)."""
    world = DataParallelWorld.from_env(config.train.resolved_device())
    created_group = world.init()
    try:
        return _pretrain(config, policy, world)
    finally:
        if created_group:
            world.destroy()


def _pretrain(config: RunConfig, policy: MixturePolicy | None, world: DataParallelWorld) -> RunRecord:
    if policy is not None and config.policy is not None:
        raise PretrainError("give the mixture policy either as the run config's `policy` section or as pretrain("
                            "policy=...), not both")
    manifest = tokenized_manifest(config.curated_dir)
    if config.model.vocab_size != manifest.tokenizer.vocab_size:
        raise PretrainError(
            f"model vocab_size {config.model.vocab_size} != tokenizer vocab_size {manifest.tokenizer.vocab_size} "
            f"({manifest.resolve(manifest.tokenizer.path)}); build the model config from the manifest's tokenizer"
        )
    config = replace(config, schedule=resolved_schedule(config, manifest))
    plan = plan_run(config, manifest)
    for warning in plan.warnings:
        log.warning("plan: %s", warning)
    plan.check()
    check_stage_seq_lens(plan, config.model)
    run_path = Path(config.runs_dir) / config.run_id
    if world.is_main and (run_path / "run.json").exists():
        existing = RunRecord.load(run_path)
        check_same_tokenizer(existing.config, manifest, run_path)
        if existing.is_live():
            existing.acquire()  # raises RunLockedError naming the live process, before anything is touched
    # the flat schedule the plan resolved
    sampler = build_sampler(manifest, plan.schedule, config.train, packing=sampler_packing(config.model))
    config = replace(config, train=align_lr_decay(config.train, sampler))
    scored = held_out_manifest(config, manifest)
    evaluator = build_evaluator(scored, evaluated_sources(scored, plan.schedule), config.train.seq_len, config.eval)
    tasks = build_task_scorer(scored, config) if world.is_main else None  # scored on rank 0 (built once there)
    if world.is_main:
        run = RunStore(config.runs_dir).create(config.run_id, run_document(config, manifest, policy),
                                               tags=config.tags)
    world.barrier()  # rank 0 has created the run
    if not world.is_main:
        run = RunRecord.load(run_path)
    policy = policy if policy is not None else config.build_policy()
    monitor = TrainingMonitor(config.monitor) if config.monitor is not None else None
    if config.backend == "nanotron":
        from mixlab.training.nanotron_trainer import train_nanotron

        train_nanotron(run, config.model, config.train, sampler, evaluator, layout=config.parallel, tasks=tasks,
                       policy=policy, monitor=monitor)
    else:
        train(run, config.model, config.train, sampler, evaluator, policy=policy, tasks=tasks, monitor=monitor)
    return RunRecord.load(run.path)
