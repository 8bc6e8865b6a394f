"""The data card's figures (matplotlib, Agg backend): each takes already-counted data (per source) and writes
one PNG. Imported only when a card is drawn, so that loading or saving a manifest without one stays light."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

LANGUAGES_PLOTTED = 8  # the most frequent languages over all sources; the rest is "other"


def save_png(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
    return path


def _colours(sources: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(sources) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(sorted(sources))}


def _legend(ax) -> None:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def language_bars(languages: Mapping[str, Mapping[str, int]]) -> Figure:
    """Documents per language, one stacked horizontal bar per source."""
    totals: dict[str, int] = {}
    for counts in languages.values():
        for lang, n in counts.items():
            totals[lang] = totals.get(lang, 0) + n
    top = [lang for lang, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:LANGUAGES_PLOTTED]]
    shown = top + (["other"] if len(totals) > len(top) else [])
    sources = sorted(languages)
    docs = np.array([max(sum(languages[s].values()), 1) for s in sources], dtype=float)
    labels = [f"{s} ({int(sum(languages[s].values())):,})" for s in sources]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(sources) + 1.4))
    left = np.zeros(len(sources))
    cmap = plt.get_cmap("tab10" if len(shown) <= 10 else "tab20")
    for i, lang in enumerate(shown):
        values = np.array([sum(n for lg, n in languages[s].items() if lg not in top) if lang == "other"
                           else languages[s].get(lang, 0) for s in sources], dtype=float) / docs
        ax.barh(labels, values, left=left, label=lang, color=cmap(i % cmap.N))
        left += values
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the source's documents (documents in brackets)")
    ax.set_title("Documents per language")
    ax.invert_yaxis()
    _legend(ax)
    return fig


def length_histogram(edges: Sequence[float], counts: Mapping[str, Sequence[int]]) -> Figure:
    """Document length (characters, log axis): the share of each source's documents per bin, one step line per
    source over the shared bins (shares, so that a small source is as visible as a large one)."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    colours = _colours(list(counts))
    used = [i for i in range(len(edges) - 1) if any(values[i] for values in counts.values())]
    for source, values in sorted(counts.items()):
        total = max(sum(values), 1)
        ax.stairs([v / total for v in values], edges, label=f"{source} ({sum(values):,})", color=colours[source],
                  linewidth=1.4)
    ax.set_xscale("log")
    if used:
        ax.set_xlim(edges[used[0]], edges[used[-1] + 1])
    ax.set_xlabel("characters per document")
    ax.set_ylabel("share of documents")
    ax.set_title("Document length")
    _legend(ax)
    return fig


def score_histograms(edges: Sequence[float], scores: Mapping[str, Mapping[str, Sequence[int]]]) -> Figure:
    """One panel per `*_score` field: the share of each source's documents per score bin."""
    fields = sorted(scores)
    fig, axes = plt.subplots(len(fields), 1, figsize=(8, 2.8 * len(fields)), squeeze=False)
    colours = _colours(sorted({s for by_source in scores.values() for s in by_source}))
    for ax, name in zip(axes[:, 0], fields, strict=True):
        for source, values in sorted(scores[name].items()):
            total = max(sum(values), 1)
            ax.stairs([v / total for v in values], edges, label=source, color=colours[source], linewidth=1.4)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel(name)
        ax.set_ylabel("share of documents")
        ax.set_title(f"{name} distribution")
        _legend(ax)
    return fig


def cluster_histograms(clusters: Mapping[str, Mapping[str, Mapping[int, int]]]) -> Figure:
    """One panel per cluster-size field (`dup_cluster_size`, `exact_cluster_size`): documents per cluster size,
    log-log, one line per source."""
    fields = sorted(clusters)
    fig, axes = plt.subplots(len(fields), 1, figsize=(8, 2.8 * len(fields)), squeeze=False)
    colours = _colours(sorted({s for by_source in clusters.values() for s in by_source}))
    for ax, name in zip(axes[:, 0], fields, strict=True):
        for source, histogram in sorted(clusters[name].items()):
            sizes = sorted(histogram)
            ax.plot(sizes, [histogram[k] for k in sizes], marker="o", markersize=3, label=source,
                    color=colours[source])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{name} (1 = unique)")
        ax.set_ylabel("kept documents")
        ax.set_title(f"{name}: documents per duplicate-cluster size")
        _legend(ax)
    return fig


def funnel_chart(funnels: Mapping[str, Sequence[tuple[str, int, int]]]) -> Figure:
    """Every source's steps (top to bottom, one axes: many small panels draw slowly): the documents each step kept
    and dropped, as shares of what the source's first step read, so that small sources are as readable."""
    labels: list[str] = []
    kept: list[float] = []
    dropped: list[float] = []
    for source in sorted(funnels):
        steps = funnels[source]
        first = max(steps[0][1], 1) if steps else 1
        for name, docs_in, docs_kept in steps:
            labels.append(f"{source} · {name}")
            kept.append(docs_kept / first)
            dropped.append((docs_in - docs_kept) / first)
        labels.append("")
        kept.append(0.0)
        dropped.append(0.0)
    rows = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 0.17 * len(labels) + 1.2))
    ax.barh(rows, kept, color="tab:green", label="kept")
    ax.barh(rows, dropped, left=kept, color="tab:red", label="dropped")
    ax.set_yticks(rows, labels, fontsize=6)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the documents the source's first step read")
    ax.set_title("Curation funnel per source and step")
    ax.legend(fontsize=7, loc="lower right")
    return fig
