"""Ablations: specs of proxy runs to compare, and reports on runs (tables, plots, noise)."""

from mixlab.ablations.ablation_report import (
    bpb_chance_levels,
    build_ablation_report,
    exceeds_seed_noise,
    loss_units_differ,
    ranked_table,
    run_vocab_sizes,
)
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
from mixlab.ablations.regmix import RegMixConfig, RegMixReport, run_regmix
from mixlab.ablations.report import RunReport, build_report
from mixlab.ablations.results import ablation_results, task_chance, write_results
from mixlab.ablations.signal import TaskSignal, signal_table, task_signal
from mixlab.ablations.slurm import SlurmLauncher
from mixlab.ablations.spec import AblationSpec, AblationSpecError, AblationVariant, Axis

__all__ = [
    "bpb_chance_levels",
    "build_ablation_report",
    "exceeds_seed_noise",
    "loss_units_differ",
    "ranked_table",
    "run_vocab_sizes",
    "RegMixConfig",
    "RegMixReport",
    "run_regmix",
    "task_chance",
    "ablation_results",
    "write_results",
    "LocalLauncher",
    "SlurmLauncher",
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
