"""A mixlab model exported to HF loads as LlamaForCausalLM with the same logits, and an HF Llama imports back
with the same logits; tied/untied heads, GQA, both places rope_theta lives, no BOS, refused configs, tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from mixlab.training import ConfigError, ModelConfig, Transformer, save_checkpoint
from mixlab.training.errors import CheckpointError
from mixlab.training.hf import WEIGHTS_FILE, export_hf, hf_config, import_hf, model_config_from_hf

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

torch.set_num_threads(1)  # tiny models: a second thread only adds sync (and stalls on a busy machine)
TOLERANCE = 1e-4
VOCAB = 96


def tiny_config(**overrides) -> ModelConfig:
    # GQA (4 query heads share 2 kv heads) and a non-default theta, so RoPE and head grouping both matter
    return ModelConfig.preset("tiny", vocab_size=VOCAB, rope_theta=500.0, init_std=0.08, **overrides)


def random_mixlab_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():  # norm gains away from 1, so swapping input/post-attention norms would show
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def random_hf_model(seed: int = 1, **overrides) -> "transformers.LlamaForCausalLM":
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.08,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 2500.0},
                  bos_token_id=None, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**values, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def tokens(seed: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def max_logit_gap(mixlab_model: Transformer, hf_model, idx: torch.Tensor) -> float:
    with torch.no_grad():
        ours, _ = mixlab_model(idx)
        theirs = hf_model(idx).logits.float()
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 0.5  # logits big enough that a wrong mapping could not hide under the tolerance
    return (ours - theirs).abs().max().item()


def rewrite_config(hf_dir: Path, edit) -> None:
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---- mixlab -> HF --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_as_llama_with_equal_logits(tmp_path: Path, tied: bool):
    model = random_mixlab_model(tiny_config(tie_embeddings=tied))
    out = export_hf(model, tmp_path / "hf")
    stored = safetensors_torch.load_file(out / WEIGHTS_FILE)
    assert ("lm_head.weight" in stored) is not tied  # tied: HF re-ties it from embed_tokens
    hf, loading = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # nothing left at random init
    assert hf.config.num_key_value_heads == 2 < hf.config.num_attention_heads
    assert hf.config.tie_word_embeddings is tied
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE
    # and back: the round trip reproduces the model exactly
    back, cfg = import_hf(out)
    assert cfg.rope_theta == 500.0 and cfg.tie_embeddings is tied and cfg.n_kv_heads == 2
    idx = tokens(3)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


def test_rope_layout_matters_so_the_logit_check_can_fail(tmp_path: Path):
    """Permuting q/k rows into the interleaved layout changes HF's logits: the equality above is evidence that
    mixlab's halves layout is HF's rotate_half, not an accident of the test."""
    model = random_mixlab_model(tiny_config())
    out = export_hf(model, tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    head_dim = model.config.head_dim
    interleave = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    with torch.no_grad():
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                w = proj.weight.view(-1, head_dim, proj.weight.shape[1])
                proj.weight.copy_(w[:, interleave].reshape_as(proj.weight))
    assert max_logit_gap(model, hf, tokens()) > 100 * TOLERANCE


def test_export_from_a_checkpoint_directory(tmp_path: Path):
    cfg = tiny_config()
    model = random_mixlab_model(cfg)
    save_checkpoint(tmp_path / "run" / "checkpoints", 7, model, None, configs={"model_config": cfg.to_dict()})
    out = export_hf(tmp_path / "run", tmp_path / "hf")  # a run directory: its latest checkpoint
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE
    from mixlab.pipelines.cli import main  # the same from the command line

    assert main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf-cli")]) == 0
    cli = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf-cli").eval()
    assert max_logit_gap(model, cli, tokens()) < TOLERANCE
    assert main(["export-hf", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


# ---- HF -> mixlab --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_imports_with_equal_logits(tmp_path: Path, tied: bool):
    hf = random_hf_model(tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path / "hf")
    model, cfg = import_hf(tmp_path / "hf")
    assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.rope_theta, cfg.norm_eps) == (tied, 2, 2500.0, 1e-5)
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE


def test_tied_embeddings_without_lm_head_in_the_file(tmp_path: Path):
    hf = random_hf_model(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / WEIGHTS_FILE
    stored = safetensors_torch.load_file(path)
    if "lm_head.weight" in stored:  # some transformers versions write the tied copy: remove it ourselves
        del stored["lm_head.weight"]
        safetensors_torch.save_file(stored, path, metadata={"format": "pt"})
    assert "lm_head.weight" not in safetensors_torch.load_file(path)
    model, _ = import_hf(tmp_path / "hf")
    assert model.lm_head.weight is model.tok_emb.weight
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE


def test_untied_config_without_lm_head_is_refused(tmp_path: Path):
    hf = random_hf_model(tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / WEIGHTS_FILE
    stored = safetensors_torch.load_file(path)
    del stored["lm_head.weight"]
    safetensors_torch.save_file(stored, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no lm_head.weight and tie_word_embeddings is false"):
        import_hf(tmp_path / "hf")


@pytest.mark.parametrize("where", ["rope_parameters", "top_level"])
def test_rope_theta_is_read_where_either_transformers_version_writes_it(tmp_path: Path, where: str):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")

    def place_theta(config: dict) -> None:
        config.pop("rope_theta", None)
        config.pop("rope_parameters", None)
        if where == "rope_parameters":  # transformers 5
            config["rope_parameters"] = {"rope_type": "default", "rope_theta": 2500.0}
        else:  # transformers 4: top level, rope_scaling null
            config["rope_theta"], config["rope_scaling"] = 2500.0, None

    rewrite_config(tmp_path / "hf", place_theta)
    model, cfg = import_hf(tmp_path / "hf")
    assert cfg.rope_theta == 2500.0
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE


def test_config_without_bos_token_imports(tmp_path: Path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    rewrite_config(tmp_path / "hf", lambda c: c.pop("bos_token_id", None))
    assert "bos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    model, _ = import_hf(tmp_path / "hf")
    assert max_logit_gap(model, hf, tokens()) < TOLERANCE


# ---- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, field", [
    ({"qk_norm": True}, "qk_norm"),
    ({"nope_layers": [1]}, "nope_layers"),
])
def test_a_config_llama_cannot_express_is_refused_on_export(tmp_path: Path, overrides: dict, field: str):
    model = random_mixlab_model(tiny_config(**overrides))
    with pytest.raises(ConfigError, match=field) as err:
        export_hf(model, tmp_path / "hf")
    assert err.value.fields == (f"model.{field}",)
    assert not (tmp_path / "hf").exists()  # refused before anything was written


@pytest.mark.parametrize("edit, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_type"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"head_dim": 32}, "head_dim"),
    ({"model_type": "mistral"}, "model_type"),
])
def test_a_config_mixlab_cannot_represent_is_refused_on_import(edit: dict, field: str):
    config = hf_config(tiny_config())
    with pytest.raises(ConfigError, match=field):
        model_config_from_hf({**config, **edit}, "some/config.json")


# ---- tokenizer -----------------------------------------------------------------------------------------------
def test_tokenizer_files_are_copied_and_load_offline(tokenized_curated: Path, tmp_path: Path, monkeypatch):
    from tokenizers import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer_dir = tokenized_curated / "tokenizer"
    reference = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cfg = ModelConfig.preset("tiny", vocab_size=reference.get_vocab_size())
    model = random_mixlab_model(cfg)
    out = export_hf(model, tmp_path / "hf", tokenizer_dir=tokenizer_dir)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "def mix(a, b):\n    return a + b  # Grüße, привет"
    ids = hf_tokenizer(text)["input_ids"]
    assert ids == reference.encode(text).ids
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] is None  # the fixture's tokenizer has no BOS
    assert config["eos_token_id"] == hf_tokenizer.eos_token_id == reference.token_to_id("<|endoftext|>")

    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    idx = torch.tensor([ids])
    assert max_logit_gap(model, hf, idx) < TOLERANCE


def test_a_tokenizer_larger_than_the_vocab_is_refused(tokenized_curated: Path, tmp_path: Path):
    model = random_mixlab_model(tiny_config())  # vocab 96 < the fixture tokenizer's 600
    with pytest.raises(ConfigError, match="vocab_size"):
        export_hf(model, tmp_path / "hf", tokenizer_dir=tokenized_curated / "tokenizer")
