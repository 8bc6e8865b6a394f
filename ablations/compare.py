"""The numbers a report shows, computed from run records and a manifest (pure functions: tested directly).

Nothing here draws or writes: `plots.py` turns these frames into figures, `report.py` into HTML.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from mixlab.curation import ShardManifest
from mixlab.training import RunRecord, RunStore

# keys that differ between any two runs by construction: the run table already names each run
_ALWAYS_DIFFERENT = ("run_id",)


# ---- picking runs --------------------------------------------------------------------------
def load_runs(runs: str | Path | RunRecord | Sequence[str | Path | RunRecord]) -> list[RunRecord]:
    """Takes one run directory or RunRecord, or a list of them; returns the RunRecords in that order."""
    items = [runs] if isinstance(runs, str | Path | RunRecord) else list(runs)
    if not items:
        raise ValueError("no runs to report: give at least one run directory (a folder holding run.json)")
    return [item if isinstance(item, RunRecord) else RunRecord.load(item) for item in items]


def select_runs(runs_dir: str | Path, pattern: str | None = None, tags: dict[str, Any] | None = None,
                status: str | None = None) -> list[RunRecord]:
    """Takes a runs directory and optional filters (a glob on run ids, tags that must all match, a status such as
    "completed" or "stale"); returns the matching runs sorted by run id, or raises naming the runs that exist.
    A run directory that cannot be read is skipped with a warning (`RunStore.runs`), so that it hides no other run."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such runs directory; point at the folder `mixlab train --runs` wrote")
    store = RunStore(root)
    every = store.runs()
    picked = [
        run for run in every
        if (pattern is None or fnmatch.fnmatchcase(run.run_id, pattern))
        and all(str(run.tags.get(k)) == str(v) for k, v in (tags or {}).items())
        and (status is None or run.display_status() == status or run.status == status)
    ]
    if not picked:
        asked = ", ".join(f"{name}={value!r}" for name, value in (("pattern", pattern), ("tags", tags),
                                                                   ("status", status)) if value)
        present = ", ".join([*(f"{r.run_id} ({r.display_status()})" for r in every),
                             *(f"{path.name} (unreadable)" for path, _ in store.unreadable())]) or "none"
        raise ValueError(f"{root}: no run matches {asked or 'the selection'}; runs there: {present}")
    return sorted(picked, key=lambda r: r.run_id)


def run_labels(runs: Sequence[RunRecord]) -> list[str]:
    """One unique, short label per run: the run id, with its parent folder when two runs share an id."""
    ids = [r.run_id for r in runs]
    labels = [f"{r.path.parent.name}/{r.run_id}" if ids.count(r.run_id) > 1 else r.run_id for r in runs]
    return [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


# ---- configs -------------------------------------------------------------------------------
def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as dotted keys (`train.lr`, `mixture.stages.1.weights.math`): the key names the
    same field the run config's error messages name."""
    if isinstance(config, dict):
        items = [(str(k), v) for k, v in config.items()]
    elif isinstance(config, list | tuple):
        items = [(str(i), v) for i, v in enumerate(config)]
    else:
        return {prefix: config}
    if not items:
        return {prefix: config} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else key))
    return flat


def config_differences(configs: dict[str, dict[str, Any]]) -> pl.DataFrame:
    """Rows of the flattened config keys whose values are not the same in every run (`key` + one column per run
    label; "(absent)" where a run lacks the key). Empty when the runs agree on everything."""
    flat = {label: flatten_config(config) for label, config in configs.items()}
    keys = sorted({k for f in flat.values() for k in f} - set(_ALWAYS_DIFFERENT))
    missing = object()
    rows = []
    for key in keys:
        values = [f.get(key, missing) for f in flat.values()]
        if all(_same(values[0], v) for v in values[1:]):
            continue
        rows.append({"key": key, **{label: "(absent)" if v is missing else _show(v) for label, v in zip(flat, values,
                                                                                                       strict=True)}})
    return pl.DataFrame(rows, schema={"key": pl.String, **dict.fromkeys(flat, pl.String)}) if rows else pl.DataFrame()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b  # True == 1 in Python, but not in a config
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ---- evals ---------------------------------------------------------------------------------
def final_evals(evals: list[dict]) -> pl.DataFrame:
    """The eval rows of the last evaluated step, one per source."""
    if not evals:
        return pl.DataFrame()
    frame = pl.DataFrame(evals, infer_schema_length=None)  # rows logged before intervals existed lack them
    last = frame["step"].max()
    return frame.filter(pl.col("step") == last).sort("source")


def training_tokens_at(metrics: list[dict], steps: Sequence[int]) -> list[float]:
    """Training tokens seen by each of `steps`: the metrics' cumulative `tokens`, interpolated between log points
    (eval steps need not be logged steps); nan when no metrics row carries tokens."""
    known = sorted((m["step"], m["tokens"]) for m in metrics if isinstance(m.get("tokens"), int | float))
    if not known:
        return [float("nan")] * len(steps)
    xs, ys = [0, *(s for s, _ in known)], [0, *(t for _, t in known)]
    return [float(v) for v in np.interp(list(steps), xs, ys)]


def eval_curves(evals: list[dict], metrics: list[dict]) -> pl.DataFrame:
    """Every eval row with the training tokens of its step (`train_tokens`), sorted by source and step; interval
    columns are null for runs evaluated before evals had them."""
    if not evals:
        return pl.DataFrame()
    frame = pl.DataFrame(evals, infer_schema_length=None)
    for name in ("loss_lo", "loss_hi", "bpb_lo", "bpb_hi"):
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(name))
    steps = frame["step"].to_list()
    frame = frame.with_columns(pl.Series("train_tokens", training_tokens_at(metrics, steps), dtype=pl.Float64))
    return frame.sort(["source", "step"])


def with_interval(row: dict[str, Any], name: str, digits: int = 3) -> str:
    """`2.071 [2.050, 2.090]`, or the bare value when the row has no interval."""
    value = row.get(name)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    if isinstance(lo, int | float) and isinstance(hi, int | float) and math.isfinite(lo) and math.isfinite(hi):
        return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    return f"{value:.{digits}f}"


# ---- data: epochs and mixture --------------------------------------------------------------
def served_tokens(run: RunRecord) -> dict[str, int]:
    """Tokens served per source so far: the last metrics row's cumulative `tokens_by_source`, else the summary's."""
    for row in reversed(run.metrics()):
        if isinstance(row.get("tokens_by_source"), dict):
            return {s: int(n) for s, n in row["tokens_by_source"].items()}
    return {s: int(n) for s, n in (run.summary.get("tokens_by_source") or {}).items()}


def epochs_per_source(tokens_by_source: dict[str, int], manifest: ShardManifest) -> dict[str, float | None]:
    """Tokens served / the source's train tokens in the manifest: how many times the run went through each source
    (None for a source the manifest has no train tokens for)."""
    out: dict[str, float | None] = {}
    for source, served in sorted(tokens_by_source.items()):
        entry = manifest.sources.get(source)
        train = entry.tokens.get("train", 0) if entry is not None else 0
        out[source] = served / train if train else None
    return out


def smoothed_mixture_shares(metrics: list[dict], window: int | None = None) -> pl.DataFrame:
    """Per log point, each source's share of the tokens served over the last `window` log intervals (a moving
    window over the cumulative `tokens_by_source`), so the realised mixture reads as a line, not as noise of
    single batches. `window=None` picks ~1/15 of the log points."""
    rows = [m for m in metrics if isinstance(m.get("tokens_by_source"), dict)]
    if not rows:
        return pl.DataFrame()
    window = window or max(1, round(len(rows) / 15))
    if window < 1:
        raise ValueError(f"smoothing window={window} must be >= 1 log point")
    sources = sorted({s for m in rows for s in m["tokens_by_source"]})
    cumulative = np.array([[float(m["tokens_by_source"].get(s, 0)) for s in sources] for m in rows])
    before = np.vstack([np.zeros((window, len(sources))), cumulative])[: len(rows)]
    served = cumulative - before
    totals = served.sum(axis=1)
    out = [{"step": m["step"], **{s: served[i, j] / totals[i] for j, s in enumerate(sources)}}
           for i, m in enumerate(rows) if totals[i] > 0]
    return pl.DataFrame(out)


def stage_first_steps(metrics: list[dict]) -> dict[str, int]:
    """The first logged step of each data stage seen in the metrics (`stage` field), in training order."""
    first: dict[str, int] = {}
    for m in metrics:
        stage = m.get("stage")
        if stage and stage not in first:
            first[stage] = int(m["step"])
    return first


def target_segments(stages: list[dict], total_steps: int, first_steps: dict[str, int] | None = None) -> pl.DataFrame:
    """The schedule's target weights as step segments: one row per stage with `stage, start, end` and each
    source's normalised weight. A stage starts at its first logged step when the metrics reached it, else where
    its fraction of the run puts it (never before the stage before it)."""
    first_steps = first_steps or {}
    sources = sorted({s for st in stages for s in st.get("weights", {})})
    starts, cumulative = [], 0.0
    for i, st in enumerate(stages):
        planned = round(cumulative * total_steps)
        start = 0 if i == 0 else first_steps.get(st["name"], planned)  # the first stage starts the run
        starts.append(max(start, starts[-1]) if starts else start)
        cumulative += float(st.get("fraction", 1.0))
    rows = []
    for i, st in enumerate(stages):
        weights = st.get("weights", {})
        norm = sum(weights.values()) or 1.0
        end = starts[i + 1] if i + 1 < len(stages) else max(total_steps, starts[i])
        rows.append({"stage": st["name"], "start": starts[i], "end": end,
                     **{s: weights.get(s, 0.0) / norm for s in sources}})
    return pl.DataFrame(rows)


def run_total_steps(run: RunRecord) -> int:
    """The run's planned optimizer steps: the summary's total_steps, else train.total_steps, else the last step."""
    train = run.config.get("train") or {}
    for value in (run.summary.get("total_steps"), train.get("total_steps"), run.summary.get("step")):
        if isinstance(value, int) and value > 0:
            return value
    metrics = run.metrics()
    return int(metrics[-1]["step"]) if metrics else 0


def schedule_table(schedule: dict) -> pl.DataFrame:
    """Target weights as a table: one row per source, one column per stage (normalised; a curriculum stage
    shows its starting weights)."""
    stages = schedule.get("stages", [])
    columns = []
    for st in stages:
        weights = {k: v for k, v in (st.get("weights") or {}).items() if isinstance(v, (int, float))}
        total = sum(weights.values()) or 1.0
        bound = next((f"{key} {st[key]:g}" for key in ("fraction", "tokens", "steps", "start_step")
                      if st.get(key) is not None), "the rest")
        if st.get("fraction") is not None:
            bound = f"{st['fraction']:.0%}"
        columns.append((f"{st['name']} ({bound})", {k: v / total for k, v in weights.items()}))
    sources = sorted({s for _, weights in columns for s in weights})
    return pl.DataFrame([{"source": source, **{label: w.get(source, 0.0) for label, w in columns}}
                         for source in sources])


def mixture_shares(metrics: list[dict], max_points: int | None = None) -> pl.DataFrame:
    """Per logged step, the share of tokens each source got since the previous point.

    `tokens_by_source` in metrics is cumulative (what the sampler has served so far), so the
    difference between consecutive points is what the model saw in that interval. `max_points`
    merges consecutive log intervals so that each point covers enough sequences to be readable."""
    rows = [m for m in metrics if isinstance(m.get("tokens_by_source"), dict)]
    if not rows:
        return pl.DataFrame()
    if max_points and len(rows) > max_points:
        stride = -(-len(rows) // max_points)
        keep = list(range(stride - 1, len(rows), stride))
        if keep[-1] != len(rows) - 1:
            keep.append(len(rows) - 1)
        rows = [rows[i] for i in keep]
    sources = sorted({s for m in rows for s in m["tokens_by_source"]})
    previous = dict.fromkeys(sources, 0)
    out = []
    for m in rows:
        current = {s: int(m["tokens_by_source"].get(s, 0)) for s in sources}
        delta = {s: current[s] - previous[s] for s in sources}
        total = sum(delta.values())
        previous = current
        if total <= 0:
            continue
        out.append({"step": m["step"], **{s: delta[s] / total for s in sources}})
    return pl.DataFrame(out)


# ---- curation ------------------------------------------------------------------------------
def curation_funnel(manifest: ShardManifest) -> pl.DataFrame:
    """One row per (source, step): documents in, kept, dropped, the dropped share of the step's input, reasons."""
    rows = []
    for name, src in manifest.sources.items():
        for step in src.steps:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(step.dropped.items(), key=lambda kv: -kv[1]) if v)
            rows.append(
                {
                    "source": name,
                    "step": step.name,
                    "docs_in": step.docs_in,
                    "kept": step.kept,
                    "dropped": step.dropped_total,
                    "dropped share": step.dropped_total / step.docs_in if step.docs_in else 0.0,
                    "reasons": reasons,
                }
            )
    return pl.DataFrame(rows)


def drop_shares(manifest: ShardManifest) -> tuple[list[str], list[str], np.ndarray]:
    """(sources, steps, [source, step] dropped/docs_in): each step's drops as a share of that step's input, so a
    small source's losses show as plainly as a big one's; nan where a source has no such step. Steps are in
    the order the pipelines run them (by their average place in each source's pipeline)."""
    sources = sorted(manifest.sources)
    positions: dict[str, list[float]] = {}  # a step's relative place in each source's pipeline
    for name in sources:
        own = manifest.sources[name].steps
        for i, step in enumerate(own):
            positions.setdefault(step.name, []).append(i / max(1, len(own) - 1))
    steps = sorted(positions, key=lambda n: sum(positions[n]) / len(positions[n]))
    shares = np.full((len(sources), len(steps)), np.nan)
    for i, name in enumerate(sources):
        for step in manifest.sources[name].steps:
            shares[i, steps.index(step.name)] = step.dropped_total / step.docs_in if step.docs_in else 0.0
    return sources, steps, shares


def source_volumes(manifest: ShardManifest) -> pl.DataFrame:
    """Per source: raw docs and bytes (from the corpus origin when known), kept docs and text bytes, train/val
    tokens: the funnel in documents, bytes and tokens."""
    rows = []
    for name, src in sorted(manifest.sources.items()):
        raw_bytes = src.origin.get("bytes") if isinstance(src.origin, dict) else None
        rows.append({
            "source": name,
            "raw docs": src.steps[0].docs_in if src.steps else src.docs,
            "kept docs": src.docs,
            "raw bytes": int(raw_bytes) if isinstance(raw_bytes, int | float) else None,
            "kept text bytes": src.bytes,
            "train tokens": src.tokens.get("train", 0),
            "val tokens": src.tokens.get("val", 0),
        })
    return pl.DataFrame(rows, schema_overrides={"raw bytes": pl.Int64})
