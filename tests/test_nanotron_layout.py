"""The nanotron layout's checks without launching a world: what layout_problems refuses (each message names the
fields), ParallelLayout's own validation, the run config's `parallel` section, and preflight's layout check,
which proves on the initial weights that tensor-parallel ranks start from distinct slices."""

from __future__ import annotations

import pytest
import torch
from mixlab.training import ConfigError, ModelConfig, TrainConfig, Transformer
from mixlab.training.nanotron_layout import ParallelLayout, layout_problems, plain_split_dims
from mixlab.training.preflight import TrainingSetup, check_parallel_layout

MODEL = dict(vocab_size=300, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)


@pytest.mark.parametrize("changes, layout, expected", [
    ({"vocab_size": 301}, ParallelLayout(tp=2, dp=1), "model.vocab_size=301 is not divisible by parallel.tp=2"),
    ({"n_layers": 3}, ParallelLayout(pp=2, dp=1), "model.n_layers=3 is not divisible by parallel.pp=2"),
    ({"n_kv_heads": 1}, ParallelLayout(tp=2, dp=1), "model.n_kv_heads=1 is not divisible by parallel.tp=2"),
    ({"n_experts": 4}, ParallelLayout(dp=1), "n_experts > 0 (MoE) is not in the nanotron backend's layout"),
    ({}, ParallelLayout(dp=3), "train.batch_size=4 (the global batch) is not divisible by parallel.dp=3"),
    ({}, ParallelLayout(pp=2, dp=1), "the 1F1B pipeline engine needs train.grad_accum >= pp - 1"),
])
def test_layout_problems_name_the_fields(changes, layout, expected):
    model = ModelConfig(**{**MODEL, "n_layers": 4, **changes}) if "n_layers" not in changes else ModelConfig(
        **{**MODEL, **changes})
    grad_accum = 0 if "1F1B" in expected else 1
    problems = layout_problems(model, layout, batch_size=4, grad_accum=grad_accum)
    assert any(expected in p for p in problems), problems


def test_a_fitting_layout_has_no_problems():
    assert layout_problems(ModelConfig(**MODEL), ParallelLayout(tp=2, pp=2, dp=1), batch_size=4, grad_accum=2) == []


def test_parallel_layout_validates_and_resolves_dp():
    assert ParallelLayout(tp=2).resolved(4).dp == 2
    with pytest.raises(ConfigError, match="tp=2 x pp=2 x dp=2 = 8 processes, but the world has 4"):
        ParallelLayout(tp=2, pp=2, dp=2).resolved(4)
    with pytest.raises(ConfigError, match=r"parallel.tp=0 must be a whole number >= 1"):
        ParallelLayout(tp=0)
    with pytest.raises(ConfigError, match="parallel.pp_engine='zb'"):
        ParallelLayout(pp_engine="zb")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ZeRO stage 0 or 1"):
        ParallelLayout(zero_stage=3)


def test_run_config_parallel_section(tmp_path):
    from mixlab.pipelines.run_config import run_config_from_document

    document = {"run_id": "r", "runs_dir": str(tmp_path), "data": {"curated": str(tmp_path)},
                "model": dict(MODEL), "train": {"seq_len": 32, "batch_size": 4, "total_steps": 10, "warmup_steps": 1},
                "backend": "nanotron", "parallel": {"tp": 2, "pp": 2}}
    config = run_config_from_document(document, vocab_size=300)
    assert config.parallel == ParallelLayout(tp=2, pp=2) and config.to_dict()["parallel"]["tp"] == 2
    with pytest.raises(ConfigError, match="parallel.pp=0"):
        run_config_from_document({**document, "parallel": {"pp": 0}}, vocab_size=300)
    with pytest.raises(ConfigError, match="set backend: nanotron"):
        run_config_from_document({**document, "backend": "embedded"}, vocab_size=300)


def _setup(model_factory=Transformer) -> TrainingSetup:
    return TrainingSetup(ModelConfig(**MODEL), TrainConfig(total_steps=4, batch_size=4, seq_len=32, grad_accum=2, warmup_steps=1),
                         sampler_factory=lambda: None, model_factory=model_factory)


def test_preflight_layout_check_passes_a_model_cut_from_one_initialisation():
    result = check_parallel_layout(_setup(), ParallelLayout(tp=2, pp=2, dp=1))
    assert result.status == "PASS", result.detail
    splits = plain_split_dims(_setup().model_config)
    names = [name for name, _ in Transformer(_setup().model_config).named_parameters()]
    assert result.measured["sharded_weights"] == sum(splits.get(name) is not None for name in names) == 15


def test_preflight_layout_check_fails_identical_tp_slices_and_bad_sizes():
    def same_seed_per_rank(config: ModelConfig) -> Transformer:
        """What a per-rank init with one seed gives: each tp rank's rows of w_up are the same numbers."""
        model = Transformer(config)
        with torch.no_grad():
            w = model.layers[1].mlp.w_up.weight
            w[w.shape[0] // 2:] = w[: w.shape[0] // 2]
        return model

    result = check_parallel_layout(_setup(same_seed_per_rank), ParallelLayout(tp=2, dp=1))
    assert result.status == "FAIL" and "layers.1.mlp.w_up.weight" in result.detail
    assert check_parallel_layout(_setup(same_seed_per_rank), ParallelLayout(pp=2, dp=1)).status == "PASS"  # tp1
    bad_vocab = TrainingSetup(ModelConfig(**{**MODEL, "vocab_size": 301}), _setup().train_config, lambda: None)
    result = check_parallel_layout(bad_vocab, ParallelLayout(tp=2, dp=1))
    assert result.status == "FAIL" and "vocab_size=301" in result.detail
