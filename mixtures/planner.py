"""The planner's refusals, checked before any training: a mixture that would repeat a source past its limit.

Repeating data is not free: past ~4 epochs the value of repeated tokens drops fast (Muennighoff et al., 2023,
"Scaling Data-Constrained Language Models"), so a schedule that asks for 30 passes over a small source is almost
always a mistake (a weight meant for another source, a budget raised without more data). `mixlab train` and
`mixlab mix` refuse it, naming the source, the stages that draw it and what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError

DEFAULT_MAX_EPOCHS = 4.0


class PlanError(ScheduleError):
    """A mixture that the planner refuses; the message names the source and stages and what to change."""


@dataclass
class PlanLimits:
    """How far a run may repeat its sources: `max_epochs` for every source, `max_epochs_by_source` per source."""

    max_epochs: float = DEFAULT_MAX_EPOCHS
    max_epochs_by_source: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {"max_epochs": self.max_epochs, **self.max_epochs_by_source}.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise PlanError(f"plan: the epoch limit of {name} must be a positive number, got {value!r}")

    def limit(self, source: str) -> float:
        return float(self.max_epochs_by_source.get(source, self.max_epochs))

    def to_dict(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "max_epochs_by_source": dict(self.max_epochs_by_source)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PlanLimits:
        unknown = sorted(set(values) - {"max_epochs", "max_epochs_by_source"})
        if unknown:
            raise PlanError(f"plan: unknown fields {unknown}; known: ['max_epochs', 'max_epochs_by_source']")
        return cls(**dict(values))


def repetition_problems(schedule: MixtureSchedule, expected_epochs: Mapping[str, float],
                        limits: PlanLimits) -> list[str]:
    """One message per source that the schedule would repeat past its limit."""
    problems = []
    for source, epochs in sorted(expected_epochs.items()):
        limit = limits.limit(source)
        if epochs <= limit:
            continue
        stages = ", ".join(f"{st.name!r} ({st.normalized_weights[source]:.1%})" for st in schedule.stages
                           if st.normalized_weights.get(source))
        problems.append(
            f"source {source!r} would be repeated {epochs:.1f} times (limit {limit:g}) by stage(s) {stages}: lower "
            f"its weight there, shorten the run, add data to it, or raise the limit with "
            f"plan.max_epochs_by_source.{source} (or plan.max_epochs)")
    return problems


def check_repetition(schedule: MixtureSchedule, expected_epochs: Mapping[str, float], limits: PlanLimits) -> None:
    """Raise PlanError when any source would be repeated past its limit."""
    problems = repetition_problems(schedule, expected_epochs, limits)
    if problems:
        raise PlanError("the planner refuses this mixture:\n  " + "\n  ".join(problems))
