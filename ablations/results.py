"""The results of an ablation as one long table: run x step x metric x value, with the variant's axes as columns.

One Parquet file (`<runs>/../ablations/<spec>/results.parquet`) that polars, pandas and DuckDB read, so any
question about the ablation is a query: per-source held-out loss and bits per byte (`<source>/loss`,
`<source>/bpb`, `all/...`), downstream cloze tasks (`task/<name>/accuracy`, `task/<name>/margin`), the training
loss (`train/loss`), with the run's variant, seed and axis labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from mixlab.ablations.launch import proxy_runs
from mixlab.ablations.spec import AblationSpec
from mixlab.training import RunRecord

EVAL_METRICS = ("loss", "bpb")
TASK_METRICS = ("accuracy", "margin")


def ablation_results(spec: AblationSpec) -> pl.DataFrame:
    """Every logged value of every proxy that has a run (pending proxies have no rows yet)."""
    axes = list(dict.fromkeys(a.field for a in spec.axes) if spec.axes else
                dict.fromkeys(k for v in spec.variants for k in v if k != "name"))
    rows = []
    for proxy in proxy_runs(spec):
        if proxy.status == "pending":
            continue
        record = RunRecord.load(proxy.path)
        labels = {axis: proxy.variant.labels.get(axis, "base") for axis in axes}
        common = {"run": proxy.run_id, "variant": proxy.variant.name, "seed": proxy.variant.seed,
                  "status": proxy.status, **labels}
        for row in record.evals():
            for metric in EVAL_METRICS:
                if isinstance(row.get(metric), int | float):
                    rows.append({**common, "step": int(row["step"]), "metric": f"{row['source']}/{metric}",
                                 "value": float(row[metric])})
        for row in record.tasks():
            for metric in TASK_METRICS:
                if isinstance(row.get(metric), int | float):
                    rows.append({**common, "step": int(row["step"]), "metric": f"task/{row['task']}/{metric}",
                                 "value": float(row[metric])})
        for row in record.metrics():
            if isinstance(row.get("loss"), int | float):
                rows.append({**common, "step": int(row["step"]), "metric": "train/loss", "value": float(row["loss"])})
    schema = {"run": pl.String, "variant": pl.String, "seed": pl.Int64, "status": pl.String,
              **dict.fromkeys(axes, pl.String), "step": pl.Int64, "metric": pl.String, "value": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def _task_facts(spec: AblationSpec, key: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for proxy in proxy_runs(spec):
        if proxy.status != "pending":
            for row in RunRecord.load(proxy.path).tasks():
                if row.get(key) is not None:
                    facts.setdefault(str(row["task"]), row[key])
    return facts


def task_chance(spec: AblationSpec) -> dict[str, float]:
    """Chance accuracy of each downstream task the spec's proxies were scored on (from their tasks.jsonl)."""
    return {task: float(value) for task, value in _task_facts(spec, "chance").items()}


def task_sources(spec: AblationSpec) -> dict[str, str]:
    """The source each downstream task was built from (what the report plots it against)."""
    return {task: str(value) for task, value in _task_facts(spec, "source").items()}


def write_results(spec: AblationSpec, path: str | Path | None = None) -> Path:
    """Write `ablation_results` as Parquet (default: beside the proxies' run documents) and return its path."""
    from mixlab.ablations.launch import runs_dir

    path = Path(path) if path else runs_dir(spec).parent / "ablations" / spec.name / "results.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    ablation_results(spec).write_parquet(tmp)
    tmp.replace(path)  # never a half-written table
    return path
