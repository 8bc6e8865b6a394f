"""TrainConfig: every knob of a training run in one dataclass, with its defaults (the CLI and recipes reuse them)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal, Self

import torch
from mixlab.training.errors import ConfigError

Schedule = Literal["wsd", "cosine", "constant"]


class ConfigDict:
    """`to_dict`, `from_dict` (unknown fields are an error) and named `preset`s, shared by the config dataclasses."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as err:  # e.g. a string where a number belongs, compared in __post_init__
            raise ConfigError(f"{cls.__name__}: {err}; check the types of {sorted(values)}") from err

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Self:
        """A named recipe from `PRESETS` with overrides, e.g. `TrainConfig.preset("demo", total_steps=500)`."""
        if name not in cls.PRESETS:
            raise ConfigError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(cls.PRESETS)}")
        return cls.from_dict({**cls.PRESETS[name], **overrides})


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # pairs with ModelConfig.preset("tiny"): seconds on a CPU, for tests and smoke runs
    "tiny": dict(total_steps=60, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=10, log_every=5,
                 eval_every=30, checkpoint_every=30),
    # pairs with ModelConfig.preset("proxy"): 1M tokens per ablation proxy (256 steps x 32 x 128), 4 evals;
    # bench/proxy_bench.py: 16 such proxies in ~28 min on 2 cores (vocab 4096)
    "proxy": dict(total_steps=256, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=16, log_every=16,
                  eval_every=64, checkpoint_every=64),
    # pairs with ModelConfig.preset("demo"): a few minutes on 2 CPU cores (~1.2M tokens)
    "demo": dict(total_steps=600, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=50, log_every=10,
                 eval_every=100, checkpoint_every=100),
}


@dataclass
class TrainConfig(ConfigDict):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = TRAIN_PRESETS

    # how long: total_steps wins; otherwise token_budget / tokens_per_step, rounded up
    total_steps: int | None = None
    token_budget: int | None = None
    # what one optimizer step sees: grad_accum micro-batches of [batch_size, seq_len + 1] tokens from the sampler
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    # learning rate: linear warmup, then WSD (stable, then linear decay to min_lr over the last decay_fraction
    # of the run, as SmolLM3 — start it where the mixture's decay stage starts) or cosine to min_lr
    lr: float = 3e-3
    min_lr: float = 0.0
    warmup_steps: int = 100
    schedule: Schedule = "wsd"
    # decay_fraction = MixtureSchedule.stable_decay's default, and the decay starts at the step where that
    # schedule's decay stage does; for any other schedule pin decay_start_step to the sampler's:
    # MixtureSampler.stage_start_step(-1) (divided by grad_accum, which draws grad_accum batches per step)
    decay_fraction: float = 0.2
    decay_start_step: int | None = None  # explicit WSD decay start (optimizer step); overrides decay_fraction
    # AdamW
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # cadence (in optimizer steps)
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_last_checkpoints: int = 2
    # machine
    seed: int = 0
    threads: int | None = None  # torch.set_num_threads; None = all cores
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    resume: bool = True  # continue from the run's latest checkpoint when there is one
    # start a new run from another run's weights and AdamW moments (a checkpoint step dir, or a run directory /
    # its checkpoints dir: the latest checkpoint), at step 0 with a fresh sampler and this config's LR schedule:
    # annealing ablations, mid-training. The model config must match the checkpoint's.
    init_from: str | None = None
    progress_bar: bool = True
    # numerics: "auto" = bf16 autocast on CUDA (fp32 master weights, fused AdamW), fp32 on CPU (bf16 matmuls are
    # ~100x slower without bf16 instructions); "fp32" everywhere; "bf16" asks for autocast on any device; "fp64"
    # weights and activations in float64 (numerical checks: the backends agree to ~1e-12 there)
    precision: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    compile: bool = False  # torch.compile the model (CUDA mainly; the first steps pay the compile time)
    tensorboard: bool = True  # metrics also as TensorBoard events under the run's tb/ (beside metrics.jsonl)
    # wall-clock hours the whole run must finish in: `mixlab preflight` measures a few steps against it
    time_budget_h: float | None = None

    def __post_init__(self) -> None:
        positive = ["batch_size", "seq_len", "grad_accum", "log_every", "eval_every", "checkpoint_every",
                    "keep_last_checkpoints"]
        for name in ("total_steps", "token_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"train.{name}={value!r} must be a whole number >= 1", [f"train.{name}"])
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name}={value!r} must be a whole number >= 1", [f"train.{name}"])
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "decay_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"train.{name}={value!r} must be a finite number >= 0", [f"train.{name}"])
        if self.lr <= 0:
            raise ConfigError(f"train.lr={self.lr!r} must be > 0", ["train.lr"])
        if self.total_steps is None and self.token_budget is None:
            raise ConfigError("the run needs a length: set train.total_steps or train.token_budget",
                              ["train.total_steps", "train.token_budget"])
        if self.schedule not in ("wsd", "cosine", "constant"):
            raise ConfigError(f"train.schedule must be 'wsd', 'cosine' or 'constant', got {self.schedule!r}",
                              ["train.schedule"])
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction must be in [0, 1], got {self.decay_fraction}", ["train.decay_fraction"])
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}", ["train.min_lr", "train.lr"])
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ConfigError(f"train.threads={self.threads!r} must be a whole number >= 1 (or null: all cores)",
                              ["train.threads"])
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps!r} must be a whole number >= 0",
                              ["train.warmup_steps"])
        if self.precision not in ("auto", "fp32", "bf16", "fp64"):
            raise ConfigError(f"train.precision must be 'auto', 'fp32', 'bf16' or 'fp64', got {self.precision!r}",
                              ["train.precision"])
        if self.time_budget_h is not None and (isinstance(self.time_budget_h, bool) or not isinstance(
                self.time_budget_h, int | float) or not self.time_budget_h > 0):
            raise ConfigError(f"train.time_budget_h={self.time_budget_h!r} must be a number of hours > 0 (or null)",
                              ["train.time_budget_h"])
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ConfigError(f"train.init_from={self.init_from!r} must be a checkpoint or run directory path "
                              "(or null)", ["train.init_from"])
        steps = self.steps
        if self.warmup_steps > steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds the run's {steps} steps: shorten the "
                              "warmup or lengthen the run", ["train.warmup_steps", "train.total_steps"])
        if self.decay_start_step is not None and not self.warmup_steps <= self.decay_start_step <= steps:
            raise ConfigError(f"train.decay_start_step={self.decay_start_step} must lie in "
                              f"[train.warmup_steps={self.warmup_steps}, train.total_steps={steps}]",
                              ["train.decay_start_step", "train.warmup_steps", "train.total_steps"])

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum

    @property
    def steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.total_steps is not None:
            return self.total_steps
        return math.ceil(self.token_budget / self.tokens_per_step)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1
