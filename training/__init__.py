"""Training: a plain Llama-style model, the embedded torch backend, checkpoints, held-out eval, run records."""

from mixlab.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mixlab.training.config import TRAIN_PRESETS, TrainConfig
from mixlab.training.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    ResumeError,
    TrainingError,
)
from mixlab.training.evaluate import HeldOutEvaluator, evaluate_checkpoint, load_model
from mixlab.training.hf import export_hf, hf_config, import_hf, model_config_from_hf
from mixlab.training.lr_schedule import decay_start_step, lr_at
from mixlab.training.model import MODEL_PRESETS, ModelConfig, Transformer
from mixlab.training.run_record import RunRecord, RunStore
from mixlab.training.trainer import Sampler, train

__all__ = [
    "export_hf",
    "hf_config",
    "import_hf",
    "model_config_from_hf",
    "MODEL_PRESETS",
    "TRAIN_PRESETS",
    "CheckpointError",
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
