"""Ablations: specs of proxy runs to compare, and reports on runs (tables, plots, noise)."""

from __future__ import annotations

from mixlab.curation.lazy_exports import lazy_exports

# imported on first use (curation/lazy_exports.py): module -> the names it provides
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mixlab.ablations.ablation_report": ("bpb_chance_levels", "build_ablation_report", "exceeds_seed_noise",
                                         "loss_units_differ", "ranked_table", "run_vocab_sizes",),
    "mixlab.ablations.compare": ("config_differences", "curation_funnel", "epochs_per_source", "final_evals",
                                 "flatten_config", "mixture_shares", "select_runs", "smoothed_mixture_shares",
                                 "target_segments",),
    "mixlab.ablations.launch": ("LocalLauncher", "ProxyRun", "proxy_runs", "run_ablation",),
    "mixlab.ablations.regmix": ("RegMixConfig", "RegMixReport", "run_regmix",),
    "mixlab.ablations.report": ("RunReport", "build_report",),
    "mixlab.ablations.results": ("ablation_results", "task_chance", "write_results",),
    "mixlab.ablations.signal": ("TaskSignal", "signal_table", "task_signal",),
    "mixlab.ablations.slurm": ("SlurmLauncher",),
    "mixlab.ablations.spec": ("AblationSpec", "AblationSpecError", "AblationVariant", "Axis",),
})
