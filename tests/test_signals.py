"""A run's state is true whatever happens to its process: SIGTERM checkpoints the current step, marks the run
interrupted and exits, and the resumed run is identical to an uninterrupted one; a run whose process died (SIGKILL)
is shown as stale, and resuming it records that."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mixlab.pipelines.cli import main
from mixlab.training import RunRecord, latest_checkpoint, read_checkpoint

STEPS = 300
KILL_SEED = int(os.environ.get("MIXLAB_KILL_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)


def _args(curated: Path, runs: Path, run_id: str) -> list[str]:
    return ["train", "--curated", str(curated), "--runs", str(runs), "--run-id", run_id, "--model-preset", "tiny",
            "--train-preset", "tiny", "--steps", str(STEPS), "--threads", "1", "--eval-every", "100",
            "--checkpoint-every", "25", "--eval-windows", "4",
            "--set", "plan.max_epochs=100"]  # the test corpus is small: 300 steps repeat web-en ~20 times


def _start(curated: Path, runs: Path, run_id: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mixlab.pipelines.cli", *_args(curated, runs, run_id)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, at_least: int, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training exited early: {proc.communicate()}"
        if metrics.exists():
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip().endswith("}")]
            if lines and lines[-1]["step"] >= at_least:
                return lines[-1]["step"]
        time.sleep(0.02)
    raise AssertionError(f"no step {at_least} in {metrics} after {timeout_s} s")


@pytest.fixture(scope="module")
def reference(tokenized_curated, tmp_path_factory) -> RunRecord:
    """The same run, never interrupted: what every stopped-and-resumed run must reproduce bit for bit."""
    runs = tmp_path_factory.mktemp("reference")
    assert main(_args(tokenized_curated, runs, "reference")) == 0
    return RunRecord.load(runs / "reference")


def _assert_identical(resumed: RunRecord, reference: RunRecord) -> None:
    assert [(m["step"], m["loss"]) for m in resumed.metrics()] == [(m["step"], m["loss"]) for m in reference.metrics()]
    key = lambda e: (e["step"], e["source"])  # noqa: E731
    assert sorted((key(e), e["loss"]) for e in resumed.evals()) == sorted((key(e), e["loss"]) for e in reference.evals())


def test_sigterm_checkpoints_marks_interrupted_and_resumes_identically(tokenized_curated, tmp_path, capsys,
                                                                        reference):
    runs = tmp_path / "runs"
    proc = _start(tokenized_curated, runs, "term")
    _wait_for_step(runs / "term", proc, at_least=5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    run = RunRecord.load(runs / "term")
    assert run.status == "interrupted" and run.summary["stopped_by"] == "SIGTERM"
    stopped_at = run.summary["step"]
    assert 5 <= stopped_at < STEPS
    assert read_checkpoint(latest_checkpoint(run.checkpoint_dir)).step == stopped_at  # the current step, not step 0
    assert "stopped by SIGTERM" in out and "resume" in out
    assert run.display_status() == "interrupted" and not run.is_live()

    assert main(_args(tokenized_curated, runs, "term")) == 0  # the same command resumes
    resumed = RunRecord.load(runs / "term")
    assert resumed.status == "completed" and resumed.summary["restarts"][-1]["previous_status"] == "interrupted"
    _assert_identical(resumed, reference)


def test_a_random_kill_leaves_a_stale_run_that_resumes_identically(tokenized_curated, tmp_path, capsys, reference):
    """SIGKILL at a random moment (seed printed; MIXLAB_KILL_SEED=N replays it), possibly inside a checkpoint
    write; while alive a second trainer is refused, once dead the run is stale, and resuming reproduces the run."""
    rng = random.Random(KILL_SEED)
    print(f"kill seed {KILL_SEED}")
    runs = tmp_path / "runs"
    proc = _start(tokenized_curated, runs, "kill")
    try:
        _wait_for_step(runs / "kill", proc, at_least=5)
        live = RunRecord.load(runs / "kill")
        assert live.is_live() and live.display_status() == "running"
        capsys.readouterr()
        assert main(_args(tokenized_curated, runs, "kill")) == 2  # a second trainer of the same run is refused
        assert "being trained by a live process" in capsys.readouterr().err
        _wait_for_step(runs / "kill", proc, at_least=rng.randrange(10, STEPS - 40))
        time.sleep(rng.uniform(0.0, 0.2))  # between log points: inside a step, an eval or a checkpoint write
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    dead = RunRecord.load(runs / "kill")
    assert dead.status == "running" and dead.display_status() == "stale"
    assert main(["runs", "--runs", str(runs)]) == 0
    listing = capsys.readouterr().out
    assert "stale" in listing.splitlines()[1] and "its process is gone" in listing

    assert main(_args(tokenized_curated, runs, "kill")) == 0
    resumed = RunRecord.load(runs / "kill")
    assert resumed.status == "completed" and resumed.summary["restarts"][-1]["previous_status"] == "stale"
    _assert_identical(resumed, reference)
