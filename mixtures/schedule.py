"""Mixture schedules: which sources, in which proportions, at which point of training.

SmolLM3 was trained in stages (stable 1, stable 2, decay), each a weight per source, switching at fixed
steps; the decay stage adds math and code. A `MixtureSchedule` is the same idea in units of the token budget:
each `Stage` owns a fraction of the budget, so one schedule serves a 20M-token CPU ablation and a 11T-token run.
Weights are stored as given (they need not sum to one) and normalised on use.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULE_FORMAT = "mixlab.mixture/v1"
FRACTION_TOLERANCE = 1e-6


class ScheduleError(ValueError):
    """A schedule that cannot be used as written; the message says which stage and what to change."""


@dataclass(frozen=True)
class Stage:
    """One phase of training: a weight per source, for `fraction` of the token budget."""

    name: str
    weights: Mapping[str, float]
    fraction: float

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise ScheduleError(f"stage {self.name!r}: weights must be a mapping of source: weight, got {self.weights!r}")
        not_numbers = {k: v for k, v in self.weights.items() if isinstance(v, bool) or not isinstance(v, int | float)}
        if not_numbers:
            raise ScheduleError(f"stage {self.name!r}: weights must be numbers; {not_numbers} "
                                "(write 0.5, not \"0.5\" or a word)")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float):
            raise ScheduleError(f"stage {self.name!r}: fraction must be a number, got {self.fraction!r}")
        object.__setattr__(self, "weights", {str(k): float(v) for k, v in self.weights.items()})
        object.__setattr__(self, "fraction", float(self.fraction))
        bad = {k: v for k, v in self.weights.items() if not math.isfinite(v) or v < 0}
        if bad:
            raise ScheduleError(f"stage {self.name!r}: weights must be finite and non-negative, got {bad}")
        if not self.weights or sum(self.weights.values()) <= 0:
            raise ScheduleError(f"stage {self.name!r}: needs at least one source with a positive weight")
        if not math.isfinite(self.fraction) or self.fraction <= 0:
            raise ScheduleError(f"stage {self.name!r}: fraction must be positive, got {self.fraction}")

    @property
    def normalized_weights(self) -> dict[str, float]:
        total = sum(self.weights.values())
        return {name: w / total for name, w in sorted(self.weights.items())}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fraction": self.fraction, "weights": dict(sorted(self.weights.items()))}


@dataclass(frozen=True)
class MixtureSchedule:
    """Stages in training order; their fractions of the token budget sum to one."""

    stages: tuple[Stage, ...]
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise ScheduleError("a mixture schedule needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ScheduleError(f"stage names must be unique, got {names}")
        total = sum(s.fraction for s in self.stages)
        if abs(total - 1.0) > FRACTION_TOLERANCE:
            parts = " + ".join(f"{s.name}={s.fraction:g}" for s in self.stages)
            raise ScheduleError(f"stage fractions must sum to 1, got {parts} = {total:g}")

    # ---- construction helpers ----------------------------------------------------------------
    @classmethod
    def constant(cls, weights: Mapping[str, float], name: str = "constant") -> MixtureSchedule:
        """One stage for the whole run: the usual shape of a data ablation."""
        return cls((Stage(name, weights, 1.0),))

    @classmethod
    def stable_decay(
        cls,
        stable: Mapping[str, float],
        decay: Mapping[str, float],
        decay_fraction: float = 0.2,
    ) -> MixtureSchedule:
        """Warmup-stable-decay shaped data: one mix for most of training, a richer one while the LR decays."""
        if not 0 < decay_fraction < 1:
            raise ScheduleError(f"decay_fraction must be in (0, 1), got {decay_fraction}")
        return cls((Stage("stable", stable, 1.0 - decay_fraction), Stage("decay", decay, decay_fraction)))

    # ---- queries -------------------------------------------------------------------------------
    @property
    def sources(self) -> list[str]:
        """Every source named by any stage (even with weight zero), sorted."""
        return sorted({name for stage in self.stages for name in stage.weights})

    @property
    def boundaries(self) -> list[float]:
        """Progress at which each stage starts (first is 0)."""
        starts, acc = [], 0.0
        for stage in self.stages:
            starts.append(acc)
            acc += stage.fraction
        return starts

    def stage_index_at(self, progress: float) -> int:
        """Stage in force at `progress` (fraction of the token budget consumed); past 1 the last stage stays."""
        if progress < 0 or not math.isfinite(progress):
            raise ValueError(f"progress must be a finite number >= 0, got {progress}")
        acc = 0.0
        for i, stage in enumerate(self.stages[:-1]):
            acc += stage.fraction
            if progress < acc - 1e-12:
                return i
        return len(self.stages) - 1

    def stage_at(self, progress: float) -> Stage:
        return self.stages[self.stage_index_at(progress)]

    def weights_at(self, progress: float) -> dict[str, float]:
        """Normalised weights over `self.sources` (zeros included) at `progress`."""
        weights = self.stage_at(progress).normalized_weights
        return {name: weights.get(name, 0.0) for name in self.sources}

    def check_sources(self, available: Iterable[str]) -> None:
        """Raise if a stage gives a positive weight to a source that is not available."""
        available = set(available)
        for stage in self.stages:
            missing = sorted(n for n, w in stage.weights.items() if w > 0 and n not in available)
            if missing:
                raise ScheduleError(
                    f"stage {stage.name!r} weights sources {missing} that are not available "
                    f"(available: {sorted(available)}); tokenize them or remove them from the schedule"
                )

    def fingerprint(self) -> str:
        """Short hash of what the sampler depends on (stages, fractions, weights), not of the description."""
        canonical = json.dumps([s.to_dict() for s in self.stages], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ---- transformations -----------------------------------------------------------------------
    def map_sources(
        self, mapping: Mapping[str, str | None] | Callable[[str], str | None], drop_unmapped: bool = False
    ) -> MixtureSchedule:
        """Rename or group sources; weights of sources mapped to the same name add up, None drops a source.

        Used to project a real schedule (SmolLM3's 56 sources) onto the few sources a demo has, e.g. every
        `stack-edu-*` to `code`. With a dict, names not in it are kept unless `drop_unmapped`.
        """

        def target(name: str) -> str | None:
            if callable(mapping):
                return mapping(name)
            if name in mapping:
                return mapping[name]
            return None if drop_unmapped else name

        stages = []
        for stage in self.stages:
            grouped: dict[str, float] = {}
            for name, weight in stage.weights.items():
                new = target(name)
                if new is not None:
                    grouped[new] = grouped.get(new, 0.0) + weight
            if sum(grouped.values()) <= 0:
                raise ScheduleError(f"stage {stage.name!r}: no weight left after mapping sources")
            stages.append(Stage(stage.name, grouped, stage.fraction))
        return MixtureSchedule(tuple(stages), self.description)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": SCHEDULE_FORMAT, "stages": [s.to_dict() for s in self.stages]}
        if self.description:
            data["description"] = self.description
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixtureSchedule:
        fmt = data.get("format", SCHEDULE_FORMAT)
        if fmt != SCHEDULE_FORMAT:
            raise ScheduleError(f"unknown schedule format {fmt!r}; this mixlab reads {SCHEDULE_FORMAT!r}")
        if "stages" not in data and "weights" in data:  # shorthand: a constant mixture
            return cls.constant(data["weights"])
        try:
            stages = tuple(Stage(s["name"], s["weights"], s.get("fraction", 1.0)) for s in data["stages"])
        except (KeyError, TypeError, AttributeError) as err:
            raise ScheduleError(
                f"malformed schedule ({err!r}); expected stages: [{{name, fraction, weights: {{source: w}}}}]"
            ) from err
        return cls(stages, data.get("description", ""))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> MixtureSchedule:
        """Read a mixlab schedule, or a nanotron config with `data_stages` (see `from_nanotron_config`)."""
        data = _load_yaml(text_or_path)
        if isinstance(data, Mapping) and "data_stages" in data:
            return cls.from_nanotron_config(data)
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

    # ---- nanotron ----------------------------------------------------------------------------
    @classmethod
    def from_nanotron_config(
        cls,
        config: Mapping[str, Any] | str | Path,
        source_names: Mapping[str, str] | Callable[[str], str] | None = None,
        train_steps: int | None = None,
    ) -> MixtureSchedule:
        """A schedule from a nanotron training config (the format SmolLM3 was trained with).

        Each `data_stages[i]` becomes a stage named after it. Source names are the basenames of
        `data.dataset.dataset_read_path` (falling back to `dataset_folder`), optionally renamed by
        `source_names`; weights come from `dataset_weights` (a list aligned with the paths) or, in the older
        format, from a `{folder: weight}` mapping. A stage runs from its `start_training_step` to the next
        stage's; the last runs to `tokens.train_steps` (or `train_steps`). Fractions are step counts over
        the total, so the schedule keeps the real proportions at any budget.
        """
        data = _load_yaml(config) if isinstance(config, (str, Path)) else config
        where = _describe(config) if isinstance(config, (str, Path)) else "nanotron config"
        raw_stages = data.get("data_stages") if isinstance(data, Mapping) else None
        if not raw_stages:
            raise ScheduleError(f"{where}: no `data_stages` list; is this a nanotron training config?")
        total_steps = train_steps or (data.get("tokens") or {}).get("train_steps")
        if not total_steps:
            raise ScheduleError(
                f"{where}: no `tokens.train_steps`; pass train_steps= to know the last stage's length"
            )

        parsed = []
        for i, raw in enumerate(raw_stages):
            name = raw.get("name") or f"stage_{i}"
            start = int(raw.get("start_training_step", 1))
            weights = _nanotron_stage_weights(raw, f"{where}: stage {name!r}", source_names)
            parsed.append((start, name, weights))
        parsed.sort(key=lambda item: item[0])
        starts = [p[0] for p in parsed]
        if len(set(starts)) != len(starts):
            raise ScheduleError(f"{where}: two stages start at the same step: {starts}")
        if starts[-1] > total_steps:
            raise ScheduleError(
                f"{where}: last stage starts at step {starts[-1]} after train_steps {total_steps}"
            )
        # nanotron counts steps from 1; stage i covers [start_i, start_{i+1}) and the last ends at train_steps
        ends = [*starts[1:], total_steps + 1]
        first = starts[0]
        span = total_steps + 1 - first
        stages = tuple(
            Stage(name, weights, (end - start) / span)
            for (start, name, weights), end in zip(parsed, ends, strict=True)
        )
        # fractions from integer step counts sum to one up to float rounding; fix the last stage exactly
        rest = 1.0 - sum(s.fraction for s in stages[:-1])
        stages = (*stages[:-1], Stage(stages[-1].name, stages[-1].weights, rest))
        description = f"imported from {where} ({len(stages)} stages, {total_steps} steps)"
        return cls(stages, description)


def _nanotron_stage_weights(
    raw: Mapping[str, Any], where: str, source_names: Mapping[str, str] | Callable[[str], str] | None
) -> dict[str, float]:
    dataset = ((raw.get("data") or {}).get("dataset")) or {}
    paths = dataset.get("dataset_read_path") or dataset.get("dataset_folder")
    weights = dataset.get("dataset_weights")
    if isinstance(paths, Mapping):  # older nanotron: {folder: weight}
        paths, weights = list(paths.keys()), list(paths.values())
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ScheduleError(f"{where}: no data.dataset.dataset_read_path or dataset_folder")
    if weights is None:
        raise ScheduleError(
            f"{where}: no dataset_weights; nanotron would weight by dataset size, which is not known here"
        )
    if len(weights) != len(paths):
        raise ScheduleError(f"{where}: {len(paths)} dataset paths but {len(weights)} dataset_weights")
    result: dict[str, float] = {}
    for path, weight in zip(paths, weights, strict=True):
        base = posixpath.basename(str(path).rstrip("/"))
        name = source_names(base) if callable(source_names) else (source_names or {}).get(base, base)
        if name in result:
            raise ScheduleError(f"{where}: two dataset paths map to the source name {name!r}")
        result[name] = float(weight)
    return result


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
