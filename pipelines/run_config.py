"""One document describes a whole run: data, mixture, model, training, evaluation and backend.

Written as YAML (or built in Python), it is what `mixlab train --config run.yaml` reads, and `run.json` stores the
same document fully resolved (presets expanded, paths absolute), so `mixlab train --config runs/<id>/run.json`
reproduces the run. Every field can be overridden with `--set section.field=value`.

    run_id: web-heavy
    runs_dir: work/runs
    data:
      curated: work/curated          # a tokenized curated directory
    mixture: schedule.yaml           # a schedule file, an inline {stages: [...]}, or null: the demo schedule
    plan: {max_epochs: 4}            # the planner refuses a source repeated more (per source: max_epochs_by_source)
    model: {preset: demo}            # a ModelConfig preset plus any field; vocab_size comes from the tokenizer
    train: {preset: demo, lr: 1.0e-3, total_steps: 400}
    eval: {windows_per_source: 48, tasks: all}   # tasks: downstream cloze tasks scored at every eval
    policy: {name: odm, update_every: 50, exploration: 0.05, bounds: {web-en: [0.2, 0.9]}}   # optional
    monitor: {on_alert: stop, loss_z: 6}   # optional: training alerts (training.monitor.MonitorConfig)
    backend: embedded                # or nanotron: tensor/pipeline/data parallel under torchrun
    parallel: {tp: 1, pp: 1}         # nanotron's layout (dp: the rest of the world; pp_engine, zero_stage)
    tags: {recipe: web-heavy}

Paths are relative to the working directory, as on the command line. `policy` names an adaptive mixture policy
of `mixtures.policies` (doremi, odm, ado) and its parameters; rules are Python, built in a script.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from mixlab.mixtures import MixtureSchedule, PlanLimits, ScheduleError
from mixlab.mixtures.policies import MixturePolicy, PolicyError, policy_from_dict
from mixlab.training import ConfigError, ModelConfig, TrainConfig
from mixlab.training.config import ConfigDict
from mixlab.training.monitor import MonitorConfig
from mixlab.training.nanotron_layout import ParallelLayout

RUN_CONFIG_FORMAT = "mixlab.run/1"
SECTIONS = ("format", "run_id", "runs_dir", "data", "mixture", "plan", "model", "train", "eval", "policy", "monitor",
            "backend", "parallel", "tags")
# facts a run records next to its document; not inputs, so a run.json read back as a config drops them
DERIVED_KEYS = ("manifest_dir", "tokenizer_sha256", "decay_start_step", "device", "python_policy", "precision",
                "compiled", "world_size")
BACKENDS = ("embedded", "nanotron")
DEFAULT_PRESET = "demo"


@dataclass
class EvalConfig(ConfigDict):
    """Held-out evaluation: fixed windows per source, scored at every `train.eval_every` steps."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    windows_per_source: int = 48  # windows of seq_len + 1 tokens from each source's val split
    batch_size: int = 16  # windows per forward pass
    bootstrap_resamples: int = 1000  # for the confidence interval over windows
    # downstream cloze tasks (ablations.tasks) scored at every eval: "all" the dataset's tasks (built from its
    # held-out documents on first use), a list of task names, or none
    tasks: str | list[str] | None = None
    task_items: int = 1000  # at most this many items per task
    # score the held-out split and tasks of this tokenized dataset (same tokenizer) instead of data.curated's:
    # the curation variants of an ablation are all scored on their base's held-out documents
    curated: str | None = None

    def __post_init__(self) -> None:
        for name in ("windows_per_source", "batch_size", "bootstrap_resamples", "task_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"eval.{name}={value!r} must be a whole number >= 1", [f"eval.{name}"])
        if self.task_items > 1000:
            raise ConfigError(f"eval.task_items={self.task_items}: a task has at most 1000 items (cheap enough to "
                              "score at every eval)", ["eval.task_items"])
        if self.curated is not None and (not isinstance(self.curated, str) or not self.curated.strip()):
            raise ConfigError(f"eval.curated={self.curated!r} must be a tokenized curated directory (or null)",
                              ["eval.curated"])
        tasks = self.tasks
        if tasks is not None and tasks != "all" and (
                not isinstance(tasks, list) or not all(isinstance(t, str) and t for t in tasks)):
            raise ConfigError(f"eval.tasks={tasks!r}: give \"all\", a list of task names, or null", ["eval.tasks"])


@dataclass
class RunConfig:
    """Everything that defines one pre-training run; `to_dict()` is the document `run.json` keeps.

    `schedule=None` means the demo's stable+decay schedule over the tokenized sources, fixed when the run starts.
    """

    curated_dir: Path
    runs_dir: Path
    run_id: str
    schedule: MixtureSchedule | None
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig = field(default_factory=EvalConfig)
    tags: dict[str, str] = field(default_factory=dict)
    backend: str = "embedded"
    plan: PlanLimits = field(default_factory=PlanLimits)  # the planner's limits (epochs per source)
    policy: dict[str, Any] | None = None  # an adaptive mixture policy: {name: doremi|odm|ado, ...its parameters}
    monitor: MonitorConfig | None = None  # training alerts (loss / grad-norm spikes, throughput, data order)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)  # the nanotron backend's tp x pp x dp

    def __post_init__(self) -> None:
        self.curated_dir, self.runs_dir = Path(self.curated_dir), Path(self.runs_dir)
        if not self.run_id or "/" in self.run_id or self.run_id in (".", ".."):
            raise ConfigError(f"run_id={self.run_id!r} must be a plain name (it names a folder of runs_dir)", ["run_id"])
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not available; choose from {list(BACKENDS)}", ["backend"])
        if self.backend == "embedded" and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ConfigError(f"parallel.tp={self.parallel.tp}, parallel.pp={self.parallel.pp}: the embedded backend "
                              "is data parallel only; set backend: nanotron (--backend nanotron) for tensor and "
                              "pipeline parallelism", ["backend", "parallel"])
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}: shorten the "
                "sequences or raise the model's maximum (a longer context is a different model)",
                ["train.seq_len", "model.max_seq_len"])
        if self.policy is not None:
            self.policy = dict(self.policy)
            self.build_policy()  # refuses an unknown policy or parameter now, not at the first step

    def build_policy(self) -> MixturePolicy | None:
        """A fresh policy object from the `policy` section (None without one): pass it to `train(policy=...)`."""
        if self.policy is None:
            return None
        try:
            return policy_from_dict(self.policy)
        except PolicyError as err:
            raise ConfigError(f"policy: {err}", ["policy"]) from err

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RUN_CONFIG_FORMAT,
            "run_id": self.run_id,
            "runs_dir": str(self.runs_dir.resolve()),
            "data": {"curated": str(self.curated_dir.resolve())},
            "mixture": self.schedule.to_dict() if self.schedule is not None else None,
            "plan": self.plan.to_dict(),
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "eval": self.eval.to_dict(),
            "policy": dict(self.policy) if self.policy is not None else None,
            "monitor": self.monitor.to_dict() if self.monitor is not None else None,
            "backend": self.backend,
            "parallel": self.parallel.to_dict(),
            "tags": dict(self.tags),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- reading documents -------------------------------------------------------------------------
class _RunYamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a learning rate written that way is a number here."""


_RunYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML (or JSON, a subset) with exponent floats read as numbers."""
    return yaml.load(text, Loader=_RunYamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_run_document(path: str | Path) -> dict[str, Any]:
    """A run document from YAML/JSON: a config file, or a run's `run.json` (its `config`, derived facts dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such run config file; write one (see `mixlab train --help`) or point at a "
                          "run's run.json", ["--config"])
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML/JSON: {err}", ["--config"]) from err
    if isinstance(data, Mapping) and "schema_version" in data and "config" in data:  # a run.json
        data = data["config"]
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a run config is a mapping with sections {list(SECTIONS)}", ["--config"])
    return {k: v for k, v in data.items() if k not in DERIVED_KEYS and k != "eval_windows_per_source"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are YAML (numbers, true/false, null, [lists], {maps});
    `1e-3`, which YAML 1.1 reads as a string, is a number here too."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected SECTION.FIELD=VALUE, e.g. --set train.lr=1e-3", ["--set"])
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {err}", ["--set"]) from err
    return key.strip().split("."), value


def apply_overrides(document: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `document` with each `a.b.c=value` set (list items by index: `mixture.stages.1.fraction=0.3`)."""
    return set_fields(document, [(*parse_override(text), f"--set {text!r}") for text in overrides])


def set_fields(document: dict[str, Any], assignments: Sequence[tuple[list[str], Any, str]]) -> dict[str, Any]:
    """A copy of `document` with each `(keys, value, where)` set at the path `keys` (`where` names the assignment
    in errors, e.g. the --set flag or the ablation axis); the value may be any document, e.g. a whole schedule."""
    document = copy.deepcopy(document)
    for keys, value, where in assignments:
        if keys[0] not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {keys[0]!r}; sections: {list(SECTIONS)}", ["--set"])
        node: Any = document
        for i, key in enumerate(keys[:-1]):
            nxt = node[int(key)] if isinstance(node, list) else node.get(key)
            if nxt is None:
                nxt = {}
                if isinstance(node, list):
                    raise ConfigError(f"{where}: {'.'.join(keys[:i + 1])} does not exist", ["--set"])
                node[key] = nxt
            if not isinstance(nxt, dict | list):
                raise ConfigError(f"{where}: {'.'.join(keys[:i + 1])} is a value, not a section", ["--set"])
            node = nxt
        if isinstance(node, list):
            node[int(keys[-1])] = copy.deepcopy(value)
        else:
            node[keys[-1]] = copy.deepcopy(value)
    return document


def _section(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = document.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}", [name])
    return dict(value)


def _from_preset(cls: type[ConfigDict], section: str, values: dict[str, Any], **defaults: Any) -> Any:
    preset = values.pop("preset", DEFAULT_PRESET)
    for key, value in defaults.items():
        values.setdefault(key, value)
    try:
        return cls.preset(preset, **values)
    except ConfigError as err:
        fields = err.fields or tuple(f"{section}.{k}" for k in values) or (f"{section}.preset",)
        raise ConfigError(str(err).replace(f"{cls.__name__}.", f"{section}."), fields) from err


def _schedule(value: Any) -> MixtureSchedule | None:
    if value is None:
        return None
    try:
        if isinstance(value, str | Path):
            return MixtureSchedule.from_yaml(Path(value))
        if isinstance(value, Mapping):
            return MixtureSchedule.from_dict(value)
    except ScheduleError as err:
        raise ConfigError(f"mixture: {err}", ["mixture"]) from err
    raise ConfigError(f"mixture: expected a schedule file path or {{stages: [...]}}, got {value!r}", ["mixture"])


def run_config_from_document(document: Mapping[str, Any], vocab_size: int | None = None) -> RunConfig:
    """Resolve a document: presets expanded, `model.vocab_size` from the tokenizer when left out (`vocab_size`)."""
    unknown = sorted(set(document) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown run config sections {unknown}; sections: {list(SECTIONS)}", unknown)
    fmt = document.get("format", RUN_CONFIG_FORMAT)
    if fmt != RUN_CONFIG_FORMAT:
        raise ConfigError(f"format={fmt!r}: this mixlab reads run configs of format {RUN_CONFIG_FORMAT!r}", ["format"])
    for name in ("run_id", "runs_dir"):
        if not document.get(name):
            raise ConfigError(f"the run config has no {name}: set it in the file, with --{name.replace('_', '-')}, "
                              f"or --set {name}=...", [name])
    data = _section(document, "data")
    if not data.get("curated"):
        raise ConfigError("the run config has no data.curated (the tokenized curated directory): set it in the "
                          "file's data: section or with --curated", ["data.curated"])
    train = _from_preset(TrainConfig, "train", _section(document, "train"))
    model_defaults = {"vocab_size": vocab_size} if vocab_size else {}
    model = _from_preset(ModelConfig, "model", _section(document, "model"), **model_defaults)
    if vocab_size and model.vocab_size != vocab_size:
        raise ConfigError(f"model.vocab_size={model.vocab_size} but the tokenizer has {vocab_size} tokens: leave "
                          "model.vocab_size out (it comes from the tokenizer)", ["model.vocab_size"])
    try:
        eval_config = EvalConfig.from_dict(_section(document, "eval"))
    except ConfigError as err:
        raise ConfigError(str(err).replace("EvalConfig", "eval"), err.fields or ["eval"]) from err
    tags = {str(k): str(v) for k, v in _section(document, "tags").items()}
    policy = document.get("policy")
    if policy is not None and not isinstance(policy, Mapping):
        raise ConfigError(f"policy: expected a mapping like {{name: odm, update_every: 50}}, got {policy!r}", ["policy"])
    try:
        plan = PlanLimits.from_dict(_section(document, "plan"))
    except (ScheduleError, TypeError) as err:
        raise ConfigError(str(err), ["plan.max_epochs"]) from err
    monitor = document.get("monitor")
    if monitor is not None and not isinstance(monitor, Mapping):
        raise ConfigError(f"monitor: expected a mapping like {{on_alert: stop}}, got {monitor!r}", ["monitor"])
    return RunConfig(
        monitor=MonitorConfig.from_dict(monitor) if monitor is not None else None,
        curated_dir=Path(data["curated"]), runs_dir=Path(document["runs_dir"]), run_id=str(document["run_id"]),
        schedule=_schedule(document.get("mixture")), model=model, train=train, eval=eval_config, tags=tags,
        backend=document.get("backend") or "embedded", plan=plan, policy=dict(policy) if policy else None,
        parallel=_parallel(document),
    )


def _parallel(document: Mapping[str, Any]) -> ParallelLayout:
    try:
        return ParallelLayout.from_dict(_section(document, "parallel"))
    except ConfigError as err:
        raise ConfigError(str(err).replace("ParallelLayout", "parallel"), err.fields or ["parallel"]) from err


def preset_sizes(vocab_size: int = 8192) -> list[str]:
    """One line per model and train preset with its size, for `--help`."""
    from mixlab.training import MODEL_PRESETS, TRAIN_PRESETS

    lines = []
    for name, values in MODEL_PRESETS.items():
        cfg = ModelConfig.preset(name, **({} if "vocab_size" in values else {"vocab_size": vocab_size}))
        embedding = cfg.vocab_size * cfg.d_model
        block = cfg.n_layers * (2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
                                + 3 * cfg.d_model * cfg.ffn_hidden)
        lines.append(f"  model {name:11s} {cfg.n_layers:>2d} layers x {cfg.d_model:>4d} wide, {_count(block)} non-embedding "
                     f"+ {_count(embedding)} embedding params (vocab {cfg.vocab_size}), context {cfg.max_seq_len}")
    for name in TRAIN_PRESETS:
        cfg = TrainConfig.preset(name)
        lines.append(f"  train {name:11s} {cfg.steps:>5d} steps x {cfg.batch_size} x {cfg.seq_len} tokens = "
                     f"{_count(cfg.steps * cfg.tokens_per_step)} tokens, lr {cfg.lr:g}, warmup {cfg.warmup_steps}")
    return lines


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n / scale < 100 else 0}f}{unit}"
    return f"{math.floor(n)}"
