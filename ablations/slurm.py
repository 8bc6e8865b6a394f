"""Launching an ablation's proxies as one Slurm job array.

`SlurmLauncher.launch(proxies)` does what `LocalLauncher.launch` does, on a cluster: every proxy becomes one
task of an sbatch array whose task i trains the run document on line i of a proxies list file, with the same
`mixlab train --config <document>` command, `--threads` set to the task's CPUs. The job id goes to `jobs.jsonl`
beside the script; the launcher then polls `sacct` (or `squeue` where accounting is off) until every task has
ended and returns each proxy's exit code, naming the Slurm state and the log of every task that did not succeed.

Resuming is mixlab's own: a run restarts from its last checkpoint, so a requeued task (`--requeue`, preemption,
a node failure) or a rerun of the whole spec never trains a step twice; a finished run is not trained again.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixlab.ablations.launch import ProxyRun

log = logging.getLogger(__name__)

TRAIN_MODULE = "mixlab.pipelines.cli"
# States a task does not leave by itself; anything else (including PENDING, RUNNING, REQUEUED) is still going.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "CANCELLED", "NODE_FAIL",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"})
# The exit code a proxy gets for a state that ended it without a code of its own (sacct often says 0:0 for them).
STATE_EXIT_CODES = {"TIMEOUT": 124, "OUT_OF_MEMORY": 137, "CANCELLED": 143, "NODE_FAIL": 1, "BOOT_FAIL": 1,
                    "DEADLINE": 124, "PREEMPTED": 143, "SPECIAL_EXIT": 1, "REVOKED": 1, "FAILED": 1}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TASK_ID = re.compile(r"^(\d+)_(\d+|\[[^\]]*\])$")


class SlurmError(ValueError):
    """Slurm could not be reached, refused the job, or answered in a way mixlab cannot read (a ValueError: the
    CLI prints its message, which says what to do)."""


class SlurmNotAvailable(SlurmError):
    """There is no `sbatch` on this machine."""


@dataclass(frozen=True)
class TaskState:
    """How one array task stands, as sacct/squeue report it: `state` is its first word (`CANCELLED by 1000` is
    CANCELLED); `exit_code` and `signal` are the two halves of sacct's `ExitCode` (0 where unknown)."""

    task: int
    state: str
    exit_code: int = 0
    signal: int = 0

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def code(self) -> int:
        """The exit code the launcher reports: the process's own for COMPLETED and FAILED (128+signal for a
        signal), else one that names the state (124 TIMEOUT, 137 OUT_OF_MEMORY, 143 CANCELLED, ...)."""
        if self.state == "COMPLETED":
            return self.exit_code or (128 + self.signal if self.signal else 0)
        if self.state == "FAILED":
            return self.exit_code or (128 + self.signal if self.signal else 1)
        return STATE_EXIT_CODES.get(self.state, 1)


@dataclass(frozen=True)
class SlurmSubmission:
    """One written (and, unless a dry run, submitted) array job: task i trains `run_ids[i]`."""

    script: Path
    proxies_file: Path
    log_dir: Path
    run_ids: tuple[str, ...]
    command: tuple[str, ...]  # the sbatch command line
    job_id: str | None = None  # None for a dry run

    def log_path(self, task: int) -> Path:
        """Where Slurm writes task `task`'s stdout and stderr (`%A_%a.out`)."""
        return self.log_dir / f"{self.job_id or '%A'}_{task}.out"


def parse_sacct(text: str, job_id: str) -> dict[int, TaskState]:
    """The array tasks of job `job_id` in `sacct -j ID --format=JobID,State,ExitCode -P -n` output.

    Step lines (`123_4.batch`, `123_4.extern`) are skipped; a pending range (`123_[2-5%2]`) stands for each
    of its tasks. A line that is not `JobID|State|ExitCode` is an error naming it."""
    states: dict[int, TaskState] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) < 3:
            raise SlurmError(f"sacct output line {number} is not JobID|State|ExitCode: {line!r}")
        job, state, exit_code = parts[0], parts[1], parts[2]
        if "." in job:  # a step of a task (batch, extern, srun steps): the task line has its state
            continue
        code, signal = _parse_exit_code(exit_code, line)
        for task in _array_tasks(job, job_id):
            states[task] = TaskState(task, _state_word(state), code, signal)
    return states


def parse_squeue(text: str, job_id: str) -> dict[int, TaskState]:
    """The array tasks of job `job_id` in `squeue -h -r --states=all -j ID -o %i|%T` output (no exit codes:
    squeue has none)."""
    states: dict[int, TaskState] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split("|")
        if len(parts) < 2:
            raise SlurmError(f"squeue output line {number} is not JobID|State: {line!r}")
        for task in _array_tasks(parts[0], job_id):
            states[task] = TaskState(task, _state_word(parts[1]))
    return states


def _state_word(state: str) -> str:
    words = state.split()
    return words[0].upper() if words else "UNKNOWN"


def _parse_exit_code(text: str, line: str) -> tuple[int, int]:
    if not text.strip():
        return 0, 0
    code, _, signal = text.strip().partition(":")
    try:
        return int(code), int(signal or 0)
    except ValueError:
        raise SlurmError(f"sacct ExitCode {text!r} is not CODE:SIGNAL in line {line!r}") from None


def _array_tasks(job: str, job_id: str) -> list[int]:
    """Task ids named by `123_4` or `123_[0-3,7%2]`; [] for other jobs (sacct -j of an array may list only ours,
    but a job id printed with a cluster suffix or a heterogeneous component is not an array task)."""
    match = _TASK_ID.match(job.strip())
    if not match or match.group(1) != job_id:
        return []
    index = match.group(2)
    if not index.startswith("["):
        return [int(index)]
    tasks: list[int] = []
    for piece in index[1:-1].split("%")[0].split(","):
        first, _, last = piece.partition("-")
        step = 1
        if ":" in last:
            last, _, step_text = last.partition(":")
            step = int(step_text)
        tasks.extend(range(int(first), int(last or first) + 1, step))
    return tasks


@dataclass
class SlurmLauncher:
    """An sbatch array per launch: one task per proxy, `max_parallel` at once (the array's `%` throttle).

    Writes `<ablation dir>/slurm/launch-<timestamp>.sh` and its `.proxies` list (the ablation dir holds the
    proxies' run documents); logs go to `log_dir` (default `<ablation dir>/slurm/logs`) as `%A_%a.out`."""

    partition: str | None = None
    time_limit: str = "04:00:00"  # sbatch --time
    cpus_per_task: int = 4  # also each proxy's --threads
    mem: str | None = None  # sbatch --mem, e.g. "16G"
    max_parallel: int | None = None  # tasks running at once; None: as many as Slurm gives
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None  # default: mixlab-<ablation name>
    requeue: bool = True
    extra_directives: Sequence[str] = ()  # more sbatch options, e.g. "--gres=gpu:1" or "constraint=cpu"
    python: str = sys.executable
    poll_interval_s: float = 30.0
    wait_timeout_s: float | None = None  # None: wait for as long as the job takes
    log_dir: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # exported in the script before training
    sbatch: str = "sbatch"
    squeue: str = "squeue"
    sacct: str = "sacct"

    def __post_init__(self) -> None:
        if self.cpus_per_task < 1:
            raise ValueError(f"SlurmLauncher: cpus_per_task must be at least 1, got {self.cpus_per_task}")
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"SlurmLauncher: max_parallel must be at least 1 (or None), got {self.max_parallel}")
        if self.poll_interval_s <= 0:
            raise ValueError(f"SlurmLauncher: poll_interval_s must be positive, got {self.poll_interval_s}")
        for name in self.env:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"SlurmLauncher: env name {name!r} is not a shell variable name")

    # ---- the script ------------------------------------------------------------------------------
    def directives(self, count: int, log_dir: Path, job_name: str) -> list[str]:
        """The sbatch options of an array of `count` tasks, as `--name=value` (or `--flag`)."""
        throttle = f"%{self.max_parallel}" if self.max_parallel else ""
        if "%" in str(log_dir) or "\\" in str(log_dir):
            raise ValueError(f"SlurmLauncher: log directory {log_dir} holds '%' or a backslash, which sbatch reads "
                             "as a file name pattern; choose another log_dir")
        logs = str(log_dir / "%A_%a.out")
        options = [f"--job-name={job_name}", f"--array=0-{count - 1}{throttle}", f"--cpus-per-task={self.cpus_per_task}",
                   f"--time={self.time_limit}", "--ntasks=1", f"--output={logs}", f"--error={logs}",
                   "--open-mode=append"]  # a requeued task appends to its log instead of wiping the first attempt
        for name, value in (("partition", self.partition), ("mem", self.mem), ("account", self.account),
                            ("qos", self.qos)):
            if value:
                options.append(f"--{name}={value}")
        if self.requeue:
            options.append("--requeue")
        for extra in self.extra_directives:
            extra = extra.strip()
            if extra.startswith("#SBATCH"):
                extra = extra[len("#SBATCH"):].strip()
            if not extra:
                raise ValueError("SlurmLauncher: an empty entry in extra_directives")
            options.append(extra if extra.startswith("-") else f"--{extra}")
        return options

    def script_text(self, proxies_file: Path, count: int, log_dir: Path, job_name: str, workdir: Path) -> str:
        """The sbatch script: its directives, then a body that trains the document on line
        $SLURM_ARRAY_TASK_ID (0-based) of `proxies_file`; the body runs as is under plain bash too."""
        lines = ["#!/bin/bash"]
        lines += [f"#SBATCH {_directive(option)}" for option in self.directives(count, log_dir, job_name)]
        lines += [
            "#",
            f"# mixlab ablation proxies: task i trains the run document on line i+1 of {proxies_file.name}.",
            "# Requeue is safe: mixlab resumes a run from its last checkpoint, so a requeued or rerun task",
            "# continues where it stopped (a SIGTERM at preemption or the time limit checkpoints first), and a",
            "# run that already completed is not trained again.",
            "set -euo pipefail",
            "export PYTHONUNBUFFERED=1",
        ]
        lines += [f"export {name}={shlex.quote(str(value))}" for name, value in self.env.items()]
        lines += [
            f"cd {shlex.quote(str(workdir))}",
            f"PROXIES={shlex.quote(str(proxies_file))}",
            'TASK="${SLURM_ARRAY_TASK_ID:?run this script with sbatch, or set SLURM_ARRAY_TASK_ID}"',
            f'THREADS="${{SLURM_CPUS_PER_TASK:-{self.cpus_per_task}}}"',
            'mapfile -t DOCUMENTS < "$PROXIES"',
            'if (( TASK < 0 || TASK >= ${#DOCUMENTS[@]} )); then',
            '  echo "mixlab: task $TASK has no line in $PROXIES (${#DOCUMENTS[@]} proxies)" >&2',
            "  exit 2",
            "fi",
            'DOCUMENT="${DOCUMENTS[$TASK]}"',
            'echo "mixlab: task $TASK trains $DOCUMENT with $THREADS thread(s) on ${HOSTNAME:-this node}"',
            f"exec {shlex.quote(self.python)} -m {TRAIN_MODULE} train --config \"$DOCUMENT\" --threads \"$THREADS\"",
        ]
        return "\n".join(lines) + "\n"

    def write(self, proxies: Sequence[ProxyRun]) -> SlurmSubmission:
        """Write the script and the proxies list of one launch (nothing is submitted)."""
        if not proxies:
            raise ValueError("SlurmLauncher: no proxies to launch")
        ablation_dir = _ablation_dir(proxies)
        slurm_dir = ablation_dir / "slurm"
        log_dir = Path(self.log_dir) if self.log_dir is not None else slurm_dir / "logs"
        slurm_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the --output directory
        script = _fresh_path(slurm_dir, "launch-" + time.strftime("%Y%m%d-%H%M%S"), ".sh")
        proxies_file = script.with_suffix(".proxies")
        documents = []
        for proxy in proxies:
            document = str(proxy.document_path.resolve())
            if "\n" in document or "\r" in document:
                raise ValueError(f"SlurmLauncher: run document path {document!r} has a line break; the proxies "
                                 "list holds one path per line, so rename its directory")
            documents.append(document)
        proxies_file.write_text("\n".join(documents) + "\n")
        job_name = self.job_name or f"mixlab-{ablation_dir.name}"
        script.write_text(self.script_text(proxies_file, len(proxies), log_dir.resolve(), job_name, Path.cwd()))
        script.chmod(0o755)
        command = (self.sbatch, "--parsable", str(script))
        return SlurmSubmission(script, proxies_file, log_dir.resolve(), tuple(p.run_id for p in proxies), command)

    # ---- submitting and waiting --------------------------------------------------------------------
    def dry_run(self, proxies: Sequence[ProxyRun]) -> list[str]:
        """Write the script and its proxies list and return the sbatch command that would submit them."""
        return list(self.write(proxies).command)

    def submit(self, proxies: Sequence[ProxyRun]) -> SlurmSubmission:
        """Write and submit the array job; returns at once with the job id (also appended to jobs.jsonl)."""
        executable = shutil.which(self.sbatch)
        if executable is None:
            raise SlurmNotAvailable(
                f"Slurm is not installed here: no {self.sbatch!r} on PATH. Train the proxies on this machine with "
                "LocalLauncher, or run from a Slurm login node (SlurmLauncher(sbatch=...) names another sbatch).")
        written = self.write(proxies)
        result = subprocess.run([executable, *written.command[1:]], capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmError(f"{' '.join(map(shlex.quote, written.command))} failed (exit {result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip() or 'no output'}")
        job_id = result.stdout.strip().split(";")[0].strip()  # --parsable prints ID or ID;CLUSTER
        if not job_id.isdigit():
            raise SlurmError(f"{self.sbatch} --parsable printed {result.stdout.strip()!r}, not a job id "
                             f"(script {written.script})")
        submission = SlurmSubmission(written.script, written.proxies_file, written.log_dir, written.run_ids,
                                     written.command, job_id)
        record = {"job_id": job_id, "script": str(written.script), "proxies": str(written.proxies_file),
                  "run_ids": list(written.run_ids), "log_dir": str(written.log_dir),
                  "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with (written.script.parent / "jobs.jsonl").open("a") as jobs:
            jobs.write(json.dumps(record) + "\n")
        log.info("submitted %s proxies as Slurm job %s (%s)", len(written.run_ids), job_id, written.script)
        return submission

    def poll(self, submission: SlurmSubmission) -> dict[int, TaskState]:
        """The tasks' states now, from sacct (or squeue where sacct is missing or accounting is off)."""
        return self._poll(submission)[0]

    def _poll(self, submission: SlurmSubmission) -> tuple[dict[int, TaskState], bool]:
        """The states, and whether squeue gave them (a task squeue no longer lists has left the queue)."""
        if submission.job_id is None:
            raise ValueError(f"SlurmLauncher: {submission.script} was not submitted (a dry run)")
        job_id = submission.job_id
        if shutil.which(self.sacct):
            result = subprocess.run([self.sacct, "-j", job_id, "--format=JobID,State,ExitCode", "-P", "-n"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                return parse_sacct(result.stdout, job_id), False
            log.debug("sacct failed (%s); reading squeue", result.stderr.strip())
        if not shutil.which(self.squeue):
            raise SlurmError(f"neither {self.sacct!r} nor {self.squeue!r} works here: cannot follow job {job_id}")
        result = subprocess.run([self.squeue, "-h", "-r", "--states=all", "-j", job_id, "-o", "%i|%T"],
                                capture_output=True, text=True)
        if result.returncode != 0 and "Invalid job id" not in result.stderr:  # squeue's word for a job long gone
            raise SlurmError(f"{self.squeue} -j {job_id} failed (exit {result.returncode}): {result.stderr.strip()}")
        return parse_squeue(result.stdout if result.returncode == 0 else "", job_id), True

    def wait(self, submission: SlurmSubmission, proxies: Sequence[ProxyRun] = ()) -> dict[int, TaskState]:
        """Poll until every task has ended. `proxies` (in task order) settle the tasks squeue no longer lists
        by their run records. With `requeue`, a PREEMPTED or NODE_FAIL task is final only when two polls in a
        row say so (Slurm requeues it in between)."""
        deadline = None if self.wait_timeout_s is None else time.monotonic() + self.wait_timeout_s
        count = len(submission.run_ids)
        previous: dict[int, TaskState] = {}
        while True:
            states, from_squeue = self._poll(submission)
            if from_squeue and proxies:
                job_gone = not states
                for task in range(count):  # gone from the queue: it ended, and its run says how
                    if task not in states and (task in previous or job_gone):
                        states[task] = _state_from_run(task, proxies[task])
            if all(task in states and self._final(states[task], previous.get(task)) for task in range(count)):
                return {task: states[task] for task in range(count)}
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Slurm job {submission.job_id} still running after {self.wait_timeout_s} s; it "
                                   "goes on without this process: rerun the ablation later (finished proxies are "
                                   "not retrained) or `scancel` it")
            previous = states
            time.sleep(self.poll_interval_s)

    def _final(self, state: TaskState, before: TaskState | None) -> bool:
        if self.requeue and state.state in ("PREEMPTED", "NODE_FAIL"):
            return before is not None and before.state == state.state
        return state.finished

    def launch(self, proxies: Sequence[ProxyRun]) -> dict[str, int]:
        """Submit the proxies as one array job, wait for it, and return each proxy's exit code by run id."""
        if not proxies:
            return {}
        submission = self.submit(proxies)
        states = self.wait(submission, proxies)
        return exit_codes(submission, states)


def exit_codes(submission: SlurmSubmission, states: Mapping[int, TaskState]) -> dict[str, int]:
    """Each proxy's exit code from its task's final state; a task that did not succeed is logged with its state
    and log file."""
    codes = {}
    for task, run_id in enumerate(submission.run_ids):
        state = states.get(task, TaskState(task, "UNKNOWN"))
        codes[run_id] = state.code
        if state.code != 0:
            log.warning("proxy %s (Slurm job %s task %d) ended %s with exit code %d; log: %s", run_id,
                        submission.job_id, task, state.state, state.code, submission.log_path(task))
    return codes


def _state_from_run(task: int, proxy: ProxyRun) -> TaskState:
    """A task gone from squeue: COMPLETED if its run completed, FAILED otherwise."""
    from mixlab.training import RunRecord

    if (proxy.path / "run.json").exists() and RunRecord.load(proxy.path).status == "completed":
        return TaskState(task, "COMPLETED")
    return TaskState(task, "FAILED", 1)


def _directive(option: str) -> str:
    """An sbatch option as sbatch reads an `#SBATCH` line: a value with a space goes in double quotes, and a
    backslash, quote or `#` (which starts a comment there) gets a backslash before it."""
    name, sep, value = option.partition("=")
    if not sep:
        return option
    escaped = "".join("\\" + c if c in "\\\"'#" else c for c in value)
    return f'{name}="{escaped}"' if any(c.isspace() for c in value) else f"{name}={escaped}"


def _ablation_dir(proxies: Sequence[ProxyRun]) -> Path:
    """The one directory holding every proxy's run document (a spec's `ablations/<name>/`)."""
    folders = {p.document_path.parent.resolve() for p in proxies}
    if len(folders) != 1:
        raise ValueError(f"SlurmLauncher: one launch is one ablation, but the proxies' run documents lie in "
                         f"{len(folders)} directories ({', '.join(sorted(map(str, folders)))}); launch each apart")
    return folders.pop()


def _fresh_path(folder: Path, stem: str, suffix: str) -> Path:
    """folder/stem+suffix, or stem-2, stem-3... when a launch in the same second took it."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path

