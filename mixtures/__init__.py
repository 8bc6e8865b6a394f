"""Mixtures: which data the model sees when. A `MixtureSchedule` of weighted stages, and a deterministic,
resumable `MixtureSampler` that draws training batches from token sources by it."""

from mixlab.mixtures.planner import (
    DEFAULT_MAX_EPOCHS,
    PlanError,
    PlanLimits,
    check_repetition,
    repetition_problems,
)
from mixlab.mixtures.sampler import (
    SAMPLER_STATE_VERSION,
    MixtureSampler,
    SampledBatch,
    SamplerStateError,
    val_windows,
)
from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError, Stage

__all__ = [
    "DEFAULT_MAX_EPOCHS",
    "PlanError",
    "PlanLimits",
    "check_repetition",
    "repetition_problems",
    "SAMPLER_STATE_VERSION",
    "MixtureSampler",
    "MixtureSchedule",
    "SampledBatch",
    "SamplerStateError",
    "ScheduleError",
    "Stage",
    "val_windows",
]
