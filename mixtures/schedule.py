"""Mixture schedules: which leaves (sources or selections), in which proportions, at which point of training.

SmolLM3 was trained in stages (stable 1, stable 2, decay), each a weight per source, switching at fixed
steps; the decay stage adds math and code. A `MixtureSchedule` is the same idea, with each `Stage` bounded in
whichever unit the author thinks in: a fraction of the run (so one schedule serves a 20M-token CPU ablation and a
11T-token run), a token count, a step count, or an absolute start step (as nanotron's `start_training_step`).
Inside a stage a `Curriculum` can move the weights towards a second mixture; a stage can set its own sequence
length (a long-context stage). Weights may be a tree (`mixlab.mixtures.hierarchy`), flattened with token counts.

`MixtureSchedule.resolve(total_steps, batch_size, seq_len)` turns the bounds into steps once, by one rule, and
answers every per-step question the sampler, the planner and the trainer ask (`ResolvedSchedule`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from mixlab.mixtures.hierarchy import (
    WEIGHT_SUM_TOLERANCE,
    MixtureNode,
    ScheduleError,
    Weight,
    explain_lines,
    flatten_weights,
    is_flat,
    leaves,
    parse_weights,
    sum_problems,
    weight_to_data,
)
from mixlab.mixtures.selection import Selection, SelectionError

SCHEDULE_FORMAT = "mixlab.mixture/v2"
READABLE_FORMATS = ("mixlab.mixture/v1", SCHEDULE_FORMAT)
FRACTION_TOLERANCE = 1e-6
BOUNDS = ("fraction", "tokens", "steps", "start_step")
SHAPES = ("step", "linear", "cosine")

__all__ = [
    "BOUNDS", "SCHEDULE_FORMAT", "SHAPES", "WEIGHT_SUM_TOLERANCE", "Curriculum", "MixtureNode", "MixtureSchedule",
    "ResolvedSchedule", "ResolvedStage", "ScheduleError", "Stage",
]


def _positive_int(value: Any, what: str, where: str, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScheduleError(f"{where}: {what} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Curriculum:
    """Inside a stage, the weights move from the stage's `weights` to `end`.

    shape "step": the stage draws `weights` until fraction `at` of its steps, `end` from then on (the switch is
    at step `start + ceil(at * length)`). "linear" / "cosine": the first step of the stage draws `weights`, the
    last draws `end`, in between a linear or cosine (slow-fast-slow) interpolation of the normalised mixtures.
    """

    end: Mapping[str, Weight]
    shape: str = "linear"
    at: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ScheduleError(f"curriculum: unknown shape {self.shape!r}; use one of {list(SHAPES)}")
        if isinstance(self.at, bool) or not isinstance(self.at, int | float) or not 0 < self.at < 1:
            raise ScheduleError(f"curriculum: at must be a number in (0, 1), got {self.at!r}")
        object.__setattr__(self, "at", float(self.at))
        object.__setattr__(self, "end", parse_weights(self.end, "curriculum end"))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"shape": self.shape, "end": {k: weight_to_data(v) for k, v in self.end.items()}}
        if self.shape == "step":
            data["at"] = self.at
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Curriculum:
        if isinstance(data, Curriculum):
            return data
        unknown = set(data) - {"end", "shape", "at"} if isinstance(data, Mapping) else set()
        if not isinstance(data, Mapping) or "end" not in data or unknown:
            raise ScheduleError(
                f"curriculum {data!r}: expected {{end: {{leaf: weight}}, shape: step|linear|cosine, at?}}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else "")
            )
        return cls(data["end"], data.get("shape", "linear"), data.get("at", 0.5))


@dataclass(frozen=True)
class Stage:
    """One phase of training: a weight per leaf, and at most one bound saying how long it lasts.

    fraction: share of the run's steps; tokens: converted to steps with the stage's tokens per step
    (batch_size * seq_len, rounded up); steps: a length; start_step: the absolute (0-based) first step, the stage
    running to the next stage's start. No bound: the stage runs to the next stage's start_step, or to the end of
    the run when it is the last.

    seq_len and rope_theta make a long-context stage inside one run: its rows are seq_len tokens and, from its first
    step, the model's RoPE base is rope_theta (SmolLM3 raised it from 50k to 2M for 4k -> 32k); a stage without them
    keeps the run's.
    """

    name: str
    weights: Mapping[str, Weight]
    fraction: float | None = None
    _: dataclasses.KW_ONLY
    tokens: int | None = None
    steps: int | None = None
    start_step: int | None = None
    seq_len: int | None = None
    rope_theta: float | None = None
    curriculum: Curriculum | None = None

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        object.__setattr__(self, "weights", parse_weights(self.weights, where))
        given = [b for b in BOUNDS if getattr(self, b) is not None]
        if len(given) > 1:
            raise ScheduleError(f"{where}: give one bound, not {given} (each of them fixes where the stage ends)")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
                raise ScheduleError(f"{where}: fraction must be a number, got {self.fraction!r}")
            object.__setattr__(self, "fraction", float(self.fraction))
            if not math.isfinite(self.fraction) or not 0 < self.fraction <= 1 + FRACTION_TOLERANCE:
                raise ScheduleError(f"{where}: fraction must be positive and at most 1, got {self.fraction}")
        if self.tokens is not None:
            object.__setattr__(self, "tokens", _positive_int(self.tokens, "tokens", where))
        if self.steps is not None:
            object.__setattr__(self, "steps", _positive_int(self.steps, "steps", where))
        if self.start_step is not None:
            object.__setattr__(self, "start_step", _positive_int(self.start_step, "start_step", where, 0))
        if self.seq_len is not None:
            object.__setattr__(self, "seq_len", _positive_int(self.seq_len, "seq_len", where))
        if self.rope_theta is not None:
            if (isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, int | float)
                    or not math.isfinite(self.rope_theta) or self.rope_theta <= 1):
                raise ScheduleError(f"{where}: rope_theta must be a number > 1 (RoPE's base), got {self.rope_theta!r}")
            object.__setattr__(self, "rope_theta", float(self.rope_theta))
        if self.curriculum is not None:
            try:
                object.__setattr__(self, "curriculum", Curriculum.from_dict(self.curriculum))
            except ScheduleError as err:
                raise ScheduleError(f"{where}: {err}") from err

    # ---- queries -------------------------------------------------------------------------------
    @property
    def bound(self) -> tuple[str, float | int] | None:
        """(kind, value) of the stage's bound, or None (it runs to the next start, or the end)."""
        for kind in BOUNDS:
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        return None

    @property
    def is_flat(self) -> bool:
        return is_flat(self.weights) and (self.curriculum is None or is_flat(self.curriculum.end))

    @property
    def leaves(self) -> list[str]:
        found = leaves(self.weights) + (leaves(self.curriculum.end) if self.curriculum else [])
        return list(dict.fromkeys(found))

    @property
    def normalized_weights(self) -> dict[str, float]:
        """The stage's starting weights, normalised (a flat stage only)."""
        return _normalized(self._flat_weights(), self.name)

    def _flat_weights(self) -> dict[str, float]:
        if not is_flat(self.weights):
            raise ScheduleError(
                f"stage {self.name!r} has hierarchical weights; flatten it with schedule.flatten(token counts)"
            )
        return dict(self.weights)  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> Stage:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name}
        if self.bound is not None:
            data[self.bound[0]] = self.bound[1]
        data["weights"] = {k: weight_to_data(v) for k, v in sorted(self.weights.items())}
        if self.seq_len is not None:
            data["seq_len"] = self.seq_len
        if self.rope_theta is not None:
            data["rope_theta"] = self.rope_theta
        if self.curriculum is not None:
            data["curriculum"] = self.curriculum.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        known = {"name", "weights", *BOUNDS, "seq_len", "rope_theta", "curriculum"}
        if not isinstance(data, Mapping) or "name" not in data or "weights" not in data:
            raise ScheduleError(
                f"malformed stage {data!r}; expected {{name, weights: {{leaf: w}}, fraction|tokens|steps|start_step?, "
                "seq_len?, rope_theta?, curriculum?}}"
            )
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(f"stage {data['name']!r}: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(data["name"], data["weights"], data.get("fraction"), tokens=data.get("tokens"),
                   steps=data.get("steps"), start_step=data.get("start_step"), seq_len=data.get("seq_len"),
                   rope_theta=data.get("rope_theta"), curriculum=data.get("curriculum"))


def _normalized(weights: Mapping[str, float], stage: str) -> dict[str, float]:
    total = sum(weights.values())
    if total <= 0:
        raise ScheduleError(f"stage {stage!r}: needs at least one leaf with a positive weight")
    return {name: w / total for name, w in sorted(weights.items())}


def _as_selection(value: Selection | Mapping[str, Any]) -> Selection:
    """Selections given as objects or as their dict form (YAML/JSON) become `Selection`s."""
    if isinstance(value, Selection):
        return value
    if isinstance(value, Mapping):
        try:
            return Selection.from_dict(value)
        except SelectionError as err:
            raise ScheduleError(f"selections: {err}") from err
    raise ScheduleError(f"selections: expected Selection objects or {{name, source, where}} mappings, got {value!r}")


@dataclass(frozen=True)
class MixtureSchedule:
    """Stages in training order, plus the named selections their weights may use.

    normalize: accept stage weights that do not sum to 1 and normalise them (otherwise a sum off by more than
    1e-3 is refused, naming the stage: a typo in a weight should not silently reshape the mixture).
    """

    stages: tuple[Stage, ...]
    description: str = field(default="", compare=False)
    selections: tuple[Selection, ...] = ()
    normalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        try:
            object.__setattr__(self, "selections", tuple(_as_selection(s) for s in self.selections))
        except (ValueError, TypeError) as err:  # SelectionError names the selection and the field
            raise ScheduleError(f"selections: {err}") from err
        if not self.stages:
            raise ScheduleError("a mixture schedule needs at least one stage")
        if not all(isinstance(s, Stage) for s in self.stages):
            raise ScheduleError(f"stages must be Stage objects, got {[type(s).__name__ for s in self.stages]}")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ScheduleError(f"stage names must be unique, got {names}")
        selection_names = [s.name for s in self.selections]
        if len(set(selection_names)) != len(selection_names):
            raise ScheduleError(f"selection names must be unique, got {selection_names}")
        self._check_bounds()
        if not self.normalize:
            problems = []
            for stage in self.stages:
                problems += sum_problems(stage.weights, f"stage {stage.name!r}")
                if stage.curriculum is not None:
                    problems += sum_problems(stage.curriculum.end, f"stage {stage.name!r} curriculum end")
            if problems:
                raise ScheduleError("; ".join(problems))

    def _check_bounds(self) -> None:
        """What can be checked without the run's length: fraction sums, start order, stages that never end."""
        fractions = [s.fraction for s in self.stages]
        if all(f is not None for f in fractions):
            total = sum(fractions)  # type: ignore[arg-type]
            if abs(total - 1.0) > FRACTION_TOLERANCE:
                parts = " + ".join(f"{s.name}={s.fraction:g}" for s in self.stages)
                raise ScheduleError(
                    f"stage fractions must sum to 1, got {parts} = {total:g}; fix them, or leave the last stage "
                    "without a bound to give it the rest"
                )
        elif sum(f for f in fractions if f is not None) > 1 + FRACTION_TOLERANCE:
            parts = " + ".join(f"{s.name}={s.fraction:g}" for s in self.stages if s.fraction is not None)
            raise ScheduleError(f"stage fractions add up to more than the whole run: {parts}")
        first = self.stages[0]
        if first.start_step not in (None, 0):
            raise ScheduleError(
                f"stage {first.name!r} starts at step {first.start_step}, but the run starts at step 0: steps "
                f"[0, {first.start_step}) belong to no stage; start it at 0 or add a stage before it"
            )
        previous_start: tuple[str, int] | None = None
        for stage, following in zip(self.stages, (*self.stages[1:], None), strict=True):
            if stage.start_step is not None:
                if previous_start is not None and stage.start_step <= previous_start[1]:
                    raise ScheduleError(
                        f"stage {stage.name!r} starts at step {stage.start_step}, not after stage "
                        f"{previous_start[0]!r} (step {previous_start[1]}): the stages overlap; order the "
                        "stages by start_step"
                    )
                previous_start = (stage.name, stage.start_step)
            open_ended = stage.bound is None or stage.bound[0] == "start_step"
            if open_ended and following is not None and following.start_step is None:
                raise ScheduleError(
                    f"stage {stage.name!r} has no length (it runs to the next stage's start), but the next "
                    f"stage {following.name!r} has no start_step; give {stage.name!r} a fraction, tokens or "
                    f"steps, or {following.name!r} a start_step"
                )

    # ---- construction helpers ----------------------------------------------------------------
    @classmethod
    def constant(cls, weights: Mapping[str, Weight], name: str = "constant", *, normalize: bool = False,
                 seq_len: int | None = None) -> MixtureSchedule:
        """One stage for the whole run: the usual shape of a data ablation."""
        return cls((Stage(name, weights, 1.0, seq_len=seq_len),), normalize=normalize)

    @classmethod
    def stable_decay(
        cls,
        stable: Mapping[str, Weight],
        decay: Mapping[str, Weight],
        decay_fraction: float = 0.2,
        *,
        normalize: bool = False,
    ) -> MixtureSchedule:
        """Warmup-stable-decay shaped data: one mix for most of training, a richer one while the LR decays."""
        if not 0 < decay_fraction < 1:
            raise ScheduleError(f"decay_fraction must be in (0, 1), got {decay_fraction}")
        return cls((Stage("stable", stable, 1.0 - decay_fraction), Stage("decay", decay, decay_fraction)),
                   normalize=normalize)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def sources(self) -> list[str]:
        """Every leaf (source or selection) named by any stage or curriculum (even with weight zero), sorted."""
        return sorted({name for stage in self.stages for name in stage.leaves})

    @property
    def leaves(self) -> list[str]:
        return self.sources

    @property
    def selection_names(self) -> list[str]:
        return [s.name for s in self.selections]

    @property
    def is_flat(self) -> bool:
        return all(stage.is_flat for stage in self.stages)

    def check_sources(self, available: Iterable[str]) -> None:
        """Raise if a stage gives a positive weight (directly, in a group, or in its curriculum's end mixture)
        to a leaf that is not available."""
        available = set(available)
        for stage in self.stages:
            wanted = _positive_leaves(stage.weights)
            if stage.curriculum is not None:
                wanted += _positive_leaves(stage.curriculum.end)
            missing = sorted({n for n in wanted if n not in available})
            if missing:
                raise ScheduleError(
                    f"stage {stage.name!r} weights sources {missing} that are not available "
                    f"(available: {sorted(available)}); tokenize them or remove them from the schedule"
                )

    def fingerprint(self) -> str:
        """Short hash of what the sampler depends on (bounds, weights, seq_len, curricula, selections,
        normalisation), not of the description."""
        data = self.to_dict()
        data.pop("description", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ---- resolution --------------------------------------------------------------------------
    def resolve(self, total_steps: int, batch_size: int, seq_len: int) -> ResolvedSchedule:
        """Stage bounds in steps for a run of `total_steps` batches of `batch_size` rows of `seq_len` tokens.

        A fraction stage i ends at step ceil(cumulative_fraction_through_i * total_steps - 1e-9) (so the
        last of a fraction schedule ends at total_steps); a tokens stage lasts ceil(tokens / (batch_size *
        stage seq_len)) steps. Gaps, overlaps and stages past the run are refused, naming the stages.
        """
        return ResolvedSchedule(self, total_steps, batch_size, seq_len)

    def as_fractions(self, total_steps: int, batch_size: int = 1, seq_len: int = 1) -> MixtureSchedule:
        """The same stages bounded by their share of a `total_steps` run: e.g. SmolLM3's step-bounded stages
        at proxy scale. batch_size/seq_len matter only for stages bounded by tokens."""
        resolved = self.resolve(total_steps, batch_size, seq_len)
        lengths = [s.end_step - s.start_step for s in resolved.stages]
        stages = []
        for stage, length in zip(self.stages[:-1], lengths, strict=False):
            if length == 0:
                raise ScheduleError(f"stage {stage.name!r} gets no steps in a {total_steps}-step run")
            stages.append(dataclasses.replace(stage, fraction=length / total_steps, tokens=None, steps=None,
                                              start_step=None))
        last = dataclasses.replace(self.stages[-1], fraction=None, tokens=None, steps=None, start_step=None)
        return dataclasses.replace(self, stages=(*stages, last))

    # ---- hierarchy -----------------------------------------------------------------------------
    def flatten(self, tokens_by_leaf: Mapping[str, int] | None = None) -> MixtureSchedule:
        """The flat schedule: each leaf's weight is the exact product of the shares on its path.

        `tokens_by_leaf` (e.g. `leaf_token_counts(manifest, schedule)`) is needed for groups with rule "by_tokens".
        """
        return dataclasses.replace(self, stages=self._map_weights(
            lambda weights, where: flatten_weights(weights, tokens_by_leaf, where)))

    def _map_weights(self, change: Callable[[Mapping[str, Weight], str], Mapping[str, Weight]]) -> tuple[Stage, ...]:
        """The stages with `change(weights, where)` applied to each stage's weights and curriculum end."""
        stages = []
        for stage in self.stages:
            where = f"stage {stage.name!r}"
            curriculum = stage.curriculum
            if curriculum is not None:
                curriculum = dataclasses.replace(curriculum, end=change(curriculum.end, f"{where} curriculum end"))
            stages.append(dataclasses.replace(stage, weights=change(stage.weights, where), curriculum=curriculum))
        return tuple(stages)

    def explain_flattening(self, tokens_by_leaf: Mapping[str, int] | None = None) -> str:
        """The weight tree of every stage with the flat weight of every leaf (`share -> flat weight`)."""
        lines = []
        for stage in self.stages:
            bound = f" ({stage.bound[0]} {stage.bound[1]:g})" if stage.bound else ""
            lines.append(f"stage {stage.name!r}{bound}:")
            lines.extend(explain_lines(stage.weights, tokens_by_leaf, f"stage {stage.name!r}"))
            if stage.curriculum is not None:
                lines.append(f"  -> {stage.curriculum.shape} curriculum to:")
                lines.extend(explain_lines(stage.curriculum.end, tokens_by_leaf,
                                           f"stage {stage.name!r} curriculum end", indent=2))
        return "\n".join(lines)

    # ---- transformations -----------------------------------------------------------------------
    def map_sources(
        self,
        mapping: Mapping[str, str | None] | Callable[[str], str | None],
        drop_unmapped: bool = False,
        normalize: bool | None = None,
    ) -> MixtureSchedule:
        """Rename or group leaves; weights of leaves mapped to the same name add up, None drops a leaf.

        Used to project a real schedule (SmolLM3's 56 sources) onto the few sources a demo has, e.g. every
        `stack-edu-*` to `code`. With a dict, names not in it are kept unless `drop_unmapped`. The result
        normalises its weights when a leaf was dropped (its weight is gone), unless `normalize` says otherwise.
        """

        def target(name: str) -> str | None:
            if callable(mapping):
                return mapping(name)
            if name in mapping:
                return mapping[name]
            return None if drop_unmapped else name

        dropped = False

        def grouped_weights(weights: Mapping[str, Weight], where: str) -> dict[str, float]:
            nonlocal dropped
            if not is_flat(weights):
                raise ScheduleError(f"{where}: hierarchical weights; map the sources of schedule.flatten(token "
                                    "counts) instead")
            grouped: dict[str, float] = {}
            for name, weight in weights.items():
                new = target(name)
                if new is None:
                    dropped = True
                else:
                    grouped[new] = grouped.get(new, 0.0) + weight
            if sum(grouped.values()) <= 0:
                raise ScheduleError(f"{where}: no weight left after mapping sources")
            return grouped

        stages = self._map_weights(grouped_weights)
        keep_normalize = self.normalize or dropped if normalize is None else normalize
        return MixtureSchedule(stages, self.description, self.selections, keep_normalize)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": SCHEDULE_FORMAT, "stages": [s.to_dict() for s in self.stages]}
        if self.selections:
            data["selections"] = [s.to_dict() for s in self.selections]
        if self.normalize:
            data["normalize"] = True
        if self.description:
            data["description"] = self.description
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureSchedule:
        fmt = data.get("format", SCHEDULE_FORMAT)
        if fmt not in READABLE_FORMATS:
            raise ScheduleError(f"unknown schedule format {fmt!r}; this mixlab reads {list(READABLE_FORMATS)}")
        unknown = sorted(set(data) - {"format", "stages", "weights", "description", "selections", "normalize"})
        if unknown:
            raise ScheduleError(
                f"unknown schedule keys {unknown}; a schedule has stages, selections, normalize, description"
            )
        normalize = data.get("normalize", False)
        if not isinstance(normalize, bool):
            raise ScheduleError(f"normalize must be true or false, got {normalize!r}")
        selections = tuple(data.get("selections") or ())
        if "stages" not in data and "weights" in data:  # shorthand: a constant mixture
            return cls((Stage("constant", data["weights"], 1.0),), data.get("description", ""), selections, normalize)
        raw = data.get("stages")
        if not isinstance(raw, list | tuple):
            raise ScheduleError(
                "malformed schedule: expected stages: [{name, fraction|tokens|steps|start_step, weights: {leaf: w}}]"
            )
        stages = tuple(Stage.from_dict(s) for s in raw)
        return cls(stages, data.get("description", ""), selections, normalize)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> MixtureSchedule:
        """Read a mixlab schedule, or a nanotron config with `data_stages`. A nanotron config read as a schedule
        file (`--schedule`, a run config's `mixture`) keeps its stages as shares of its `train_steps`, so it
        plans and trains at any budget; `from_nanotron_config` keeps its absolute start steps."""
        data = _load_yaml(text_or_path)
        if isinstance(data, Mapping) and "data_stages" in data:
            return cls.from_nanotron_config(data, bounds="fraction")
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{_describe(text_or_path)}: expected a mapping with `stages`")
        try:
            return cls.from_dict(data)
        except ScheduleError as err:  # name the file: the stage alone does not say where to look
            raise ScheduleError(f"{_describe(text_or_path)}: {err}") from err

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(
            self.to_yaml() if path.suffix in (".yaml", ".yml") else json.dumps(self.to_dict(), indent=2)
        )
        return path

    # ---- nanotron (mixtures/nanotron.py) -------------------------------------------------------
    @classmethod
    def from_nanotron_config(
        cls,
        config: Mapping[str, Any] | str | Path,
        source_names: Mapping[str, str] | Callable[[str], str] | None = None,
        train_steps: int | None = None,
        bounds: str = "start_step",
    ) -> MixtureSchedule:
        """A schedule from a nanotron training config; see `mixlab.mixtures.nanotron.read_nanotron_config`."""
        from mixlab.mixtures.nanotron import read_nanotron_config

        return read_nanotron_config(config, source_names, train_steps, bounds=bounds).schedule

    def to_nanotron_config(self, dataset_paths: Mapping[str, str], total_steps: int, **kwargs: Any) -> dict[str, Any]:
        """A nanotron config dict with `data_stages`; see `mixlab.mixtures.nanotron.to_nanotron_config`."""
        from mixlab.mixtures.nanotron import to_nanotron_config

        return to_nanotron_config(self, dataset_paths, total_steps, **kwargs)


def _positive_leaves(weights: Mapping[str, Weight]) -> list[str]:
    found: list[str] = []
    for key, value in weights.items():
        if not isinstance(value, MixtureNode):
            found += [key] if value > 0 else []
        elif value.weight > 0:
            found += _positive_leaves(value.children) if isinstance(value.children, Mapping) else list(value.children)
    return found


def _flat(weights: Mapping[str, Weight], stage: str) -> dict[str, float]:
    if not is_flat(weights):
        raise ScheduleError(
            f"stage {stage!r} has hierarchical weights; flatten it with schedule.flatten(token counts)"
        )
    return dict(weights)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ResolvedStage:
    """A stage placed on the run's steps: it draws steps [start_step, end_step) with rows of seq_len tokens."""

    name: str
    index: int
    start_step: int
    end_step: int
    seq_len: int

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


_SHAPE_CODE = {None: 0, "step": 1, "linear": 2, "cosine": 3}


class ResolvedSchedule:
    """A schedule placed on a run: stage steps, and the weights of every step over `sources` (sorted leaves).

    This is the one rule every consumer uses (sampler, planner, trainer, report): compute it once with
    `MixtureSchedule.resolve` and ask it, rather than re-deriving stage boundaries.
    """

    def __init__(self, schedule: MixtureSchedule, total_steps: int, batch_size: int, seq_len: int):
        if not schedule.is_flat:
            hierarchical = [s.name for s in schedule.stages if not s.is_flat]
            raise ScheduleError(
                f"stages {hierarchical} have hierarchical weights; flatten it with schedule.flatten(token counts) "
                "before resolving"
            )
        for what, value in (("total_steps", total_steps), ("batch_size", batch_size), ("seq_len", seq_len)):
            _positive_int(value, what, "resolve")
        self.schedule = schedule
        self.total_steps = int(total_steps)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.sources: list[str] = schedule.sources
        self.stages: tuple[ResolvedStage, ...] = self._place()
        # per stage: normalised start and end weights over `sources`, curriculum shape and switch offset
        columns = {name: i for i, name in enumerate(self.sources)}
        n, k = len(schedule.stages), len(self.sources)
        self._w0 = np.zeros((n, k))
        self._w1 = np.zeros((n, k))
        self._shape = np.zeros(n, dtype=np.int64)
        self._switch = np.zeros(n, dtype=np.int64)
        for i, (stage, placed) in enumerate(zip(schedule.stages, self.stages, strict=True)):
            for name, w in stage.normalized_weights.items():
                self._w0[i, columns[name]] = w
            self._w1[i] = self._w0[i]
            if stage.curriculum is not None:
                self._w1[i] = 0.0
                for name, w in _normalized(_flat(stage.curriculum.end, stage.name), stage.name).items():
                    self._w1[i, columns[name]] = w
                self._shape[i] = _SHAPE_CODE[stage.curriculum.shape]
                length = placed.num_steps
                self._switch[i] = min(length, max(0, math.ceil(stage.curriculum.at * length - 1e-9)))
        self._starts = np.array([s.start_step for s in self.stages], dtype=np.int64)
        self._lengths = np.array([s.num_steps for s in self.stages], dtype=np.int64)

    def _place(self) -> tuple[ResolvedStage, ...]:
        stages = self.schedule.stages
        total = self.total_steps
        placed: list[ResolvedStage] = []
        cursor, acc = 0, 0.0  # acc: unrounded position as a fraction of the run, as fractions accumulate
        only_fractions = all(s.fraction is not None for s in stages)
        for i, stage in enumerate(stages):
            stage_seq = stage.seq_len or self.seq_len
            last = i == len(stages) - 1
            start = cursor
            if stage.start_step is not None:
                start = stage.start_step
                prev = stages[i - 1].name if i else None
                if start > cursor:
                    raise ScheduleError(
                        f"steps [{cursor}, {start}) belong to no stage: stage {prev!r} ends at step {cursor} and "
                        f"stage {stage.name!r} starts at step {start}; lengthen {prev!r} or start {stage.name!r} "
                        "earlier"
                    )
                if start < cursor:
                    raise ScheduleError(
                        f"stages {prev!r} and {stage.name!r} overlap: {prev!r} runs to step {cursor} but "
                        f"{stage.name!r} starts at step {start}; shorten {prev!r} or start {stage.name!r} later"
                    )
                acc = start / total
            kind = stage.bound[0] if stage.bound else None
            if kind != "fraction" and start >= total:
                raise ScheduleError(
                    f"stage {stage.name!r} starts at step {start}, past the {total}-step run: it would get no "
                    "steps; lengthen the run, or shorten or drop the stages before it"
                )
            if kind == "fraction":
                acc += stage.fraction  # type: ignore[operator]
                # a schedule of fractions only sums to 1 (checked): its last stage ends the run exactly
                # after steps/tokens/start_step bounds, a share that does not fit is refused below, never cut
                end = total if last and only_fractions else max(start, math.ceil(acc * total - 1e-9))
                if end > total and acc * total <= total + 1e-6:  # float noise in a share that ends the run
                    end = total
            elif kind == "tokens":
                per_step = self.batch_size * stage_seq
                end = start + -(-stage.tokens // per_step)  # type: ignore[operator]
                acc = end / total
            elif kind == "steps":
                end = start + stage.steps  # type: ignore[operator]
                acc = end / total
            else:  # no length: to the next stage's start (checked to exist) or the end of the run
                end = total if last else stages[i + 1].start_step  # type: ignore[assignment]
                if end >= total and not last:
                    raise ScheduleError(
                        f"stage {stages[i + 1].name!r} starts at step {end}, past the {total}-step run: it would "
                        "get no steps; lengthen the run, or start it earlier"
                    )
            if end > total:
                raise ScheduleError(
                    f"stage {stage.name!r} runs to step {end}, past the {total}-step run; shorten it "
                    f"(its {stage.bound[0] if stage.bound else 'bound'}) or lengthen the run"
                )
            placed.append(ResolvedStage(stage.name, i, start, end, stage_seq))
            cursor = end
        if cursor < total:
            last = stages[-1]
            raise ScheduleError(
                f"the stages end at step {cursor}, but the run has {total} steps: steps [{cursor}, {total}) belong "
                f"to no stage; leave the last stage {last.name!r} without a bound to run to the end"
            )
        return tuple(placed)

    # ---- per-step queries ----------------------------------------------------------------------
    def stage_index_at_step(self, step: int) -> int:
        """The stage drawing `step` (0-based); past the end of the run, the last stage."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return int(np.searchsorted(self._starts, step, side="right") - 1)

    def stage_indices(self, start: int, end: int) -> np.ndarray:
        """int64 [end - start]: the stage of each step in [start, end) (vectorised `stage_index_at_step`)."""
        if start < 0 or end < start:
            raise ValueError(f"need 0 <= start <= end, got [{start}, {end})")
        return np.searchsorted(self._starts, np.arange(start, end, dtype=np.int64), side="right") - 1

    def stage_at_step(self, step: int) -> ResolvedStage:
        return self.stages[self.stage_index_at_step(step)]

    def stage_index(self, stage: int | str) -> int:
        """Index of a stage given by name or (negative counts from the end) index."""
        names = [s.name for s in self.stages]
        if isinstance(stage, str):
            if stage not in names:
                raise ValueError(f"no stage named {stage!r} in the mixture schedule; stages: {names}")
            return names.index(stage)
        if not -len(names) <= stage < len(names):
            raise ValueError(f"stage index {stage} out of range for the {len(names)} stages {names}")
        return stage % len(names)

    def stage_start_step(self, stage: int | str) -> int:
        return self.stages[self.stage_index(stage)].start_step

    def seq_len_at_step(self, step: int) -> int:
        return self.stage_at_step(step).seq_len

    def tokens_per_step_at(self, step: int) -> int:
        return self.batch_size * self.seq_len_at_step(step)

    def weights_at_step(self, step: int) -> dict[str, float]:
        """Normalised weights over `sources` for `step`, curriculum applied."""
        row = self.weights_matrix(step, step + 1)[0]
        return {name: float(w) for name, w in zip(self.sources, row, strict=True)}

    def weights_matrix(self, start: int, end: int) -> np.ndarray:
        """[end - start, len(sources)] float64: the weights of each step in [start, end); rows sum to 1."""
        if start < 0 or end < start:
            raise ValueError(f"need 0 <= start <= end, got [{start}, {end})")
        steps = np.arange(start, end, dtype=np.int64)
        index = np.searchsorted(self._starts, steps, side="right") - 1
        if not self._shape.any():  # no curriculum anywhere: each step draws its stage's weights
            return self._w0[index]
        offset = steps - self._starts[index]
        shape = self._shape[index]
        t = np.zeros(len(steps))
        span = np.maximum(self._lengths[index] - 1, 1)
        linear = np.clip(offset / span, 0.0, 1.0)
        t = np.where(shape == 2, linear, t)
        t = np.where(shape == 3, (1.0 - np.cos(np.pi * linear)) / 2.0, t)
        t = np.where(shape == 1, (offset >= self._switch[index]).astype(np.float64), t)
        t = t[:, None]
        return (1.0 - t) * self._w0[index] + t * self._w1[index]

    # ---- totals ----------------------------------------------------------------------------------
    def _curriculum_mass(self, i: int) -> float:
        """Sum over the stage's steps of the interpolation factor t (exact: linear and cosine both give n/2)."""
        n = int(self._lengths[i])
        code = int(self._shape[i])
        if code == 0:
            return 0.0
        if code == 1:
            return float(n - self._switch[i])
        return n / 2.0 if n >= 2 else 0.0

    def expected_rows(self, stage_index: int | None = None) -> dict[str, float]:
        """Rows each leaf is expected to get: the sum over the stage's (or run's) steps of weight * batch_size."""
        rows = np.zeros(len(self.sources))
        for i in self._stage_indices(stage_index):
            n = float(self._lengths[i])
            mass = self._curriculum_mass(i)
            rows += self.batch_size * ((n - mass) * self._w0[i] + mass * self._w1[i])
        return {name: float(r) for name, r in zip(self.sources, rows, strict=True)}

    def expected_tokens(self, stage_index: int | None = None) -> dict[str, float]:
        """Trained tokens per leaf: expected rows times each stage's seq_len."""
        totals = dict.fromkeys(self.sources, 0.0)
        for i in self._stage_indices(stage_index):
            for name, rows in self.expected_rows(i).items():
                totals[name] += rows * self.stages[i].seq_len
        return totals

    def _stage_indices(self, stage_index: int | None) -> list[int]:
        return list(range(len(self.stages))) if stage_index is None else [self.stage_index(stage_index)]

    @property
    def total_tokens(self) -> int:
        """Tokens trained over the run (batch_size * each stage's seq_len per step)."""
        return sum(s.num_steps * self.batch_size * s.seq_len for s in self.stages)

    def describe(self) -> str:
        return "; ".join(f"{s.name!r} steps [{s.start_step}, {s.end_step}) seq_len {s.seq_len}" for s in self.stages)

    def __repr__(self) -> str:
        return f"ResolvedSchedule({self.total_steps} steps x {self.batch_size}: {self.describe()})"


def _load_yaml(text_or_path: str | Path) -> Any:
    """Parse a path's content, or the string itself when it is YAML text rather than a file name."""
    text = str(text_or_path)
    looks_like_path = isinstance(text_or_path, Path) or (
        "\n" not in text and text.endswith((".yaml", ".yml", ".json"))
    )
    if looks_like_path or ("\n" not in text and Path(text).is_file()):
        path = Path(text_or_path)
        if not path.is_file():
            raise ScheduleError(f"{path}: no such schedule file")
        text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ScheduleError(f"{_describe(text_or_path)}: not valid YAML ({err})") from err


def _describe(text_or_path: str | Path) -> str:
    text = str(text_or_path)
    return text if "\n" not in text and len(text) < 300 else "schedule text"
