"""One document per run: a YAML file, flags and `--set` overrides resolve to the same RunConfig, run.json keeps
that document, and `mixlab train --config run.json` reproduces the run."""

from __future__ import annotations

import json

import pytest
import yaml
from mixlab.pipelines.cli import build_parser, main
from mixlab.pipelines.pretrain import load_run_config
from mixlab.pipelines.run_config import (
    apply_overrides,
    parse_override,
    read_run_document,
    run_config_from_document,
)
from mixlab.training import ConfigError, RunRecord


def _document(curated, runs, run_id="cfg", **train):
    return {"run_id": run_id, "runs_dir": str(runs), "data": {"curated": str(curated)},
            "mixture": {"stages": [{"name": "only", "fraction": 1.0, "weights": {"web-en": 0.5, "math": 0.5}}]},
            "model": {"preset": "tiny"}, "train": {"preset": "tiny", "total_steps": 16, "threads": 1, **train},
            "eval": {"windows_per_source": 4}, "tags": {"purpose": "test"}}


def test_overrides_parse_values_and_reach_nested_fields():
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)
    assert parse_override("train.total_steps=300") == (["train", "total_steps"], 300)
    assert parse_override("model.qk_norm=true") == (["model", "qk_norm"], True)
    assert parse_override("train.threads=null") == (["train", "threads"], None)
    doc = {"mixture": {"stages": [{"name": "a", "fraction": 0.5}, {"name": "b", "fraction": 0.5}]}}
    out = apply_overrides(doc, ["mixture.stages.1.fraction=0.3", "train.lr=2e-3"])
    assert out["mixture"]["stages"][1]["fraction"] == 0.3 and out["train"]["lr"] == 0.002
    assert doc["mixture"]["stages"][1]["fraction"] == 0.5  # the input is not changed
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        apply_overrides({}, ["trian.lr=1"])
    with pytest.raises(ConfigError, match="expected SECTION.FIELD=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_document_resolves_presets_and_names_bad_fields(tmp_path):
    doc = _document(tmp_path / "curated", tmp_path / "runs", lr=0.01)
    config = run_config_from_document(doc, vocab_size=600)
    assert config.train.lr == 0.01 and config.train.batch_size == 8  # the tiny preset, with an override
    assert config.model.vocab_size == 600 and config.model.d_model == 64
    assert config.eval.windows_per_source == 4
    again = run_config_from_document(config.to_dict(), vocab_size=600)  # the resolved document reads back the same
    assert again.to_dict() == config.to_dict()

    with pytest.raises(ConfigError, match=r"train.warmup_steps=50 exceeds the run's 16 steps") as err:
        run_config_from_document({**doc, "train": {"preset": "tiny", "total_steps": 16, "warmup_steps": 50}})
    assert "train.warmup_steps" in err.value.fields
    with pytest.raises(ConfigError, match=r"unknown TrainConfig fields \['bogus'\]"):
        run_config_from_document({**doc, "train": {"bogus": 1}})
    with pytest.raises(ConfigError, match=r"train.seq_len=512 exceeds model.max_seq_len=128"):
        run_config_from_document({**doc, "train": {"preset": "tiny", "seq_len": 512}})
    with pytest.raises(ConfigError, match=r"train.lr=nan must be a finite number"):
        run_config_from_document(apply_overrides(doc, ["train.lr=.nan"]))
    with pytest.raises(ConfigError, match="unknown run config sections"):
        run_config_from_document({**doc, "optimizer": {}})
    with pytest.raises(ConfigError, match="no data.curated"):
        run_config_from_document({**doc, "data": {}})


def test_cli_error_names_the_flags_that_fix_it(tokenized_curated, tmp_path, capsys):
    code = main(["train", "--curated", str(tokenized_curated), "--runs", str(tmp_path), "--run-id", "bad",
                 "--train-preset", "tiny", "--model-preset", "tiny", "--steps", "20", "--warmup-steps", "19"])
    err = capsys.readouterr().err
    assert code == 2
    # the decay stage (20% of 20 steps) would start at step 16, inside the warmup: name every way out
    assert "warmup lasts until step 19" in err
    assert "--warmup-steps … or --set train.warmup_steps=…" in err
    assert "--set mixture.stages.1.fraction=…" in err
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_presets_are_listed_with_their_sizes_in_help():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "model demo" in text and "non-embedding" in text and "train tiny" in text and "tokens" in text


def test_config_file_run_json_and_reproduction(tokenized_curated, tmp_path, capsys):
    runs = tmp_path / "runs"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_document(tokenized_curated, runs)))
    assert main(["train", "--config", str(config_file), "--set", "train.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    assert "run cfg: completed at step 16/16" in out and "held-out loss" in out
    assert not out.lstrip().startswith("{")  # a summary for a person; --json gives the machine form
    run = RunRecord.load(runs / "cfg")
    assert run.config["train"]["lr"] == 0.002 and run.config["eval"]["windows_per_source"] == 4
    assert run.config["tags"] == {"purpose": "test"} and run.tags == {"purpose": "test"}
    # run.json holds the resolved document: read back, it is the config the run trained with
    document = read_run_document(run.path / "run.json")
    assert load_run_config(None, [f"{k}={json.dumps(v)}" for k, v in document.items()]).to_dict() == {
        k: v for k, v in run.config.items() if k in document}

    # reproduce it under another id from its run.json: the same losses, bit for bit
    assert main(["train", "--config", str(run.path / "run.json"), "--run-id", "again", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "completed"
    again = RunRecord.load(runs / "again")
    assert [m["loss"] for m in again.metrics()] == [m["loss"] for m in run.metrics()]
    assert {k: v for k, v in again.config.items() if k != "run_id"} == {
        k: v for k, v in run.config.items() if k != "run_id"}


def test_schedule_that_leaves_out_a_curated_source_says_so(tokenized_curated, tmp_path, capsys):
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"stages": [{"name": "s", "fraction": 1.0, "weights": {"math": 1.0}}]}))
    assert main(["mix", "--curated", str(tokenized_curated), "--schedule", str(schedule), "--train-preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "leaves out curated source(s)" in out and "web-en (" in out and "math (" not in out.split("leaves out")[1]


def test_the_monitor_section_is_read_and_refused_by_field():
    from mixlab.pipelines.run_config import run_config_from_document

    document = {"run_id": "r", "runs_dir": "runs", "data": {"curated": "c"}, "monitor": {"on_alert": "stop"}}
    config = run_config_from_document(document, vocab_size=256)
    assert config.monitor.on_alert == "stop" and config.to_dict()["monitor"]["on_alert"] == "stop"
    assert run_config_from_document({**document, "monitor": None}, vocab_size=256).monitor is None
    with pytest.raises(ConfigError, match="unknown MonitorConfig fields"):
        run_config_from_document({**document, "monitor": {"loss_zz": 3}}, vocab_size=256)
