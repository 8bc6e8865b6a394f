"""nanotron `data_stages` in and out: SmolLM3's configs as mixlab schedules, and mixlab schedules as configs.

nanotron describes a run's data as stages, each a list of dataset folders with weights and a 1-based
`start_training_step`; the run's length and sequence length live in `tokens`. Import maps each folder to a leaf
(its basename; a mixlab token folder `.../tokens/<source>/train` to `<source>`) and each start to a 0-based
`start_step` bound, keeping the folders so that export writes back the same config. nanotron normalises the
weights itself, so imported schedules have `normalize=True` (SmolLM3's decay weights sum to 1.00565).
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError, Stage, _describe, _load_yaml

SPLIT_FOLDERS = ("train", "val", "validation", "test")


@dataclass(frozen=True)
class NanotronImport:
    """What a nanotron config says about the data: the schedule, the run's length, and where each leaf lives."""

    schedule: MixtureSchedule
    train_steps: int
    sequence_length: int | None
    dataset_folders: dict[str, str] = field(default_factory=dict)  # leaf -> data.dataset.dataset_folder entry
    read_paths: dict[str, str] = field(default_factory=dict)  # leaf -> dataset_read_path (SmolLM3's fork), if any


def nanotron_source_name(path: str) -> str:
    """The leaf a dataset folder stands for: its basename, or `<source>` for `.../<source>/train` (mixlab's
    `tokens/<source>/<split>` layout), so that two splits folders are not all called 'train'."""
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    if not parts:
        raise ScheduleError(f"empty dataset path {path!r}")
    if parts[-1] in SPLIT_FOLDERS and len(parts) >= 2:
        return parts[-2]
    return posixpath.basename(parts[-1])


def read_nanotron_config(
    config: Mapping[str, Any] | str | Path,
    source_names: Mapping[str, str] | Callable[[str], str] | None = None,
    train_steps: int | None = None,
    *,
    bounds: str = "start_step",
) -> NanotronImport:
    """Read `data_stages`, `tokens.train_steps` and `tokens.sequence_length` from a nanotron config.

    Each stage becomes a `Stage` named as in the config, bounded by `start_step = start_training_step - 1`
    (bounds="start_step"), or by its share of `train_steps` (bounds="fraction": the same proportions at any
    budget, for proxy runs). Leaves are named by `nanotron_source_name` of `dataset_read_path` (falling back to
    `dataset_folder`), optionally renamed by `source_names`. A stage-level `sequence_length` becomes the stage's
    seq_len. `train_steps` overrides the config's.
    """
    if bounds not in ("start_step", "fraction"):
        raise ScheduleError(f"bounds must be 'start_step' or 'fraction', got {bounds!r}")
    data = _load_yaml(config) if isinstance(config, str | Path) else config
    where = _describe(config) if isinstance(config, str | Path) else "nanotron config"
    raw_stages = data.get("data_stages") if isinstance(data, Mapping) else None
    if not raw_stages:
        raise ScheduleError(f"{where}: no `data_stages` list; is this a nanotron training config?")
    tokens = data.get("tokens") or {}
    total_steps = train_steps or tokens.get("train_steps")
    if not total_steps:
        raise ScheduleError(f"{where}: no `tokens.train_steps`; pass train_steps= to know the last stage's length")
    total_steps = int(total_steps)
    sequence_length = tokens.get("sequence_length")

    folders: dict[str, str] = {}
    read_paths: dict[str, str] = {}
    parsed = []
    for i, raw in enumerate(raw_stages):
        name = raw.get("name") or f"stage_{i}"
        start = int(raw.get("start_training_step", 1))
        weights = _stage_weights(raw, f"{where}: stage {name!r}", source_names, folders, read_paths)
        parsed.append((start, name, weights, raw.get("sequence_length")))
    parsed.sort(key=lambda item: item[0])
    starts = [p[0] for p in parsed]
    if len(set(starts)) != len(starts):
        raise ScheduleError(f"{where}: two stages start at the same step: {starts}")
    if starts[-1] > total_steps:
        raise ScheduleError(f"{where}: last stage starts at step {starts[-1]} after train_steps {total_steps}")
    if bounds == "start_step" and starts[0] != 1:
        raise ScheduleError(
            f"{where}: stage {parsed[0][1]!r} starts at step {starts[0]}, but nanotron counts steps from 1 and "
            "steps before it would belong to no stage; start it at 1, or import with bounds='fraction'"
        )
    stages = []
    span = total_steps + 1 - starts[0]  # nanotron steps are 1..train_steps
    for k, (start, name, weights, seq_len) in enumerate(parsed):
        last = k == len(parsed) - 1
        try:
            if bounds == "start_step":
                stage = Stage(name, weights, start_step=start - 1, seq_len=seq_len)
            else:
                fraction = None if last else (parsed[k + 1][0] - start) / span
                stage = Stage(name, weights, fraction, seq_len=seq_len)
        except ScheduleError as err:
            raise ScheduleError(f"{where}: {err}") from err
        stages.append(stage)
    description = f"imported from {where} ({len(stages)} stages, {total_steps} steps)"
    try:
        schedule = MixtureSchedule(tuple(stages), description, normalize=True)
        schedule.resolve(total_steps, 1, int(sequence_length or 1))  # bounds must fit the run as configured
    except ScheduleError as err:
        raise ScheduleError(f"{where}: {err}") from err
    return NanotronImport(schedule, total_steps, int(sequence_length) if sequence_length else None, folders,
                          read_paths)


def _stage_weights(
    raw: Mapping[str, Any],
    where: str,
    source_names: Mapping[str, str] | Callable[[str], str] | None,
    folders: dict[str, str],
    read_paths: dict[str, str],
) -> dict[str, float]:
    dataset = ((raw.get("data") or {}).get("dataset")) or {}
    read = dataset.get("dataset_read_path")
    folder = dataset.get("dataset_folder")
    weights = dataset.get("dataset_weights")
    if isinstance(folder, Mapping):  # older nanotron: {folder: weight}
        folder, weights = list(folder.keys()), list(folder.values())
    if isinstance(folder, str):
        folder = [folder]
    if isinstance(read, str):
        read = [read]
    paths = read or folder
    if not paths:
        raise ScheduleError(f"{where}: no data.dataset.dataset_read_path or dataset_folder")
    if weights is None:
        raise ScheduleError(
            f"{where}: no dataset_weights; nanotron would weight by dataset size, which is not known here"
        )
    if len(weights) != len(paths):
        raise ScheduleError(f"{where}: {len(paths)} dataset paths but {len(weights)} dataset_weights")
    if read and folder and len(folder) != len(read):
        raise ScheduleError(f"{where}: {len(read)} dataset_read_path entries but {len(folder)} dataset_folder entries")
    result: dict[str, float] = {}
    for i, (path, weight) in enumerate(zip(paths, weights, strict=True)):
        base = nanotron_source_name(path)
        name = source_names(base) if callable(source_names) else (source_names or {}).get(base, base)
        if name in result:
            raise ScheduleError(
                f"{where}: two dataset paths map to the source name {name!r}; rename one with source_names="
            )
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ScheduleError(f"{where}: dataset_weights entry for {name!r} is {weight!r}, not a number")
        result[name] = float(weight)
        for known, value in ((folders, folder[i] if folder else None), (read_paths, read[i] if read else None)):
            if value is None:
                continue
            if known.setdefault(name, str(value)) != str(value):
                raise ScheduleError(
                    f"{where}: source {name!r} reads {value!r} here but {known[name]!r} in an earlier stage; "
                    "one leaf is one dataset: rename one of them with source_names="
                )
    return result


def to_nanotron_data_stages(
    schedule: MixtureSchedule,
    dataset_paths: Mapping[str, str],
    total_steps: int,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    read_paths: Mapping[str, str] | None = None,
    base_stages: list[Mapping[str, Any]] | None = None,
    seed: int = 0,
    curriculum_pieces: int = 0,
) -> list[dict[str, Any]]:
    """nanotron `data_stages` for a `total_steps` run: name, 1-based start_training_step, dataset_folder and
    dataset_weights per stage (leaves in the stage's order), as upstream nanotron reads them.

    batch_size / seq_len are needed only to place stages bounded by tokens. `read_paths` also writes
    SmolLM3's `dataset_read_path`. A `base_stages` entry with the same name lends its other settings (seed,
    workers, tokenizer fields). nanotron stages are constant: a curriculum is refused unless
    `curriculum_pieces` > 0 cuts it into that many constant stages (each the mean mixture of its steps).
    """
    flat = schedule if schedule.is_flat else None
    if flat is None:
        raise ScheduleError("nanotron export needs a flat schedule; flatten it with schedule.flatten(token counts)")
    needs_size = any(s.tokens is not None for s in schedule.stages)
    if needs_size and (batch_size is None or seq_len is None):
        raise ScheduleError("stages bounded by tokens: pass batch_size= and seq_len= to place them in steps")
    resolved = schedule.resolve(total_steps, batch_size or 1, seq_len or 1)
    base_by_name = {b.get("name"): b for b in base_stages or ()}
    run_seq = seq_len
    out: list[dict[str, Any]] = []
    for stage, placed in zip(schedule.stages, resolved.stages, strict=True):
        if placed.num_steps == 0:
            raise ScheduleError(
                f"stage {stage.name!r} gets no steps in a {total_steps}-step run; nanotron needs each stage to "
                "start at its own step: lengthen it or drop it"
            )
        if stage.seq_len is not None and run_seq is not None and stage.seq_len != run_seq:
            raise ScheduleError(
                f"stage {stage.name!r} has seq_len {stage.seq_len} but the run {run_seq}: nanotron has one "
                "tokens.sequence_length per run; export that stage as its own config"
            )
        pieces = [(stage.name, placed.start_step, stage.weights)]
        if stage.curriculum is not None:
            if curriculum_pieces < 1:
                raise ScheduleError(
                    f"stage {stage.name!r} has a {stage.curriculum.shape} curriculum, which nanotron's constant "
                    "stages cannot express; pass curriculum_pieces=N to cut it into N constant stages"
                )
            pieces = _curriculum_pieces(resolved, placed, curriculum_pieces)
        for name, start, weights in pieces:
            missing = [leaf for leaf in weights if leaf not in dataset_paths]
            if missing:
                raise ScheduleError(
                    f"stage {stage.name!r}: no dataset path for {missing}; add them to dataset_paths "
                    "(leaf -> tokenized folder)"
                )
            entry = copy.deepcopy(dict(base_by_name.get(name) or base_by_name.get(stage.name) or {}))
            data = entry.setdefault("data", {})
            data.setdefault("seed", seed)
            data.setdefault("num_loading_workers", 0)
            dataset = data.setdefault("dataset", {})
            dataset.pop("dataset_read_path", None)
            dataset["dataset_folder"] = [dataset_paths[leaf] for leaf in weights]
            if read_paths is not None:
                dataset["dataset_read_path"] = [read_paths.get(leaf, dataset_paths[leaf]) for leaf in weights]
            dataset["dataset_weights"] = [float(w) for w in weights.values()]  # type: ignore[arg-type]
            entry["name"] = name
            entry["start_training_step"] = start + 1
            out.append(entry)
    return out


def _curriculum_pieces(resolved: Any, placed: Any, pieces: int) -> list[tuple[str, int, dict[str, float]]]:
    bounds = np.linspace(placed.start_step, placed.end_step, min(pieces, placed.num_steps) + 1).round().astype(int)
    result = []
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        mean = resolved.weights_matrix(int(a), int(b)).mean(axis=0)
        weights = {leaf: float(w) for leaf, w in zip(resolved.sources, mean, strict=True) if w > 0}
        result.append((f"{placed.name} ({j + 1}/{len(bounds) - 1})", int(a), weights))
    return result


def to_nanotron_config(
    schedule: MixtureSchedule,
    dataset_paths: Mapping[str, str],
    total_steps: int,
    *,
    sequence_length: int | None = None,
    batch_size: int | None = None,
    read_paths: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
    seed: int = 0,
    curriculum_pieces: int = 0,
) -> dict[str, Any]:
    """A nanotron config: `base` (e.g. the config it was imported from; model, optimizer... are nanotron's
    business) with `data_stages` and `tokens.train_steps` / `tokens.sequence_length` set from the schedule."""
    config = copy.deepcopy(dict(base or {}))
    tokens = config.setdefault("tokens", {})
    stage_lens = {s.seq_len for s in schedule.stages}  # None: the run's
    if sequence_length is None:
        sequence_length = tokens.get("sequence_length") or (
            next(iter(stage_lens)) if len(stage_lens) == 1 else None)  # every stage sets the same one
    if sequence_length is None:
        raise ScheduleError("pass sequence_length= (nanotron's tokens.sequence_length) for the exported run")
    config["data_stages"] = to_nanotron_data_stages(
        schedule, dataset_paths, total_steps, batch_size=batch_size, seq_len=sequence_length, read_paths=read_paths,
        base_stages=(base or {}).get("data_stages"), seed=seed, curriculum_pieces=curriculum_pieces,
    )
    tokens["train_steps"] = int(total_steps)
    tokens["sequence_length"] = int(sequence_length)
    return config
