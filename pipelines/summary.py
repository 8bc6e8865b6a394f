"""Console summaries of a manifest, shared by the CLI and the recipes."""

from __future__ import annotations

from pathlib import Path

from mixlab.curation import LeakageReport, ShardManifest, SourceEntry

TOP_DROP_REASONS = 3  # drop reasons an empty source's line names


def source_line(entry: SourceEntry, seconds: float | None = None, note: str = "") -> str:
    """One source: documents read → kept, text MB, quarantined, seconds; an empty source says why."""
    read = entry.steps[0].docs_in if entry.steps else entry.docs
    line = (f"  {entry.name:14s} {read:7,d} docs read → {entry.docs:7,d} kept  {entry.bytes / 1e6:7.2f} MB text  "
            f"quarantined {entry.quarantined}")
    if seconds is not None:
        line += f"  {seconds:6.1f} s"
    if entry.docs == 0 and read > 0:
        line += f"  WARNING: empty source, {empty_reason(entry)}"
    return line + (f"  ({note})" if note else "")


def empty_reason(entry: SourceEntry) -> str:
    """Which steps dropped the documents of a source, with their main reasons."""
    parts = []
    for step in entry.steps:
        if step.dropped_total:
            top = sorted(step.dropped.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_DROP_REASONS]
            parts.append(f"{step.name} dropped {step.dropped_total} ({', '.join(f'{r} {n}' for r, n in top)})")
    return "; ".join(parts) or "no step kept a document"


def token_lines(manifest: ShardManifest) -> list[str]:
    """One line per tokenized source: train and held-out tokens."""
    return [f"  {name:14s} train {src.tokens.get('train', 0):>11,d}  val {src.tokens.get('val', 0):>9,d} tokens"
            for name, src in sorted(manifest.sources.items()) if src.tokens]


def leakage_lines(report: LeakageReport) -> list[str]:
    """Sources whose held-out documents have near-duplicates in training, or one line saying none do."""
    lines = [f"  {name:14s} {report.leaked[name]} of {report.checked[name]} held-out docs have a near-duplicate in "
            f"training (e.g. {report.examples[name][0]})" for name in sorted(report.leaked) if report.leaked[name]]
    return lines or ["  held-out documents: no near-duplicate in any training split"]


def train_summary_lines(summary: dict, status: str, run_path: Path) -> list[str]:
    """A few lines a person reads at the end of `mixlab train` (`--json` gives the whole summary)."""
    step, total = summary.get("step", 0), summary.get("total_steps", "?")
    tokens, seconds = summary.get("tokens") or 0, summary.get("train_time_s") or 0.0
    speed = f", {tokens / seconds:,.0f} tokens/s" if seconds else ""
    if seconds and summary.get("mfu"):
        speed += f" (MFU {summary['mfu']:.1%})"
    lines = [f"run {run_path.name}: {status} at step {step}/{total}, {tokens / 1e6:.2f}M tokens in {seconds:.0f} s{speed}"]
    if summary.get("params"):
        model = f"  model: {summary['params'] / 1e6:.2f}M parameters"
        if summary.get("activation_ratio") is not None and summary["activation_ratio"] < 1:
            model += (f", {summary['active_params'] / 1e6:.2f}M active per token (activation ratio "
                      f"{summary['activation_ratio']:.2f} of the non-embedding parameters)")
        lines.append(model)
    parts = []
    if summary.get("final_loss") is not None:
        parts.append(f"train loss {summary['final_loss']:.4f}")
    overall = summary.get("eval", {}).get("all")
    if overall:
        interval = (f" [{overall['loss_lo']:.3f}, {overall['loss_hi']:.3f}]"
                    if overall.get("loss_lo") is not None else "")
        parts.append(f"held-out loss {overall['loss']:.4f}{interval}, {overall['bpb']:.4f} bits/byte")
    if parts:
        lines.append("  " + " · ".join(parts))
    if summary.get("stopped_by"):
        lines.append(f"  stopped by {summary['stopped_by']} with a checkpoint at step {step}: run the same command "
                     "again to resume")
    lines.append(f"  run directory: {run_path}   (report: mixlab report {run_path})")
    return lines
