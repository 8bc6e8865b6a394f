"""The report's figures (matplotlib Agg): each function takes already-shaped data and returns a closed-over
figure that `save_figure` writes as PNG; one colour per run (C0, C1, ...) across all comparison plots."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save_figure(fig: Figure, path: Path) -> bytes:
    """Write the figure as PNG to `path` and return the PNG bytes (the HTML embeds them)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.read_bytes()


def run_colour(i: int) -> str:
    return f"C{i % 10}"


def _source_colours(sources: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(sources) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(sorted(sources))}


def _legend_outside(ax, **kw) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)


def training_curves(runs: list[tuple[str, list[dict]]]) -> Figure:
    """Train loss, learning rate and grad norm against step, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, (label, metrics) in enumerate(runs):
        steps = [m["step"] for m in metrics]
        for ax, field in zip(axes, ("loss", "lr", "grad_norm"), strict=True):
            values = [m.get(field) for m in metrics]
            points = [(s, v) for s, v in zip(steps, values, strict=True)
                      if isinstance(v, int | float) and math.isfinite(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, lw=1.2, color=run_colour(i), label=label)
    for ax, title, ylabel in zip(axes, ("Training loss", "Learning rate", "Gradient norm (before clipping)"),
                                 ("loss (nats/token)", "lr", "grad norm"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def eval_curves(curves: list[tuple[str, pl.DataFrame]], x: str) -> Figure:
    """Held-out loss (top row) and bits per byte (bottom row) per source (columns) against `x` ("step" or
    "train_tokens"), one colour per run, the bootstrap interval as a band."""
    sources = sorted({s for _, frame in curves if not frame.is_empty() for s in frame["source"].unique()},
                     key=lambda s: (s == "all", s))
    ncols = min(4, max(1, len(sources)))
    groups = -(-len(sources) // ncols) or 1
    fig, grid = plt.subplots(2 * groups, ncols, figsize=(3.3 * ncols + 1.5, 2.9 * 2 * groups), squeeze=False)
    # source k: loss panel in row 2*(k // ncols), bpb panel right below it
    panels = {s: (grid[2 * (k // ncols)][k % ncols], grid[2 * (k // ncols) + 1][k % ncols])
              for k, s in enumerate(sources)}
    for k in range(len(sources), groups * ncols):
        grid[2 * (k // ncols)][k % ncols].set_visible(False)
        grid[2 * (k // ncols) + 1][k % ncols].set_visible(False)
    for i, (label, frame) in enumerate(curves):
        if frame.is_empty():
            continue
        for source in sources:
            sub = frame.filter(pl.col("source") == source).sort("step")
            if sub.is_empty():
                continue
            xs = sub[x].to_numpy()
            for ax, metric in zip(panels[source], ("loss", "bpb"), strict=True):
                ax.plot(xs, sub[metric].to_numpy(), marker="o", ms=3, lw=1.3, color=run_colour(i), label=label)
                lo = sub[f"{metric}_lo"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
                hi = sub[f"{metric}_hi"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
                ok = np.isfinite(lo) & np.isfinite(hi)
                if ok.any():
                    ax.fill_between(xs[ok], lo[ok], hi[ok], color=run_colour(i), alpha=0.2, lw=0)
    xlabel = "step" if x == "step" else "training tokens"
    for source, (loss_ax, bpb_ax) in panels.items():
        loss_ax.set_title(f"{source}" + (" (token-weighted)" if source == "all" else ""))
        loss_ax.set_ylabel("eval loss (nats/token)", fontsize=8)
        bpb_ax.set_ylabel("bits per byte", fontsize=8)
        bpb_ax.set_xlabel(xlabel)
        for ax in (loss_ax, bpb_ax):
            ax.grid(alpha=0.3)
    handles, labels = grid[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(f"Held-out loss and bits per byte by source vs {xlabel} (band: 95% bootstrap interval)", fontsize=10)
    return fig


def final_bpb_bars(finals: list[tuple[str, pl.DataFrame]]) -> Figure:
    """Final held-out bits per byte per source, grouped bars (one per run) with the interval as error bars."""
    sources = sorted({s for _, f in finals if not f.is_empty() for s in f["source"].to_list()},
                     key=lambda s: (s == "all", s))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(sources) * max(1, len(finals)) ** 0.5 + 3), 3.8))
    width = 0.8 / max(1, len(finals))
    for i, (label, frame) in enumerate(finals):
        if frame.is_empty() or "bpb" not in frame.columns:
            continue
        by_source = {r["source"]: r for r in frame.iter_rows(named=True)}
        xs, ys, err = [], [], [[], []]
        for j, source in enumerate(sources):
            row = by_source.get(source)
            if row is None or row.get("bpb") is None:
                continue
            xs.append(j + (i - (len(finals) - 1) / 2) * width)
            ys.append(row["bpb"])
            lo, hi = row.get("bpb_lo"), row.get("bpb_hi")
            has = isinstance(lo, float) and isinstance(hi, float) and math.isfinite(lo) and math.isfinite(hi)
            err[0].append(row["bpb"] - lo if has else 0.0)
            err[1].append(hi - row["bpb"] if has else 0.0)
        ax.bar(xs, ys, width=width, color=run_colour(i), label=label, yerr=err, capsize=3)
    ax.set_xticks(range(len(sources)), sources, rotation=20)
    ax.set_ylabel("bits per byte")
    ax.set_title("Final held-out bits per byte by source (lower is better; bars: 95% bootstrap interval)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    return fig


def mixture(panels: list[tuple[str, pl.DataFrame, pl.DataFrame]]) -> Figure:
    """Per run: realised token shares per source (smoothed, solid) and the schedule's targets (dashed steps),
    with stage boundaries as vertical lines."""
    sources = sorted({c for _, shares, targets in panels for frame in (shares, targets) for c in frame.columns
                      if c not in ("step", "stage", "start", "end")})
    colours = _source_colours(sources)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (label, shares, targets) in zip(axes[:, 0], panels, strict=True):
        for source in sources:
            if not shares.is_empty() and source in shares.columns:
                ax.plot(shares["step"].to_list(), shares[source].to_list(), color=colours[source], lw=1.6,
                        label=source)
            if not targets.is_empty() and source in targets.columns:
                xs = [*targets["start"].to_list(), targets["end"].to_list()[-1]]
                ys = [*targets[source].to_list(), targets[source].to_list()[-1]]
                ax.step(xs, ys, where="post", color=colours[source], ls="--", lw=1.1)
        if not targets.is_empty():
            for row in targets.iter_rows(named=True):
                if row["start"] > 0:
                    ax.axvline(row["start"], color="#888", lw=0.8, ls=":")
                ax.text(row["start"], 1.0, f" {row['stage']}", va="top", fontsize=8, color="#555")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"{label}: mixture over training (solid: realised, moving window; dashed: target weights)")
        ax.grid(alpha=0.3)
        ax.plot([], [], color="#444", lw=1.6, label="realised (solid)")
        ax.plot([], [], color="#444", lw=1.1, ls="--", label="target (dashed)")
        _legend_outside(ax, ncol=1)
    return fig


def curation_volumes(volumes: pl.DataFrame) -> Figure:
    """The funnel per source in documents, bytes and tokens: raw vs kept documents, raw vs kept text bytes,
    train and val tokens."""
    names = volumes["source"].to_list()
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    axes[0].bar(x - 0.2, volumes["raw docs"].to_list(), 0.4, color="#bbb", label="read")
    axes[0].bar(x + 0.2, volumes["kept docs"].to_list(), 0.4, color="C0", label="kept")
    axes[0].set_ylabel("documents (log scale)")
    axes[0].set_yscale("log")  # small sources stay visible next to big ones
    axes[0].set_title("Documents read → kept")
    raw_mb = [v / 1e6 if v is not None else 0.0 for v in volumes["raw bytes"].to_list()]
    axes[1].bar(x - 0.2, raw_mb, 0.4, color="#bbb", label="raw (as fetched)")
    axes[1].bar(x + 0.2, [v / 1e6 for v in volumes["kept text bytes"].to_list()], 0.4, color="C1",
                label="kept text (UTF-8)")
    axes[1].set_ylabel("MB")
    axes[1].set_title("Bytes: raw → kept text")
    train, val = volumes["train tokens"].to_list(), volumes["val tokens"].to_list()
    axes[2].bar(x, train, 0.6, color="C2", label="train")
    axes[2].bar(x, val, 0.6, bottom=train, color="C3", label="val (held out)")
    axes[2].set_ylabel("tokens")
    axes[2].set_title("Tokens per split")
    for ax in axes:
        ax.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return fig


def drop_heatmap(sources: list[str], steps: list[str], shares: np.ndarray) -> Figure:
    """Share of each step's input documents that the step dropped, per source (grey: the source has no such step)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(steps) + 3), 0.5 * len(sources) + 2))
    masked = np.ma.masked_invalid(shares)
    cmap = plt.get_cmap("Reds").with_extremes(bad="#eee")
    image = ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(0.05, float(np.nanmax(shares)) if shares.size else 1.0),
                      aspect="auto")
    for i in range(len(sources)):
        for j in range(len(steps)):
            if np.isfinite(shares[i, j]):
                dark = shares[i, j] > 0.6 * image.get_clim()[1]
                ax.text(j, i, f"{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    ax.set_xticks(range(len(steps)), steps, rotation=25, ha="right")
    ax.set_yticks(range(len(sources)), sources)
    ax.set_title("Curation: share of each step's input documents dropped")
    fig.colorbar(image, ax=ax, label="dropped / docs in")
    return fig


def mixture_weights(panels: list[tuple[str, list[dict], int]]) -> Figure:
    """Per run: the sampling weights over the run from its mixture.jsonl rows (step, weights, cause), drawn as
    steps (each row holds until the next one), up to the run's last step; markers show where a change came from
    a policy (dots) or the schedule (squares)."""
    sources = sorted({s for _, rows, _ in panels for r in rows for s in r["weights"]})
    colours = _source_colours(sources)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (label, rows, end) in zip(axes[:, 0], panels, strict=True):
        steps = [r["step"] for r in rows]
        xs = [*steps, max(end, steps[-1])]
        for source in sources:
            ys = [r["weights"].get(source, 0.0) for r in rows]
            ax.step(xs, [*ys, ys[-1]], where="post", color=colours[source], lw=1.5, label=source)
            policy_rows = [(r["step"], y) for r, y in zip(rows, ys, strict=True)
                           if not str(r.get("cause", "")).startswith(("schedule", "start"))]
            if policy_rows:
                ax.plot(*zip(*policy_rows, strict=True), "o", ms=3, color=colours[source])
            schedule_rows = [(r["step"], y) for r, y in zip(rows, ys, strict=True)
                             if str(r.get("cause", "")).startswith("schedule")]
            if schedule_rows:
                ax.plot(*zip(*schedule_rows, strict=True), "s", ms=4, color=colours[source])
        policies = sorted({str(r["policy"]) for r in rows if r.get("policy")})
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("sampling weight")
        ax.set_title(f"{label}: mixture weights over the run ({', '.join(policies) or 'no policy'}; dots: policy "
                     "decisions, squares: schedule stages)")
        ax.grid(alpha=0.3)
        _legend_outside(ax, ncol=1)
    return fig
