"""Ablations: specs of proxy runs to compare, and reports on runs (tables, plots, noise)."""

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
from mixlab.ablations.spec import AblationSpec, AblationSpecError, AblationVariant, Axis

__all__ = [
    "AblationSpec",
    "AblationSpecError",
    "AblationVariant",
    "Axis",
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
