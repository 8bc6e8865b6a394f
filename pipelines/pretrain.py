"""Pre-training recipe: a tokenized curated directory + a mixture schedule + model/train configs → a run.

This is the glue between stages and nothing more: the manifest says where the token shards are, the
mixtures package turns the schedule into a sampler, the training package trains and evaluates, and
everything the run did lands in its run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from mixlab.curation import ShardManifest, open_token_sources, token_byte_lengths
from mixlab.mixtures import MixtureSampler, MixtureSchedule, val_windows
from mixlab.training import HeldOutEvaluator, ModelConfig, RunRecord, RunStore, TrainConfig, train

log = logging.getLogger("mixlab.pretrain")


class PretrainError(ValueError):
    """A run that cannot start or continue as asked; the message names the directory and the fix."""


@dataclass
class PretrainJob:
    """Everything that defines one pre-training run."""

    curated_dir: Path
    runs_dir: Path
    run_id: str
    schedule: MixtureSchedule
    model: ModelConfig
    train: TrainConfig
    eval_windows_per_source: int = 48  # fixed held-out windows per source, scored at every eval
    tags: dict[str, str] = field(default_factory=dict)

    def config_dict(self, manifest: ShardManifest) -> dict[str, Any]:
        return {
            "manifest_dir": str(Path(self.curated_dir).resolve()),
            # the token ids mean nothing without the tokenizer: eval and resume refuse another one
            "tokenizer_sha256": manifest.tokenizer.sha256,
            "mixture": self.schedule.to_dict(),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "eval_windows_per_source": self.eval_windows_per_source,
        }


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


def build_evaluator(
    manifest: ShardManifest, sources: list[str], seq_len: int, windows_per_source: int, batch_size: int = 16
) -> HeldOutEvaluator:
    """Fixed held-out windows from the val split of each source; bits-per-byte from the tokenizer's byte table."""
    val = open_token_sources(manifest, split="val", sources=sources)
    windows = {name: val_windows(src, seq_len, windows_per_source) for name, src in val.items()}
    too_small = sorted(name for name, w in windows.items() if not len(w))
    if too_small:
        log.warning("no held-out window of %d tokens in %s: not evaluated (raise the val fraction)", seq_len + 1, too_small)
    windows = {name: w for name, w in windows.items() if len(w)}
    if not windows:
        raise PretrainError(f"{manifest.root}: no source has enough held-out tokens for a window of {seq_len + 1}")
    token_bytes: np.ndarray = token_byte_lengths(manifest.resolve(manifest.tokenizer.path))
    return HeldOutEvaluator(windows, token_bytes, batch_size=batch_size)


def align_lr_decay(train_config: TrainConfig, sampler: MixtureSampler) -> TrainConfig:
    """With a staged mixture, the WSD learning-rate decay starts exactly where the last data stage starts
    (SmolLM3 anneals on its richest mix), computed by the sampler's own stage rule."""
    stages = sampler.schedule.stages
    if train_config.schedule != "wsd" or train_config.decay_start_step is not None or len(stages) < 2:
        return train_config
    # the sampler counts batches; an optimizer step draws grad_accum of them
    return replace(train_config, decay_start_step=sampler.stage_start_step(-1) // train_config.grad_accum)


def pretrain(job: PretrainJob) -> RunRecord:
    """Train (or resume) the run and return its record; evals land in the record as training goes."""
    manifest = tokenized_manifest(job.curated_dir)
    if job.model.vocab_size != manifest.tokenizer.vocab_size:
        raise PretrainError(
            f"model vocab_size {job.model.vocab_size} != tokenizer vocab_size {manifest.tokenizer.vocab_size} "
            f"({manifest.resolve(manifest.tokenizer.path)}); build the model config from the manifest's tokenizer"
        )
    run_path = Path(job.runs_dir) / job.run_id
    if (run_path / "run.json").exists():
        check_same_tokenizer(RunRecord.load(run_path).config, manifest, run_path)
    sampler = build_sampler(manifest, job.schedule, job.train)
    job = replace(job, train=align_lr_decay(job.train, sampler))
    evaluator = build_evaluator(manifest, job.schedule.sources, job.train.seq_len, job.eval_windows_per_source)
    run = RunStore(job.runs_dir).create(job.run_id, job.config_dict(manifest), tags=job.tags)
    train(run, job.model, job.train, sampler, evaluator)
    return RunRecord.load(run.path)
