"""The ablation report's figures (matplotlib Agg): curves per variant with a band over seeds, and metrics against
the share of tokens a source actually got. Each function takes already-shaped polars frames and returns a
figure that `mixlab.ablations.plots.save_figure` writes; a variant keeps its colour (C0, C1, ...) in every figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from mixlab.ablations.plots import run_colour  # noqa: E402


def _grid(count: int, max_cols: int = 4, width: float = 3.4, height: float = 2.8) -> tuple[Figure, list]:
    """Small multiples: `count` panels in rows of at most `max_cols`; unused cells hidden."""
    cols = max(1, min(max_cols, count))
    rows = max(1, math.ceil(count / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(width * cols + 1.6, height * rows + 0.6), squeeze=False)
    panels = [grid[i // cols][i % cols] for i in range(rows * cols)]
    for ax in panels[count:]:
        ax.set_visible(False)
    return fig, panels[:count]


def colour_of(variants: Sequence[str]) -> dict[str, str]:
    """One colour per variant in the given order (the spec's: base first), shared by every figure."""
    return {v: run_colour(i) for i, v in enumerate(variants)}


def seed_curves(results: pl.DataFrame, metrics: Sequence[str], variants: Sequence[str], title: str,
                band: str = "minmax") -> Figure:
    """One panel per metric: per variant the mean over seeds against step (line) and the spread over seeds as
    a band: min-max (`band="minmax"`, honest with 2-3 seeds) or mean +- std (`band="std"`)."""
    if band not in ("minmax", "std"):
        raise ValueError(f"band={band!r}: choose 'minmax' or 'std'")
    colours = colour_of(variants)
    fig, panels = _grid(len(metrics))
    for ax, metric in zip(panels, metrics, strict=True):
        rows = results.filter(pl.col("metric") == metric)
        stats = (rows.group_by("variant", "step")
                 .agg(pl.col("value").mean().alias("mean"), pl.col("value").min().alias("lo"),
                      pl.col("value").max().alias("hi"), pl.col("value").std().fill_null(0.0).alias("std"),
                      pl.col("value").len().alias("n"))
                 .sort("step"))
        for variant in variants:
            mine = stats.filter(pl.col("variant") == variant)
            if mine.is_empty():
                continue
            steps, mean = mine["step"].to_numpy(), mine["mean"].to_numpy()
            lo, hi = ((mine["lo"].to_numpy(), mine["hi"].to_numpy()) if band == "minmax"
                      else (mean - mine["std"].to_numpy(), mean + mine["std"].to_numpy()))
            seeds = int(mine["n"].max())
            ax.plot(steps, mean, lw=1.3, marker="o" if len(steps) <= 12 else None, ms=3, color=colours[variant],
                    label=f"{variant} ({seeds} seed{'s' if seeds != 1 else ''})")
            if seeds > 1:
                ax.fill_between(steps, lo, hi, color=colours[variant], alpha=0.2, lw=0)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels() if panels else ([], [])
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="upper right")
    spread = "min-max over seeds" if band == "minmax" else "mean +- std over seeds"
    fig.suptitle(f"{title} (line: mean over seeds; band: {spread})", fontsize=10, x=0.01, ha="left")
    return fig


def metric_vs_weight(points: pl.DataFrame, variants: Sequence[str], title: str) -> Figure:
    """One panel per (metric, source) of `points` (columns variant, seed, metric, source, share, value): each
    seed a dot at (share of the source's trained tokens, final value), the variant means joined in order of
    share and labelled with the variant's name."""
    colours = colour_of(variants)
    keys = points.select("metric", "source").unique(maintain_order=True).rows()
    fig, panels = _grid(len(keys))
    for ax, (metric, source) in zip(panels, keys, strict=True):
        rows = points.filter((pl.col("metric") == metric) & (pl.col("source") == source))
        means = (rows.group_by("variant").agg(pl.col("share").mean(), pl.col("value").mean()).sort("share"))
        ax.plot(means["share"].to_list(), means["value"].to_list(), color="#888", lw=1.0, zorder=1)
        for variant in variants:
            mine = rows.filter(pl.col("variant") == variant)
            if mine.is_empty():
                continue
            ax.scatter(mine["share"].to_list(), mine["value"].to_list(), s=18, color=colours[variant], alpha=0.7,
                       label=variant, zorder=2)
            x, y = float(mine["share"].mean()), float(mine["value"].mean())
            ax.scatter([x], [y], marker="D", s=30, facecolor="none", edgecolor=colours[variant], zorder=3)
            ax.annotate(variant, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=colours[variant])
        ax.set_title(f"{metric} vs {source} share", fontsize=9)
        ax.set_xlabel(f"share of trained tokens from {source}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels() if panels else ([], [])
    if handles:
        fig.legend(handles, labels, fontsize=8, loc="upper right")
    fig.suptitle(f"{title} (dots: seeds; diamonds: variant means, joined by share)", fontsize=10, x=0.01,
                 ha="left")
    return fig
