"""The nanotron backend under torchrun on CPU/gloo: tp2, pp2, dp2, tp2 x dp2 and pp2 x dp2 (ZeRO-1) train the same
tiny model as the embedded backend from the same weights on the real MixtureSampler, with the same losses (1e-4 in
fp32 over 12 steps; 1e-9 in fp64 at tp2 x pp2); a run stopped at tp2 x pp2 resumes bit for bit on its layout, and
continues at tp1 x pp2 x dp2, and a dp1 run at dp4, within 1e-5 of the uninterrupted run.

This file is also the worker script: torchrun runs it with `worker ...` arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("nanotron")

TOKENIZER_VOCAB = 300
STEPS, BATCH, SEQ_LEN, ACCUM = 12, 4, 32, 2
HALF = STEPS // 2  # where the interrupted runs stop
MODEL = dict(vocab_size=TOKENIZER_VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
             max_seq_len=SEQ_LEN)


def worker(tokenized: Path, runs: Path, specs: list[str]) -> None:
    """Train one run per spec `run_id:backend[:tp:pp][:flag...]` in turn (dp = the rest of the world; flags: zero1,
    afab, fp64, stop = stop after step HALF) with the real sampler on the stdlib corpus; rank 0 creates each run,
    as pretrain does."""
    import torch
    import torch.distributed as dist
    from mixlab.curation import open_token_sources
    from mixlab.mixtures import MixtureSampler, MixtureSchedule
    from mixlab.training import ModelConfig, RunRecord, RunStore, TrainConfig, train
    from mixlab.training.nanotron_layout import ParallelLayout
    from mixlab.training.nanotron_trainer import train_nanotron

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    for spec in specs:
        run_id, backend, *rest = spec.split(":")
        sizes = [int(v) for v in rest if v.isdigit()]
        flags = {v for v in rest if not v.isdigit()}
        cfg = TrainConfig(total_steps=STEPS, batch_size=BATCH, seq_len=SEQ_LEN, grad_accum=ACCUM, lr=3e-3,
                          warmup_steps=2, log_every=1, eval_every=100, checkpoint_every=HALF, progress_bar=False,
                          threads=1, precision="fp64" if "fp64" in flags else "fp32")
        schedule = MixtureSchedule.stable_decay({"code": 0.3, "prose": 0.7}, {"code": 0.8, "prose": 0.2},
                                                decay_fraction=0.3)
        sampler = MixtureSampler(schedule, open_token_sources(tokenized), seq_len=SEQ_LEN, batch_size=BATCH,
                                 total_tokens=cfg.steps * cfg.tokens_per_step, seed=cfg.seed)
        cfg = replace(cfg, decay_start_step=sampler.stage_start_step(-1) // ACCUM)
        if rank == 0 and not (runs / run_id / "run.json").exists():
            RunStore(runs).create(run_id, config={"test": "nanotron"})
        if dist.is_initialized():
            dist.barrier()
        run = RunRecord.load(runs / run_id)
        model = ModelConfig(**MODEL)
        stop_after = HALF if "stop" in flags else None
        if backend == "embedded":
            train(run, model, cfg, sampler, stop_after=stop_after)
            continue
        tp, pp = sizes if sizes else (1, 1)
        layout = ParallelLayout(tp=tp, pp=pp, zero_stage=1 if "zero1" in flags else 0,
                                pp_engine="afab" if "afab" in flags else "1f1b")
        train_nanotron(run, model, cfg, sampler, layout=layout, stop_after=stop_after)
    if world > 1:
        dist.destroy_process_group()


def torchrun(nproc: int, *args: str) -> None:
    exe = Path(sys.executable).with_name("torchrun")
    command = [str(exe), "--standalone", "--nproc_per_node", str(nproc), __file__, "worker", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).splitlines()
        errors = [line for line in lines if "rank" in line or "Error" in line or "error" in line]
        raise AssertionError("\n".join(errors[-60:] + ["..."] + lines[-40:]))


def in_process(*args: str) -> None:
    """One process, in a fresh interpreter (nanotron's process group stays out of the test process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, __file__, "worker", *args], capture_output=True, text=True, timeout=400,
                          env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


def losses(run_path: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), run_path
    return [r["loss"] for r in rows]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every training of this file, in four launches (a launch costs seconds of start-up): the layouts and the
    first halves of the interrupted runs, then the resumes, all three in one four-process world."""
    from stdlib_corpus import build_tokenized_dir

    tokenized = str(build_tokenized_dir(tmp_path_factory.mktemp("nanotron-data"), vocab_size=TOKENIZER_VOCAB))
    runs = tmp_path_factory.mktemp("nanotron-runs")
    in_process(tokenized, str(runs), "embedded:embedded", "nanotron-1:nanotron", "embedded-fp64:embedded:fp64",
               "dp1:nanotron:stop", "dp1-whole:nanotron")
    torchrun(2, tokenized, str(runs), "tp2:nanotron:2:1", "pp2:nanotron:1:2", "dp2:nanotron:1:1",
             "pp2-afab:nanotron:1:2:afab")
    torchrun(4, tokenized, str(runs), "tp2dp2:nanotron:2:1", "pp2dp2-zero1:nanotron:1:2:zero1",
             "tp2pp2-fp64:nanotron:2:2:fp64", "whole:nanotron:2:2", "same:nanotron:2:2:stop",
             "to-tp1:nanotron:2:2:stop")
    # from step 6: on its own layout; a tp2 x pp2 checkpoint at tp1 x pp2 x dp2; a one-process checkpoint at dp4
    torchrun(4, tokenized, str(runs), "same:nanotron:2:2", "to-tp1:nanotron:1:2", "dp1:nanotron:1:1")
    return runs


def test_every_layout_trains_what_the_embedded_backend_trains(runs):
    from mixlab.training import RunRecord

    reference = losses(runs / "embedded")
    for run_id in ("nanotron-1", "tp2", "pp2", "dp2", "pp2-afab", "tp2dp2", "pp2dp2-zero1"):
        diff = max_abs_diff(reference, losses(runs / run_id))
        print(f"{run_id}: max |loss - embedded| over {STEPS} steps = {diff:.2e}")
        assert diff < 1e-4, (run_id, diff)
    run = RunRecord.load(runs / "tp2dp2")
    assert run.status == "completed" and run.summary["parallel"] == {"tp": 2, "pp": 1, "dp": 2, "pp_engine": "1f1b",
                                                                     "zero_stage": 0}
    assert run.summary["tokens"] == RunRecord.load(runs / "embedded").summary["tokens"] == STEPS * BATCH * SEQ_LEN * ACCUM
    assert run.summary["tokens_by_source"] == RunRecord.load(runs / "embedded").summary["tokens_by_source"]


def test_fp64_layouts_match_to_1e9(runs):
    diff = max_abs_diff(losses(runs / "embedded-fp64"), losses(runs / "tp2pp2-fp64"))
    print(f"fp64 tp2 x pp2: max |loss - embedded| = {diff:.2e}")
    assert diff < 1e-9, diff


def test_checkpoints_resume_on_the_same_and_on_other_layouts(runs):
    import torch
    from mixlab.training import RunRecord

    saved = torch.load(runs / "whole" / "checkpoints" / f"step_{STEPS:08d}" / "model.pt", weights_only=True)
    assert saved["tok_emb.weight"].shape == (TOKENIZER_VOCAB, MODEL["d_model"])  # full tensors, not shards
    assert saved["layers.1.mlp.w_down.weight"].shape == (MODEL["d_model"], MODEL["ffn_hidden"])
    assert losses(runs / "same") == losses(runs / "whole")  # bit for bit on the same layout
    assert RunRecord.load(runs / "same").summary["resumed_from"].endswith(f"step_{HALF:08d}")
    diff = max_abs_diff(losses(runs / "whole"), losses(runs / "to-tp1"))
    print(f"tp2 x pp2 -> tp1 x pp2 x dp2 after step {HALF}: max |loss - uninterrupted| = {diff:.2e}")
    assert diff < 1e-5, diff
    assert RunRecord.load(runs / "to-tp1").summary["resumed_from"].endswith(f"step_{HALF:08d}")
    assert RunRecord.load(runs / "to-tp1").summary["parallel"] == {"tp": 1, "pp": 2, "dp": 2, "pp_engine": "1f1b",
                                                                    "zero_stage": 0}
    assert RunRecord.load(runs / "dp1").summary["parallel"]["dp"] == 4
    diff = max_abs_diff(losses(runs / "dp1-whole"), losses(runs / "dp1"))
    print(f"dp1 -> dp4 after step {HALF}: max |loss - uninterrupted| = {diff:.2e}")
    assert diff < 1e-5, diff


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    import argparse

    sys.path.insert(0, str(Path(__file__).parent))
    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("tokenized", type=Path)
    parser.add_argument("runs", type=Path)
    parser.add_argument("specs", nargs="+")
    options = parser.parse_args()
    worker(options.tokenized, options.runs, options.specs)
