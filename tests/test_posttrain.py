"""Post-training end to end on CPU: a pre-trained tiny run -> SFT on the curated chat dialogues and GSM8K worked
answers -> DPO (and the other preference losses) on derived pairs -> on-policy distillation from a larger
teacher, all through `mixlab train --stage ...`, each a resumable run with the parent on record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mixlab.pipelines.cli import main
from mixlab.pipelines.corpus import GSM8K_EVAL_FRACTION, GSM8K_EVAL_PURPOSE, gsm8k_problems
from mixlab.training import RunRecord, latest_checkpoint, load_model
from mixlab.training.posttrain import gsm8k_dialogue, held_out

SEQ = 128


def _pretrain(curated: Path, runs: Path, run_id: str, *extra: str) -> Path:
    assert main(["train", "--curated", str(curated), "--runs", str(runs), "--run-id", run_id, "--model-preset", "tiny",
                 "--train-preset", "tiny", "--steps", "40", "--threads", "1", "--eval-every", "40",
                 "--checkpoint-every", "40", "--eval-windows", "2", "--set", "plan.max_epochs=100",
                 "--set", f"model.max_seq_len={SEQ * 2}", *extra]) == 0
    return runs / run_id


@pytest.fixture(scope="module")
def workspace(tokenized_curated: Path, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("posttrain")
    runs = work / "runs"
    base = _pretrain(tokenized_curated, runs, "base")
    # GSM8K worked answers as dialogues (the `chat-reasoning` source's 80%), beside the curated chat dialogues
    dialogues = work / "gsm8k.jsonl"
    with open(dialogues, "w") as handle:
        for pid, question, answer in list(gsm8k_problems())[:300]:
            if not held_out(pid, GSM8K_EVAL_FRACTION, GSM8K_EVAL_PURPOSE):
                handle.write(json.dumps({"id": pid, "source": "chat-reasoning",
                                         "messages": gsm8k_dialogue(question, answer)}) + "\n")
    return {"work": work, "runs": runs, "base": base, "curated": tokenized_curated, "gsm8k": dialogues}


def _post(ws: dict[str, Path], stage: str, parent: Path, data: Path, run_id: str, *extra: str) -> RunRecord:
    assert main(["train", "--stage", stage, "--init-from", str(parent), "--data", str(data), "--runs",
                 str(ws["runs"]), "--run-id", run_id, "--steps", "12", "--batch-size", "4", "--seq-len", str(SEQ),
                 "--threads", "1", "--eval-every", "12", "--checkpoint-every", "6", *extra]) == 0
    return RunRecord.load(ws["runs"] / run_id)


def test_sft_then_dpo_end_to_end_with_the_parent_on_record(workspace, capsys):
    ws = workspace
    sft = _post(ws, "sft", ws["base"], ws["curated"], "sft", "--gsm8k-problems", "6", "--ablation-tasks", "8")
    assert sft.status == "completed" and sft.summary["initialized_from"]["step"] == 40
    facts = sft.config["posttrain"]
    assert facts["dialogues"] > 1000 and 0.5 < facts["packing_efficiency"] <= 1.0
    report = json.loads((sft.path / "posttrain_report.json").read_text())
    assert report["held_out"][-1]["source"] == "all" and report["held_out"][-1]["dialogues"] > 50
    em = report["gsm8k_exact_match"]  # reported as it is, near zero for a tiny model
    assert em["items"] + em["skipped_longer_than_context"] == 6 and 0 <= em["accuracy"] <= 1
    tasks = {row["task"]: row for row in report["ablation_tasks"]}  # the ablation tasks score it too
    assert tasks and all(0 <= row["accuracy"] <= 1 and row["items"] > 0 for row in tasks.values())
    assert set(tasks) <= {json.loads(line)["task"] for line in (sft.path / "tasks.jsonl").read_text().splitlines()}
    # SFT lowered the held-out assistant-token loss of the parent
    parent, _ = load_model(latest_checkpoint(ws["base"] / "checkpoints"))
    from mixlab.pipelines.posttrain import PostTrainConfig, build_posttrain

    parts = build_posttrain(PostTrainConfig(stage="sft", init_from=str(ws["base"]), data=str(ws["curated"]),
                                            runs_dir=str(ws["runs"]), run_id="sft", seq_len=SEQ, batch_size=4))
    before = parts["evaluator"].evaluate(parent)[-1]["loss"]
    assert report["held_out"][-1]["loss"] < before

    pairs = ws["work"] / "pairs.jsonl"
    assert main(["pairs", "--data", str(ws["gsm8k"]), "--out", str(pairs)]) == 0
    with open(pairs, "a") as handle:  # plus replies against another dialogue's, from the curated chat
        other = ws["work"] / "chat_pairs.jsonl"
        assert main(["pairs", "--data", str(ws["curated"]), "--out", str(other), "--max-pairs", "200"]) == 0
        handle.write(other.read_text())
    capsys.readouterr()
    dpo = _post(ws, "dpo", sft.path, pairs, "dpo", "--beta", "0.5", "--gsm8k-problems", "0")
    assert dpo.status == "completed" and dpo.config["posttrain"]["preference"]["loss"] == "dpo"
    rows = [json.loads(line) for line in (dpo.path / "metrics.jsonl").read_text().splitlines()]
    assert all("rewards/accuracy" in r and "rewards/margin" in r for r in rows)
    held = dpo.summary["posttrain"]["held_out"][0]
    assert held["pairs"] > 10 and 0 <= held["accuracy"] <= 1
    caches = dpo.config["posttrain"]["reference_cache"]
    assert [c["hit"] for c in caches] == [False, False]
    # the same reference and pairs: another loss reuses the cached log-probabilities
    apo = _post(ws, "apo", sft.path, pairs, "apo", "--gsm8k-problems", "0")
    assert [c["hit"] for c in apo.config["posttrain"]["reference_cache"]] == [True, True]
    assert apo.config["posttrain"]["preference"]["loss"] == "apo_zero"


@pytest.mark.parametrize("stage", ["ipo", "kto", "orpo", "apo_down"])
def test_every_preference_loss_trains_and_reports_its_rewards(workspace, stage):
    ws = workspace
    pairs = ws["work"] / "small_pairs.jsonl"
    if not pairs.exists():
        assert main(["pairs", "--data", str(ws["gsm8k"]), "--out", str(pairs), "--max-pairs", "120"]) == 0
    run = _post(ws, stage, ws["base"], pairs, f"pref-{stage}", "--gsm8k-problems", "0", "--steps", "4")
    assert run.status == "completed"
    last = json.loads((run.path / "metrics.jsonl").read_text().splitlines()[-1])
    assert torch.isfinite(torch.tensor(last["loss"])) and "rewards/accuracy" in last
    has_reference = [c["hit"] for c in run.config["posttrain"].get("reference_cache", [])]
    assert has_reference if stage != "orpo" else not has_reference  # ORPO needs no reference model


def test_an_interrupted_sft_resumes_to_the_uninterrupted_weights(workspace):
    from mixlab.pipelines.posttrain import PostTrainConfig, posttrain

    ws = workspace

    def config(run_id: str) -> PostTrainConfig:
        return PostTrainConfig(stage="sft", init_from=str(ws["base"]), data=str(ws["gsm8k"]), runs_dir=str(ws["runs"]),
                               run_id=run_id, steps=8, batch_size=4, seq_len=SEQ, threads=1, eval_every=8,
                               checkpoint_every=3, gsm8k_problems=0, progress_bar=False)

    whole = posttrain(config("sft-whole"))
    cut = posttrain(config("sft-cut"), stop_after=5)
    assert cut.status == "interrupted"
    resumed = posttrain(config("sft-cut"))
    assert resumed.status == "completed" and resumed.summary["resumed_from"].endswith("step_00000005")
    a, _ = load_model(latest_checkpoint(whole.checkpoint_dir))
    b, _ = load_model(latest_checkpoint(resumed.checkpoint_dir))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_on_policy_distillation_from_a_larger_teacher(workspace):
    ws = workspace
    teacher = _pretrain(ws["curated"], ws["runs"], "teacher", "--set", "model.d_model=96",
                        "--set", "model.ffn_hidden=256")
    metrics = {}
    # the embedded backend, then nanotron at tp=2 (rank 0 samples with the gathered student; the teacher's and the
    # student's vocabulary split over two ranks): the same samples from the same seeds, the same reverse KL
    for name, flags in (("embedded", ()), ("nanotron", ("--tp", "2"))):
        run = _post(ws, "distill", ws["base"], ws["gsm8k"], f"distill-{name}", "--teacher", str(teacher),
                    "--max-new-tokens", "12", "--steps", "4", "--gsm8k-problems", "0", "--backend", name, *flags)
        assert run.status == "completed" and run.config["posttrain"]["teacher_params"] > run.summary["params"]
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all(r["distill/reverse_kl"] > 0 and r["distill/sampled_tokens"] > 0 for r in rows)
        metrics[name] = [r[key] for r in rows for key in ("loss", "distill/reverse_kl", "distill/sampled_tokens")]
    assert metrics["nanotron"] == pytest.approx(metrics["embedded"], rel=1e-3, abs=1e-5)


def test_the_nanotron_backend_post_trains_what_the_embedded_backend_does(workspace):
    ws = workspace
    pairs = ws["work"] / "nanotron_pairs.jsonl"
    assert main(["pairs", "--data", str(ws["gsm8k"]), "--out", str(pairs), "--max-pairs", "60"]) == 0
    losses = {}
    # one process each, then tensor parallel over two processes (the CLI starts torchrun)
    for name, flags in (("embedded", ()), ("nanotron", ()), ("nanotron-tp2", ("--tp", "2"))):
        run = _post(ws, "dpo", ws["base"], pairs, f"dpo-{name}", "--backend", name.split("-")[0], *flags,
                    "--steps", "3", "--warmup-steps", "1", "--gsm8k-problems", "0")
        assert run.status == "completed" and run.summary["initialized_from"]["step"] == 40
        rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [value for r in rows for value in (r["loss"], r["rewards/margin"])]
    assert losses["nanotron"] == pytest.approx(losses["embedded"], rel=1e-4, abs=1e-6)
    assert losses["nanotron-tp2"] == pytest.approx(losses["embedded"], rel=1e-3, abs=1e-5)
    assert RunRecord.load(ws["runs"] / "dpo-nanotron-tp2").summary["parallel"]["tp"] == 2
    sft = _post(ws, "sft", ws["base"], ws["gsm8k"], "sft-nanotron", "--backend", "nanotron", "--steps", "3",
                "--warmup-steps", "1", "--gsm8k-problems", "0")
    assert sft.status == "completed" and sft.config["model"]["doc_masking"] is False  # one dialogue a row there
