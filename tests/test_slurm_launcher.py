"""The Slurm launcher writes one sbatch array per launch whose task i trains proxy i, reads sacct/squeue, and
says clearly when there is no Slurm. There is no Slurm here: the script's body runs under plain bash with the
array variables set, which trains a real proxy."""

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mixlab.ablations.launch import proxy_runs, write_documents
from mixlab.ablations.slurm import (
    SlurmError,
    SlurmLauncher,
    SlurmNotAvailable,
    SlurmSubmission,
    TaskState,
    exit_codes,
    parse_sacct,
    parse_squeue,
)
from mixlab.ablations.spec import AblationSpec, Axis
from mixlab.training import RunRecord

MIX = {"stages": [{"name": "all", "weights": {"web-en": 0.5, "code-python": 0.5}}]}


def spec(curated: Path, runs: Path, lrs: tuple[float, ...] = (1e-3, 3e-3)) -> AblationSpec:
    base = {"runs_dir": str(runs), "data": {"curated": str(curated)}, "mixture": MIX, "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": 10, "checkpoint_every": 5, "eval_every": 10,
                      "warmup_steps": 2, "progress_bar": False}}
    return AblationSpec("lr-sweep", base, axes=(Axis("train.lr", list(lrs)),))


def sbatch_options(script: str) -> list[str]:
    """The options sbatch takes from a script: `#SBATCH` lines before the first command, split the way sbatch
    splits them (double/single quotes group, a backslash escapes, an unescaped `#` starts a comment)."""
    options = []
    for line in script.splitlines()[1:]:
        if not line.startswith("#"):
            break  # sbatch stops at the first command
        if not line.startswith("#SBATCH"):
            continue
        rest, word, quote, escaped, words = line[len("#SBATCH"):], "", "", False, []
        for char in rest:
            if escaped:
                word, escaped = word + char, False
            elif char == "\\":
                escaped = True
            elif quote:
                quote, word = ("", word) if char == quote else (quote, word + char)
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif char.isspace():
                words, word = words + [word] if word else words, ""
            else:
                word += char
        assert not quote, f"unmatched quote in {line!r}"
        options += words + ([word] if word else [])
    return options


def as_dict(options: list[str]) -> dict[str, str]:
    return dict((o.split("=", 1) + [""])[:2] for o in options)


def run_task(script: Path, task: int | None, cpus: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CPUS_PER_TASK"] = str(cpus)
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_script_is_one_throttled_array_whose_task_i_trains_proxy_i(tmp_path: Path):
    ablation = spec(tmp_path / "curated", tmp_path / "my ablations" / "runs")
    proxies = proxy_runs(ablation)
    assert len(proxies) == 3
    launcher = SlurmLauncher(partition="cpu", time_limit="02:00:00", cpus_per_task=3, mem="6G", max_parallel=2,
                             account="lab", qos="low", job_name="lr sweep #2", extra_directives=["--constraint=avx2", "#SBATCH --nice=10"],
                             env={"HF_HOME": str(tmp_path / "hf home"), "MIXLAB_NOTE": "it's #1"})
    command = launcher.dry_run(proxies)
    script = Path(command[-1])
    slurm_dir = proxies[0].document_path.parent.resolve() / "slurm"
    assert command == ["sbatch", "--parsable", str(script)] and script.parent == slurm_dir
    assert re.fullmatch(r"launch-\d{8}-\d{6}\.sh", script.name) and os.access(script, os.X_OK)
    assert not (slurm_dir / "jobs.jsonl").exists()  # a dry run submits nothing

    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "\nset -euo pipefail\n" in text
    assert re.search(r"[Rr]equeue is safe.*resumes a run from its last checkpoint", text.replace("\n# ", " "))
    options = as_dict(sbatch_options(text))
    log_dir = slurm_dir / "logs"
    assert options["--array"] == "0-2%2" and options["--cpus-per-task"] == "3" and options["--time"] == "02:00:00"
    assert options["--partition"] == "cpu" and options["--mem"] == "6G" and options["--account"] == "lab"
    assert options["--qos"] == "low" and "--requeue" in options and options["--job-name"] == "lr sweep #2"
    assert options["--constraint"] == "avx2" and options["--nice"] == "10"
    assert options["--output"] == options["--error"] == str(log_dir / "%A_%a.out")  # a path with a space
    assert " " in options["--output"] and log_dir.is_dir()

    documents = [str(p.document_path.resolve()) for p in proxies]
    proxies_file = script.with_suffix(".proxies")
    assert proxies_file.read_text().splitlines() == documents and str(proxies_file) in text

    # the body, task by task, under bash: the train command it would exec, word for word
    exec_lines = [line for line in text.splitlines() if line.startswith("exec ")]
    assert len(exec_lines) == 1
    echo = script.with_name("echo.sh")
    echo.write_text(text.replace("\nexec ", '\nprintf \'%s\\n\' "$HF_HOME" "$MIXLAB_NOTE" ', 1))
    for task, document in enumerate(documents):
        done = run_task(echo, task, cpus=3)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[1:] == [
            str(tmp_path / "hf home"), "it's #1",
            sys.executable, "-m", "mixlab.pipelines.cli", "train", "--config", document, "--threads", "3"]
    beyond = run_task(echo, 3)
    assert beyond.returncode == 2 and "task 3 has no line" in beyond.stderr
    unset = run_task(echo, None)
    assert unset.returncode != 0 and "SLURM_ARRAY_TASK_ID" in unset.stderr

    again = Path(launcher.dry_run(proxies)[-1])  # a second launch never overwrites the first
    assert again != script and again.read_text().count("#SBATCH --array=0-2%2") == 1
    unthrottled = as_dict(sbatch_options(Path(SlurmLauncher(requeue=False).dry_run(proxies[:1])[-1]).read_text()))
    assert unthrottled["--array"] == "0-0" and "--requeue" not in unthrottled and "--partition" not in unthrottled
    assert unthrottled["--job-name"] == "mixlab-lr-sweep"


SACCT = """\
4242_0|COMPLETED|0:0
4242_0.batch|COMPLETED|0:0
4242_0.extern|COMPLETED|0:0
4242_1|FAILED|3:0
4242_1.batch|FAILED|3:0
4242_2|TIMEOUT|0:0
4242_2.batch|CANCELLED|0:15
4242_3|OUT_OF_MEMORY|0:125
4242_3.batch|OUT_OF_MEMORY|0:125
4242_4|CANCELLED by 1000|0:0
4242_5|FAILED|0:9
4242_6|RUNNING|0:0
4242_[7-9,12%2]|PENDING|0:0
4243_0|COMPLETED|0:0
"""


def test_sacct_and_squeue_lines_give_each_task_its_state_and_exit_code(caplog):
    states = parse_sacct(SACCT, "4242")
    assert sorted(states) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12]  # steps skipped, the pending range expanded
    assert {t: s.state for t, s in states.items()} == {
        0: "COMPLETED", 1: "FAILED", 2: "TIMEOUT", 3: "OUT_OF_MEMORY", 4: "CANCELLED", 5: "FAILED",
        6: "RUNNING", 7: "PENDING", 8: "PENDING", 9: "PENDING", 12: "PENDING"}
    assert [states[t].code for t in range(6)] == [0, 3, 124, 137, 143, 137]  # FAILED by SIGKILL: 128+9
    assert [states[t].finished for t in (0, 1, 2, 3, 4, 5, 6, 7)] == [True] * 6 + [False] * 2
    assert not TaskState(0, "REQUEUED").finished and TaskState(0, "NODE_FAIL").code == 1
    assert parse_sacct("", "4242") == {}  # just submitted, not yet in accounting
    with pytest.raises(SlurmError, match="line 2 is not JobID"):
        parse_sacct("4242_0|COMPLETED|0:0\n4242_1 COMPLETED\n", "4242")
    with pytest.raises(SlurmError, match="not CODE:SIGNAL"):
        parse_sacct("4242_0|FAILED|x:y\n", "4242")

    queued = parse_squeue("4242_0|COMPLETED\n4242_[1-2]|PENDING\n4242_3|RUNNING\n", "4242")
    assert {t: s.state for t, s in queued.items()} == {0: "COMPLETED", 1: "PENDING", 2: "PENDING", 3: "RUNNING"}

    submission = SlurmSubmission(Path("/x/launch.sh"), Path("/x/launch.proxies"), Path("/x/logs"),
                                 ("base", "lr=0.001", "lr=0.003"), ("sbatch", "--parsable", "/x/launch.sh"), "4242")
    with caplog.at_level(logging.WARNING, logger="mixlab.ablations.slurm"):
        codes = exit_codes(submission, states)
    assert codes == {"base": 0, "lr=0.001": 3, "lr=0.003": 124}
    warned = caplog.text
    assert "lr=0.003" in warned and "TIMEOUT" in warned and "/x/logs/4242_2.out" in warned
    assert "lr=0.001" in warned and "FAILED" in warned and "4242_0" not in warned  # the success is not logged


def test_without_slurm_the_error_says_so_and_what_to_use(tmp_path: Path):
    proxies = proxy_runs(spec(tmp_path / "curated", tmp_path / "runs", lrs=(1e-3,)))
    missing = SlurmLauncher(sbatch=str(tmp_path / "no" / "sbatch"))
    with pytest.raises(SlurmNotAvailable, match="Slurm is not installed here.*LocalLauncher.*login node"):
        missing.launch(proxies)
    assert not (proxies[0].document_path.parent / "slurm").exists()  # nothing written for a launch that cannot run
    if shutil.which("sbatch") is None:  # this machine: the default command name
        with pytest.raises(SlurmNotAvailable, match="no 'sbatch' on PATH"):
            SlurmLauncher().submit(proxies)
    assert SlurmLauncher().launch([]) == {}

    # a command that fails as sbatch: its stderr is the error; one that prints no job id is refused
    with pytest.raises(SlurmError, match=r"failed \(exit 2\).*unrecognized option '--parsable'"):
        SlurmLauncher(sbatch="ls").submit(proxies)
    with pytest.raises(SlurmError, match="not a job id"):
        SlurmLauncher(sbatch="echo").submit(proxies)
    assert not (proxies[0].document_path.parent.resolve() / "slurm" / "jobs.jsonl").exists()

    submitted = SlurmSubmission(Path("s.sh"), Path("s.proxies"), tmp_path, ("base",), ("sbatch",), "77")
    nothing = SlurmLauncher(sacct="true", poll_interval_s=0.05, wait_timeout_s=0.2)  # accounting that lists nothing
    with pytest.raises(TimeoutError, match="Slurm job 77 still running"):
        nothing.wait(submitted)
    blind = SlurmLauncher(sacct=str(tmp_path / "sacct"), squeue=str(tmp_path / "squeue"))
    with pytest.raises(SlurmError, match="cannot follow job 77"):
        blind.poll(submitted)
    with pytest.raises(ValueError, match="was not submitted"):
        blind.poll(SlurmSubmission(Path("s.sh"), Path("s.proxies"), tmp_path, ("base",), ("sbatch",)))
    with pytest.raises(ValueError, match="max_parallel"):
        SlurmLauncher(max_parallel=0)


def test_a_task_of_the_script_trains_its_proxy_and_a_rerun_does_not_retrain(tokenized_curated: Path,
                                                                             tmp_path: Path):
    ablation = spec(tokenized_curated, tmp_path / "slurm runs" / "runs", lrs=(3e-3,))
    proxies = proxy_runs(ablation)
    write_documents(ablation, proxies)
    script = Path(SlurmLauncher(cpus_per_task=1).dry_run(proxies)[-1])

    done = run_task(script, 1)  # the second proxy only
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"task 1 trains {proxies[1].document_path.resolve()}" in done.stdout
    record = RunRecord.load(proxies[1].path)
    assert record.status == "completed" and record.summary["step"] == 10
    assert [m["step"] for m in record.metrics()][-1] == 10 and record.evals()
    assert record.config["train"]["lr"] == 3e-3
    assert not (proxies[0].path / "run.json").exists()  # task 1 trained line 2 and nothing else

    before = (proxies[1].path / "metrics.jsonl").read_bytes()
    rerun = run_task(script, 1)  # what a requeued task does once its run has completed
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (proxies[1].path / "metrics.jsonl").read_bytes() == before
    assert RunRecord.load(proxies[1].path).status == "completed"
