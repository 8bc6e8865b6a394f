"""A run report a person can read: loss curve, per-source eval, the mixture over training, and the
curation funnel that produced the data. Written as `report.html` plus PNG plots next to it.

The report reads only files (a run directory through `RunRecord`, and optionally a shard manifest), so
it works on any finished or running run, whichever backend wrote it.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from mixlab.curation import ShardManifest  # noqa: E402
from mixlab.training import RunRecord  # noqa: E402

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.note{color:#666;font-size:.9em}.bad{color:#b00}
"""


@dataclass
class RunReport:
    """Paths of what `build_report` wrote."""

    html_path: Path
    plots: dict[str, Path]


# ---- data shaping (pure functions: tested directly) ------------------------------------------
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


def schedule_table(schedule: dict) -> pl.DataFrame:
    """Target weights as a table: one row per source, one column per stage (normalised)."""
    stages = schedule.get("stages", [])
    sources = sorted({s for st in stages for s in st["weights"]})
    rows = []
    for source in sources:
        row = {"source": source}
        for st in stages:
            total = sum(st["weights"].values()) or 1.0
            row[f"{st['name']} ({st['fraction']:.0%})"] = st["weights"].get(source, 0.0) / total
        rows.append(row)
    return pl.DataFrame(rows)


def final_evals(evals: list[dict]) -> pl.DataFrame:
    """The eval rows of the last evaluated step, one per source."""
    if not evals:
        return pl.DataFrame()
    frame = pl.DataFrame(evals)
    last = frame["step"].max()
    return frame.filter(pl.col("step") == last).sort("source")


def curation_funnel(manifest: ShardManifest) -> pl.DataFrame:
    """One row per (source, step): documents in, kept, dropped, and the reasons."""
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
                    "reasons": reasons,
                }
            )
    return pl.DataFrame(rows)


# ---- plots ---------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_loss(metrics: list[dict], evals: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, lw=1, alpha=0.8, label="train loss")
    if evals:
        frame = pl.DataFrame(evals)
        for source in sorted(frame["source"].unique()):
            sub = frame.filter(pl.col("source") == source).sort("step")
            style = {"lw": 2.2, "color": "black"} if source == "all" else {"lw": 1, "ls": "--"}
            ax.plot(sub["step"], sub["loss"], marker="o", ms=3, label=f"eval {source}", **style)
    # shade the data stages so that a loss change at a stage switch is visible
    stage_starts = []
    last_stage = None
    for m in metrics:
        if m.get("stage") != last_stage:
            stage_starts.append((m["step"], m.get("stage")))
            last_stage = m.get("stage")
    for i, (start, stage) in enumerate(stage_starts):
        end = stage_starts[i + 1][0] if i + 1 < len(stage_starts) else (metrics[-1]["step"] if metrics else start)
        ax.axvspan(start, end, color=f"C{i}", alpha=0.06)
        if stage:
            ax.text(start, ax.get_ylim()[1], f" {stage}", va="top", fontsize=8, color="#555")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training and held-out loss")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _plot_mixture(shares: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 3.8))
    sources = [c for c in shares.columns if c != "step"]
    ax.stackplot(shares["step"].to_list(), *[shares[s].to_list() for s in sources], labels=sources, alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("share of tokens")
    ax.set_title("Mixture over training (realised token shares per source)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def _plot_eval_bars(frame: pl.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(frame["source"].to_list(), frame["bpb"].to_list(), color="C2")
    ax.set_ylabel("bits per byte")
    ax.set_title("Held-out bits per byte by source (lower is better)")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def _plot_funnel(manifest: ShardManifest, path: Path) -> Path:
    names = sorted(manifest.sources)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    first_in = [manifest.sources[n].steps[0].docs_in if manifest.sources[n].steps else 0 for n in names]
    kept = [manifest.sources[n].docs for n in names]
    ax.bar(names, first_in, color="#ccc", label="raw documents")
    ax.bar(names, kept, color="C0", label="kept after curation")
    ax.set_ylabel("documents")
    ax.set_title("Curation: documents in and kept per source")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---- HTML ----------------------------------------------------------------------------------
def _table(frame: pl.DataFrame, floats: int = 4) -> str:
    if frame.is_empty():
        return "<p class=note>(nothing recorded)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = []
    for row in frame.iter_rows():
        cells = []
        for value in row:
            if value is None:
                text = "–"
            elif isinstance(value, float):
                text = f"{value:.{floats}f}"
            elif isinstance(value, int):
                text = f"{value:,}"
            else:
                text = html.escape(str(value))
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def build_report(run_dir: str | Path, out_dir: str | Path, manifest_dir: str | Path | None = None) -> RunReport:
    """Write `report.html` and its plots for one run into `out_dir`."""
    run = RunRecord.load(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, evals = run.metrics(), run.evals()
    plots: dict[str, Path] = {}
    sections: list[str] = []

    summary = run.summary or {}
    sections.append(
        f"<h1>mixlab run <code>{html.escape(run.run_id)}</code></h1>"
        f"<p>status: <b>{html.escape(run.status)}</b> · updated {html.escape(run.updated)}</p>"
    )
    if summary:
        def show(value) -> str:
            return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

        rows = [{"field": k, "value": show(v)} for k, v in summary.items() if not isinstance(v, dict | list)]
        sections.append("<h2>Summary</h2>" + _table(pl.DataFrame(rows)))

    sections.append("<h2>Loss</h2>")
    if metrics:
        plots["loss"] = _plot_loss(metrics, evals, out / "loss.png")
        first, last = metrics[0].get("loss"), metrics[-1].get("loss")
        trend = "went down" if first is not None and last is not None and last < first else "did NOT go down"
        sections.append(
            f"<img src='loss.png' alt='loss curve'><p>Training loss {trend}: "
            f"{first:.3f} at step {metrics[0]['step']} → {last:.3f} at step {metrics[-1]['step']}.</p>"
        )
    else:
        sections.append("<p class=bad>No training metrics recorded.</p>")

    sections.append("<h2>Held-out evaluation per source</h2>")
    final = final_evals(evals)
    if not final.is_empty():
        cols = [c for c in ("source", "loss", "bpb", "ppl", "tokens") if c in final.columns]
        table = final.select(cols)
        if "bpb" in final.columns:
            plots["eval"] = _plot_eval_bars(final.filter(pl.col("source") != "all"), out / "eval_bpb.png")
            sections.append("<img src='eval_bpb.png' alt='bits per byte per source'>")
        sections.append(f"<p>At step {final['step'][0]}:</p>" + _table(table))
    else:
        sections.append("<p class=note>No evals recorded.</p>")

    sections.append("<h2>Mixture over training</h2>")
    shares = mixture_shares(metrics, max_points=40)
    if not shares.is_empty():
        plots["mixture"] = _plot_mixture(shares, out / "mixture.png")
        sections.append("<img src='mixture.png' alt='mixture over training'>")
    schedule = run.config.get("mixture")
    if schedule and schedule.get("stages"):
        sections.append("<p>Target weights per stage:</p>" + _table(schedule_table(schedule), floats=3))

    manifest_dir = manifest_dir or run.config.get("manifest_dir")
    if manifest_dir and Path(manifest_dir).exists():
        manifest = ShardManifest.load(manifest_dir)
        sections.append("<h2>Data: curation funnel</h2>")
        plots["funnel"] = _plot_funnel(manifest, out / "curation.png")
        sections.append("<img src='curation.png' alt='curation funnel'>")
        problems = manifest.check()
        sections.append(
            "<p>Counts add up for every source.</p>"
            if not problems
            else "<p class=bad>Accounting problems:<br>" + "<br>".join(map(html.escape, problems)) + "</p>"
        )
        sections.append(_table(curation_funnel(manifest)))
        per_source = pl.DataFrame(
            [
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
            ]
        )
        sections.append("<h3>Sources</h3>" + _table(per_source, floats=2))

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>mixlab {html.escape(run.run_id)}</title><style>{_CSS}</style></head><body>{''.join(sections)}</body></html>"
    html_path = out / "report.html"
    html_path.write_text(page)
    return RunReport(html_path=html_path, plots=plots)
