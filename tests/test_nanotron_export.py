"""A finished mixlab run exported for upstream nanotron: config, token shards, tokenizer and a 0.4 checkpoint that
hold the run's own values, checked with nanotron 0.4's own parsers where they import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mixlab.curation.manifest import ShardManifest
from mixlab.mixtures.schedule import MixtureSchedule
from mixlab.pipelines.cli import main
from mixlab.training import RunRecord
from mixlab.training.checkpoint import latest_checkpoint
from mixlab.training.model import ModelConfig, apply_rope, rope_tables
from mixlab.training.nanotron_export import (
    NanotronExport,
    NanotronExportError,
    export_nanotron,
    read_shard_tokens,
    rope_interleave_permutation,
    validate_with_nanotron,
)

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def run_dir(tokenized_curated: Path, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("nanotron-export") / "runs"
    assert main(["train", "--curated", str(tokenized_curated), "--runs", str(runs), "--run-id", "nt",
                 "--model-preset", "tiny", "--train-preset", "tiny", "--steps", "6",
                 "--set", "train.warmup_steps=2", "--set", "train.checkpoint_every=3"]) == 0
    return runs / "nt"


@pytest.fixture(scope="module")
def exported(run_dir: Path, tmp_path_factory) -> NanotronExport:
    return export_nanotron(run_dir, tmp_path_factory.mktemp("out") / "nanotron", tp=2, dp=2)


def _nanotron_importable() -> bool:
    try:
        from mixlab.training.nanotron_compat import ensure_nanotron

        ensure_nanotron()
        import nanotron.config  # noqa: F401
        import nanotron.serialize.metadata  # noqa: F401
    except Exception:
        return False
    return True


def test_config_holds_the_run_values_and_the_schedule(run_dir: Path, exported: NanotronExport):
    config = yaml.safe_load(exported.config_yaml.read_text())
    record = RunRecord.load(run_dir)
    model, train = record.config["model"], record.config["train"]
    assert config["parallelism"].items() >= {"tp": 2, "pp": 1, "dp": 2, "pp_engine": "1f1b",
                                           "tp_linear_async_communication": False}.items()
    llama = config["model"]["model_config"]
    assert (llama["hidden_size"], llama["intermediate_size"], llama["num_hidden_layers"]) == (
        model["d_model"], model["ffn_hidden"], model["n_layers"])
    assert (llama["num_attention_heads"], llama["num_key_value_heads"], llama["vocab_size"]) == (
        model["n_heads"], model["n_kv_heads"], 600)
    assert llama["tie_word_embeddings"] is model["tie_embeddings"] and llama["hidden_act"] == "silu"
    assert config["model"]["init_method"] == {"std": model["init_std"]}
    assert exported.warnings == []  # rope_theta 10000 is 0.4's hard-wired base
    assert Path(config["tokenizer"]["tokenizer_name_or_path"]) == exported.tokenizer_dir
    assert (exported.tokenizer_dir / "tokenizer.json").is_file()
    assert config["tokens"] == config["tokens"] | {
        "sequence_length": train["seq_len"], "micro_batch_size": train["batch_size"],
        "batch_accumulation_per_replica": train["grad_accum"], "train_steps": 6}
    assert config["optimizer"]["learning_rate_scheduler"]["learning_rate"] == train["lr"]
    assert config["optimizer"]["adam_beta2"] == train["beta2"]

    schedule = MixtureSchedule.from_dict(record.config["mixture"])
    assert [s["name"] for s in config["data_stages"]] == [s.name for s in schedule.stages]
    assert config["data_stages"][0]["start_training_step"] == 1
    for stage, exported_stage in zip(schedule.stages, config["data_stages"], strict=True):
        dataset = exported_stage["data"]["dataset"]
        assert dataset["dataset_weights"] == [float(w) for w in stage.weights.values()]
        assert [Path(f).name for f in dataset["dataset_folder"]] == list(stage.weights)
        for folder in dataset["dataset_folder"]:
            assert sorted(Path(folder).glob("*.ds")), folder
    if _nanotron_importable():
        assert validate_with_nanotron(config) == ["data_stages", "model.model_config.rope_theta"]


def test_token_shards_name_the_tokenizer_and_hold_the_run_tokens(run_dir: Path, exported: NanotronExport):
    tokenizer_name = yaml.safe_load(exported.config_yaml.read_text())["tokenizer"]["tokenizer_name_or_path"]
    manifest = ShardManifest.load(RunRecord.load(run_dir).config["manifest_dir"])
    for source, folder in exported.token_dirs.items():
        shards = sorted(folder.glob("*.ds"))
        originals = [manifest.resolve(s.path) for s in manifest.source(source).token_shards if s.split == "train"]
        assert len(shards) == len(originals)
        total = 0
        for shard, original in zip(shards, sorted(originals), strict=True):
            lines = Path(f"{shard}.metadata").read_text().splitlines()
            assert lines[0] == f"{tokenizer_name}|2"
            tokens = read_shard_tokens(shard)
            assert int(lines[1]) == len(tokens)
            np.testing.assert_array_equal(tokens, np.memmap(original, dtype=np.uint16, mode="r"))
            np.testing.assert_array_equal(np.fromfile(f"{shard}.index", np.uint64),
                                          np.fromfile(f"{original}.index", np.uint64))
            assert not Path(f"{original}.metadata").read_text().startswith(tokenizer_name)  # run's file untouched
            total += len(tokens)
        assert total == manifest.source(source).tokens["train"], source


def test_vocab_not_divisible_by_tp_is_refused(run_dir: Path, tmp_path: Path):
    with pytest.raises(NanotronExportError, match=r"vocab_size=600 .*tp=16"):
        export_nanotron(run_dir, tmp_path / "out", tp=16)


def test_a_shard_whose_size_disagrees_with_its_metadata_is_refused(run_dir: Path, tmp_path: Path):
    manifest = ShardManifest.load(RunRecord.load(run_dir).config["manifest_dir"])
    ds = manifest.resolve(manifest.source("math").token_shards[0].path)
    meta = Path(f"{ds}.metadata")
    saved = meta.read_text()
    head, count = saved.splitlines()
    try:
        meta.write_text(f"{head}\n{int(count) + 1}\n")
        with pytest.raises(NanotronExportError, match=ds.name):
            export_nanotron(run_dir, tmp_path / "out", with_checkpoint=False, validate=False)
    finally:
        meta.write_text(saved)


def test_checkpoint_is_nanotron_format_with_the_run_weights(run_dir: Path, exported: NanotronExport):
    assert exported.checkpoint_dir is not None
    weights = torch.load(latest_checkpoint(run_dir / "checkpoints") / "model.pt", weights_only=True)
    cfg = ModelConfig.from_dict(RunRecord.load(run_dir).config["model"])
    perm = rope_interleave_permutation(cfg.head_dim)

    def heads(w: torch.Tensor, n: int) -> torch.Tensor:
        return w.view(n, cfg.head_dim, -1)[:, perm].reshape(n * cfg.head_dim, -1)

    expected = {"model.token_position_embeddings.pp_block.token_embedding.weight": weights["tok_emb.weight"],
                "model.final_layer_norm.pp_block.weight": weights["norm.weight"]}
    for i in range(cfg.n_layers):
        p, m = f"model.decoder.{i}.pp_block", f"layers.{i}"
        expected |= {
            f"{p}.attn.qkv_proj.weight": torch.cat([heads(weights[f"{m}.attn.wq.weight"], cfg.n_heads),
                                                    heads(weights[f"{m}.attn.wk.weight"], cfg.n_kv_heads),
                                                    weights[f"{m}.attn.wv.weight"]]),
            f"{p}.attn.o_proj.weight": weights[f"{m}.attn.wo.weight"],
            f"{p}.mlp.gate_up_proj.weight": torch.cat([weights[f"{m}.mlp.w_gate.weight"],
                                                       weights[f"{m}.mlp.w_up.weight"]]),
            f"{p}.mlp.down_proj.weight": weights[f"{m}.mlp.w_down.weight"],
            f"{p}.input_layernorm.weight": weights[f"{m}.attn_norm.weight"],
            f"{p}.post_attention_layernorm.weight": weights[f"{m}.mlp_norm.weight"],
        }
    files = sorted((exported.checkpoint_dir / "model").rglob("*.safetensors"))
    assert len(files) == len(expected)  # tied: no lm_head file
    parse = None
    if _nanotron_importable():
        from nanotron.serialize.metadata import TensorMetadata

        parse = TensorMetadata.from_str_dict
    from safetensors import safe_open

    for name, tensor in expected.items():
        *folders, leaf = name.split(".")
        sharded = "norm" not in name
        suffix = "_pp-rank-0-of-1_tp-rank-0-of-1" if sharded else ""
        path = exported.checkpoint_dir.joinpath("model", *folders, f"model_{leaf}{suffix}.safetensors")
        assert path in files, path
        torch.testing.assert_close(safetensors_torch.load_file(path)["data"], tensor, rtol=0, atol=0)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if sharded:
            assert metadata["unsharded_shape"] == str(tuple(tensor.shape))
            if parse is not None:
                parsed = parse(metadata)
                assert tuple(parsed.unsharded_shape) == tuple(tensor.shape)
                rebuilt = torch.empty_like(tensor)
                for pair in parsed.local_global_slices_pairs:
                    rebuilt[pair.global_slices] = tensor[pair.local_slices]
                torch.testing.assert_close(rebuilt, tensor)
                if name.endswith("qkv_proj.weight"):
                    assert len(parsed.local_global_slices_pairs) == 3
    meta = (exported.checkpoint_dir / "checkpoint_metadata.json").read_text()
    assert '"last_train_step": 6' in meta and '"version": "1.2"' in meta
    if parse is not None:  # as 0.4's serialize.metadata.load_meta reads it
        import dacite
        from nanotron.serialize.metadata import CheckpointMetadata
        from packaging.version import Version

        loaded = dacite.from_dict(CheckpointMetadata, json.loads(meta), config=dacite.Config(cast=[Version]))
        assert (loaded.tp, loaded.dp, loaded.metas["last_train_step"]) == (1, 1, 6)
    assert (exported.checkpoint_dir / "model_config.json").is_file()


def _interleaved_rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate adjacent (x_2i, x_2i+1) pairs, as nanotron 0.4's Llama does; x is [T, D]."""
    t, d = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(t, dtype=torch.float64), freqs)
    return torch.view_as_real(torch.view_as_complex(x.view(t, d // 2, 2)) * torch.polar(torch.ones_like(angles),
                                                                                        angles)).reshape(t, d)


def test_permuted_rows_give_nanotron_the_same_attention_scores():
    torch.manual_seed(0)
    d, t = 16, 9
    wq, wk = torch.randn(d, 32, dtype=torch.float64), torch.randn(d, 32, dtype=torch.float64)
    x = torch.randn(t, 32, dtype=torch.float64)
    cos, sin = (c.double() for c in rope_tables(d, t, 10000.0))
    q, k = (apply_rope((x @ w.T)[None, None], cos, sin)[0, 0] for w in (wq, wk))
    mixlab = q @ k.T
    perm = rope_interleave_permutation(d)
    nanotron = _interleaved_rope(x @ wq[perm].T) @ _interleaved_rope(x @ wk[perm].T).T
    torch.testing.assert_close(nanotron, mixlab, rtol=1e-5, atol=1e-4)  # mixlab's tables are float32
    unpermuted = _interleaved_rope(x @ wq.T) @ _interleaved_rope(x @ wk.T).T
    assert not torch.allclose(unpermuted, mixlab)  # the check can fail: the layouts do differ


def test_cli_export_names_what_it_wrote(run_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli-export"
    assert main(["export-nanotron", "--run", str(run_dir), "--out", str(out), "--tp", "2", "--no-checkpoint"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "config.yaml") in printed and "torchrun --nproc_per_node=2" in printed
    assert yaml.safe_load((out / "config.yaml").read_text())["parallelism"]["tp"] == 2
    assert not (out / "checkpoint").exists()
