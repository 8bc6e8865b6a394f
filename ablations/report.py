"""A report a person can read, for one run or several compared on one page: a summary row per run, training
curves (loss, LR, grad norm), per-source held-out curves with bootstrap intervals, the config keys that differ,
epochs per source, the mixture (realised vs target), the weight changes of an adaptive mixture policy (with their
causes) and the curation funnel that produced the data.

`report.html` is self-contained (plots embedded as base64 PNG data URIs), so it can be mailed alone; the PNGs are
also written next to it. The report reads only files (run directories through `RunRecord`, a manifest through
`ShardManifest`), so it works on any finished or running run, whichever backend wrote it.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
from mixlab.ablations import compare, plots
from mixlab.ablations.compare import curation_funnel, final_evals, with_interval
from mixlab.curation import ManifestError, ShardManifest
from mixlab.training import RunRecord
from mixlab.training.evaluate import position_losses

logger = logging.getLogger("mixlab.report")

REPORT_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
figure{margin:.8em 0}figcaption{color:#888;font-size:.8em}
.note{color:#666;font-size:.9em}.bad{color:#b00}
"""


@dataclass
class RunReport:
    """What `build_report` wrote: the HTML page, the PNG of each plot (also embedded in the page), the runs."""

    html_path: Path
    plots: dict[str, Path]
    run_ids: list[str] = field(default_factory=list)


class HtmlPage:
    """Sections of HTML plus the figures, each saved as PNG next to the page and embedded in it."""

    def __init__(self, out: Path):
        self.out = out
        self.sections: list[str] = []
        self.plots: dict[str, Path] = {}

    def add(self, *parts: str) -> None:
        self.sections.extend(parts)

    def figure(self, key: str, fig, alt: str, filename: str | None = None) -> None:
        path = self.out / (filename or f"{key}.png")
        png = plots.save_figure(fig, path)
        self.plots[key] = path
        data = base64.b64encode(png).decode("ascii")
        self.add(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'>"
                 f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def _cell(value: Any, floats: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{floats}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def html_table(frame: pl.DataFrame, floats: int = 4) -> str:
    if frame.is_empty():
        return "<p class=note>(nothing recorded)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v, floats)}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><tr>{head}</tr>{body}</table>"


def _load_manifest(directory: str | Path | None, problems: list[str]) -> ShardManifest | None:
    """The manifest a run trained on, or None; a manifest that is refused (hostile, corrupt, another schema) is
    named in `problems` and left out, so that it does not stop the report of the runs."""
    if directory and Path(directory).exists():
        try:
            return ShardManifest.load(directory)
        except ManifestError as err:
            logger.warning("report: leaving out the manifest in %s: %s", directory, err)
            problems.append(str(err))
    return None


def _manifest_dir(run: RunRecord, override: str | Path | None) -> str | Path | None:
    """The curated directory a run recorded (run.json's config is data: only a string counts as a path)."""
    data = run.config.get("data")
    for candidate in (override, run.config.get("manifest_dir"), data.get("curated") if isinstance(data, dict) else None):
        if isinstance(candidate, str | Path) and str(candidate):
            return candidate
    return None


def _last_eval(evals: list[dict], source: str = "all") -> dict[str, Any]:
    final = final_evals(evals)
    if final.is_empty():
        return {}
    rows = final.filter(pl.col("source") == source).to_dicts()
    return rows[0] if rows else {}


def _summary_rows(runs: list[RunRecord], labels: list[str]) -> pl.DataFrame:
    rows = []
    for run, label in zip(runs, labels, strict=True):
        metrics = run.metrics()
        final = _last_eval(run.evals())
        last_loss = metrics[-1].get("loss") if metrics else run.summary.get("final_loss")
        rows.append({
            "run": label,
            "status": run.display_status(),
            "step": f"{metrics[-1]['step'] if metrics else run.summary.get('step', 0):,} / "
                    f"{compare.run_total_steps(run):,}",
            "tokens": metrics[-1].get("tokens") if metrics else run.summary.get("tokens"),
            "params": run.summary.get("params"),
            "final train loss": last_loss,
            "eval step": final.get("step"),
            "eval loss (all) [95%]": with_interval(final, "loss"),
            "eval bpb (all) [95%]": with_interval(final, "bpb"),
            "tags": ", ".join(f"{k}={v}" for k, v in sorted(run.tags.items())),
        })
    return pl.DataFrame(rows)


def _final_eval_table(runs: list[RunRecord], labels: list[str]) -> pl.DataFrame:
    """Rows: source; per run a loss and a bpb column, each with its interval."""
    finals = {label: {r["source"]: r for r in final_evals(run.evals()).to_dicts()} for run, label in
              zip(runs, labels, strict=True)}
    sources = sorted({s for f in finals.values() for s in f}, key=lambda s: (s == "all", s))
    rows = []
    for source in sources:
        row: dict[str, Any] = {"source": source}
        for label, by_source in finals.items():
            prefix = f"{label}: " if len(finals) > 1 else ""
            entry = by_source.get(source, {})
            row[f"{prefix}loss [95%]"] = with_interval(entry, "loss")
            row[f"{prefix}bpb [95%]"] = with_interval(entry, "bpb")
            if len(finals) == 1:
                row["ppl"] = entry.get("ppl")
                row["eval tokens"] = entry.get("tokens")
        rows.append(row)
    return pl.DataFrame(rows)


def _position_table(runs: list[RunRecord], labels: list[str]) -> pl.DataFrame:
    """Rows: position span; a loss column per run (the final "all" eval row's buckets); empty without buckets."""
    losses = {label: {(lo, hi): loss for lo, hi, loss in position_losses(_last_eval(run.evals()))}
              for run, label in zip(runs, labels, strict=True)}
    spans = sorted({span for by_span in losses.values() for span in by_span})
    if not spans:
        return pl.DataFrame()
    return pl.DataFrame([{"positions": f"{lo}-{hi - 1}", **{label: by_span.get((lo, hi)) for label, by_span in
                                                           losses.items()}} for lo, hi in spans],
                        schema={"positions": pl.String, **dict.fromkeys(losses, pl.Float64)})


def _epochs_table(runs: list[RunRecord], labels: list[str], manifests: list[ShardManifest | None]) -> pl.DataFrame:
    served = [compare.served_tokens(run) for run in runs]
    sources = sorted({s for tokens in served for s in tokens})
    rows = []
    for label, tokens, manifest in zip(labels, served, manifests, strict=True):
        epochs = compare.epochs_per_source(tokens, manifest) if manifest is not None else {}
        rows.append({"run": label, **{s: epochs.get(s) for s in sources}})
    return pl.DataFrame(rows, schema={"run": pl.String, **dict.fromkeys(sources, pl.Float64)})


def _mixture_changes(run: RunRecord) -> list[dict[str, Any]]:
    """The run's mixture.jsonl rows that have an integer step and numeric weights; others are left out with a
    warning (the report never fails on one bad line of a run's logs)."""
    try:
        rows = run.mixture_changes()
    except ValueError as err:
        logger.warning("report: leaving out %s/mixture.jsonl: %s", run.path, err)
        return []
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)
            and isinstance(r.get("weights"), dict) and r["weights"]
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in r["weights"].values())]
    if len(good) < len(rows):
        logger.warning("report: %s/mixture.jsonl: left out %d rows without a step and numeric weights", run.path,
                       len(rows) - len(good))
    return sorted(good, key=lambda r: r["step"])


def _mixture_change_table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """One row per change: step, the weight of every source, the policy and the cause."""
    sources = sorted({s for r in rows for s in r.get("weights", {})})
    table = [{"step": r["step"], **{s: float(r["weights"].get(s, 0.0)) for s in sources},
              "policy": str(r.get("policy") or ""), "cause": str(r.get("cause", ""))} for r in rows]
    return pl.DataFrame(table, schema={"step": pl.Int64, **dict.fromkeys(sources, pl.Float64), "policy": pl.String,
                                       "cause": pl.String})


def _data_card_link(manifest: ShardManifest, out: Path) -> str:
    """A link to the curated dataset's data card (`card/README.md`: figures, funnel, dropped examples), relative to
    the report so that the two can move together; empty when the curated directory has no card."""
    from mixlab.curation.datacard import data_card_path

    try:
        card = data_card_path(manifest)
    except ManifestError:
        return ""  # a card/ symlink pointing outside: not linked
    if not card.is_file():
        return ""
    href = Path(os.path.relpath(card.resolve(), out.resolve())).as_posix()
    return (f"<p>Data card of the curated dataset (histograms, funnel per step, examples of dropped documents): "
            f"<a href='{html.escape(href, quote=True)}'>{html.escape(str(card))}</a></p>")


def _data_section(page: HtmlPage, manifest: ShardManifest, where: str) -> None:
    page.add("<h2>Data: curation funnel</h2>", f"<p class=note>From the manifest in {html.escape(where)}.</p>")
    page.add(_data_card_link(manifest, page.out))
    volumes = compare.source_volumes(manifest)
    if not volumes.is_empty():
        page.figure("funnel", plots.curation_volumes(volumes), "curation funnel in documents, bytes and tokens",
                    "curation.png")
    sources, steps, shares = compare.drop_shares(manifest)
    if steps:
        page.figure("funnel_drops", plots.drop_heatmap(sources, steps, shares),
                    "share of each curation step's input dropped, per source", "curation_drops.png")
    problems = manifest.check()
    page.add("<p>Counts add up for every source.</p>" if not problems
             else "<p class=bad>Accounting problems:<br>" + "<br>".join(map(html.escape, problems)) + "</p>")
    page.add(html_table(curation_funnel(manifest), floats=3))
    per_source = pl.DataFrame([
        {
            "source": n,
            "kind": s.kind,
            "docs": s.docs,
            "MB text": round(s.bytes / 1e6, 2),
            "train tokens": s.tokens.get("train", 0),
            "val tokens": s.tokens.get("val", 0),
            "quarantined": s.quarantined,
            "held-out near-dups in train": s.metadata_summary.get("held_out_leakage", {}).get(
                "val_near_duplicates_in_train"),
            "languages": ", ".join(f"{k}:{v}" for k, v in sorted(s.languages.items(), key=lambda kv: -kv[1])[:4]),
        }
        for n, s in sorted(manifest.sources.items())
    ])
    page.add("<h3>Sources</h3>", html_table(per_source, floats=2))


def build_report(runs: str | Path | RunRecord | Sequence[str | Path | RunRecord], out_dir: str | Path,
                 manifest_dir: str | Path | None = None) -> RunReport:
    """Takes one run (directory or RunRecord) or a list of them; writes a self-contained `report.html` (plus its
    PNGs) into `out_dir` comparing them. `manifest_dir` overrides the curated directory each run recorded."""
    records = compare.load_runs(runs)
    labels = compare.run_labels(records)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = HtmlPage(out)
    metrics = [run.metrics() for run in records]
    evals = [run.evals() for run in records]
    manifest_dirs = [_manifest_dir(run, manifest_dir) for run in records]
    loaded: dict[str, ShardManifest | None] = {}
    manifest_problems: list[str] = []
    for directory in manifest_dirs:
        if directory is not None and str(directory) not in loaded:
            loaded[str(directory)] = _load_manifest(directory, manifest_problems)
    manifests = [loaded.get(str(d)) if d is not None else None for d in manifest_dirs]

    # ---- header and summary
    if len(records) == 1:
        run = records[0]
        page.add(f"<h1>mixlab run <code>{html.escape(run.run_id)}</code></h1>",
                 f"<p>status: <b>{html.escape(run.display_status())}</b> · updated {html.escape(run.updated)}</p>")
    else:
        page.add(f"<h1>mixlab: {len(records)} runs compared</h1>",
                 "<p>" + " · ".join(f"<code>{html.escape(label)}</code>" for label in labels) + "</p>")
    page.add("<h2>Summary</h2>", html_table(_summary_rows(records, labels)))
    if len(records) == 1 and records[0].summary:
        def show(value) -> str:
            return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

        fields = [{"field": k, "value": show(v)} for k, v in records[0].summary.items() if not isinstance(v, dict | list)]
        page.add("<h3>Run details</h3>", html_table(pl.DataFrame(fields)))

    # ---- config differences
    if len(records) > 1:
        page.add("<h2>Config differences</h2>")
        diff = compare.config_differences({label: run.config for run, label in zip(records, labels, strict=True)})
        page.add("<p>Only the config keys whose values differ between the runs (flattened run.json config).</p>"
                 + html_table(diff) if not diff.is_empty()
                 else "<p>No config key differs between the runs (apart from the run id).</p>")

    # ---- training curves
    page.add("<h2>Training</h2>")
    if any(metrics):
        page.figure("loss", plots.training_curves(list(zip(labels, metrics, strict=True))),
                    "training loss, learning rate and gradient norm")
        for label, rows in zip(labels, metrics, strict=True):
            losses = [(m["step"], m["loss"]) for m in rows if isinstance(m.get("loss"), int | float)]
            if not losses:
                page.add(f"<p class=bad>{html.escape(label)}: no training loss recorded.</p>")
                continue
            (s0, first), (s1, last) = losses[0], losses[-1]
            trend = "went down" if last < first else "did NOT go down"
            page.add(f"<p>{html.escape(label)}: training loss {trend}: {first:.3f} at step {s0} → {last:.3f} at step "
                     f"{s1}.</p>")
    else:
        page.add("<p class=bad>No training metrics recorded.</p>")

    # ---- held-out evaluation
    page.add("<h2>Held-out evaluation per source</h2>")
    curves = [(label, compare.eval_curves(ev, m)) for label, ev, m in zip(labels, evals, metrics, strict=True)]
    if any(not frame.is_empty() for _, frame in curves):
        page.figure("eval_by_step", plots.eval_curves(curves, "step"), "held-out loss and bpb per source vs step")
        if any(not f.is_empty() and f["train_tokens"].is_not_nan().any() for _, f in curves):
            page.figure("eval_by_tokens", plots.eval_curves(curves, "train_tokens"),
                        "held-out loss and bpb per source vs training tokens")
        finals = [(label, final_evals(ev)) for label, ev in zip(labels, evals, strict=True)]
        page.figure("eval", plots.final_bpb_bars(finals), "final bits per byte per source", "eval_bpb.png")
        steps = ", ".join(f"{label}: step {f['step'][0]}" for label, f in finals if not f.is_empty())
        page.add(f"<p>Last evaluation ({html.escape(steps)}); brackets: 95% bootstrap interval over eval windows.</p>",
                 html_table(_final_eval_table(records, labels)))
        by_position = _position_table(records, labels)
        if not by_position.is_empty():
            page.add("<h3>Loss by position</h3><p>Held-out loss (all sources) of each span of target positions at the "
                     "last evaluation: after a context extension the late spans show whether the model uses the "
                     "longer context (their loss at or below the early ones) or fails past its old length.</p>",
                     html_table(by_position, floats=4))
    else:
        page.add("<p class=note>No evals recorded.</p>")

    # ---- epochs per source
    page.add("<h2>Epochs per source</h2>")
    for problem in manifest_problems:
        page.add(f"<p class=bad>Manifest left out: {html.escape(problem)}</p>")
    if any(m is not None for m in manifests):
        page.add("<p>Tokens served to the run / the source's train tokens: above 1 the run repeated that source's data."
                 "</p>", html_table(_epochs_table(records, labels, manifests), floats=3))
    else:
        page.add("<p class=note>No manifest found (give the curated directory) to relate tokens served to the data."
                 "</p>")

    # ---- mixture
    page.add("<h2>Mixture over training</h2>")
    panels = []
    for run, label, rows in zip(records, labels, metrics, strict=True):
        stages = (run.config.get("mixture") or {}).get("stages") or []
        targets = (compare.target_segments(stages, compare.run_total_steps(run), compare.stage_first_steps(rows))
                   if stages else pl.DataFrame())
        shares = compare.smoothed_mixture_shares(rows)
        if not shares.is_empty() or not targets.is_empty():
            panels.append((label, shares, targets))
    if panels:
        page.figure("mixture", plots.mixture(panels), "realised mixture vs target weights")
    schedules = [(label, run.config.get("mixture")) for run, label in zip(records, labels, strict=True)
                 if (run.config.get("mixture") or {}).get("stages")]
    distinct = {str(s): s for _, s in schedules}
    for label, schedule in schedules if len(distinct) > 1 else schedules[:1]:
        owner = f" of {html.escape(label)}" if len(distinct) > 1 else ""
        page.add(f"<p>Target weights per stage{owner}:</p>", html_table(compare.schedule_table(schedule), floats=3))

    # ---- adaptive mixture: every weight change a policy made, with its cause
    changes = [(label, _mixture_changes(run), compare.run_total_steps(run)) for run, label in
               zip(records, labels, strict=True)]
    changes = [(label, rows, end) for label, rows, end in changes if rows]
    if changes:
        page.add("<h2>Adaptive mixture</h2>",
                 "<p>Sampling weights as the run's mixture policy set them (mixture.jsonl): each change holds from "
                 "its step until the next one.</p>")
        page.figure("mixture_weights", plots.mixture_weights(changes), "mixture weights over the run, per change")
        for label, rows, _ in changes:
            owner = f" of {html.escape(label)}" if len(changes) > 1 else ""
            page.add(f"<p>Weight changes{owner} ({len(rows)}):</p>", html_table(_mixture_change_table(rows), floats=3))

    # ---- data
    first = next(((d, m) for d, m in zip(manifest_dirs, manifests, strict=True) if m is not None), None)
    if first is not None:
        _data_section(page, first[1], str(first[0]))
        if len({str(d) for d, m in zip(manifest_dirs, manifests, strict=True) if m is not None}) > 1:
            page.add("<p class=note>The runs trained on different curated directories; the funnel shows the first.</p>")

    title = records[0].run_id if len(records) == 1 else " vs ".join(labels)
    html_page = (f"<!doctype html><html><head><meta charset='utf-8'><title>mixlab {html.escape(title)}</title>"
                 f"<style>{REPORT_CSS}</style></head><body>{''.join(page.sections)}</body></html>")
    html_path = out / "report.html"
    html_path.write_text(html_page)
    return RunReport(html_path=html_path, plots=page.plots, run_ids=[r.run_id for r in records])
