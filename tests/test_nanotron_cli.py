"""`mixlab train --backend nanotron --tp 2 --pp 2` on the demo corpus: the command starts its own 4-process world
under torchrun and trains what `mixlab train` trains with the embedded backend (same losses, evals and
checkpoint format)."""

from __future__ import annotations

import json

import pytest
import torch
from mixlab.pipelines.cli import main
from mixlab.training import RunRecord

pytest.importorskip("nanotron")


def _train(curated, runs, run_id: str, *extra: str) -> list[str]:
    return ["train", "--curated", str(curated), "--runs", str(runs), "--run-id", run_id, "--model-preset", "tiny",
            "--train-preset", "tiny", "--steps", "8", "--warmup-steps", "2", "--eval-every", "8", "--checkpoint-every", "4",
            "--threads", "1", *extra]


def _losses(run: RunRecord) -> list[float]:
    return [json.loads(line)["loss"] for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def test_mixlab_train_backend_nanotron_tp2_pp2_on_the_demo_corpus(tokenized_curated, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    assert main(_train(tokenized_curated, runs, "embedded")) == 0
    assert main(_train(tokenized_curated, runs, "nanotron", "--backend", "nanotron", "--tp", "2", "--pp", "2")) == 0
    embedded, nanotron = RunRecord.load(runs / "embedded"), RunRecord.load(runs / "nanotron")
    assert nanotron.status == "completed" and nanotron.summary["step"] == 8
    assert nanotron.summary["parallel"] == {"tp": 2, "pp": 2, "dp": 1, "pp_engine": "1f1b", "zero_stage": 0}
    assert nanotron.config["backend"] == "nanotron" and nanotron.config["parallel"]["tp"] == 2
    a, b = _losses(embedded), _losses(nanotron)
    assert len(a) == len(b) > 0 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert set(nanotron.summary["eval"]) == set(embedded.summary["eval"])  # the same held-out sources
    for source, row in nanotron.summary["eval"].items():
        assert abs(row["loss"] - embedded.summary["eval"][source]["loss"]) < 1e-4, source
    weights = torch.load(runs / "nanotron" / "checkpoints" / "step_00000008" / "model.pt", weights_only=True)
    plain = torch.load(runs / "embedded" / "checkpoints" / "step_00000008" / "model.pt", weights_only=True)
    assert weights.keys() == plain.keys() and all(weights[k].shape == plain[k].shape for k in plain)


def test_embedded_backend_refuses_tensor_parallel_flags(tokenized_curated, tmp_path, capsys):
    assert main(_train(tokenized_curated, tmp_path, "refused", "--tp", "2")) == 2
    assert "set backend: nanotron" in capsys.readouterr().err
