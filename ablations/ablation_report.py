"""The report of a whole ablation: one page that says which variant wins on which metric, and whether the win
is larger than what changing the seed does.

`build_ablation_report(spec)` reads the proxies' runs (through `ablation_results` and `RunRecord`) and writes
`report.html` (figures embedded as base64 PNG and also written beside it; no script, no network) and
`summary.json` (the same numbers for scripts). The page has: the spec (base, axes, seeds, proxies done); curves
per variant with a band over seeds; a ranked table per key metric with the difference to the base and whether
it exceeds the seed noise; the playbook's signal checks on the downstream tasks and on per-source bpb; and, for
mixture axes, every per-source metric against the share of tokens that source really got in each run.

A tokenizer axis (or runs with different vocabularies) puts each variant's loss in nats per token of its own
tokenizer: those are different units, so the `/loss` metrics are then not ranked (the page and summary say so)
and variants are ranked by bits per byte; bpb's chance level (a uniform guess) is set per variant from its own
vocabulary and tokens per byte.

Seed noise, as used here: a variant's final mean differs from the base's by more than the seed noise when
|diff| > k x the pooled seed std of the two (k = 2 by default; std over seeds with ddof=1, pooled as the root of
the dof-weighted mean variance). The bar does not shrink with more seeds on purpose: it asks whether the effect
is larger than what one re-run with another seed moves the metric by. With one seed on both sides there is no
estimate, and the table says so instead of claiming a difference.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml
from mixlab.ablations import ablation_plots, compare
from mixlab.ablations.launch import DONE, proxy_runs, runs_dir
from mixlab.ablations.outputs import json_safe
from mixlab.ablations.report import REPORT_CSS, HtmlPage, html_table
from mixlab.ablations.results import ablation_results, task_chance, task_sources, write_results
from mixlab.ablations.signal import signal_table
from mixlab.ablations.spec import TOKENIZER_FIELD, AblationSpec
from mixlab.training import RunRecord

logger = logging.getLogger("mixlab.ablation_report")

NOISE_K = 2.0
MARGIN_CHANCE = 0.0  # a model that cannot tell the answers apart scores no margin between right and wrong ones
_LOWER_IS_BETTER = ("/loss", "/bpb")
_HIGHER_IS_BETTER = ("/accuracy", "/margin")
RANKED_COLUMNS = {"rank": pl.Int64, "variant": pl.String, "seeds": pl.Int64, "step": pl.Int64, "mean": pl.Float64,
                  "std": pl.Float64, "diff_to_base": pl.Float64, "pooled_seed_std": pl.Float64,
                  "noise_bar": pl.Float64, "exceeds_seed_noise": pl.Boolean, "verdict": pl.String}


# ---- direction and seed noise -----------------------------------------------------------------
def higher_is_better(metric: str) -> bool:
    """Accuracy and margin go up, loss and bpb go down; any other metric has no known direction."""
    if metric.endswith(_LOWER_IS_BETTER):
        return False
    if metric.endswith(_HIGHER_IS_BETTER):
        return True
    raise ValueError(f"metric {metric!r}: no known direction; rank metrics ending in /loss or /bpb (lower is "
                     "better) or /accuracy or /margin (higher is better)")


def pooled_seed_std(base_std: float | None, base_seeds: int, variant_std: float | None, variant_seeds: int
                    ) -> float | None:
    """The root of the dof-weighted mean of the two seed variances (each side with n - 1 degrees of freedom);
    a side with fewer than 2 seeds adds nothing, and None means neither side has 2."""
    weighted, dof = 0.0, 0
    for std, seeds in ((base_std, base_seeds), (variant_std, variant_seeds)):
        if std is not None and seeds >= 2 and math.isfinite(std):
            weighted += (seeds - 1) * std ** 2
            dof += seeds - 1
    return math.sqrt(weighted / dof) if dof else None


def exceeds_seed_noise(diff: float, base_std: float | None, base_seeds: int, variant_std: float | None,
                       variant_seeds: int, k: float = NOISE_K) -> bool | None:
    """Whether |diff| > k x the pooled seed std of base and variant; None when there is no seed noise estimate
    (one seed on both sides), since then no difference can be told from noise."""
    pooled = pooled_seed_std(base_std, base_seeds, variant_std, variant_seeds)
    if pooled is None:
        return None
    return abs(diff) > k * pooled


# ---- the ranked table ------------------------------------------------------------------------
def final_values(results: pl.DataFrame, metric: str, completed_only: bool = True) -> pl.DataFrame:
    """Each run's value of `metric` at its own last step (run, variant, seed, step, value). Only completed runs
    count when any is completed (a run still training or dead early would be compared at another step)."""
    missing = [c for c in ("run", "variant", "seed", "step", "metric", "value") if c not in results.columns]
    if missing:
        raise ValueError(f"results table lacks column(s) {missing}: give the table of ablation_results(spec)")
    rows = results.filter(pl.col("metric") == metric)
    if rows.is_empty():
        known = sorted(results["metric"].unique().to_list())
        raise ValueError(f"metric {metric!r} is not in the results table; it holds {known}")
    if completed_only and "status" in rows.columns and (rows["status"] == DONE).any():
        rows = rows.filter(pl.col("status") == DONE)
    last = rows.group_by("run").agg(pl.col("step").max())
    return (rows.join(last, on=["run", "step"]).select("run", "variant", "seed", "step", "value")
            .unique(subset=["run"], keep="last").sort("variant", "seed"))


def ranked_table(results: pl.DataFrame, metric: str, base_variant: str | None = "base", k: float = NOISE_K,
                 completed_only: bool = True) -> pl.DataFrame:
    """One row per variant, best first: its final `metric` as mean and std over seeds (ddof=1), the difference
    of the mean to the base's, the pooled seed std of the two, the bar k x pooled, and whether the difference
    exceeds it (null: no seed noise estimate). `verdict` says it in words."""
    finals = final_values(results, metric, completed_only)
    hib = higher_is_better(metric)
    stats = (finals.group_by("variant")
             .agg(pl.len().alias("seeds"), pl.col("step").min().alias("step"), pl.col("value").mean().alias("mean"),
                  pl.col("value").std(ddof=1).alias("std"))
             .sort(["mean", "variant"], descending=[hib, False]))
    by_variant = {row["variant"]: row for row in stats.iter_rows(named=True)}
    base = by_variant.get(base_variant) if base_variant is not None else None
    rows = []
    for rank, row in enumerate(stats.iter_rows(named=True), 1):
        out = {**row, "rank": rank, "diff_to_base": None, "pooled_seed_std": None, "noise_bar": None,
               "exceeds_seed_noise": None}
        if base is None:
            out["verdict"] = ("no base to compare with" if base_variant is None
                              else f"no {metric} of base variant {base_variant!r} to compare with")
        elif row["variant"] == base_variant:
            out["verdict"] = "base"
        else:
            diff = row["mean"] - base["mean"]
            pooled = pooled_seed_std(base["std"], base["seeds"], row["std"], row["seeds"])
            beyond = exceeds_seed_noise(diff, base["std"], base["seeds"], row["std"], row["seeds"], k)
            better = diff > 0 if hib else diff < 0
            out.update(diff_to_base=diff, pooled_seed_std=pooled, noise_bar=None if pooled is None else k * pooled,
                       exceeds_seed_noise=beyond)
            if beyond is None:
                out["verdict"] = f"{'better' if better else 'worse'} than base; no seed noise estimate (1 seed)"
            elif diff == 0:
                out["verdict"] = "same as base"
            else:
                out["verdict"] = (f"{'better' if better else 'worse'} than base, "
                                  + ("beyond seed noise" if beyond else "within seed noise"))
        rows.append(out)
    return pl.DataFrame(rows, schema=RANKED_COLUMNS)


# ---- metrics of the results table --------------------------------------------------------------
def key_metrics(results: pl.DataFrame) -> list[str]:
    """The metrics the report ranks: held-out loss and bpb per source ("all" first), then each task's metrics."""
    names = set(results["metric"].unique().to_list())
    evals = sorted((m for m in names if m.endswith(_LOWER_IS_BETTER) and m != "train/loss"),
                   key=lambda m: (m.endswith("/bpb"), m.split("/")[0] != "all", m))
    tasks = sorted(m for m in names if m.startswith("task/") and m.endswith(_HIGHER_IS_BETTER))
    return [*evals, *tasks]


def _task_name(metric: str) -> str:
    """`task/<name>/accuracy` -> `<name>` (a name may hold slashes)."""
    return metric[len("task/"):].rsplit("/", 1)[0]


def _signal_rows(results: pl.DataFrame, metrics: Sequence[str]) -> pl.DataFrame:
    """The long table signal_table reads: run, seed, step, task (the metric's name), value, variant."""
    rows = results.filter(pl.col("metric").is_in(list(metrics)) & pl.col("value").is_finite())
    return rows.select("run", "seed", "step", pl.col("metric").alias("task"), "value", "variant")


def report_task_signal(results: pl.DataFrame, chance: Mapping[str, float] | None, metrics: Sequence[str] | None = None
                ) -> tuple[pl.DataFrame | None, list[str]]:
    """The signal checks on the task metrics: accuracy against `chance[task]`, margin against
    `chance["<task>/margin"]` (default 0). A task without a chance for its accuracy is left out, named in the
    returned notes; None when no task metric is there."""
    chance = dict(chance or {})
    wanted = [m for m in (metrics or key_metrics(results)) if m.startswith("task/")]
    levels: dict[str, float] = {}
    notes = []
    for metric in wanted:
        name = _task_name(metric)
        if metric.endswith("/margin"):
            levels[metric] = float(chance.get(f"{name}/margin", MARGIN_CHANCE))
        elif name in chance:
            levels[metric] = float(chance[name])
        else:
            notes.append(f"{metric}: no chance level for task {name!r}; pass chance={{{name!r}: 1/choices}}")
    if not levels:
        return None, notes
    table = signal_table(_signal_rows(results, list(levels)), levels, {m: higher_is_better(m) for m in levels})
    return table.drop("chance_per_variant"), notes  # a task's chance is one number (1 / choices)


def bpb_chance_levels(results: pl.DataFrame, vocab_size: int | Mapping[str, int] | None, metric: str
                      ) -> tuple[dict[str, float], list[str]]:
    """Per variant, the bpb of a uniform guess over its own vocabulary: ln(V) nats per token, which in bits per
    byte is ln(V) x the run's own bpb / loss (its windows' tokens per byte). A tokenizer axis changes both V and
    tokens per byte from one variant to the next, so one level for all would misjudge every variant but one.
    `vocab_size` is one size for every run or a mapping run -> size; a run without one adds nothing (named in the
    returned notes), and a variant none of whose runs has one gets no level. A variant's level is the mean of
    its runs' (its seeds share tokenizer and windows)."""
    source = metric[: -len("/bpb")]
    pairs = (results.filter(pl.col("metric") == metric).select("run", "variant", "step", pl.col("value").alias("bpb"))
             .join(results.filter(pl.col("metric") == f"{source}/loss")
                   .select("run", "step", pl.col("value").alias("loss")), on=["run", "step"])
             .filter(pl.col("loss") > 0))
    if pairs.is_empty():
        return {}, [f"{metric}: no matching {source}/loss rows to convert the uniform guess into bpb; left out"]
    per_run = (pairs.group_by("run", "variant").agg((pl.col("bpb") / pl.col("loss")).median().alias("ratio"))
               .sort("variant", "run"))
    chances: dict[str, list[float]] = {}
    lacking = []
    for run, variant, ratio in per_run.iter_rows():
        size = vocab_size.get(run) if isinstance(vocab_size, Mapping) else vocab_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            lacking.append(run)
            continue
        chances.setdefault(variant, []).append(float(ratio) * math.log(size))
    notes = [f"{metric}: run(s) {lacking} have no vocabulary size in their configs (no uniform-guess chance level); "
             "a variant with none is left out of its signal checks"] if lacking else []
    return {variant: float(np.mean(levels)) for variant, levels in chances.items()}, notes


def bpb_signal(results: pl.DataFrame, vocab_size: int | Mapping[str, int] | None, metrics: Sequence[str] | None = None
               ) -> tuple[pl.DataFrame | None, list[str]]:
    """The signal checks on per-source bpb read as tasks. The above-random check needs a chance level; for a
    loss the honest one is a uniform guess over the vocabulary, per variant (bpb_chance_levels): each variant's
    margin is taken from its own level. `vocab_size` is one size for all runs or a mapping run -> size (the
    report reads each run's config). The table's `chance` is the mean level over the final runs, and
    `chance_per_variant` lists each variant's; a variant without a level is left out of its metric's checks."""
    wanted = [m for m in (metrics or key_metrics(results)) if m.endswith("/bpb")]
    if not wanted:
        return None, []
    if not vocab_size or (not isinstance(vocab_size, Mapping) and vocab_size < 2):
        return None, ["no vocabulary size in the runs' configs: bpb has no chance level (uniform guess), so its "
                      "signal checks are left out"]
    chances: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    for metric in wanted:
        levels, why = bpb_chance_levels(results, vocab_size, metric)
        notes += why
        if levels:
            chances[metric] = levels
    if not chances:
        return None, notes
    with_level = pl.any_horizontal(*[(pl.col("task") == m) & pl.col("variant").is_in(list(levels))
                                     for m, levels in chances.items()])
    rows = _signal_rows(results, list(chances)).filter(with_level)
    return signal_table(rows, chances, dict.fromkeys(chances, False), tasks=list(chances)), notes


# ---- mixture axes: metric against the trained share of each source --------------------------------
def _spec_fields(spec: AblationSpec) -> list[str]:
    """The fields the spec's axes or variants set, in order."""
    fields = [a.field for a in spec.axes] if spec.axes else [k for v in spec.variants for k in v if k != "name"]
    return list(dict.fromkeys(fields))


def mixture_axes(spec: AblationSpec) -> list[str]:
    """The spec's fields that change the mixture: `mixture` or `mixture.<...>`."""
    return [f for f in _spec_fields(spec) if f == "mixture" or f.startswith("mixture.")]


def loss_units_differ(spec: AblationSpec, vocab_sizes: Mapping[str, int] | None = None) -> str | None:
    """Why the runs' per-token losses are in different units (a tokenizer axis, or runs with different
    vocabularies), or None when they compare. Nats per token of two tokenizers measure different things (a
    tokenizer with more tokens per byte has an easier next token), so then only bits per byte ranks variants."""
    if TOKENIZER_FIELD in _spec_fields(spec):
        return (f"the spec varies the tokenizer (field `{TOKENIZER_FIELD}`): each variant's loss is in nats per "
                "token of its own vocabulary")
    sizes = sorted(set((vocab_sizes or {}).values()))
    if len(sizes) > 1:
        return f"the runs' vocabularies differ ({', '.join(map(str, sizes))} tokens): their losses are per token of each"
    return None


def trained_shares(spec: AblationSpec) -> pl.DataFrame:
    """Per run and source: tokens actually trained (the last metrics row's cumulative tokens_by_source) and
    their share of the run's tokens, whatever the schedule or policy did."""
    rows = []
    for proxy in proxy_runs(spec):
        if proxy.status == "pending":
            continue
        served = compare.served_tokens(RunRecord.load(proxy.path))
        total = sum(served.values())
        for source, tokens in sorted(served.items()):
            rows.append({"run": proxy.run_id, "variant": proxy.variant.name, "seed": proxy.variant.seed,
                         "source": source, "tokens": tokens, "share": tokens / total if total else 0.0})
    return pl.DataFrame(rows, schema={"run": pl.String, "variant": pl.String, "seed": pl.Int64, "source": pl.String,
                                      "tokens": pl.Int64, "share": pl.Float64})


def weight_points(results: pl.DataFrame, shares: pl.DataFrame, metrics: Sequence[str], max_sources: int = 3,
                  task_sources: Mapping[str, str] | None = None) -> pl.DataFrame:
    """Rows (run, variant, seed, metric, source, share, value) to plot a final metric against a source's share:
    `<source>/<loss|bpb>` against its own source; a task against the source it was built from (`task_sources`,
    else the source its name starts with), else the `max_sources` sources whose share varies most."""
    sources = sorted(shares["source"].unique().to_list())
    ranges = shares.group_by("source").agg((pl.col("share").max() - pl.col("share").min()).alias("range"))
    varying = [s for s, r in sorted(ranges.rows(), key=lambda sr: (-sr[1], sr[0])) if r > 0][:max_sources]
    frames = []
    for metric in metrics:
        head = metric.split("/")[0]
        if metric.startswith("task/"):
            built_from = (task_sources or {}).get(_task_name(metric))
            named = [built_from] if built_from in sources else sorted(
                (s for s in sources if _task_name(metric).startswith(s)), key=len)[-1:]
            against = named or varying
        else:
            against = [head] if head in sources else []
        if not against:
            continue
        finals = final_values(results, metric).select("run", "value")
        for source in against:
            mine = shares.filter(pl.col("source") == source).select("run", "variant", "seed", "share")
            frames.append(mine.join(finals, on="run").with_columns(pl.lit(metric).alias("metric"),
                                                                   pl.lit(source).alias("source")))
    schema = {"run": pl.String, "variant": pl.String, "seed": pl.Int64, "metric": pl.String, "source": pl.String,
              "share": pl.Float64, "value": pl.Float64}
    if not frames:
        return pl.DataFrame(schema=schema)
    return pl.concat(frames).select(list(schema)).sort("metric", "source", "variant", "seed")


# ---- the page ------------------------------------------------------------------------------------
def _variant_order(spec: AblationSpec) -> list[str]:
    return list(dict.fromkeys(v.name for v in spec.expand()))


def run_vocab_sizes(spec: AblationSpec) -> dict[str, int]:
    """Run id -> the model vocabulary it trained with (its run.json config; else the base's model.vocab_size),
    for the uniform-guess bpb of each run: a tokenizer axis gives each variant its own."""
    fallback = (spec.base.get("model") or {}).get("vocab_size")
    sizes = {}
    for proxy in proxy_runs(spec):
        size = (RunRecord.load(proxy.path).config.get("model") or {}).get("vocab_size") \
            if proxy.status != "pending" else None
        size = size if isinstance(size, int) and not isinstance(size, bool) else fallback
        if isinstance(size, int) and not isinstance(size, bool):
            sizes[proxy.run_id] = size
    return sizes


def _families(metrics: Sequence[str], mixed_units: bool = False) -> list[tuple[str, str, list[str]]]:
    """(key, title, metrics) per figure: held-out loss, held-out bpb, then one per task metric kind. With
    `mixed_units` (a tokenizer axis) the loss title says that its curves do not compare across variants."""
    out = []
    loss_title = "Held-out loss per source (nats/token" + (" of each variant's own tokenizer: not comparable "
                                                          "across variants, read bpb)" if mixed_units else ")")
    for key, title, suffix in (("eval_loss", loss_title, "/loss"),
                               ("eval_bpb", "Held-out bits per byte per source", "/bpb")):
        chosen = [m for m in metrics if m.endswith(suffix) and not m.startswith(("task/", "train/"))]
        if chosen:
            out.append((key, title, chosen))
    for kind in ("accuracy", "margin"):
        chosen = [m for m in metrics if m.startswith("task/") and m.endswith(f"/{kind}")]
        if chosen:
            out.append((f"task_{kind}", f"Downstream task {kind}", chosen))
    return out


def _spec_header(spec: AblationSpec, proxies: list, base_variant: str | None) -> list[str]:
    done = sum(p.status == DONE for p in proxies)
    if spec.axes:
        axes = "".join(f"<li><code>{html.escape(a.field)}</code>: "
                       + ", ".join(html.escape(label) for label, _ in a.labelled()) + "</li>" for a in spec.axes)
    else:
        axes = "".join(f"<li>{html.escape(str(v.get('name', '')))} "
                       + ", ".join(f"<code>{html.escape(k)}</code>" for k in v if k != "name") + "</li>"
                       for v in spec.variants)
    status = pl.DataFrame([{"run": p.run_id, "variant": p.variant.name, "seed": p.variant.seed, "status": p.status,
                            "step": f"{p.step}/{p.total_steps}" if p.total_steps else str(p.step)} for p in proxies])
    parts = [f"<h1>mixlab ablation <code>{html.escape(spec.name)}</code></h1>",
             f"<p>{html.escape(spec.description)}</p>" if spec.description else "",
             f"<p>mode {html.escape(spec.mode)} · seeds {', '.join(map(str, spec.seeds))} · "
             f"base variant: {html.escape(base_variant or 'none (include_base is off)')} · "
             f"<b>{done} of {len(proxies)} proxies completed</b></p>",
             f"<h3>{'Axes' if spec.axes else 'Variants'}</h3><ul>{axes}</ul>",
             "<details><summary>Base run document</summary><pre>"
             + html.escape(yaml.safe_dump(spec.base, sort_keys=False)) + "</pre></details>",
             "<h3>Proxies</h3>", html_table(status)]
    if done < len(proxies):
        parts.append("<p class=bad>Not every proxy has completed: tables rank completed runs only (each at its own "
                     "last step); curves show whatever was logged.</p>")
    return parts


def _noise_rule(k: float) -> str:
    return (f"A difference to the base exceeds the seed noise when |diff| &gt; {k:g} × the pooled seed std of base "
            "and variant (std over seeds with ddof=1, pooled as the root of the dof-weighted mean variance). With "
            "one seed on both sides there is no seed noise estimate and no claim is made.")


def build_ablation_report(spec: AblationSpec, out_dir: str | Path | None = None,
                          chance: Mapping[str, float] | None = None, metrics: Sequence[str] | None = None,
                          k: float = NOISE_K, results: pl.DataFrame | None = None,
                          vocab_sizes: Mapping[str, int] | None = None) -> Path:
    """Write `report.html` and `summary.json` for the spec's proxies (default dir
    `<runs_dir>/../ablations/<spec.name>/report/`) and return the HTML's path. `chance` maps a task name to its
    accuracy at random (1/choices); `metrics` limits the ranked metrics (default: every held-out loss/bpb and
    task metric); `results` replaces `ablation_results(spec)` (e.g. a table read back from Parquet) and
    `vocab_sizes` (run id -> vocabulary) the one each run's config recorded. When the runs' losses are in
    different units (loss_units_differ: a tokenizer axis), `/loss` metrics are not ranked: bpb ranks them."""
    out = Path(out_dir) if out_dir is not None else runs_dir(spec).parent / "ablations" / spec.name / "report"
    out.mkdir(parents=True, exist_ok=True)
    results = ablation_results(spec) if results is None else results
    proxies = proxy_runs(spec)
    variants = _variant_order(spec)
    variants += sorted(set(results["variant"].unique().to_list()) - set(variants))
    base_variant = "base" if spec.include_base else None
    present = set(results["metric"].unique().to_list()) if not results.is_empty() else set()
    wanted = list(metrics) if metrics is not None else key_metrics(results) if present else []
    unknown = [m for m in wanted if m not in present]
    if unknown and metrics is not None:
        raise ValueError(f"metrics {unknown} are not in the results of ablation {spec.name!r}; they hold "
                         f"{sorted(present)}")
    vocab_sizes = run_vocab_sizes(spec) if vocab_sizes is None else dict(vocab_sizes)
    mixed_units = loss_units_differ(spec, vocab_sizes)
    unranked = [m for m in wanted if mixed_units and m.endswith("/loss")]
    ranked_metrics = [m for m in wanted if m not in unranked]
    page = HtmlPage(out)
    notes: list[str] = []
    summary: dict[str, Any] = {
        "spec": spec.name, "description": spec.description, "mode": spec.mode, "seeds": list(spec.seeds),
        "base_variant": base_variant, "variants": variants, "noise_k": k,
        "axes": {a.field: [label for label, _ in a.labelled()] for a in spec.axes},
        "proxies": {"completed": sum(p.status == DONE for p in proxies), "total": len(proxies),
                    "runs": [{"run": p.run_id, "variant": p.variant.name, "seed": p.variant.seed, "status": p.status,
                              "step": p.step, "total_steps": p.total_steps} for p in proxies]},
    }
    page.add(*_spec_header(spec, proxies, base_variant))
    if results.is_empty():
        page.add("<p class=bad>No proxy has logged anything yet: run the ablation first (mixlab ablate run).</p>")

    # ---- curves
    if not results.is_empty():
        page.add("<h2>Curves per variant</h2>",
                 "<p class=note>Line: mean over seeds at each step; band: min–max over seeds.</p>")
        for key, title, family in _families(wanted, mixed_units is not None):
            page.figure(key, ablation_plots.seed_curves(results, family, variants, title), title)
        if "train/loss" in present:
            title = "Training loss" + (" (nats/token of each variant's own tokenizer)" if mixed_units else "")
            page.figure("train_loss", ablation_plots.seed_curves(results, ["train/loss"], variants, title),
                        "training loss")

    # ---- ranked tables
    ranked: dict[str, list[dict[str, Any]]] = {}
    if unranked:
        note = (f"Per-token loss is not ranked: {mixed_units}. Nats per token of different tokenizers are different "
                f"units, so the variants are ranked by bits per byte only; left out: {', '.join(unranked)}.")
        notes.append(note)
        summary["unranked"] = {"metrics": unranked, "reason": mixed_units}
    summary["ranked_by_bpb_only"] = mixed_units is not None
    if wanted:
        page.add("<h2>Ranked variants per metric (final step)</h2>", f"<p>{_noise_rule(k)} Ranked by the mean over "
                 "seeds: lower is better for loss and bpb, higher for accuracy and margin.</p>")
        if unranked:
            page.add(f"<p class=bad>{html.escape(note)}</p>")
        tables = {m: ranked_table(results, m, base_variant, k) for m in ranked_metrics}
        overview = [{"metric": m, "best": t["variant"][0], "best mean": t["mean"][0],
                     "beyond noise vs base": int(t["exceeds_seed_noise"].fill_null(False).sum()),
                     "within noise": int((~t["exceeds_seed_noise"]).fill_null(False).sum()),
                     "no estimate": int(t.filter(pl.col("diff_to_base").is_not_null())["exceeds_seed_noise"]
                                        .null_count())}
                    for m, t in tables.items()]
        page.add("<h3>Overview</h3>", html_table(pl.DataFrame(overview)))
        for metric, table in tables.items():
            page.add(f"<h3><code>{html.escape(metric)}</code></h3>", html_table(table, floats=4))
            ranked[metric] = table.to_dicts()
    summary["ranked"] = ranked

    # ---- signal
    signal: dict[str, Any] = {}
    if wanted:
        page.add("<h2>Which evals carry signal</h2>",
                 "<p>The four checks per eval over all runs (signal_table): monotonic in training (rho), variants "
                 "differ more than seeds (seed std vs variant spread), above random (margin over chance), stable "
                 "ranking of the variants over the last evaluations (tau). Trust an eval only when it passes all "
                 "four.</p>")
        tasks, task_notes = report_task_signal(results, chance, wanted)
        page.add("<h3>Downstream tasks</h3>")
        if tasks is not None:
            page.add("<p class=note>Chance: the accuracy of a random guess (given per task); for a margin, 0.</p>",
                     html_table(tasks, floats=4))
            signal["tasks"] = tasks.to_dicts()
        elif not any(m.startswith("task/") for m in present):
            page.add("<p class=note>No task metrics in these runs (set eval.tasks in the base to score them).</p>")
        bpb, bpb_notes = bpb_signal(results, vocab_sizes, wanted)
        page.add("<h3>Held-out bits per byte per source</h3>")
        if bpb is not None:
            page.add("<p class=note>Chance for a loss: a uniform guess over the vocabulary (ln V nats per token), in "
                     "bits per byte, per variant from its own vocabulary and tokens per byte (chance_per_variant); "
                     "chance is their mean over the final runs.</p>", html_table(bpb, floats=4))
            signal["bpb"] = bpb.to_dicts()
        for note in [*task_notes, *bpb_notes]:
            page.add(f"<p class=bad>{html.escape(note)}</p>")
        notes += task_notes + bpb_notes
    summary["signal"] = signal

    # ---- mixture axes
    mixing = mixture_axes(spec)
    summary["mixture_axes"] = mixing
    if mixing and wanted:
        shares = trained_shares(spec)
        page.add("<h2>Metrics against the trained share of each source</h2>",
                 f"<p>Mixture axes: {', '.join(f'<code>{html.escape(f)}</code>' for f in mixing)}. A source's share "
                 "in a run is the share of the tokens the run actually trained on that came from it (the last "
                 "logged tokens_by_source), whatever the schedule or policy did.</p>")
        per_source = "/bpb" if mixed_units else "/loss"  # a tokenizer axis too: per-token losses do not compare
        loss_metrics = [m for m in wanted if m.endswith(per_source) and m.split("/")[0] != "all"]
        task_metrics = [m for m in wanted if m.startswith("task/")]
        points = weight_points(results, shares, [*loss_metrics, *task_metrics], task_sources=task_sources(spec))
        loss_title = f"Held-out {'bpb' if mixed_units else 'loss'} vs the source's trained share"
        for key, chosen, title in (("weight_loss", loss_metrics, loss_title),
                                   ("weight_tasks", task_metrics, "Task metrics vs trained source shares")):
            mine = points.filter(pl.col("metric").is_in(chosen))
            if not mine.is_empty():
                page.figure(key, ablation_plots.metric_vs_weight(mine, variants, title), title)
        mean_shares = (shares.group_by("variant", "source").agg(pl.col("share").mean())
                       .pivot(on="source", index="variant", values="share").sort("variant"))
        page.add("<h3>Mean trained share per variant</h3>", html_table(mean_shares, floats=3))
        summary["trained_shares"] = shares.to_dicts()
        summary["weight_points"] = points.to_dicts()

    summary["images"] = {key: path.name for key, path in page.plots.items()}
    summary["notes"] = notes
    html_page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mixlab ablation {html.escape(spec.name)}"
                 f"</title><style>{REPORT_CSS}</style></head><body>{''.join(page.sections)}</body></html>")
    html_path = out / "report.html"
    html_path.write_text(html_page)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    return html_path


def report_ablation(spec: AblationSpec, out_dir: str | Path | None = None) -> Path:
    """What `mixlab ablate run|report` leave: the results table written, then the report with each task's
    chance level from the runs."""
    write_results(spec)
    return build_ablation_report(spec, out_dir=out_dir, chance=task_chance(spec))
