"""Learning-rate schedules as pure functions of the step: the scheduler's position *is* the step, so a checkpoint
needs only the step to resume the schedule exactly (no hidden scheduler state to get out of sync)."""

from __future__ import annotations

import math

from mixlab.training.config import TrainConfig


def decay_start_step(cfg: TrainConfig) -> int:
    """First step of the decay phase (0-based: the step whose update gets the first decayed LR).

    For WSD this is `cfg.decay_start_step` when set (pin it to the sampler's `stage_start_step(-1)`), else the
    step where `MixtureSchedule.stable_decay(decay_fraction=cfg.decay_fraction)` switches to its decay stage.
    """
    total = cfg.steps
    if cfg.schedule == "constant":
        return total
    if cfg.schedule == "cosine":
        return cfg.warmup_steps
    if cfg.decay_start_step is not None:
        return cfg.decay_start_step
    return max(cfg.warmup_steps, _first_step_at(1.0 - cfg.decay_fraction, total))


def _first_step_at(boundary: float, total: int) -> int:
    """First step s with s / total past `boundary`, compared exactly as `MixtureSchedule.stage_index_at` does
    (a step belongs to the earlier stage while `s / total < boundary - 1e-12`); a test holds the two together."""
    if total <= 0:
        return 0
    step = min(total, max(0, math.ceil(boundary * total)))
    while step > 0 and not ((step - 1) / total < boundary - 1e-12):
        step -= 1
    while step < total and step / total < boundary - 1e-12:
        step += 1
    return step


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update that turns step `step` into `step + 1` (0-based).

    Warmup rises linearly to `lr` and reaches it at its last step (step 0 gets lr / warmup_steps, never 0, so no
    step is wasted). Decay goes from `lr` down to `min_lr`, reaching `min_lr` at the final step. WSD decays
    linearly (SmolLM3's `lr_decay_style: linear`); cosine decays along a half cosine from the end of warmup.
    """
    total = cfg.steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = decay_start_step(cfg)
    if step < start:
        return cfg.lr
    decay_steps = total - start
    progress = min(1.0, (step - start + 1) / decay_steps)
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr + (cfg.min_lr - cfg.lr) * progress
