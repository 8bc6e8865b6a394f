"""Ablations: compare runs and report on them (tables, plots, noise)."""

from mixlab.ablations.compare import (
    config_differences,
    curation_funnel,
    epochs_per_source,
    final_evals,
    flatten_config,
    mixture_shares,
    select_runs,
    smoothed_mixture_shares,
    target_segments,
)
from mixlab.ablations.report import RunReport, build_report

__all__ = [
    "RunReport",
    "build_report",
    "config_differences",
    "curation_funnel",
    "epochs_per_source",
    "final_evals",
    "flatten_config",
    "mixture_shares",
    "select_runs",
    "smoothed_mixture_shares",
    "target_segments",
]
