"""Training: a plain Llama-style model and its switches (MoE, SSM, MLA), the embedded torch backend (one process or
DDP), the nanotron backend (tensor x pipeline x data parallel on nanotron 0.4's building blocks), checkpoints,
held-out eval, training alerts, run records. Preflight checks: `mixlab.training.preflight`."""

from mixlab.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mixlab.training.config import TRAIN_PRESETS, TrainConfig
from mixlab.training.data_parallel import DataParallelWorld
from mixlab.training.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    ResumeError,
    TrainingError,
)
from mixlab.training.evaluate import HeldOutEvaluator, evaluate_checkpoint, load_model, position_losses
from mixlab.training.hf import export_hf, hf_config, import_hf, model_config_from_hf
from mixlab.training.lr_schedule import decay_start_step, lr_at
from mixlab.training.model import MODEL_PRESETS, ModelConfig, Transformer, segment_ids_from_cu_seqlens
from mixlab.training.moe import MoEFeedForward
from mixlab.training.monitor import MonitorConfig, TrainingMonitor
from mixlab.training.nanotron_export import NanotronExport, export_nanotron
from mixlab.training.nanotron_layout import ParallelLayout, layout_problems
from mixlab.training.nanotron_trainer import train_nanotron
from mixlab.training.run_record import RunLockedError, RunRecord, RunStore
from mixlab.training.seeds import RankSeeds, rank_seeds, seed_violations, world_seeds
from mixlab.training.ssm import GatedLinearRecurrence
from mixlab.training.throughput import measure_matmul_peak, mfu
from mixlab.training.trainer import Sampler, train

__all__ = [
    "NanotronExport",
    "ParallelLayout",
    "export_nanotron",
    "layout_problems",
    "train_nanotron",
    "export_hf",
    "hf_config",
    "import_hf",
    "model_config_from_hf",
    "MODEL_PRESETS",
    "TRAIN_PRESETS",
    "CheckpointError",
    "DataParallelWorld",
    "GatedLinearRecurrence",
    "MoEFeedForward",
    "MonitorConfig",
    "RankSeeds",
    "TrainingMonitor",
    "measure_matmul_peak",
    "mfu",
    "position_losses",
    "rank_seeds",
    "seed_violations",
    "segment_ids_from_cu_seqlens",
    "world_seeds",
    "ConfigError",
    "HeldOutEvaluator",
    "ModelConfig",
    "NonFiniteLossError",
    "ResumeError",
    "RunLockedError",
    "RunRecord",
    "RunStore",
    "Sampler",
    "TrainConfig",
    "TrainingError",
    "Transformer",
    "decay_start_step",
    "evaluate_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model",
    "lr_at",
    "read_checkpoint",
    "save_checkpoint",
    "train",
]
