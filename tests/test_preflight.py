"""`mixlab preflight`: every check passes on a good run config and each one fails, with its fix, when its part of
the run is broken on purpose (on copies of the fixture data, never the fixture itself)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from mixlab.curation import ShardManifest
from mixlab.pipelines.cli import main
from mixlab.pipelines.preflight import load_preflight_config, preflight
from mixlab.pipelines.pretrain import build_evaluator, build_sampler, plan_run, tokenized_manifest
from mixlab.pipelines.run_config import EvalConfig
from mixlab.training import RunStore, Transformer, save_checkpoint
from mixlab.training.preflight import (
    CHECK_NAMES,
    CONDITIONAL_CHECKS,
    FIXES,
    TrainingSetup,
    check_checkpoint_round_trip,
    check_eval,
    check_plan,
    check_rank_seeds,
    check_throughput_and_memory,
    check_token_shards,
    guarded,
    never_raises,
)
from mixlab.training.seeds import world_seeds

SOURCES = ["math", "web-en"]


def _document(curated: Path, runs: Path, **train) -> dict:
    return {"run_id": "pre", "runs_dir": str(runs), "data": {"curated": str(curated)},
            "mixture": {"stages": [{"name": "only", "fraction": 1.0, "weights": {"web-en": 0.5, "math": 0.5}}]},
            "model": {"preset": "tiny", "max_seq_len": 64},
            "train": {"preset": "tiny", "total_steps": 12, "warmup_steps": 2, "seq_len": 32, "batch_size": 4,
                      "threads": 1, "eval_every": 6, "checkpoint_every": 6, **train},
            "eval": {"windows_per_source": 4, "bootstrap_resamples": 20}}


def _config_file(tmp_path: Path, curated: Path, name: str = "run.yaml", **train) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(_document(curated, tmp_path / "runs", **train)))
    return path


def _setup(config) -> TrainingSetup:
    manifest = tokenized_manifest(config.curated_dir)
    return TrainingSetup(config.model, config.train, lambda: build_sampler(manifest, config.schedule, config.train))


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture()
def config(tokenized_curated, tmp_path):
    return load_preflight_config(_config_file(tmp_path, tokenized_curated))


@pytest.fixture()
def data_copy(tokenized_curated, tmp_path) -> Path:
    copy = tmp_path / "curated-copy"
    shutil.copytree(tokenized_curated, copy)
    return copy


def test_every_check_passes_on_a_good_config_and_nothing_is_written(config, tokenized_curated):
    before = _files(tokenized_curated)
    results = preflight(replace(config, train=replace(config.train, time_budget_h=10.0)), dp=2, tp=2, steps=2)
    assert [r.name for r in results] == list(CHECK_NAMES)
    assert [r.status for r in results] == ["PASS"] * len(CHECK_NAMES), [r.line() for r in results]
    by_name = {r.name: r for r in results}
    assert by_name["token shards"].measured["max_id"] < config.model.vocab_size
    assert by_name["eval"].measured["sources"] == ["all", *SOURCES]
    throughput = by_name["throughput and memory"].measured
    assert throughput["tokens_per_s"] > 0 and 0 < throughput["projected_hours"] < 10.0
    assert "; within train.time_budget_h=10" in by_name["throughput and memory"].detail
    assert len(set(by_name["rank seeds"].measured["weight_hashes"].values())) == 1
    assert not (config.runs_dir / config.run_id).exists()  # the run's directory is never touched
    assert _files(tokenized_curated) == before


def test_token_shards_fail_on_a_truncated_shard_a_vocab_mismatch_and_another_runs_tokenizer(data_copy):
    manifest = ShardManifest.load(data_copy)
    vocab = manifest.tokenizer.vocab_size
    good = check_token_shards(manifest, SOURCES, vocab)
    assert good.status == "PASS", good.line()

    record = next(r for r in manifest.sources["math"].token_shards if r.split == "train")
    shard = manifest.resolve(record.path)
    shard.write_bytes(shard.read_bytes()[:-8])
    truncated = check_token_shards(manifest, SOURCES, vocab)
    assert truncated.status == "FAIL" and str(shard) in truncated.detail and "mixlab tokenize" in truncated.fix

    mismatch = check_token_shards(manifest, ["web-en"], vocab + 1)
    assert mismatch.status == "FAIL" and f"model.vocab_size={vocab + 1}" in mismatch.detail
    assert "leave model.vocab_size out" in mismatch.fix
    other_run = check_token_shards(manifest, ["web-en"], vocab, run_tokenizer_sha256="0" * 64, run_path="runs/x")
    assert other_run.status == "FAIL" and "trained with tokenizer 000000000000" in other_run.detail


def test_plan_fails_on_a_budget_the_epoch_cap_refuses_a_stage_too_long_and_decay_inside_warmup(tokenized_curated, tmp_path):
    doc = _document(tokenized_curated, tmp_path / "runs")
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump({**doc, "plan": {"max_epochs": 0.001}}))
    config = load_preflight_config(path)
    result = check_plan(plan_run(config, tokenized_manifest(tokenized_curated)), config.model)
    assert result.status == "FAIL" and "would be repeated" in result.detail, result.line()
    assert result.measured["problems"]

    long_stage = {**doc, "mixture": {"stages": [{"name": "long", "fraction": 1.0, "seq_len": 128,
                                                 "weights": {"web-en": 0.5, "math": 0.5}}]}}
    path.write_text(yaml.safe_dump(long_stage))
    config = load_preflight_config(path)
    result = check_plan(plan_run(config, tokenized_manifest(tokenized_curated)), config.model)
    assert result.status == "FAIL" and "seq_len 128 > model.max_seq_len=64" in result.detail

    # the LR decay starts with the last data stage, here at step 6, inside a 10-step warmup: refused like train
    two_stages = {**doc, "mixture": {"stages": [{"name": "a", "fraction": 0.5, "weights": {"web-en": 1.0}},
                                                {"name": "b", "fraction": 0.5, "weights": {"math": 1.0}}]},
                  "train": {**doc["train"], "warmup_steps": 10}}
    path.write_text(yaml.safe_dump(two_stages))
    results = {r.name: r for r in preflight(load_preflight_config(path), steps=1)}
    assert results["plan"].status == "FAIL" and "warmup lasts until step 10" in results["plan"].detail
    assert results["checkpoint round trip"].status == "PASS"


def test_eval_fails_when_a_source_has_no_held_out_split(config, data_copy):
    manifest = ShardManifest.load(data_copy)
    entry = manifest.sources["math"]
    entry.token_shards = [r for r in entry.token_shards if r.split != "val"]
    entry.tokens = {k: v for k, v in entry.tokens.items() if k != "val"}
    manifest.save()
    manifest = ShardManifest.load(data_copy)
    eval_config = EvalConfig(windows_per_source=4, bootstrap_resamples=10)

    def evaluator():
        return build_evaluator(manifest, SOURCES, config.train.seq_len, eval_config)

    result = check_eval(_setup(config), evaluator, SOURCES)
    assert result.status == "FAIL" and "no eval row for source 'math'" in result.detail, result.line()
    assert "held-out" in result.fix


def test_checkpoint_round_trip_fails_when_the_optimizer_state_or_a_buffer_is_lost(config):
    setup = _setup(config)
    assert check_checkpoint_round_trip(setup).status == "PASS"

    def save_fresh_optimizer(root, step, model, optimizer, **kwargs):
        """Drops AdamW's moments: saves the state of a brand-new optimizer instead."""
        return save_checkpoint(root, step, model, setup.new_optimizer(model), **kwargs)

    lossy = check_checkpoint_round_trip(setup, save=save_fresh_optimizer)
    assert lossy.status == "FAIL" and "optimizer." in lossy.detail and "missing after loading" in lossy.detail

    class CountingTransformer(Transformer):
        """Keeps training state in a buffer that is left out of the state dict, so no checkpoint holds it."""

        def __init__(self, cfg):
            super().__init__(cfg)
            self.register_buffer("steps_seen", torch.zeros(()), persistent=False)

        def forward(self, idx, targets=None, reduction="mean"):
            if self.training:
                self.steps_seen += 1
            return super().forward(idx, targets, reduction)

    buffered = check_checkpoint_round_trip(replace(setup, model_factory=CountingTransformer))
    assert buffered.status == "FAIL" and "buffer.steps_seen differs" in buffered.detail, buffered.line()


def test_throughput_fails_past_the_time_budget_and_the_memory_limit(config):
    setup = _setup(config)
    slow = check_throughput_and_memory(setup, steps=1, time_budget_h=1e-9)
    assert slow.status == "FAIL" and "train.time_budget_h=1e-09" in slow.detail and "more time (train.time_budget_h)" in slow.fix
    assert slow.measured["projected_hours"] > 1e-9
    unset = check_throughput_and_memory(setup, steps=1)
    assert unset.status == "PASS" and "budget SKIP" in unset.detail
    small = check_throughput_and_memory(setup, steps=1, memory_limit_bytes=1)
    assert small.status == "FAIL" and "peak memory" in small.detail and "train.batch_size" in small.fix
    assert math.isfinite(small.measured["seconds_per_step"])


def test_rank_seeds_fail_on_shared_tp_init_seeds_and_on_diverging_dp_replicas(config):
    setup = _setup(config)
    good = check_rank_seeds(setup, dp=2, tp=2)
    assert good.status == "PASS", good.line()

    def same_tp_seed(seed, dp, tp):
        return [replace(s, init=seed) for s in world_seeds(seed, dp, tp)]

    smollm3 = check_rank_seeds(setup, dp=2, tp=2, seed_fn=same_tp_seed)
    assert smollm3.status == "FAIL" and "(the SmolLM3 failure)" in smollm3.detail

    def per_replica_seed(seed, dp, tp):
        return [replace(s, init=s.init + s.dp_rank) for s in world_seeds(seed, dp, tp)]

    replicas = check_rank_seeds(setup, dp=2, tp=1, seed_fn=per_replica_seed)
    assert replicas.status == "FAIL" and "replicas must start identical" in replicas.detail
    assert len(set(replicas.measured["weight_hashes"].values())) == 2  # the weights really differ


def test_cli_exits_0_on_a_good_config_and_1_naming_each_broken_check(tokenized_curated, data_copy, tmp_path, capsys):
    good = _config_file(tmp_path, tokenized_curated)
    assert main(["preflight", str(good), "--steps", "1"]) == 0
    out = capsys.readouterr().out
    for name in CHECK_NAMES:
        assert f"PASS  {name}  " in out
    assert "preflight passed: 6 passed, 0 failed" in out

    assert main(["preflight", str(good), "--steps", "1", "--set", "plan.max_epochs=0.001"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  plan  " in out and " -> " in out and "preflight FAILED: 5 passed, 1 failed" in out

    # an existing run trained with another tokenizer, a budget the epoch cap refuses, an eval dataset of another
    # tokenizer: three checks fail, the other three still run and pass
    RunStore(tmp_path / "runs").create("pre", {"tokenizer_sha256": "f" * 64})
    other = ShardManifest.load(data_copy)
    other.tokenizer.sha256 = "e" * 64
    other.save()
    assert main(["preflight", str(good), "--steps", "1", "--set", "plan.max_epochs=0.001",
                 "--set", f"eval.curated={data_copy}", "--json"]) == 1
    results = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n for n, r in results.items() if r["status"] == "FAIL"} == {"token shards", "plan", "eval"}
    assert "trained with tokenizer ffffffffffff" in results["token shards"]["detail"]
    assert "would be repeated" in results["plan"]["detail"] and "eval.curated" in results["eval"]["detail"]
    assert all(r["fix"] for r in results.values() if r["status"] == "FAIL")


def test_cli_without_tokenized_data_fails_the_data_checks_and_refuses_bad_flags(tmp_path, capsys):
    empty = tmp_path / "not-curated"
    empty.mkdir()
    config = _config_file(tmp_path, empty)
    assert main(["preflight", str(config)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL  token shards  ") and "mixlab curate" in lines[0] and " -> " in lines[0]
    assert [line.split()[0] for line in lines[1:5]] == ["SKIP"] * 4
    assert lines[5].startswith("PASS  rank seeds")
    assert main(["preflight", str(config), "--steps", "0"]) == 2
    assert "--steps 0: give a whole number >= 1" in capsys.readouterr().err


def test_each_fix_string_lives_in_one_place():
    """A check that raises gets its fix from FIXES, whether decorated (`never_raises`) or run by the CLI through
    `guarded`; neither module spells a fix out a second time."""
    import mixlab.pipelines.preflight as cli_module
    import mixlab.training.preflight as checks_module

    assert set(FIXES) == set(CHECK_NAMES) | set(CONDITIONAL_CHECKS) and all(FIXES.values())

    def boom() -> None:
        raise RuntimeError("boom")

    for name in (*CHECK_NAMES, *CONDITIONAL_CHECKS):
        decorated = never_raises(name)(boom)()
        assert decorated.failed and decorated.fix == FIXES[name] and "RuntimeError: boom" in decorated.detail
        assert guarded(name, boom).to_dict() == decorated.to_dict()
    with pytest.raises(KeyError, match="FIXES"):
        never_raises("not a check")
    checks_source = Path(checks_module.__file__).read_text(encoding="utf-8")
    cli_source = Path(cli_module.__file__).read_text(encoding="utf-8")
    for fix in FIXES.values():
        head = fix[:40]  # the opening words (a literal may break after them)
        assert checks_source.count(head) == 1 and head not in cli_source, fix
