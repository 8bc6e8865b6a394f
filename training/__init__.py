"""Training: a plain Llama-style model and its switches (MoE, SSM, MLA), the embedded torch backend (one process or
DDP), the nanotron backend (tensor x pipeline x data parallel on nanotron 0.4's building blocks), checkpoints,
held-out eval, training alerts, run records. Preflight checks: `mixlab.training.preflight`."""

from __future__ import annotations

from mixlab.curation.lazy_exports import lazy_exports

# imported on first use (curation/lazy_exports.py): module -> the names it provides
__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mixlab.training.checkpoint": ("latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_checkpoint",
                                   "save_checkpoint",),
    "mixlab.training.config": ("TRAIN_PRESETS", "TrainConfig",),
    "mixlab.training.data_parallel": ("DataParallelWorld",),
    "mixlab.training.errors": ("CheckpointError", "ConfigError", "NonFiniteLossError", "ResumeError", "TrainingError",),
    "mixlab.training.evaluate": ("HeldOutEvaluator", "evaluate_checkpoint", "load_model", "position_losses",),
    "mixlab.training.hf": ("export_hf", "hf_config", "import_hf", "model_config_from_hf",),
    "mixlab.training.lr_schedule": ("decay_start_step", "lr_at",),
    "mixlab.training.model": ("MODEL_PRESETS", "ModelConfig", "Transformer", "segment_ids_from_cu_seqlens",),
    "mixlab.training.moe": ("MoEFeedForward",),
    "mixlab.training.monitor": ("MonitorConfig", "TrainingMonitor",),
    "mixlab.training.nanotron_export": ("NanotronExport", "export_nanotron",),
    "mixlab.training.nanotron_layout": ("ParallelLayout", "layout_problems",),
    "mixlab.training.nanotron_trainer": ("train_nanotron",),
    "mixlab.training.run_record": ("RunLockedError", "RunRecord", "RunStore",),
    "mixlab.training.seeds": ("RankSeeds", "rank_seeds", "seed_violations", "world_seeds",),
    "mixlab.training.ssm": ("GatedLinearRecurrence",),
    "mixlab.training.throughput": ("measure_matmul_peak", "mfu",),
    "mixlab.training.trainer": ("Sampler", "train",),
})
