"""Export a mixlab run for upstream nanotron on GPU clusters: a folder a nanotron user can train from or load.

`export_nanotron(run_dir, out_dir)` writes

- `config.yaml`: an upstream nanotron config (general, parallelism, model with a LlamaConfig, tokenizer, optimizer,
  tokens, checkpoints) and `data_stages` made by `mixtures.nanotron.to_nanotron_config` from the run's schedule.
  The target is upstream master's Nanoset format (`data.dataset.dataset_folder` / `dataset_weights` lists per
  stage). nanotron 0.4 (the release the registry has) reads data as one `data: {dataset: hf...}` section and its
  LlamaConfig has no `rope_theta`: `validate_with_nanotron` checks everything else against 0.4's own dataclasses.
- `tokens/<source>/`: the run's datatrove train shards (`.ds`, `.ds.index` hard-linked, copied across
  filesystems), each `.ds.metadata` rewritten so that its tokenizer name is the config's `tokenizer_name_or_path`
  exactly (Nanoset refuses any other); token counts are checked against each `.ds` file's size.
- `tokenizer/`: the run's tokenizer files.
- `checkpoint/`: the run's (or the given) checkpoint in nanotron 0.4's `save_weights` layout at tp1/pp1, weights
  only: `model/<module path>/model_weight[_pp-rank-0-of-1_tp-rank-0-of-1].safetensors` with 0.4's TensorMetadata
  (plain ints: numpy 2 ints break 0.4's parser), `model_config.json`, `checkpoint_metadata.json`.

RoPE: mixlab rotates (x_i, x_{i+d/2}) pairs (halves layout); 0.4's Llama rotates adjacent (x_{2i}, x_{2i+1})
pairs (flash-attn `interleaved=True` in training, complex view in inference). The q/k rows of every head are
permuted so that nanotron computes the same function (attention scores are invariant under one permutation of
both q and k). 0.4's rotary embeddings ignore `rope_theta` (base 10000 is hard-wired): another theta cannot be
expressed and is recorded in `NanotronExport.warnings`. The GQA head layout is the same (query head h reads
key/value head h // (n_heads / n_kv_heads) in both SDPA's enable_gqa and flash-attn).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.token_shards import ShardMetadata
from mixlab.mixtures.nanotron import to_nanotron_config
from mixlab.mixtures.schedule import MixtureSchedule
from mixlab.training.checkpoint import _load_tensors, canonical_name, read_checkpoint, resolve_checkpoint
from mixlab.training.config import TrainConfig
from mixlab.training.errors import CheckpointError, ConfigError
from mixlab.training.hf import TOKENIZER_FILES, _refuse_for_llama, _tokenizer_ids
from mixlab.training.model import ModelConfig
from mixlab.training.run_record import RunRecord

NANOTRON_CHECKPOINT_VERSION = "1.2"  # nanotron 0.4's constants.CHECKPOINT_VERSION
SHARD_SUFFIX = "_pp-rank-0-of-1_tp-rank-0-of-1"  # 0.4's serialize.utils.get_path at tp1/pp1
ROPE_BASE_0_4 = 10000.0  # 0.4's FlashRotaryEmbedding / RotaryEmbedding are built without a base
TP_MODES = ("REDUCE_SCATTER", "ALL_REDUCE")


class NanotronExportError(ConfigError):
    """A run that cannot be exported as asked; the message names the field or file and the fix."""


@dataclass
class NanotronExport:
    """Where the export put things, and what nanotron will not compute exactly as mixlab did."""

    out_dir: Path
    config_yaml: Path
    tokenizer_dir: Path
    token_dirs: dict[str, Path]
    checkpoint_dir: Path | None
    warnings: list[str] = field(default_factory=list)


# ---- weights: one table, mixlab names -> (nanotron 0.4 LlamaForTraining name, split dim or None) -----------
_LAYER = "model.decoder.{i}.pp_block"
# fused nanotron tensors are cat(rows) of mixlab tensors in this order; split dim: None = not sharded (norms)
WEIGHT_MAP: tuple[tuple[tuple[str, ...], str, int | None], ...] = (
    (("tok_emb.weight",), "model.token_position_embeddings.pp_block.token_embedding.weight", 0),
    (("layers.{i}.attn_norm.weight",), f"{_LAYER}.input_layernorm.weight", None),
    (("layers.{i}.attn.wq.weight", "layers.{i}.attn.wk.weight", "layers.{i}.attn.wv.weight"),
     f"{_LAYER}.attn.qkv_proj.weight", 0),
    (("layers.{i}.attn.wo.weight",), f"{_LAYER}.attn.o_proj.weight", 1),
    (("layers.{i}.mlp_norm.weight",), f"{_LAYER}.post_attention_layernorm.weight", None),
    (("layers.{i}.mlp.w_gate.weight", "layers.{i}.mlp.w_up.weight"), f"{_LAYER}.mlp.gate_up_proj.weight", 0),
    (("layers.{i}.mlp.w_down.weight",), f"{_LAYER}.mlp.down_proj.weight", 1),
    (("norm.weight",), "model.final_layer_norm.pp_block.weight", None),
    (("lm_head.weight",), "model.lm_head.pp_block.weight", 0),
)


def rope_interleave_permutation(head_dim: int) -> torch.Tensor:
    """Row order that turns a halves-layout head (pairs i, i+d/2) into an interleaved one (pairs 2i, 2i+1)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def _interleave_heads(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    rows = weight.view(n_heads, head_dim, -1)[:, rope_interleave_permutation(head_dim)]
    return rows.reshape(n_heads * head_dim, -1)


def nanotron_state_dict(state: dict[str, torch.Tensor],
                        cfg: ModelConfig) -> dict[str, tuple[torch.Tensor, int | None]]:
    """nanotron 0.4 LlamaForTraining tensors (name -> (tensor, split dim)) from mixlab's: q/k rows interleaved for
    0.4's RoPE, q|k|v and gate|up fused; a tied lm_head is left out (0.4 saves the tie once, as the embedding)."""
    state = {canonical_name(k): v.detach().cpu() for k, v in state.items() if k not in ("rope_cos", "rope_sin")}
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    used: set[str] = set()
    for sources, target, split_dim in WEIGHT_MAP:
        layers = range(cfg.n_layers) if "{i}" in target else [None]
        for i in layers:
            names = [s.replace("{i}", str(i)) for s in sources]
            if target.endswith("lm_head.pp_block.weight") and cfg.tie_embeddings:
                used.update(n for n in names if n in state)
                continue
            missing = [n for n in names if n not in state]
            if missing:
                raise CheckpointError(f"checkpoint has no {missing}; it is not a dense mixlab Transformer of "
                                      "its model_config")
            parts = [state[n] for n in names]
            if names[0].endswith("attn.wq.weight"):
                parts[0] = _interleave_heads(parts[0], cfg.n_heads, cfg.head_dim)
                parts[1] = _interleave_heads(parts[1], cfg.n_kv_heads, cfg.head_dim)
            used.update(names)
            name = target.replace("{i}", str(i)) if i is not None else target
            out[name] = (torch.cat(parts, dim=0).contiguous(), split_dim)
    if extra := sorted(set(state) - used):
        raise CheckpointError(f"checkpoint tensors {extra[:5]} have no nanotron 0.4 Llama counterpart")
    return out


def _slices_str(shape: tuple[int, ...], split_dim: int, chunks: tuple[int, ...]) -> str:
    """0.4's SlicesPair.tuple_to_str at tp1: one local#global pair per contiguous chunk, identical slices."""
    pairs, start = [], 0
    for chunk in chunks:
        dims = [f"{start},{start + chunk},None" if d == split_dim else "None,None,None" for d in range(len(shape))]
        text = "|".join(dims)
        pairs.append(f"{text}#{text}")
        start += chunk
    return ";".join(pairs)


def _chunks(name: str, cfg: ModelConfig, rows: int) -> tuple[int, ...]:
    if name.endswith("qkv_proj.weight"):
        return (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    if name.endswith("gate_up_proj.weight"):
        return (cfg.ffn_hidden, cfg.ffn_hidden)
    return (rows,)


def write_nanotron_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, llama_config: dict[str, Any],
                              out_dir: Path, *, step: int, consumed_train_samples: int) -> Path:
    """nanotron 0.4's weights-only checkpoint folder, laid out as its `save_weights` / `save_meta` / trainer do."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (tensor, split_dim) in nanotron_state_dict(state, cfg).items():
        *folders, leaf = name.split(".")
        if split_dim is None:
            path, metadata = out_dir.joinpath("model", *folders, f"model_{leaf}.safetensors"), {}
        else:
            shape = tuple(int(s) for s in tensor.shape)
            chunk_dim = shape[split_dim]
            chunks = _chunks(name, cfg, chunk_dim) if split_dim == 0 else (chunk_dim,)
            path = out_dir.joinpath("model", *folders, f"model_{leaf}{SHARD_SUFFIX}.safetensors")
            metadata = {"version": NANOTRON_CHECKPOINT_VERSION,
                        "local_global_slices_pairs": _slices_str(shape, split_dim, chunks),
                        "unsharded_shape": str(shape)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"data": tensor}, str(path), metadata=metadata)
    metas = {"consumed_train_samples": int(consumed_train_samples), "last_train_step": int(step)}
    meta = {"dp": 1, "metas": metas, "tp": 1, "version": NANOTRON_CHECKPOINT_VERSION}
    (out_dir / "checkpoint_metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (out_dir / "model_config.json").write_text(json.dumps(llama_config))
    return out_dir


# ---- token shards ---------------------------------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def export_token_shards(manifest: ShardManifest, sources: list[str], out_dir: Path, tokenizer_name: str,
                        vocab_size: int) -> dict[str, Path]:
    """`out_dir/<source>/` with every train shard of each source; metadata rewritten to name `tokenizer_name`.
    A shard whose metadata token count disagrees with its `.ds` size is refused, naming the file."""
    dirs: dict[str, Path] = {}
    for source in sources:
        shards = [s for s in manifest.source(source).token_shards if s.split in (None, "train")]
        if not shards:
            raise NanotronExportError(f"source {source!r} has no train token shards in {manifest.root}; re-run "
                                      "`mixlab tokenize`")
        target = out_dir / source
        target.mkdir(parents=True, exist_ok=True)
        for shard in shards:
            ds = manifest.resolve(shard.path)
            meta = ShardMetadata.read(ds)
            size = ds.stat().st_size
            if meta.token_size not in (2, 4) or size != meta.tokens * meta.token_size:
                raise NanotronExportError(f"{ds}: {size} bytes, but {ds.name}.metadata says {meta.tokens} tokens "
                                          f"of {meta.token_size} bytes; re-run `mixlab tokenize`")
            if vocab_size > 2**16 and meta.token_size != 4:
                raise NanotronExportError(f"{ds}: uint16 tokens cannot hold a {vocab_size}-token vocabulary")
            name = f"{source}_{ds.parent.name}_{ds.name}" if ds.parent.name != source else ds.name
            dst = target / name
            _link_or_copy(ds, dst)
            _link_or_copy(Path(f"{ds}.index"), Path(f"{dst}.index"))
            Path(f"{dst}.metadata").unlink(missing_ok=True)  # never write through a hard link into the run's data
            ShardMetadata(tokenizer_name, meta.token_size, meta.tokens).write(dst)
        dirs[source] = target
    return dirs


# ---- config ---------------------------------------------------------------------------------------------------
def llama_config(cfg: ModelConfig, *, bos: int | None, eos: int | None, pad: int | None) -> dict[str, Any]:
    """nanotron's LlamaConfig as a dict (master's keys; `rope_theta` is master-only, 0.4 ignores the theta)."""
    return {"bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu", "hidden_size": cfg.d_model,
            "initializer_range": cfg.init_std, "intermediate_size": cfg.ffn_hidden, "is_llama_config": True,
            "max_position_embeddings": cfg.max_seq_len, "num_attention_heads": cfg.n_heads,
            "num_hidden_layers": cfg.n_layers, "num_key_value_heads": cfg.n_kv_heads, "pad_token_id": pad,
            "pretraining_tp": 1, "rms_norm_eps": cfg.norm_eps, "rope_scaling": None, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "vocab_size": cfg.vocab_size}


def _lr_scheduler(train: TrainConfig, total_steps: int) -> dict[str, Any]:
    warmup = int(train.warmup_steps)
    if train.schedule == "constant":
        style, start, steps = "linear", total_steps, 1
    else:
        style = "cosine" if train.schedule == "cosine" else "linear"
        if train.schedule == "wsd":
            start = train.decay_start_step or int(round(total_steps * (1 - train.decay_fraction)))
        else:
            start = warmup
        steps = max(total_steps - start, 1)
    return {"learning_rate": train.lr, "lr_warmup_steps": warmup, "lr_warmup_style": "linear",
            "lr_decay_style": style, "lr_decay_starting_step": int(start), "lr_decay_steps": int(steps),
            "min_decay_lr": train.lr if train.schedule == "constant" else train.min_lr}


def validate_with_nanotron(config: dict[str, Any]) -> list[str]:
    """Parse `config` with nanotron 0.4's own `get_config_from_dict` (strict); returns the keys left out because
    they are upstream master's and 0.4 has no field for them. Raises when nanotron 0.4 refuses the rest."""
    try:
        from mixlab.training.nanotron_compat import ensure_nanotron
    except ImportError:
        ensure_nanotron = None
    if ensure_nanotron is not None:
        ensure_nanotron()  # breaks 0.4's import cycle (issue #191)
    from nanotron.config import get_config_from_dict
    from nanotron.config.models_config import LlamaConfig

    view = json.loads(json.dumps(config))
    skipped = [k for k in view if k == "data_stages"]
    view.pop("data_stages", None)
    model_config = view["model"]["model_config"]
    known = {f.name for f in fields(LlamaConfig)}
    skipped += [f"model.model_config.{k}" for k in sorted(set(model_config) - known)]
    view["model"]["model_config"] = {k: v for k, v in model_config.items() if k in known}
    get_config_from_dict(view)
    return skipped


def nanotron_config(record: RunRecord, schedule: MixtureSchedule, model: ModelConfig, train: TrainConfig, *,
                    token_dirs: dict[str, Path], tokenizer_dir: Path, ids: Any, checkpoints_path: Path,
                    tp: int, pp: int, dp: int, tp_mode: str) -> dict[str, Any]:
    """The upstream nanotron config of a run (see the module docstring for what is master's format)."""
    total_steps = int(record.config.get("train", {}).get("total_steps") or record.summary.get("total_steps") or 0)
    if total_steps < 1:
        raise NanotronExportError(f"{record.path}: run.json has no train.total_steps; export a started run")
    base = {
        "general": {"project": "mixlab", "run": record.run_id, "seed": int(train.seed), "step": None,
                    "consumed_train_samples": None, "benchmark_csv_path": None, "ignore_sanity_checks": True},
        "parallelism": {"dp": dp, "pp": pp, "tp": tp, "pp_engine": "1f1b", "tp_mode": tp_mode,
                        "tp_linear_async_communication": False, "expert_parallel_size": 1},
        "model": {"ddp_bucket_cap_mb": 25, "dtype": "bfloat16", "init_method": {"std": model.init_std},
                  "make_vocab_size_divisible_by": 1,
                  "model_config": llama_config(model, bos=ids.bos, eos=ids.eos, pad=ids.pad)},
        "tokenizer": {"tokenizer_name_or_path": str(tokenizer_dir), "tokenizer_revision": None,
                      "tokenizer_max_length": None},
        "optimizer": {"zero_stage": 0, "weight_decay": train.weight_decay,
                      "clip_grad": train.grad_clip if train.grad_clip > 0 else None,
                      "accumulate_grad_in_fp32": True, "adam_eps": train.eps, "adam_beta1": train.beta1,
                      "adam_beta2": train.beta2, "torch_adam_is_fused": True,
                      "learning_rate_scheduler": _lr_scheduler(train, total_steps)},
        "tokens": {"sequence_length": int(train.seq_len), "micro_batch_size": int(train.batch_size),
                   "batch_accumulation_per_replica": int(train.grad_accum), "train_steps": total_steps,
                   "val_check_interval": -1, "limit_val_batches": 0, "limit_test_batches": 0},
        "checkpoints": {"checkpoints_path": str(checkpoints_path),
                        "checkpoint_interval": int(train.checkpoint_every),
                        "save_initial_state": False, "resume_checkpoint_path": None,
                        "checkpoints_path_is_shared_file_system": False},
        "logging": {"log_level": "info", "log_level_replica": "info",
                    "iteration_step_info_interval": int(train.log_every)},
    }
    return to_nanotron_config(schedule, {k: str(v) for k, v in token_dirs.items()}, total_steps,
                              sequence_length=int(train.seq_len),
                              batch_size=int(train.batch_size * train.grad_accum),
                              base=base, seed=int(train.seed))


# ---- the export -----------------------------------------------------------------------------------------------
def export_nanotron(run_dir: Path, out_dir: Path, *, tp: int = 1, pp: int = 1, dp: int = 1,
                    checkpoint: Path | None = None, with_checkpoint: bool = True,
                    tp_mode: str = "REDUCE_SCATTER", validate: bool = True) -> NanotronExport:
    """Turn a mixlab run into a folder upstream nanotron trains from (config.yaml, tokens/, tokenizer/) and, given
    `checkpoint` or when the run has one (and `with_checkpoint`), a nanotron 0.4 weights-only `checkpoint/`.

    Refused (NanotronExportError): a model nanotron's Llama cannot express, a vocab_size not equal to the
    tokenizer's or not divisible by tp, heads not divisible by tp, token shards whose counts do not add up."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if tp_mode.upper() not in TP_MODES:
        raise NanotronExportError(f"tp_mode={tp_mode!r}: choose from {list(TP_MODES)}")
    record = RunRecord.load(run_dir)
    doc = record.config
    model = ModelConfig.from_dict(doc["model"])
    train = TrainConfig.from_dict(doc["train"])
    _refuse_for_llama(model)
    warnings: list[str] = []
    manifest = ShardManifest.load(doc.get("manifest_dir") or doc["data"]["curated"])
    if manifest.tokenizer is None:
        raise NanotronExportError(f"{manifest.root}: not tokenized; the run's data has no tokenizer")
    if doc.get("tokenizer_sha256") and doc["tokenizer_sha256"] != manifest.tokenizer.sha256:
        raise NanotronExportError(f"{manifest.root}: its tokenizer is not the one run {record.run_id} trained "
                                  "with; "
                                  "re-tokenize with the run's tokenizer")
    source_tokenizer = manifest.resolve(manifest.tokenizer.path)
    source_tokenizer = source_tokenizer if source_tokenizer.is_dir() else source_tokenizer.parent
    ids = _tokenizer_ids(source_tokenizer)
    if model.vocab_size != ids.vocab_size:
        raise NanotronExportError(f"model vocab_size={model.vocab_size} but the tokenizer has {ids.vocab_size} "
                                  "tokens; nanotron needs them equal")
    for what, value in (("tp", tp), ("pp", pp), ("dp", dp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise NanotronExportError(f"{what}={value!r} must be a whole number >= 1")
    if model.vocab_size % tp:
        raise NanotronExportError(f"vocab_size={model.vocab_size} is not divisible by tp={tp}: nanotron shards "
                                  "the embedding evenly over tp ranks; choose a tp that divides it")
    for what, value in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads)):
        if value % tp:
            raise NanotronExportError(f"model {what}={value} is not divisible by tp={tp}")
    if model.n_layers < pp:
        raise NanotronExportError(f"pp={pp} exceeds the model's {model.n_layers} layers")
    if float(model.rope_theta) != ROPE_BASE_0_4:
        warnings.append(f"rope_theta={model.rope_theta}: nanotron 0.4's Llama hard-wires RoPE base "
                        f"{ROPE_BASE_0_4} "
                        "(upstream master reads model_config.rope_theta), so 0.4 computes another function")
    schedule = MixtureSchedule.from_dict(doc["mixture"]) if doc.get("mixture") else None
    if schedule is None:
        raise NanotronExportError(f"{run_dir}/run.json: no mixture schedule recorded")
    if not schedule.is_flat:
        schedule = schedule.flatten({n: s.tokens.get("train", 0) for n, s in manifest.sources.items()})

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = (out_dir / "tokenizer").resolve()
    tokenizer_dir.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source_tokenizer / name, tokenizer_dir / name)
    token_dirs = export_token_shards(manifest, list(schedule.sources), (out_dir / "tokens").resolve(),
                                     str(tokenizer_dir), model.vocab_size)
    config = nanotron_config(record, schedule, model, train, token_dirs=token_dirs, tokenizer_dir=tokenizer_dir,
                             ids=ids, checkpoints_path=(out_dir / "checkpoints").resolve(), tp=tp, pp=pp, dp=dp,
                             tp_mode=tp_mode.upper())
    if validate:
        validate_with_nanotron(config)
    config_yaml = out_dir / "config.yaml"
    config_yaml.write_text(yaml.safe_dump(config, sort_keys=False))

    checkpoint_dir = None
    if with_checkpoint:
        path = resolve_checkpoint(checkpoint) if checkpoint is not None else _latest_or_none(run_dir)
        if path is not None:
            ckpt = read_checkpoint(path)
            if ckpt.model_config is not None and ModelConfig.from_dict(ckpt.model_config) != model:
                raise NanotronExportError(f"{path}: its model_config is not the run's; export the run it "
                                          "belongs to")
            samples = ckpt.step * train.batch_size * train.grad_accum * int(doc.get("world_size") or 1)
            checkpoint_dir = write_nanotron_checkpoint(
                _load_tensors(path / "model.pt"), model, config["model"]["model_config"], out_dir / "checkpoint",
                step=ckpt.step, consumed_train_samples=samples)
    return NanotronExport(out_dir, config_yaml, tokenizer_dir, token_dirs, checkpoint_dir, warnings)


def _latest_or_none(run_dir: Path) -> Path | None:
    try:
        return resolve_checkpoint(run_dir)
    except CheckpointError:
        return None


def read_shard_tokens(ds: Path) -> np.ndarray:
    """The tokens of one `.ds` file, memory-mapped with the dtype its metadata names."""
    meta = ShardMetadata.read(ds)
    return np.memmap(ds, dtype=np.uint16 if meta.token_size == 2 else np.uint32, mode="r")
