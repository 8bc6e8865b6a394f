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
from mixlab.ablations.launch import LocalLauncher, ProxyRun, proxy_runs, run_ablation
from mixlab.ablations.report import RunReport, build_report
from mixlab.ablations.results import ablation_results, write_results
from mixlab.ablations.signal import TaskSignal, signal_table, task_signal
from mixlab.ablations.spec import AblationSpec, AblationSpecError, AblationVariant, Axis

__all__ = [
    "ablation_results",
    "write_results",
    "LocalLauncher",
    "ProxyRun",
    "TaskSignal",
    "proxy_runs",
    "run_ablation",
    "signal_table",
    "task_signal",
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
