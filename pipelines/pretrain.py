"""Pre-training recipe: a tokenized curated directory + a mixture schedule + model/train configs → a run.

This is the glue between stages and nothing more: the manifest says where the token shards are, the
mixtures package turns the schedule into a sampler, the training package trains and evaluates, and
everything the run did lands in its run directory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from mixlab.curation import ShardManifest, open_token_sources, token_byte_lengths
from mixlab.mixtures import MixtureSampler, MixtureSchedule, check_repetition, val_windows
from mixlab.pipelines.run_config import (
    EvalConfig,
    RunConfig,
    apply_overrides,
    read_run_document,
    run_config_from_document,
)
from mixlab.training import ConfigError, HeldOutEvaluator, RunRecord, RunStore, TrainConfig, train

log = logging.getLogger("mixlab.pretrain")


class PretrainError(ValueError):
    """A run that cannot start or continue as asked; the message names the directory and the fix."""


def run_document(config: RunConfig, manifest: ShardManifest) -> dict[str, Any]:
    """What run.json keeps: the run's document plus facts derived when it started (not inputs)."""
    return {
        **config.to_dict(),
        "manifest_dir": str(Path(config.curated_dir).resolve()),
        # the token ids mean nothing without the tokenizer: eval and resume refuse another one
        "tokenizer_sha256": manifest.tokenizer.sha256,
    }


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


def unused_sources(manifest: ShardManifest, schedule: MixtureSchedule) -> dict[str, int]:
    """Tokenized sources the schedule leaves out, with their train tokens: curated but never trained on."""
    return {name: src.tokens.get("train", 0) for name, src in sorted(manifest.sources.items())
            if src.tokens.get("train") and name not in schedule.sources}


def describe_unused(unused: dict[str, int]) -> str:
    listed = ", ".join(f"{name} ({tokens:,d} train tokens)" for name, tokens in unused.items())
    return (f"the schedule leaves out curated source(s) {listed}: they are not trained on; give them a weight in a "
            "stage to use them")


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


def build_sampler(manifest: ShardManifest, schedule: MixtureSchedule, train_config: TrainConfig) -> MixtureSampler:
    """The sampler over the train split of every source the schedule names."""
    sources = open_token_sources(manifest, split="train", sources=schedule.sources)
    return MixtureSampler(
        schedule,
        sources,
        seq_len=train_config.seq_len,
        batch_size=train_config.batch_size,
        total_tokens=train_config.steps * train_config.tokens_per_step,
        seed=train_config.seed,
    )


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
        raise ConfigError(
            f"the mixture's last stage {last.name!r} ({last.fraction:.0%} of the run) starts at step {start}, where the "
            f"learning-rate decay starts too, but the warmup lasts until step {train_config.warmup_steps}: shorten "
            "the warmup, lengthen the run, or shrink the last stage's fraction",
            ["train.warmup_steps", "train.total_steps", f"mixture.stages.{len(stages) - 1}.fraction"])
    return replace(train_config, decay_start_step=start)


def pretrain(config: RunConfig) -> RunRecord:
    """Train (or resume) the run and return its record; evals land in the record as training goes."""
    manifest = tokenized_manifest(config.curated_dir)
    if config.model.vocab_size != manifest.tokenizer.vocab_size:
        raise PretrainError(
            f"model vocab_size {config.model.vocab_size} != tokenizer vocab_size {manifest.tokenizer.vocab_size} "
            f"({manifest.resolve(manifest.tokenizer.path)}); build the model config from the manifest's tokenizer"
        )
    config = replace(config, schedule=resolved_schedule(config, manifest))
    unused = unused_sources(manifest, config.schedule)
    if unused:
        log.warning("%s", describe_unused(unused))
    run_path = Path(config.runs_dir) / config.run_id
    if (run_path / "run.json").exists():
        existing = RunRecord.load(run_path)
        check_same_tokenizer(existing.config, manifest, run_path)
        if existing.is_live():
            existing.acquire()  # raises RunLockedError naming the live process, before anything is touched
    sampler = build_sampler(manifest, config.schedule, config.train)
    check_repetition(config.schedule, sampler.expected_epochs(), config.plan)  # refused before the run is touched
    config = replace(config, train=align_lr_decay(config.train, sampler))
    evaluator = build_evaluator(manifest, config.schedule.sources, config.train.seq_len, config.eval)
    run = RunStore(config.runs_dir).create(config.run_id, run_document(config, manifest), tags=config.tags)
    train(run, config.model, config.train, sampler, evaluator)
    return RunRecord.load(run.path)
