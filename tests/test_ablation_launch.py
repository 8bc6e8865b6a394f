"""An ablation's proxies run as ordinary runs; a killed ablation reruns to the same results without retraining
what had finished."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mixlab.ablations.launch import LocalLauncher, plan_lines, proxy_runs, run_ablation, status_lines
from mixlab.ablations.spec import AblationSpec, Axis
from mixlab.training import RunRecord

MIX = {"stages": [{"name": "all", "weights": {"web-en": 0.34, "code-python": 0.33, "math": 0.33}}]}


def spec(curated: Path, runs: Path) -> AblationSpec:
    base = {"runs_dir": str(runs), "data": {"curated": str(curated)}, "mixture": MIX, "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": 12, "checkpoint_every": 4, "eval_every": 6,
                      "warmup_steps": 4, "progress_bar": False}}
    return AblationSpec("lr", base, axes=(Axis("train.lr", [1e-3]),))


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in RunRecord.load(run).metrics()]


def test_a_killed_ablation_reruns_without_retraining_and_matches(tokenized_curated: Path, tmp_path: Path):
    launcher = LocalLauncher(parallel=1, threads=1)
    reference = spec(tokenized_curated, tmp_path / "ref" / "runs")
    assert [p.status for p in proxy_runs(reference)] == ["pending", "pending"]
    assert "2 of 2 to train" in plan_lines(reference, launcher, measure=False)[-1]
    done = run_ablation(reference, launcher)
    assert [p.status for p in done] == ["completed", "completed"] and "2 of 2 completed" in status_lines(done)[-1]

    killed = spec(tokenized_curated, tmp_path / "killed" / "runs")
    code = (f"from pathlib import Path; from mixlab.ablations.spec import AblationSpec; "
            f"from mixlab.ablations.launch import LocalLauncher, run_ablation; "
            f"run_ablation(AblationSpec.from_dict({killed.to_dict()!r}), LocalLauncher(parallel=1, threads=1))")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "killed" / "runs" / killed.expand()[1].run_id
    deadline = time.monotonic() + 300
    while not list((second / "checkpoints").glob("step_*")):  # the first proxy is done, the second has begun
        assert process.poll() is None and time.monotonic() < deadline, "the ablation ended before the kill"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    first = tmp_path / "killed" / "runs" / killed.expand()[0].run_id
    assert RunRecord.load(first).status == "completed" and RunRecord.load(second).status != "completed"
    before = (first / "metrics.jsonl").stat().st_mtime_ns, (first / "run.json").read_bytes()

    rerun = run_ablation(killed, launcher)
    assert [p.status for p in rerun] == ["completed", "completed"]
    assert ((first / "metrics.jsonl").stat().st_mtime_ns, (first / "run.json").read_bytes()) == before  # not retrained
    assert RunRecord.load(second).summary["restarts"]  # resumed from its checkpoint
    for proxy_ref, proxy in zip(done, rerun, strict=True):
        assert losses(proxy.path) == losses(proxy_ref.path)  # bit-identical to the uninterrupted ablation


def test_results_are_one_long_table_with_the_axes_as_columns(tokenized_curated: Path, tmp_path: Path, capsys):
    import polars as pl
    from mixlab.ablations.results import ablation_results, write_results

    ablation = spec(tokenized_curated, tmp_path / "runs")
    assert ablation_results(ablation).is_empty()  # nothing has run yet
    run_ablation(ablation, LocalLauncher(parallel=2, threads=1))
    table = pl.read_parquet(write_results(ablation))
    assert table.equals(ablation_results(ablation))
    assert set(table["variant"]) == {"base", "lr=0.001"} and set(table["train.lr"]) == {"base", "0.001"}
    for proxy in proxy_runs(ablation):  # every eval row of every run is in the table, value for value
        evals = RunRecord.load(proxy.path).evals()
        mine = table.filter(pl.col("run") == proxy.run_id)
        for row in evals:
            got = mine.filter((pl.col("step") == row["step"]) & (pl.col("metric") == f"{row['source']}/bpb"))
            assert got["value"].to_list() == [row["bpb"]]
        train = mine.filter(pl.col("metric") == "train/loss").sort("step")
        assert train["value"].to_list() == [m["loss"] for m in RunRecord.load(proxy.path).metrics()]
    # the CLI reads the same spec from YAML
    from mixlab.pipelines.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(ablation.to_yaml())
    assert main(["ablate", "status", str(path)]) == 0 and "2 of 2 completed" in capsys.readouterr().out
    assert main(["ablate", "run", str(path)]) == 0  # nothing left to train; the report is written
    report = tmp_path / "ablations" / ablation.name / "report" / "report.html"
    assert "report.html" in capsys.readouterr().out and report.exists()
    report.unlink()
    assert main(["ablate", "report", str(path)]) == 0 and report.exists()
    assert main(["ablate", "results", str(path)]) == 0 and "results.parquet" in capsys.readouterr().out
    assert main(["ablate", "run", str(path), "--launcher", "slurm"]) == 0  # nothing to launch: Slurm never asked


def test_every_ablate_action_explains_itself_and_slurm_absence_is_a_clear_error(tokenized_curated, tmp_path, capsys):
    from mixlab.pipelines.cli import main

    for action in ("plan", "run", "status", "results", "report", "example", "regmix", "doremi", "anneal"):
        with pytest.raises(SystemExit) as exit_:
            main(["ablate", action, "--help"])
        assert exit_.value.code == 0 and "usage: mixlab ablate " + action in capsys.readouterr().out
    path = tmp_path / "spec.yaml"
    path.write_text(spec(tokenized_curated, tmp_path / "runs").to_yaml())
    env_path = os.environ.get("PATH", "")
    try:  # no sbatch on the PATH (as on this machine): the message says what to do instead
        os.environ["PATH"] = str(tmp_path / "empty")
        assert main(["ablate", "run", str(path), "--launcher", "slurm"]) == 2
    finally:
        os.environ["PATH"] = env_path
    err = capsys.readouterr().err
    assert "Slurm is not installed" in err and "LocalLauncher" in err
