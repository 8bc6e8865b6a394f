"""The embedded plain-torch training backend: one device per process (CPU fp32, or CUDA with bf16 autocast),
one process or several under torchrun (DDP), resumable bit for bit.

The loop reads as a list of components: a sampler (the data position, saved in every checkpoint), the model and
its AdamW, the LR schedule (a pure function of the step), the held-out evaluator, an optional mixture policy
(`mixtures.policies`: it sees per-source losses and evals and moves the sampler's weights) and the checkpointer.
Everything a run produces goes through its RunRecord; with several processes only rank 0 writes it, and every
decision that ends or steers the run (a signal, a monitor alert, a policy move) is taken on the same step on
every rank.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from mixlab.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from mixlab.training.config import TrainConfig
from mixlab.training.data_parallel import DataParallelWorld
from mixlab.training.errors import ConfigError, NonFiniteLossError, ResumeError
from mixlab.training.evaluate import HeldOutEvaluator
from mixlab.training.lr_schedule import decay_start_step, lr_at
from mixlab.training.model import ModelConfig, Transformer, at_least_fp32, segment_ids_from_cu_seqlens
from mixlab.training.monitor import TrainingMonitor, window_ids
from mixlab.training.run_record import RunRecord
from mixlab.training.seeds import rank_seeds, seed_everything
from mixlab.training.throughput import measure_matmul_peak, mfu, settled_peak
from tqdm.auto import tqdm


class Batch(Protocol):
    tokens: np.ndarray  # int64 [B, T+1]
    sources: list[str]  # source of each row
    stage: str  # mixture stage name


class Sampler(Protocol):
    """What the trainer needs from mixtures.MixtureSampler (or any stand-in). Several processes (torchrun) need
    `next_batch(dp_rank, dp_size)`: rank r's rows of the global batch, every rank advancing the same state.

    Optional, used when present: `tokens_by_source() -> dict[str, int]` (the sampler's own count, the one the
    run logs), `stage_start_step(stage) -> int` (checks that the LR decay starts with the last data stage) and
    `total_tokens` (checks the sampler's budget against the trainer's).
    """

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Objective(Protocol):
    """A post-training loss in place of next-token cross-entropy (`training.posttrain`: DPO and its variants).
    Its batches hold `rows_per_example` rows per example (a pair: 2), so train.batch_size counts examples.
    Called in the run's precision; returns (logits, the loss to back-propagate, metrics to log as floats)."""

    name: str
    rows_per_example: int

    def __call__(self, forward: Callable[..., Any], batch: Batch, tokens: torch.Tensor,
                 extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]: ...


class TaskScorer(Protocol):
    """What the trainer needs from downstream tasks (ablations.tasks.ClozeEvaluator): one row per task, each
    with its name under "task" (and accuracy, margin, items, chance)."""

    def evaluate(self, model: torch.nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]: ...


class Policy(Protocol):
    """What the trainer needs from a mixtures.policies.MixturePolicy."""

    name: str

    def observe_train(self, step: int, loss_by_source: dict[str, float], rows_by_source: dict[str, int]) -> None: ...
    def observe_eval(self, step: int, rows: list[dict]) -> None: ...
    def decide(self, step: int, current: dict[str, float]) -> Any: ...  # PolicyDecision | None
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Progress:
    """Counters that belong in the checkpoint next to the sampler state."""

    tokens: int = 0
    train_time_s: float = 0.0  # time spent in training steps (not eval/checkpointing), over all resumes
    tokens_by_source: dict[str, int] | None = None  # counted here only for samplers that keep no count

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "train_time_s": self.train_time_s, "tokens_by_source": self.tokens_by_source}


class _StopSignals:
    """SIGTERM / SIGINT during training ask for a clean stop: the loop finishes its step, checkpoints and marks the
    run "interrupted" (what a preempted cluster job needs). A second signal stops at once (KeyboardInterrupt).
    Handlers are installed only in the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None


def _batch_tensor(batch: Batch, cfg: TrainConfig, model_config: ModelConfig, device: torch.device,
                  world_size: int = 1, rows_per_example: int = 1) -> torch.Tensor:
    """The batch as a tensor. Its sequence length may differ from TrainConfig.seq_len (a mixture stage with its
    own seq_len, e.g. a long-context stage) as long as the model can take it; its rows must be batch_size (this
    rank's share of it with several processes)."""
    tokens = np.asarray(batch.tokens)
    vocab_size = model_config.vocab_size
    rows = cfg.batch_size // world_size * rows_per_example
    if tokens.ndim != 2 or tokens.shape[0] != rows or tokens.shape[1] < 2:
        share = f" / {world_size} processes" if world_size > 1 else ""
        share += f" x {rows_per_example} rows per example" if rows_per_example > 1 else ""
        share = f"{share} = {rows} rows" if share else ""
        raise ConfigError(f"sampler gave a batch of shape {tokens.shape}; TrainConfig expects "
                          f"[batch_size={cfg.batch_size}{share}, seq_len+1] with seq_len >= 1 (train.seq_len+1="
                          f"{cfg.seq_len + 1} unless the mixture stage sets its own): build the sampler with the "
                          "same sizes")
    if tokens.shape[1] - 1 > model_config.max_seq_len:
        raise ConfigError(f"stage {getattr(batch, 'stage', '?')!r} gave sequences of {tokens.shape[1] - 1} tokens but "
                          f"model.max_seq_len={model_config.max_seq_len}: raise max_seq_len or shorten the stage's "
                          "seq_len", ["model.max_seq_len"])
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ConfigError(f"sampler gave token ids in [{tokens.min()}, {tokens.max()}] but vocab_size={vocab_size}: "
                          "set ModelConfig.vocab_size to the tokenizer's vocabulary size")
    return torch.from_numpy(tokens.astype(np.int64, copy=False)).to(device, non_blocking=True)


def _doc_masking_inputs(batch: Batch, model_config: ModelConfig, device: torch.device,
                        seq_len: int) -> dict[str, torch.Tensor]:
    """position_ids and segment_ids for intra-document attention (model.doc_masking), from the batch's
    document offsets; {} when the model does not mask by document."""
    if not model_config.doc_masking:
        return {}
    cu_seqlens, positions = getattr(batch, "cu_seqlens", None), getattr(batch, "position_ids", None)
    if cu_seqlens is None or positions is None:
        raise ConfigError("model.doc_masking is on but the sampler's batches carry no document offsets "
                          "(cu_seqlens / position_ids): build the MixtureSampler with packing=\"documents\" "
                          "(pipelines.pretrain.build_sampler does when model.doc_masking is on), or set "
                          "model.doc_masking=false", ["model.doc_masking"])
    return {"position_ids": torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(device),
            "segment_ids": segment_ids_from_cu_seqlens(cu_seqlens, seq_len).to(device)}


def _source_passes(sampler: Sampler) -> dict[str, int] | None:
    """Each source's pass number over its data (a MixtureSampler's epochs, floored), for the monitor's repeat
    check; None for a sampler that does not count them."""
    epochs = getattr(sampler, "epochs_by_source", None)
    return {name: int(value) for name, value in epochs().items()} if callable(epochs) else None


def _stage_rope_theta(sampler: Sampler, base: float, batch: int | None = None) -> float:
    """The RoPE base (mixtures Stage.rope_theta, else the model's) of the stage that batch `batch` (0-based, as
    the sampler counts them; default: the next one) comes from."""
    stages = getattr(getattr(sampler, "schedule", None), "stages", None)
    if not stages or not callable(getattr(sampler, "stage_index", None)):
        return base
    return getattr(stages[sampler.stage_index(batch)], "rope_theta", None) or base


def masked_targets(batch: Batch, tokens: torch.Tensor) -> torch.Tensor:
    """tokens[:, 1:], with the targets outside the batch's `loss_mask` (when it has one: SFT's assistant tokens)
    set to the ignored index -100."""
    targets = tokens[:, 1:]
    mask = getattr(batch, "loss_mask", None)
    if mask is None:
        return targets
    mask = torch.from_numpy(np.asarray(mask, dtype=bool)).to(tokens.device)
    if mask.shape != targets.shape:
        raise ConfigError(f"the batch's loss_mask {tuple(mask.shape)} must have the shape of its targets "
                          f"{tuple(targets.shape)}")
    return targets.masked_fill(~mask, -100)


def micro_step(forward: Callable[..., Any], batch: Batch, cfg: TrainConfig, model_config: ModelConfig,
               device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
               world_size: int = 1, objective: Objective | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """One micro-batch as the trainer takes it (and `mixlab preflight` times it): the batch checked and moved to
    the device, its document-masking inputs, the forward pass in the run's precision and the backward pass of
    loss / grad_accum. The loss is next-token cross-entropy over the batch's `loss_mask` (all targets without
    one), or the objective's. Returns (tokens [B, T+1], logits, the loss detached in fp32, or fp64 in fp64 runs,
    the objective's metrics)."""
    tokens = _batch_tensor(batch, cfg, model_config, device, world_size,
                           objective.rows_per_example if objective is not None else 1)
    extra = _doc_masking_inputs(batch, model_config, device, tokens.shape[1] - 1)
    metrics: dict[str, float] = {}
    with autocast():
        if objective is None:
            logits, loss = forward(tokens[:, :-1], masked_targets(batch, tokens), **extra)
        else:
            logits, loss, metrics = objective(forward, batch, tokens, extra)
    (loss / cfg.grad_accum).backward()
    return tokens, logits, at_least_fp32(loss.detach()), metrics


def precision_context(cfg: TrainConfig, device: torch.device) -> tuple[str, Callable[[], contextlib.AbstractContextManager]]:
    """The run's numerics ("fp32" or "bf16") and the context the forward pass runs in: bf16 autocast on CUDA
    ("auto"; fp32 master weights), fp32 on CPU unless asked, where bf16 is slow without bf16 instructions."""
    if cfg.precision == "fp64":
        return "fp64", contextlib.nullcontext
    wants_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not wants_bf16:
        return "fp32", contextlib.nullcontext
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn(f"train.precision={cfg.precision!r}: this GPU has no bf16; training in fp32", stacklevel=3)
        return "fp32", contextlib.nullcontext
    if device.type != "cuda":
        warnings.warn(f"train.precision='bf16' on {device.type}: bf16 autocast works but is usually much slower "
                      "than fp32 on a CPU; use precision 'auto' or 'fp32' unless you mean to test bf16 numerics",
                      stacklevel=3)
    kind = device.type
    return "bf16", lambda: torch.autocast(kind, dtype=torch.bfloat16)


def _check_rank_sampler(sampler: Sampler, world: DataParallelWorld) -> None:
    if not world.distributed:
        return
    try:
        params = inspect.signature(sampler.next_batch).parameters
    except (TypeError, ValueError):
        return
    if len(params) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        raise ConfigError(f"{world.world_size} processes need a sampler whose next_batch(dp_rank, dp_size) gives "
                          f"each rank its rows of the global batch, but {type(sampler).__name__}.next_batch takes "
                          "no rank: use mixlab.mixtures.MixtureSampler, or train in one process", ["sampler"])


def _check_policy(policy: Policy | None, sampler: Sampler, run: RunRecord) -> None:
    if policy is None:
        return
    missing = [name for name in ("set_weights", "current_weights") if not callable(getattr(sampler, name, None))]
    if missing:
        raise ConfigError(f"run {run.run_id!r}: policy {getattr(policy, 'name', type(policy).__name__)!r} needs a "
                          f"sampler that can change its weights, but {type(sampler).__name__} has no {missing}: use "
                          "mixlab.mixtures.MixtureSampler, or train without policy=", ["policy"])


def _row_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row [B] (no z-loss): what a mixture policy learns from, per source."""
    with torch.no_grad():
        per_token = torch.nn.functional.cross_entropy(logits.detach().reshape(-1, logits.size(-1)),
                                                      targets.reshape(-1), reduction="none").view(targets.shape)
        counted = (targets != -100).sum(dim=1).clamp(min=1)
        return per_token.sum(dim=1) / counted


def _check_sampler_budget(sampler: Sampler, cfg: TrainConfig) -> None:
    """A sampler that places its stages by a token budget must be given the trainer's budget, or the data
    decay stage and the LR decay drift apart."""
    budget = getattr(sampler, "total_tokens", None)
    if budget is not None and budget != cfg.steps * cfg.tokens_per_step:
        warnings.warn(f"sampler total_tokens={budget} but the trainer runs {cfg.steps} steps x "
                      f"{cfg.tokens_per_step} tokens = {cfg.steps * cfg.tokens_per_step}: mixture stages will not "
                      "line up with the LR schedule", stacklevel=3)


def _check_decay_alignment(sampler: Sampler, cfg: TrainConfig) -> None:
    """With WSD the LR decay starts exactly where a data stage starts: by default the last (decay) stage, as
    SmolLM3 anneals on its best data; a recipe may pin it to an earlier stage (SmolLM3's decay stage before a
    long-context stage). Exact: one step apart is a misalignment too."""
    stage_start_step = getattr(sampler, "stage_start_step", None)
    if cfg.schedule != "wsd" or not callable(stage_start_step):
        return
    data_start = stage_start_step(-1)  # in batches drawn; an optimizer step draws grad_accum of them
    if data_start == 0:
        return  # one mixture for the whole run: nothing to line up
    lr_start = decay_start_step(cfg)
    stages = len(getattr(getattr(sampler, "schedule", None), "stages", ())) or 1
    if lr_start * cfg.grad_accum in {stage_start_step(i) for i in range(1, stages)} | {data_start}:
        return
    if data_start % cfg.grad_accum:
        where = (f"inside optimizer step {data_start // cfg.grad_accum} (batch {data_start}, grad_accum="
                 f"{cfg.grad_accum}); choose a budget or stage fractions that put it on a step boundary and ")
    else:
        where = f"at step {data_start // cfg.grad_accum}; "
    warnings.warn(f"the sampler's last data stage starts {where}the LR decay at step {lr_start}: set "
                  f"TrainConfig.decay_start_step = sampler.stage_start_step(-1) // grad_accum "
                  f"(= {data_start // cfg.grad_accum})", stacklevel=3)


# what a run started from another run's checkpoint may change about the model: the context and how positions are
# encoded (mid-training context extension: a longer max_seq_len with a larger RoPE theta or YaRN); no weight depends
# on them
POSITION_FIELDS = ("max_seq_len", "rope_theta", "yarn_factor", "yarn_original_max_seq_len", "yarn_beta_fast",
                   "yarn_beta_slow")
# what a child run may change from its parent's model (train.init_from): the context, and whether attention stops
# at document boundaries (no weights depend on it: SFT packs dialogues with it on)
INIT_FREE_FIELDS = (*POSITION_FIELDS, "doc_masking")


def _filled(saved_model_config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's model config with the fields added since it was written at their defaults (a switch that
    did not exist then was off), so an older run still resumes; a config it cannot read stays as it is."""
    try:
        return ModelConfig.from_dict(saved_model_config).to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved_model_config


def _init_from(path: Path, run: RunRecord, model: Transformer, optimizer: torch.optim.Optimizer,
               model_config: ModelConfig) -> dict[str, Any]:
    """Start a new run from another run's checkpoint: its weights and AdamW moments, not its step, sampler, RNG or
    LR schedule (this run has its own). Returns what the run records about its origin."""
    saved = read_checkpoint(path)
    now = {k: v for k, v in model_config.to_dict().items() if k not in INIT_FREE_FIELDS}
    if saved.model_config is not None:
        had = {k: v for k, v in _filled(saved.model_config).items() if k not in INIT_FREE_FIELDS}
        if had != now:
            diff = {k: (v, now.get(k)) for k, v in had.items() if now.get(k) != v}
            raise ConfigError(f"run {run.run_id!r}: train.init_from={path} was trained with another model config "
                              f"(field: (checkpoint, now)) {diff}; use the parent's model section (only the context: "
                              f"{', '.join(INIT_FREE_FIELDS)} may change)", ["train.init_from"])
    hyper = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
    load_checkpoint(path, model, optimizer, restore_rng=False)
    for group, own in zip(optimizer.param_groups, hyper, strict=True):
        group.update(own)  # the moments are the parent's; betas, eps and weight decay are this run's
    return {"checkpoint": str(path), "step": saved.step}


def _resume(
    path: Path, run: RunRecord, model: Transformer, optimizer: torch.optim.Optimizer, sampler: Sampler,
    model_config: ModelConfig, cfg: TrainConfig, policy: Policy | None = None,
) -> _Progress:
    """Load the checkpoint at `path` into the live model, optimizer, RNGs, sampler and policy; returns the
    counters."""
    saved = read_checkpoint(path)
    now_model = model_config.to_dict()
    had_model = _filled(saved.model_config) if saved.model_config is not None else None
    saved_theta = had_model.get("rope_theta") if had_model is not None else None
    if had_model is not None:  # the theta in force when it was saved is checked below, once the sampler says where
        had_model = {**had_model, "rope_theta": now_model["rope_theta"]}
    if had_model is not None and had_model != now_model:
        diff = {k: (v, now_model.get(k)) for k, v in saved.model_config.items() if now_model.get(k) != v}
        raise ResumeError(f"run {run.run_id!r}: its checkpoint {path} was trained with another model config "
                          f"(field: (checkpoint, now)) {diff}; resume with the run's model config, or use a new "
                          "run id for a different model")
    if saved.train_config is not None:
        ignore = {"progress_bar", "threads", "device", "eval_every", "checkpoint_every", "keep_last_checkpoints",
                  "log_every", "tensorboard", "compile", "time_budget_h"}
        now = cfg.to_dict()
        diff = {k: (v, now.get(k)) for k, v in saved.train_config.items() if k not in ignore and now.get(k) != v}
        if diff:
            warnings.warn(f"resuming {path} with changed TrainConfig (field: (checkpoint, now)) {diff}; "
                          "the continuation will not reproduce an uninterrupted run", stacklevel=3)
    if saved.sampler_state is None:
        raise ResumeError(f"run {run.run_id!r}: checkpoint {path} has no sampler state, so the data order cannot "
                          "continue; use a new run id to train from scratch")
    ckpt = load_checkpoint(path, model, optimizer)
    try:
        sampler.load_state_dict(ckpt.sampler_state)
    except (ValueError, KeyError) as exc:
        raise ResumeError(f"run {run.run_id!r}: the sampler cannot continue from {path}: {exc}. Build the sampler "
                          "as the run did (same schedule, token shards, seed, seq_len, batch_size), or use a new "
                          "run id") from exc
    drawn = getattr(sampler, "step", 0)
    expected = _stage_rope_theta(sampler, model_config.rope_theta, drawn - 1) if drawn else model_config.rope_theta
    if saved_theta is not None and saved_theta != expected:
        raise ResumeError(f"run {run.run_id!r}: checkpoint {path} was trained with RoPE theta {saved_theta} but the "
                          f"model config and the schedule's stage there give {expected}; resume with the run's "
                          "model.rope_theta and mixture, or use a new run id")
    saved_policy = ckpt.trainer_state.get("policy")
    if policy is not None:
        if saved_policy is None:
            raise ResumeError(f"run {run.run_id!r}: checkpoint {path} was trained without a mixture policy, so policy "
                              f"{policy.name!r} cannot continue it; resume without policy=, or use a new run id")
        try:
            policy.load_state_dict(saved_policy)
        except (ValueError, KeyError) as exc:
            raise ResumeError(f"run {run.run_id!r}: the policy cannot continue from {path}: {exc}") from exc
    elif saved_policy is not None:
        warnings.warn(f"run {run.run_id!r}: checkpoint {path} holds the state of mixture policy "
                      f"{saved_policy.get('name')!r} but train() got no policy: the weights stay as the sampler "
                      "saved them and no longer adapt", stacklevel=3)
    return _Progress(**{k: v for k, v in ckpt.trainer_state.items() if k in _Progress.__dataclass_fields__})


def train(
    run: RunRecord,
    model_config: ModelConfig,
    train_config: TrainConfig,
    sampler: Sampler,
    evaluator: HeldOutEvaluator | None = None,
    *,
    stop_after: int | None = None,
    policy: Policy | None = None,
    tasks: TaskScorer | None = None,
    monitor: TrainingMonitor | None = None,
    objective: Objective | None = None,
) -> dict[str, Any]:
    """Train (or resume) `run` to train_config.steps and return its summary (also stored in run.json).

    Resumes from the run's latest checkpoint when train_config.resume: weights, optimizer, RNG, the sampler's
    position and the run's logs (truncated to the checkpoint's step) all continue as if never interrupted.
    stop_after=N stops cleanly after step N with a checkpoint, as a preemption would (status "interrupted").
    SIGTERM or SIGINT does the same at the current step (summary["stopped_by"] names the signal).
    policy (a mixtures.policies.MixturePolicy): after every step it gets the mean loss of each source's rows,
    after every eval the eval rows, and at its cadence the sampler's weights follow its decisions; each change
    is logged to mixture.jsonl with its cause and the policy state is in every checkpoint.
    tasks (e.g. ablations.tasks.ClozeEvaluator): downstream tasks scored at every eval, logged to tasks.jsonl.
    monitor (training.monitor.TrainingMonitor): every step's loss, grad norm, throughput and data are checked for the
    playbook's silent failures; alerts go to alerts.jsonl and the console. With on_alert="stop" the run stops before
    the offending update, checkpointed and "interrupted" (summary.stopped_by names the alert); the checkpoint's
    sampler is past the offending batches, so a rerun skips them. With on_alert="rewind" it goes back to its last
    checkpoint (weights, moments, policy and monitor state) and trains on with the sampler where it is, skipping
    the batches since (summary.rewinds lists each; after monitor.max_rewinds it stops instead). Its state is in
    every checkpoint.
    A mixture stage with its own rope_theta (a long-context stage) switches the model's RoPE base from its first
    step on (summary.rope_theta_changes); checkpoints record the base in force.
    The run's lock (`RunRecord.acquire`) is held while training, so `mixlab runs` can tell a live run from a dead one.
    Any error once the run is touched (resuming included) marks it "failed" with the error in its summary; the
    errors raised on purpose are `training.TrainingError`s (ValueErrors) that say what to do.
    Under torchrun (RANK / WORLD_SIZE set) each process trains a DDP replica on its rows of the global batch
    (train.batch_size, which must divide by the world size) and only rank 0 writes the run record, TensorBoard
    events and checkpoints; the process group is created here when the caller has not created it.
    objective (training.posttrain): a preference loss in place of cross-entropy; its metrics (reward accuracy
    and margin) go into every metrics row. Batches with a `loss_mask` (SFT) learn only from its targets.
    Every metrics row and the summary carry tokens_per_s and mfu, against the matmul peak measured at start
    (summary.matmul_peak_flops, summed over ranks; measured again at the end when the MFU is implausible).
    """
    world = DataParallelWorld.from_env(train_config.resolved_device())
    if train_config.batch_size % world.world_size:  # before joining the group: a config error needs no peers
        raise ConfigError(f"run {run.run_id!r}: train.batch_size={train_config.batch_size} (the global batch) must "
                          f"divide by the {world.world_size} processes: each reads an equal share of its rows; "
                          "choose a multiple of the world size", ["train.batch_size"])
    created_group = world.init()
    try:
        return _train(run, model_config, train_config, sampler, evaluator, world, stop_after=stop_after,
                      policy=policy, tasks=tasks, monitor=monitor, objective=objective)
    finally:
        if created_group:
            world.destroy()


def _train(
    run: RunRecord,
    model_config: ModelConfig,
    train_config: TrainConfig,
    sampler: Sampler,
    evaluator: HeldOutEvaluator | None,
    world: DataParallelWorld,
    *,
    stop_after: int | None,
    policy: Policy | None,
    tasks: TaskScorer | None,
    monitor: TrainingMonitor | None,
    objective: Objective | None,
) -> dict[str, Any]:
    cfg = train_config
    total = cfg.steps
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"run {run.run_id!r}: train.seq_len={cfg.seq_len} exceeds model.max_seq_len="
                          f"{model_config.max_seq_len}; shorten seq_len or raise max_seq_len",
                          ["train.seq_len", "model.max_seq_len"])
    _check_rank_sampler(sampler, world)
    if not world.is_main:
        run = run.follower()  # rank 0 writes the run; the others keep the same facts in memory only
    # every rank resumes from the checkpoint rank 0 sees (one file system, one decision)
    found = latest_checkpoint(run.checkpoint_dir) if world.is_main else None
    latest_name = world.broadcast_object(str(found) if found is not None else None)
    latest = Path(latest_name) if latest_name is not None else None
    if latest is not None and not cfg.resume:  # refused before touching the run: its status stays as it was
        raise ResumeError(f"run {run.run_id!r} already has checkpoints ({latest}) and TrainConfig.resume is off: "
                          "use a new run id, or delete the run directory to start it over")
    device = world.device(cfg.resolved_device())
    if device.type == "cpu":
        # processes on one machine share its cores: each takes its part unless train.threads says otherwise
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world.local_world_size))
    precision, autocast = precision_context(cfg, device)
    peak_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak_flops = world_peak_flops(world, device, peak_dtype)
    init_path = resolve_checkpoint(cfg.init_from) if cfg.init_from and latest is None else None
    _check_policy(policy, sampler, run)
    _check_sampler_budget(sampler, cfg)
    _check_decay_alignment(sampler, cfg)
    seeds = rank_seeds(cfg.seed, world.rank, world.world_size)
    seed_everything(seeds.init)  # the same weights on every replica (DDP broadcasts rank 0's anyway)
    model = Transformer(model_config).to(device, dtype=torch.float64 if precision == "fp64" else None)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    if world.distributed:
        seed_everything(seeds.local)  # from here on, what a rank draws is its own
    # wrappers from outside: `model` stays the plain module that is saved, evaluated and exported
    replica = world.wrap(model)  # (an MoE's experts are stacked tensors: no parameter goes unused in a step)
    forward = torch.compile(replica) if cfg.compile else replica
    configs = {"model_config": model_config.to_dict(), "train_config": cfg.to_dict()}
    sampler_counts = callable(getattr(sampler, "tokens_by_source", None))
    # per-row facts of the global batch that policy, monitor or our own token count need from every rank
    gather_rows = world.distributed and (policy is not None or monitor is not None or not sampler_counts)

    step, progress, resumed_from, stopped_by = 0, _Progress(), None, None
    last_loss, eval_rows = float("nan"), []
    call_tokens = 0  # tokens trained by this call (0 when resuming an already finished run)
    bar = None
    stop_signal = 0  # the signal number any rank received, agreed at the end of every step

    def draw() -> Batch:
        return sampler.next_batch(world.rank, world.world_size) if world.distributed else sampler.next_batch()

    def tokens_by_source() -> dict[str, int]:
        """One count: the sampler's when it keeps one (it knows packing we can't see), else ours."""
        return dict(sampler.tokens_by_source() if sampler_counts else progress.tokens_by_source or {})

    def checkpoint(at: int) -> Path | None:
        if not world.is_main:
            return None
        state = progress.state_dict() | ({"policy": policy.state_dict()} if policy is not None else {})
        if monitor is not None:
            state["monitor"] = monitor.state_dict()
        path = save_checkpoint(run.checkpoint_dir, at, model, optimizer, sampler_state=sampler.state_dict(),
                               trainer_state=state, configs=configs, keep_last=cfg.keep_last_checkpoints)
        run.flush()
        return path

    def rewind(at: int, why: str) -> int | None:
        """Back to the last checkpoint's weights, AdamW moments, policy and monitor state, but not its sampler,
        which stays past the offending batches: the steps since the checkpoint are skipped (PaLM's cure for a loss
        spike) and the run goes on at the step after the offending one, so the LR schedule and the mixture's stages
        keep their places. The new state is checkpointed at once (a preemption cannot replay the skipped batches).
        Returns the step to continue from; None without a checkpoint (the run then stops)."""
        found = latest_checkpoint(run.checkpoint_dir) if world.is_main else None
        path = world.broadcast_object(str(found) if found is not None else None)
        if path is None:
            return None
        saved = load_checkpoint(path, model, optimizer, restore_rng=False)
        if policy is not None and saved.trainer_state.get("policy") is not None:
            policy.load_state_dict(saved.trainer_state["policy"])
        monitor.rewind(saved.trainer_state.get("monitor"), skip_steps=range(saved.step + 1, at + 2))
        # the discarded steps' metrics go (their updates are undone); the alerts that caused it and the mixture
        # decisions (still in force in the sampler) stay on record
        run.truncate_after(saved.step, keep=("alerts.jsonl", "mixture.jsonl"))
        run.summary.setdefault("rewinds", []).append(
            {"at_step": at + 1, "weights_from_step": saved.step, "checkpoint": path, "cause": why,
             "skipped_steps": [saved.step + 1, at + 1], "skipped_batches": (at + 1 - saved.step) * cfg.grad_accum})
        if world.is_main:
            bar.write(f"[{run.run_id}] {why}: weights back to step {saved.step} ({path}); the batches of steps "
                      f"{saved.step + 1}..{at + 1} are skipped, training goes on at step {at + 2}", file=sys.stderr)
            bar.update(1)
        checkpoint(at + 1)
        return at + 1

    def log_weights(at: int, weights: dict[str, float], cause: str) -> None:
        run.log_mixture(at, weights, cause, policy=getattr(policy, "name", None))

    def run_eval(at: int) -> list[dict[str, Any]]:
        """Rank 0 evaluates; the others wait for its rows (so every rank's policy sees the same)."""
        rows = None
        if world.is_main:
            if bar is not None:
                bar.set_description_str(f"{run.run_id}: evaluating step {at}…")
                bar.refresh()
            rows = evaluator.evaluate(model, device)
            if bar is not None:
                bar.set_description_str(run.run_id)
            for row in rows:
                run.log_eval(at, row["source"], **{k: v for k, v in row.items() if k != "source"})
            if tasks is not None:
                for row in tasks.evaluate(model, device):
                    run.log_task(at, row["task"], **{k: v for k, v in row.items() if k != "task"})
        return world.broadcast_object(rows)

    previous_status = run.display_status() if (run.path / "run.json").exists() else None  # "stale": it died
    run.acquire()  # refuses a run that a live process trains; the lock dies with this process
    stop = _StopSignals()
    try:
        stop.__enter__()
        if latest is not None:
            step = read_checkpoint(latest).step  # what the run has, should the resume fail
            progress = _resume(latest, run, model, optimizer, sampler, model_config, cfg, policy)
            resumed_from = str(latest)
            if monitor is not None and (saved_monitor := read_checkpoint(latest).trainer_state.get("monitor")):
                monitor.load_state_dict(saved_monitor)
            if world.distributed:  # the checkpoint holds rank 0's generators: give each rank its own again
                seed_everything((seeds.local + step) % 2**63)
        elif init_path is not None:
            run.summary["initialized_from"] = _init_from(init_path, run, model, optimizer, model_config)
        run.use_tensorboard(cfg.tensorboard)
        run.truncate_after(step)  # drop logs of steps after the checkpoint (or of a run that died before its first)
        run.config.update({"model": model_config.to_dict(), "train": cfg.to_dict(),
                           "decay_start_step": decay_start_step(cfg), "device": str(device),
                           "precision": precision, "compiled": bool(cfg.compile), "world_size": world.world_size})
        if latest is not None or previous_status in ("stale", "interrupted", "failed"):
            restarts = run.summary.setdefault("restarts", [])
            restarts.append({"step": step, "previous_status": previous_status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        run.status = "running"
        run.summary.pop("stopped_by", None)
        run.summary.update({"params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
                            # an MoE's share of its (non-embedding) parameters one token uses; 1 for dense models
                            "active_params": model.active_params(), "activation_ratio": model.activation_ratio(),
                            "flops_per_token": model.estimate_flops_per_token(cfg.seq_len), "total_steps": total,
                            "matmul_peak_flops": peak_flops, "world_size": world.world_size})
        run.save()
        def next_stage() -> int:
            """The stage of the next batch to draw (the sampler counts batches; a step draws grad_accum)."""
            return sampler.stage_index()  # type: ignore[attr-defined]  (a MixtureSampler; a rewind skips batches)

        known_stage = next_stage() if policy is not None else None  # a policy needs a MixtureSampler (checked)
        if policy is not None and step == 0 and not run.mixture_changes():  # (a run that died before step 1 has it)
            log_weights(0, dict(sampler.current_weights()), "start: the schedule's weights")

        window_tokens, window_time = 0, 0.0
        stage = ""
        seq_len = cfg.seq_len
        moe_window: list[list[int]] | None = None  # tokens per expert of each MoE layer since the last log row
        bar = tqdm(total=total, initial=step, disable=not cfg.progress_bar or not world.is_main, unit="step",
                   dynamic_ncols=True, desc=run.run_id)
        model.train()
        rope_theta = model_config.rope_theta
        while step < total and (stop_after is None or step < stop_after) and stop_signal == 0:
            t0 = time.perf_counter()
            if (theta := _stage_rope_theta(sampler, model_config.rope_theta)) != rope_theta:
                rope_theta = theta  # a long-context stage's RoPE base, from its first batch on
                model.use_rope_theta(theta)
                configs["model_config"]["rope_theta"] = theta  # checkpoints describe the model as it now is
                changes = run.summary.setdefault("rope_theta_changes", [])
                if not changes or changes[-1]["rope_theta"] != theta:  # (a resume inside the stage is no change)
                    changes.append({"step": step, "rope_theta": theta})
                if world.is_main:
                    bar.write(f"[{run.run_id}] step {step + 1}: RoPE theta {theta:g}", file=sys.stderr)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device, dtype=torch.float64 if precision == "fp64" else torch.float32)
            sources: list[str] = []
            row_lens: list[int] = []  # tokens trained per row (a stage may set its own seq_len)
            windows: list[str] = []  # a hash per row, for the monitor's repeated-window check
            row_losses: list[torch.Tensor] = []
            step_metrics: dict[str, float] = {}  # the objective's, averaged over the micro-batches
            for micro in range(cfg.grad_accum):
                batch = draw()
                # DDP averages gradients on the last micro-batch only: one all-reduce per optimizer step
                syncing = (replica.no_sync() if replica is not model and micro < cfg.grad_accum - 1
                           else contextlib.nullcontext())
                with syncing:
                    tokens, logits, loss, metrics = micro_step(forward, batch, cfg, model_config, device,
                                                               autocast, world.world_size, objective)
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value / cfg.grad_accum
                seq_len = tokens.shape[1] - 1
                loss_sum += loss
                if policy is not None:
                    row_losses.append(_row_losses(logits.float(), masked_targets(batch, tokens)))
                del logits
                row_lens += [seq_len] * tokens.shape[0]
                stage, sources = batch.stage, sources + list(batch.sources)
                if monitor is not None:
                    windows += window_ids(np.asarray(batch.tokens))
            per_row = (torch.cat(row_losses).cpu().numpy().astype(np.float64).tolist() if row_losses else [])
            if gather_rows:  # the global batch's rows, in rank order (= the rows one process would see)
                parts = world.all_gather_object((sources, row_lens, windows, per_row))
                sources = [s for part in parts for s in part[0]]
                row_lens = [n for part in parts for n in part[1]]
                windows = [w for part in parts for w in part[2]]
                per_row = [v for part in parts for v in part[3]]
            n = sum(row_lens) if gather_rows or not world.distributed else sum(row_lens) * world.world_size
            if not sampler_counts:
                own = progress.tokens_by_source = progress.tokens_by_source or {}
                for source, length in zip(sources, row_lens, strict=True):
                    own[source] = own.get(source, 0) + length
            last_loss = world.all_mean(loss_sum).item() / cfg.grad_accum
            if step_metrics:  # every rank's, averaged
                means = world.all_mean(torch.tensor(list(step_metrics.values()), dtype=torch.float64))
                step_metrics = dict(zip(step_metrics, means.tolist(), strict=True))
            # DDP has averaged the gradients: the norm, and so the clipping, is the same on every rank
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else float("nan"))
            monitor_action = None  # (what to do, why)
            if monitor is not None:
                if world.is_main:
                    alerts = monitor.observe(step + 1, last_loss, grad_norm if cfg.grad_clip > 0 else None,
                                             n / max(time.perf_counter() - t0, 1e-9), windows, sources,
                                             dict(sampler.current_weights()) if hasattr(sampler, "current_weights")
                                             else None, _source_passes(sampler))
                    for alert in alerts:
                        run.log_alert(alert.to_dict())
                        bar.write(f"[{run.run_id}] {alert.format()}", file=sys.stderr)
                    if alerts and (action := monitor.decision(alerts)) != "continue":
                        monitor_action = (action, f"monitor: {alerts[0].kind} at step {step + 1}")
                monitor_action = world.broadcast_object(monitor_action)  # rank 0's monitor decides for all
            if monitor_action is not None:
                optimizer.zero_grad(set_to_none=True)  # the offending update is not applied
                for layer in model.moe_layers():
                    layer.tokens_per_expert.zero_()  # nor its expert counts
                if monitor_action[0] == "rewind" and (back := rewind(step, monitor_action[1])) is not None:
                    progress.tokens += n  # drawn (and skipped), as the sampler counts them
                    step = back
                    continue
            if not math.isfinite(last_loss) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
                raise NonFiniteLossError(
                    f"run {run.run_id!r} step {step + 1}: loss {last_loss}, grad norm {grad_norm} at lr {lr:.3g} "
                    f"(stage {stage!r}, sources {sorted(set(sources))}); the update was not applied. Last "
                    f"checkpoint: {latest_checkpoint(run.checkpoint_dir) or 'none'}. Rerun (it resumes from there) "
                    "with a lower train.lr, a longer train.warmup_steps or train.grad_clip > 0, or set model.qk_norm "
                    "/ model.z_loss; if it recurs at the same step, inspect that batch's data.",
                    ["train.lr", "train.warmup_steps", "train.grad_clip", "model.qk_norm", "model.z_loss"])
            if monitor_action is not None:
                stopped_by = monitor_action[1]
                checkpoint(step)
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if model.moe_layers():
                if world.distributed:  # every rank steps its expert biases from the global batch's counts
                    for layer in model.moe_layers():
                        world.all_sum_(layer.tokens_per_expert)
                counts = model.after_optimizer_step()["moe_tokens_per_expert"]
                moe_window = counts if moe_window is None else [
                    [a + b for a, b in zip(old, new, strict=True)] for old, new in zip(moe_window, counts, strict=True)]
            step += 1

            dt = time.perf_counter() - t0
            progress.tokens += n
            progress.train_time_s += dt
            call_tokens += n
            window_tokens, window_time = window_tokens + n, window_time + dt
            bar.update(1)
            if policy is not None:
                sums: dict[str, float] = {}
                rows_by_source: dict[str, int] = {}
                for source, value in zip(sources, per_row, strict=True):
                    sums[source] = sums.get(source, 0.0) + value
                    rows_by_source[source] = rows_by_source.get(source, 0) + 1
                policy.observe_train(step, {s: v / rows_by_source[s] for s, v in sums.items()}, rows_by_source)

            if step % cfg.log_every == 0 or step == total:
                tok_s = window_tokens / window_time if window_time > 0 else 0.0
                extra_metrics: dict[str, Any] = {}
                if moe_window is not None:  # over the log window: the busiest expert's load / the mean, any layer
                    extra_metrics["moe_tokens_per_expert"] = moe_window
                    extra_metrics["moe_max_load"] = max(max(layer) * len(layer) / max(sum(layer), 1)
                                                        for layer in moe_window)
                    moe_window = None
                run.log_metrics(step, loss=last_loss, lr=lr, grad_norm=grad_norm, tokens=progress.tokens,
                                tokens_per_s=tok_s, mfu=mfu(model.estimate_flops_per_token(seq_len), tok_s, peak_flops),
                                stage=stage, tokens_by_source=tokens_by_source(), **extra_metrics, **step_metrics)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}", stage=stage)
                window_tokens, window_time = 0, 0.0
            if evaluator is not None and (step % cfg.eval_every == 0 or step == total):
                eval_rows = run_eval(step)
                overall = eval_rows[-1]
                # progress goes to stderr, with the bar: stdout is for results (`mixlab train --json`)
                if world.is_main:
                    bar.write(f"[{run.run_id}] step {step}: eval loss {overall['loss']:.4f}, bpb "
                              f"{overall['bpb']:.4f}", file=sys.stderr)
                if policy is not None:
                    policy.observe_eval(step, eval_rows)
            if policy is not None and step < total:
                if (now := next_stage()) != known_stage:
                    known_stage = now  # a new stage takes the schedule's weights again: say so in the log
                    name = sampler.schedule.stages[now].name  # type: ignore[attr-defined]
                    log_weights(step, dict(sampler.current_weights()), f"schedule: stage {name!r} starts")
                decision = world.broadcast_object(policy.decide(step, dict(sampler.current_weights())))
                if decision is not None:
                    sampler.set_weights(decision.weights, decision.cause)
                    log_weights(step, dict(decision.weights), decision.cause)
            stop_signal = world.all_max(stop.received or 0)  # one rank's signal stops every rank here
            if step % cfg.checkpoint_every == 0 or step == total or step == stop_after or stop_signal:
                checkpoint(step)
        stop_signal = world.all_max(stop_signal or stop.received or 0)
        if stop_signal and world.is_main and (latest_checkpoint(run.checkpoint_dir) is None
                                              or read_checkpoint(latest_checkpoint(run.checkpoint_dir)).step != step):
            checkpoint(step)  # the signal came after this step's checkpoint decision
    except BaseException as exc:
        record_failure(run, exc, step)
        raise
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
    return finish_run(run, world, step=step, total=total, progress=progress, tokens_by_source=tokens_by_source(),
                      final_loss=last_loss if call_tokens else None, resumed_from=resumed_from,
                      flops_per_token=model.estimate_flops_per_token(cfg.seq_len), peak_flops=peak_flops,
                      measure_peak=lambda: world_peak_flops(world, device, peak_dtype, cached=False),
                      stopped_by=signal.Signals(stop_signal).name if stop_signal else stopped_by, eval_rows=eval_rows)


def record_failure(run: RunRecord, exc: BaseException, step: int) -> None:
    """The run record of a training loop that raised: failed (interrupted on Ctrl-C) at `step`, lock released."""
    run.status = "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted"
    run.summary.update({"error": f"{type(exc).__name__}: {exc}", "step": step})
    run.save()
    run.release()


def world_peak_flops(world: DataParallelWorld, device: torch.device, dtype: torch.dtype,
                     cached: bool = True) -> float:
    """The matmul peak (FLOP/s) of all ranks: they measure together, sharing the machine as they will train, and
    the world's peak is their mean times their number."""
    world.barrier()
    local = measure_matmul_peak(device, dtype, cached=cached)
    return world.all_mean(torch.tensor(local, dtype=torch.float64)).item() * world.world_size


def finish_run(run: RunRecord, world: DataParallelWorld, *, step: int, total: int, progress: _Progress,
               tokens_by_source: dict[str, int], final_loss: float | None, resumed_from: str | None,
               flops_per_token: float, peak_flops: float, measure_peak: Callable[[], float],
               stopped_by: str | None, eval_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run record of a training loop that returned (every backend's): completed or interrupted, the summary's
    totals, the lock released; returns the summary once every rank is here. final_loss None: this call trained no
    step, so the summary keeps the previous call's. `measure_peak` measures the world's peak again (every rank
    calls it), for an MFU too high to be true."""
    run.status = "completed" if step >= total else "interrupted"
    run.summary.pop("error", None)
    tokens_per_s = progress.tokens / progress.train_time_s if progress.train_time_s else None
    # the ranks' mean: every rank takes the same branch (measuring again is a collective)
    run_mfu = world.all_mean(torch.tensor(mfu(flops_per_token, tokens_per_s or 0.0, peak_flops),
                                          dtype=torch.float64)).item()
    peak_flops = settled_peak(peak_flops, run_mfu, measure_peak)
    run.summary["matmul_peak_flops"] = peak_flops
    run.summary.update({
        "step": step,
        "tokens": progress.tokens,
        "tokens_by_source": tokens_by_source,
        "final_loss": final_loss if final_loss is not None else run.summary.get("final_loss"),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(flops_per_token, tokens_per_s, peak_flops) if tokens_per_s else None,
        "train_time_s": progress.train_time_s,
        "resumed_from": resumed_from,
    })
    if stopped_by is not None:
        run.summary["stopped_by"] = stopped_by
    if eval_rows:
        run.summary["eval"] = {r["source"]: {k: v for k, v in r.items() if k != "source"} for r in eval_rows}
    run.save()
    run.release()
    world.barrier()  # the run record is complete before any rank returns (and reads it)
    return dict(run.summary)
