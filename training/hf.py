"""Hugging Face interop for the dense model: export to a directory `transformers` loads as `LlamaForCausalLM`, and
import such a directory back into a mixlab `Transformer`.

The model is already Llama's architecture (RMSNorm, RoPE, GQA, SwiGLU), so conversion is a renaming of tensors
plus a config translation. The renaming is one table, `NAME_MAP`, read in both directions. No tensor needs a
transform: mixlab's RoPE rotates (x_i, x_{i+d/2}) pairs (the "rotate_half" halves layout), the same convention HF
Llama applies to q_proj/k_proj outputs, so q/k weight rows keep their order (tests/test_hf_interop.py checks it
numerically: logits agree within 1e-4 both ways). What Llama cannot express (QK-norm, NoPE layers, YaRN, MLA, MoE,
SSM layers; on import: biases, other activations, RoPE scaling) is refused with an error naming the field, never
silently dropped. Intra-document masking is a way of training, not a change of weights: it exports.

A directory holds config.json, model.safetensors (or shards with model.safetensors.index.json) and, when given,
the tokenizer files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mixlab.training.checkpoint import canonical_name, resolve_checkpoint
from mixlab.training.errors import CheckpointError, ConfigError
from mixlab.training.evaluate import load_model
from mixlab.training.model import ModelConfig, Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
HF_ARCHITECTURE = "LlamaForCausalLM"

# mixlab name <-> HF Llama name; "{i}" is the layer index, the same on both sides. The only place names live.
NAME_MAP: tuple[tuple[str, str], ...] = (
    ("tok_emb.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attn.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.w_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.w_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.w_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
# HF tensors that carry no learned state (older transformers saved RoPE's inverse frequencies): skipped on import
HF_IGNORED = (re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern(mixlab), hf) for mixlab, hf in NAME_MAP]
_FROM_HF = [(_pattern(hf), mixlab) for mixlab, hf in NAME_MAP]


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if match := pattern.match(name):
            return template.replace("{i}", match.group("i")) if "i" in pattern.groupindex else template
    return None


def hf_name(mixlab_name: str) -> str:
    """The HF Llama name of a mixlab parameter (wrapper prefixes such as `module.` are dropped first)."""
    name = canonical_name(mixlab_name)
    if (renamed := _rename(name, _TO_HF)) is None:
        raise ConfigError(f"mixlab parameter {name!r} has no Llama counterpart in training.hf.NAME_MAP; a model "
                          "with extra parameters (e.g. qk_norm) cannot be exported as LlamaForCausalLM")
    return renamed


def mixlab_name(hf_tensor_name: str) -> str | None:
    """The mixlab name of an HF Llama tensor, None for tensors mixlab ignores (see HF_IGNORED)."""
    if any(p.match(hf_tensor_name) for p in HF_IGNORED):
        return None
    return _rename(hf_tensor_name, _FROM_HF)


# ---- configs -------------------------------------------------------------------------------------------------
# ModelConfig fields config.json carries (or that only shape training, like z_loss); any other field must hold the
# value Llama computes with, else export is refused naming it. A field added to ModelConfig later is refused when
# set away from its default until this module learns to express it.
# doc_masking only changes which tokens attend to which when packed rows come with segment_ids: the weights are
# a plain Llama's, and HF computes the same logits for one document (or with its own packed-sequence masking).
_CARRIED_FIELDS = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len",
                   "rope_theta", "norm_eps", "tie_embeddings", "init_std", "z_loss", "doc_masking"}
_LLAMA_VALUES: dict[str, tuple[Any, str]] = {
    "qk_norm": (False, "LlamaForCausalLM has no per-head query/key norm"),
    "nope_layers": ([], "LlamaForCausalLM applies RoPE in every layer (nope_every adds to nope_layers)"),
    "nope_every": (None, "LlamaForCausalLM applies RoPE in every layer"),
    "yarn_factor": (1.0, "mixlab's YaRN is not mapped onto HF's rope_parameters yet"),
    "attention": ("mha", "LlamaForCausalLM has no multi-head latent attention (that is DeepSeek-V2's architecture)"),
    "n_experts": (0, "LlamaForCausalLM's MLP is one dense SwiGLU, not a mixture of experts"),
    "ssm_layers": ([], "LlamaForCausalLM has attention in every layer, no SSM mixer layers (attention_every adds "
                       "to ssm_layers)"),
    "attention_every": (None, "LlamaForCausalLM has attention in every layer, no SSM mixer layers"),
}
# fields that only take effect when another field is switched on: ignored while that one holds its "off" value
_DEPENDS_ON: dict[str, tuple[str, Any]] = {
    **{name: ("yarn_factor", 1.0) for name in ("yarn_beta_fast", "yarn_beta_slow", "yarn_original_max_seq_len")},
    **{name: ("attention", "mha") for name in ("mla_kv_rank", "mla_q_rank", "mla_rope_dim")},
    **{name: ("n_experts", 0) for name in ("moe_top_k", "expert_hidden", "n_shared_experts", "moe_first_dense",
                                           "moe_balance", "moe_aux_loss", "moe_bias_rate", "router_z_loss")},
    **{name: ("ssm_layers", []) for name in ("ssm_state", "ssm_expand", "ssm_conv")},
}


def _refuse_for_llama(cfg: ModelConfig) -> None:
    for f in fields(cfg):
        if f.name in _CARRIED_FIELDS:
            continue
        value = getattr(cfg, f.name)
        if f.name in _LLAMA_VALUES:
            expected, why = _LLAMA_VALUES[f.name]
        else:
            expected = f.default_factory() if f.default_factory is not MISSING else f.default
            why = "training.hf does not know how to express this field in a Llama config"
        switch = _DEPENDS_ON.get(f.name)
        if value != expected and not (switch is not None and getattr(cfg, switch[0], switch[1]) == switch[1]):
            raise ConfigError(f"model config has {f.name}={value!r}: {why}, so the export would change the model; "
                              f"export a model trained with {f.name}={expected!r}", fields=(f"model.{f.name}",))


def hf_config(model_config: ModelConfig, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
              pad_token_id: int | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for LlamaForCausalLM. RoPE's theta is written both at the top level (transformers 4 reads it
    there) and under rope_parameters (transformers 5). z_loss is a training-time loss term, not part of the model,
    so it is not carried over."""
    _refuse_for_llama(model_config)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": model_config.vocab_size,
        "hidden_size": model_config.d_model,
        "intermediate_size": model_config.ffn_hidden,
        "num_hidden_layers": model_config.n_layers,
        "num_attention_heads": model_config.n_heads,
        "num_key_value_heads": model_config.n_kv_heads,
        "head_dim": model_config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_config.max_seq_len,
        "rms_norm_eps": model_config.norm_eps,
        "initializer_range": model_config.init_std,
        "tie_word_embeddings": model_config.tie_embeddings,
        "rope_theta": model_config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def _rope_theta(config: dict[str, Any], where: str) -> float:
    """theta from rope_parameters (transformers 5) or the top level (4); any RoPE scaling is refused."""
    scaling = config.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ConfigError(f"{where}: rope_scaling={scaling} is not supported (mixlab has plain RoPE only); "
                          "import a model without RoPE scaling")
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: rope_parameters={params!r} is not an object; expected "
                          '{"rope_type": "default", "rope_theta": ...}')
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where}: rope_parameters are given per layer type ({sorted(params)}); mixlab uses one "
                          "RoPE for all layers")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}: rope_parameters.rope_type={rope_type!r} is not supported (mixlab has plain "
                          "RoPE only); import a model with rope_type 'default'")
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"{where}: partial_rotary_factor={partial} is not supported; mixlab rotates whole heads")
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(f"{where}: rope_theta={theta!r} must be a positive number")
    return float(theta)


def model_config_from_hf(config: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfig:
    """ModelConfig for a Llama config.json dict; refuses (naming the field) what mixlab's model cannot compute.
    Token ids (bos/eos/pad) are tokenizer facts, not model facts: a missing bos_token_id is fine."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: model_type={model_type!r}; only Llama ('llama') configs can be imported")
    architectures = config.get("architectures") or [HF_ARCHITECTURE]
    if any(a not in (HF_ARCHITECTURE, "LlamaModel") for a in architectures):
        raise ConfigError(f"{source}: architectures={architectures}; only {HF_ARCHITECTURE} can be imported")
    refusals = {
        "hidden_act": (("silu", "swish"), "mixlab's MLP is SwiGLU (SiLU gate)"),
        "attention_bias": (False, "mixlab's attention projections have no bias"),
        "mlp_bias": (False, "mixlab's MLP projections have no bias"),
    }
    for key, (allowed, why) in refusals.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if key in config and config[key] not in allowed:
            raise ConfigError(f"{source}: {key}={config[key]!r} is not supported ({why}); expected {allowed[0]!r}")
    if config.get("quantization_config"):
        raise ConfigError(f"{source}: quantization_config is set; import an unquantized checkpoint")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in config:
            raise ConfigError(f"{source}: missing {key!r}; a Llama config.json needs it")
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    if head_dim * n_heads != config["hidden_size"]:
        raise ConfigError(f"{source}: head_dim={head_dim} x num_attention_heads={n_heads} != hidden_size="
                          f"{config['hidden_size']}; mixlab derives head_dim as hidden_size / num_attention_heads")
    values = dict(
        vocab_size=config["vocab_size"],
        d_model=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_theta=_rope_theta(config, source),
        norm_eps=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),  # LlamaConfig's default is untied
        init_std=config.get("initializer_range", 0.02),
    )
    try:
        return ModelConfig.from_dict(values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


# ---- state dicts ---------------------------------------------------------------------------------------------
def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF-named tensors of a mixlab model; a tied lm_head is left out (HF re-ties it from embed_tokens)."""
    cfg: ModelConfig = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        name = canonical_name(name)
        if name in ("rope_cos", "rope_sin"):
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        # own contiguous memory: safetensors refuses shared or strided tensors
        out[hf_name(name)] = tensor.detach().cpu().contiguous().clone()
    return out


def from_hf_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """mixlab-named tensors (fp32) for a model of `cfg`; names what is missing, unexpected or mis-shaped."""
    if tensors and not any(k.startswith("model.") for k in tensors):  # saved from LlamaModel (no causal-LM head)
        tensors = {f"model.{k}": v for k, v in tensors.items()}
    state, unexpected = {}, []
    for name, tensor in tensors.items():
        target = mixlab_name(name)
        if target is None:
            if not any(p.match(name) for p in HF_IGNORED):
                unexpected.append(name)
            continue
        state[target] = tensor.to(torch.float32)
    if cfg.tie_embeddings:
        # HF ties lm_head to embed_tokens; a file may hold a copy of it or (usually) none at all
        state["lm_head.weight"] = state.get("tok_emb.weight", state.get("lm_head.weight"))
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {canonical_name(k): v.shape for k, v in Transformer(cfg).state_dict().items()}
    missing = sorted(set(expected) - {k for k, v in state.items() if v is not None})
    unexpected += sorted(set(state) - set(expected))
    if missing == ["lm_head.weight"]:
        raise CheckpointError(f"{source}: no lm_head.weight and tie_word_embeddings is false, so the output layer "
                              "is unknown; set tie_word_embeddings: true in config.json if the model ties it")
    if missing or unexpected:
        hf_missing = [hf_name(m) for m in missing]
        raise CheckpointError(f"{source}: tensors do not match config.json; missing {hf_missing[:5]}, unexpected "
                              f"{unexpected[:5]}: the file is not a {HF_ARCHITECTURE} of that config")
    wrong = [(hf_name(k), tuple(state[k].shape), tuple(expected[k])) for k in expected
             if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        name, got, want = wrong[0]
        raise CheckpointError(f"{source}: {name} has shape {got}, config.json implies {want}; the weights and "
                              "config.json come from different models")
    return state


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:  # comes with transformers, which mixlab needs only for tests
        raise CheckpointError("HF interop needs the safetensors package: pip install safetensors") from err
    return safetensors.torch


def _read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    st = _safetensors()
    single, index = hf_dir / WEIGHTS_FILE, hf_dir / WEIGHTS_INDEX_FILE
    try:
        if single.is_file():
            return st.load_file(single, device="cpu")
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors |= st.load_file(hf_dir / shard, device="cpu")
            return tensors
    except Exception as err:  # OSError, bad JSON, a truncated file (safetensors' SafetensorError is an Exception)
        raise CheckpointError(f"{hf_dir}: weights unreadable ({type(err).__name__}: {err}); re-export or "
                              "re-download the model") from err
    found = sorted(p.name for p in hf_dir.iterdir()) if hf_dir.is_dir() else []
    raise CheckpointError(f"{hf_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} (found {found[:8]}); only "
                          "safetensors weights are read: save the model with save_pretrained(safe_serialization=True)")


# ---- tokenizer files -----------------------------------------------------------------------------------------
@dataclass
class TokenIds:
    """Special token ids config.json carries, read from a tokenizer folder."""

    bos: int | None = None
    eos: int | None = None
    pad: int | None = None
    vocab_size: int = 0


def _tokenizer_ids(tokenizer_dir: Path) -> TokenIds:
    from tokenizers import Tokenizer

    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise CheckpointError(f"{tokenizer_dir}: missing tokenizer files {missing}; point tokenizer_dir at a "
                              "`mixlab tokenize` output folder (<curated>/tokenizer), or write the transformers "
                              "files with curation.write_transformers_config")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        special = json.loads((tokenizer_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{tokenizer_dir}: tokenizer files unreadable ({err}); re-run `mixlab tokenize`") from err

    def token_id(key: str) -> int | None:
        token = special.get(key)
        if isinstance(token, dict):  # {"content": ..., "lstrip": ...} form
            token = token.get("content")
        if token is None:
            return None
        found = tokenizer.token_to_id(token)
        if found is None:
            raise CheckpointError(f"{tokenizer_dir}/special_tokens_map.json: {key} {token!r} is not in tokenizer.json;"
                                  " re-run `mixlab tokenize`")
        return found

    return TokenIds(bos=token_id("bos_token"), eos=token_id("eos_token"), pad=token_id("pad_token"),
                    vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))


# ---- export / import -----------------------------------------------------------------------------------------
def export_hf(model_or_checkpoint: Transformer | str | Path, out_dir: str | Path,
              tokenizer_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors and (given tokenizer_dir) the tokenizer files into out_dir, which
    `transformers.LlamaForCausalLM.from_pretrained(out_dir)` loads. A path is a checkpoint, a checkpoints
    directory or a run directory (its latest checkpoint). Returns out_dir."""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
        if not isinstance(getattr(model, "config", None), ModelConfig):
            raise ConfigError(f"{type(model).__name__} is not a mixlab Transformer; pass one or a checkpoint path")
    else:
        model, _ = load_model(resolve_checkpoint(model_or_checkpoint))
    cfg: ModelConfig = model.config
    ids = TokenIds()
    if tokenizer_dir is not None:
        ids = _tokenizer_ids(Path(tokenizer_dir))
        if ids.vocab_size > cfg.vocab_size:
            raise ConfigError(f"{tokenizer_dir}: tokenizer has {ids.vocab_size} tokens but the model's vocab_size is "
                              f"{cfg.vocab_size}; export with the tokenizer the model was trained with")
    config = hf_config(cfg, bos_token_id=ids.bos, eos_token_id=ids.eos, pad_token_id=ids.pad, dtype=dtype)
    tensors = {k: v.to(dtype) for k, v in to_hf_state_dict(model).items()}
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another export directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_INDEX_FILE).unlink(missing_ok=True)  # a stale index would shadow the fresh single file
    _safetensors().save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    return out


def import_hf(hf_dir: str | Path) -> tuple[Transformer, ModelConfig]:
    """A mixlab Transformer (fp32, eval mode) with the weights of an HF Llama directory, and its ModelConfig."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir}: no {CONFIG_FILE}; point at a directory written by save_pretrained or "
                              "training.hf.export_hf")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path}: unreadable ({err}); re-export the model") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: holds a JSON {type(config).__name__}, not an object")
    cfg = model_config_from_hf(config, str(config_path))
    state = from_hf_state_dict(_read_weights(hf_dir), cfg, str(hf_dir))
    model = Transformer(cfg)
    model.load_state_dict(state, strict=True)  # tied: both names point at one parameter, loaded twice identically
    return model.eval(), cfg
