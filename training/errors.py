"""Errors a training run raises on purpose. All are ValueErrors whose message names the run or file and says what
to do, so a command line can print them without a traceback."""

from __future__ import annotations

import math
from typing import Any


class TrainingError(ValueError):
    """Base of every error the training package raises on purpose.

    `fields` names the config fields that fix it, as dotted run-config paths (`train.warmup_steps`), so that a
    command line can add the flags or `--set` overrides that set them."""

    def __init__(self, message: str, fields: tuple[str, ...] | list[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)


class ConfigError(TrainingError):
    """A ModelConfig/TrainConfig (or what the sampler and evaluator hand the trainer) that cannot work."""


class CheckpointError(TrainingError):
    """A checkpoint directory that cannot be read, written or loaded into this model."""


class ResumeError(TrainingError):
    """A run that cannot continue from its checkpoint as asked (other model, other data order, resume off)."""


class NonFiniteLossError(TrainingError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the bad update was not applied.

    Also a RuntimeError, as it was before the typed errors: existing `except RuntimeError` handlers still see it."""


class RunLockedError(TrainingError):
    """Another live process holds the run's lock (it is training the run now)."""


def whole_number(config: Any, name: str, minimum: int, section: str = "model") -> int:
    """config.<name> as an int >= minimum, or a ConfigError naming `<section>.<name>` (bools are not numbers)."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{section}.{name}={value!r} must be a whole number >= {minimum}", [f"{section}.{name}"])
    return value


def non_negative_number(config: Any, name: str, section: str = "model") -> float:
    """config.<name> as a finite number >= 0, or a ConfigError naming `<section>.<name>`."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{section}.{name}={value!r} must be a finite number >= 0", [f"{section}.{name}"])
    return float(value)
