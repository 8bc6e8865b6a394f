"""Console summaries of a manifest, shared by the CLI and the recipes."""

from __future__ import annotations

from mixlab.curation import LeakageReport, ShardManifest


def curation_lines(manifest: ShardManifest) -> list[str]:
    """One line per source: documents read, kept, text size, quarantined."""
    lines = []
    for name, src in sorted(manifest.sources.items()):
        read = src.steps[0].docs_in if src.steps else src.docs
        lines.append(f"  {name:14s} {read:7,d} docs read → {src.docs:7,d} kept  {src.bytes / 1e6:7.2f} MB text  "
                     f"quarantined {src.quarantined}")
    return lines


def token_lines(manifest: ShardManifest) -> list[str]:
    """One line per tokenized source: train and held-out tokens."""
    return [f"  {name:14s} train {src.tokens.get('train', 0):>11,d}  val {src.tokens.get('val', 0):>9,d} tokens"
            for name, src in sorted(manifest.sources.items()) if src.tokens]


def leakage_lines(report: LeakageReport) -> list[str]:
    """Sources whose held-out documents have near-duplicates in training, or one line saying none do."""
    lines = [f"  {name:14s} {report.leaked[name]} of {report.checked[name]} held-out docs have a near-duplicate in "
            f"training (e.g. {report.examples[name][0]})" for name in sorted(report.leaked) if report.leaked[name]]
    return lines or ["  held-out documents: no near-duplicate in any training split"]
