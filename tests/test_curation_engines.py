"""Curation on real engines, interrupted at random points: a local run killed with -9, a Slurm run whose jobs are
cancelled with scancel and resubmitted, a Ray run that loses a worker mid-task, and a run killed on one engine and
finished on another. Each must end with the shards, byte for byte, and the manifest accounting of an
uninterrupted local run. Ablation proxies go through the same Slurm.

The engines are the project's own: `make test` starts a single-node Slurm and a local Ray
(`pipelines/engines/`) and sets MIXLAB_ENGINES=required, so that a missing engine fails here instead of skipping.
`MIXLAB_KILL_SEED=N` picks other kill points."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mixlab.ablations.launch import proxy_runs, run_ablation
from mixlab.ablations.slurm import SlurmLauncher
from mixlab.ablations.spec import AblationSpec, Axis
from mixlab.pipelines.kill_trials import completed_ranks, kill_trial, run_curate, shard_digests
from mixlab.training import RunRecord

SEED = int(os.environ.get("MIXLAB_KILL_SEED", "20261207"))
ENGINES = Path(__file__).resolve().parents[1] / "pipelines" / "engines"
REQUIRED = os.environ.get("MIXLAB_ENGINES") == "required"


def _engine_up(script: str) -> bool:
    """The engine's own status check (the project's scripts start it)."""
    return subprocess.run([str(ENGINES / script), "status"], capture_output=True, check=False).returncode == 0


def require(engine: str) -> None:
    """Skip without the engine, unless the run asked for every engine (then its absence is a failure)."""
    script = {"slurm": "slurm_single_node.sh", "ray": "ray_local.sh"}[engine]
    if (engine != "slurm" or shutil.which("sbatch")) and _engine_up(script):
        if engine == "ray":  # the address and the cluster's own token (ray_local.sh chooses token auth)
            for key, value in _ray_client_env().items():
                os.environ.setdefault(key, value)
        return
    message = f"{engine} is not running: start it with pipelines/engines/{script} up (make test does)"
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def _ray_client_env() -> dict[str, str]:
    lines = subprocess.run([str(ENGINES / "ray_local.sh"), "env"], capture_output=True, text=True,
                           check=True).stdout.split()
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="module")
def math_raw(raw_corpus: Path, tmp_path_factory) -> Path:
    """About half the test corpus's math: a real source through its full recipe (filters, decontamination, exact
    and MinHash dedup), small enough that each engine curates it in about a minute."""
    raw = tmp_path_factory.mktemp("engines") / "raw"
    (raw / "math").mkdir(parents=True)
    for path in sorted((raw_corpus / "math").glob("*.jsonl.gz"))[:2]:
        shutil.copy(path, raw / "math" / path.name)
    return raw


@pytest.fixture(scope="module")
def reference(math_raw: Path) -> Path:
    """An uninterrupted local run through the CLI: the bytes and counts every trial must end with."""
    out = math_raw.parent / "reference"
    run_curate(math_raw, out, "local", ["math"])
    assert shard_digests(out) and completed_ranks(out) > 2
    return out


LIGHT = ("math=engine_recipes:math_without_minhash",)  # tests/engine_recipes.py: the recipe without MinHash


@pytest.fixture(scope="module")
def light_reference(math_raw: Path) -> Path:
    """The uninterrupted local run of the lighter recipe (the CLI's subprocesses import it from tests/)."""
    tests = str(Path(__file__).resolve().parent)
    if tests not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    out = math_raw.parent / "light-reference"
    run_curate(math_raw, out, "local", ["math"], recipes=LIGHT)
    assert shard_digests(out) and completed_ranks(out) > 2
    return out


def _check(trial) -> None:
    assert trial.interrupted, f"seed {trial.seed}: the run ended before the kill point ({trial.detail})"
    assert trial.identical_shards, f"seed {trial.seed}: shards differ after {trial.detail}"
    assert trial.same_accounting, f"seed {trial.seed}: the manifest counts differ after {trial.detail}"


@pytest.mark.parametrize("offset", [0, 1, 2])
def test_a_local_curation_killed_at_random_points_resumes_to_the_same_bytes(math_raw, reference, light_reference,
                                                                          offset):
    """The first trial on the full recipe (MinHash's four stages included), the others on the lighter one."""
    if offset == 0:
        _check(kill_trial(math_raw, math_raw.parent, ["math"], reference, SEED, "local"))
    else:
        _check(kill_trial(math_raw, math_raw.parent, ["math"], light_reference, SEED + offset, "local",
                          recipes=LIGHT))


def test_slurm_writes_the_same_shards_and_survives_scancel_and_resubmit(math_raw, light_reference):
    """Job arrays chained afterok, cancelled mid-run with scancel and submitted again: the local run's bytes (on
    the lighter recipe; `make kill-trials EXECUTOR=slurm` runs the full one)."""
    require("slurm")
    trial = kill_trial(math_raw, math_raw.parent, ["math"], light_reference, SEED, "slurm", recipes=LIGHT)
    _check(trial)
    logs = math_raw.parent / f"slurm-slurm-{SEED}" / "logs" / "math"
    # every stage ran as a job array of its own, with Slurm's own per-task logs
    scripts = sorted(logs.glob("*/launch_script.slurm"))
    assert {s.parent.name for s in scripts} >= {"filter", "exact_hashes", "exact_clusters", "write"}
    assert all("#SBATCH --array=0-" in s.read_text() for s in scripts)
    assert all(list((s.parent / "slurm_logs").glob("*_*.out")) for s in scripts)


def test_ray_writes_the_same_shards_when_a_worker_dies_mid_task(math_raw, light_reference):
    """On the lighter recipe, as is the next test (the full recipe runs locally here, and on Ray in
    `make kill-trials EXECUTOR=ray`)."""
    require("ray")
    _check(kill_trial(math_raw, math_raw.parent, ["math"], light_reference, SEED, "ray", recipes=LIGHT))


def test_the_accounting_survives_a_resume_on_another_engine(math_raw, light_reference):
    """datatrove's stats.json covers only the ranks of its last invocation (its issue #360); the manifest counts
    every rank, whichever engine ran it."""
    require("ray")
    trial = kill_trial(math_raw, math_raw.parent, ["math"], light_reference, SEED + 7, "local", resume_executor="ray",
                       recipes=LIGHT)
    _check(trial)
    stats = [p for p in (math_raw.parent / f"local-ray-{SEED + 7}" / "logs" / "math").glob("*/stats.json")]
    assert stats  # the per-stage totals datatrove wrote are still there, but the manifest does not read them


def test_ablation_proxies_train_as_a_slurm_job_array(tokenized_curated: Path, tmp_path: Path):
    require("slurm")
    mix = {"stages": [{"name": "all", "weights": {"web-en": 0.5, "code-python": 0.5}}]}
    base = {"runs_dir": str(tmp_path / "runs"), "data": {"curated": str(tokenized_curated)}, "mixture": mix,
            "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": 6, "checkpoint_every": 3, "eval_every": 6,
                      "warmup_steps": 2, "progress_bar": False}}
    spec = AblationSpec("slurm-lr", base, axes=(Axis("train.lr", [1e-3, 3e-3]),))
    launcher = SlurmLauncher(cpus_per_task=1, time_limit="00:20:00", poll_interval_s=1.0, wait_timeout_s=600)
    proxies = run_ablation(spec, launcher)
    records = [RunRecord.load(p.path) for p in proxies]
    assert len(records) == len(proxy_runs(spec)) >= 2
    assert all(r.status == "completed" for r in records), [(r.run_id, r.status) for r in records]
    assert {1e-3, 3e-3} <= {r.config["train"]["lr"] for r in records}
    logs = sorted((proxies[0].document_path.parent / "slurm" / "logs").glob("*_*.out"))
    assert len(logs) == len(records) and all("trains" in log.read_text() for log in logs)
    jobs = (proxies[0].document_path.parent / "slurm" / "jobs.jsonl").read_text().splitlines()
    assert len(jobs) == 1  # one array job for the whole launch


def test_an_engine_that_is_not_there_is_named_with_the_fix(tmp_path: Path, monkeypatch):
    from mixlab.curation import CurationError, curation_engine

    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, squeue, scancel
    with pytest.raises(CurationError, match=r"sbatch, squeue, scancel not on PATH.*slurm_single_node.sh up"):
        curation_engine("slurm")
    with pytest.raises(CurationError, match="unknown executor 'dask'"):
        curation_engine("dask")
