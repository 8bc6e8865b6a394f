"""Where curation stages run: datatrove's local, Slurm and Ray executors behind one small interface.

A recipe's stages are the same pipeline lists on every engine; an engine only decides where the ranks run. Each
engine is a callable `(pipeline, tasks, workers, logging_dir) -> PipelineExecutor` with three facts the runner
needs:

- `name` ("local", "slurm", "ray"), recorded with the source's timing;
- `chains`: whether the stages of a source are submitted at once as dependent jobs (Slurm job arrays with
  `afterok` dependencies) rather than run one after the other (local, Ray);
- `wait(executors)`: for a chaining engine, block until the submitted jobs have left the queue.

Every engine writes datatrove's per-rank `completions/` and `stats/` into the stage's logging folder, so a rerun on
any engine skips what any engine finished, and mixlab's accounting (merged per-rank stats) is the same whichever
engine ran which rank. The logging folder must be on a file system the workers share (it is, on one machine).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from datatrove.executor import LocalPipelineExecutor
from datatrove.executor.base import PipelineExecutor
from datatrove.pipeline.base import PipelineStep
from mixlab.curation.console import CurationError, quiet_datatrove_console

log = logging.getLogger("mixlab.curation.executors")

EXECUTORS = ("local", "slurm", "ray")
PRELOADED_MODULES = ("trafilatura", "fasttext", "pyarrow.parquet")  # and spaCy, without torch


class CurationEngine(Protocol):
    name: str
    chains: bool

    def __call__(self, pipeline: list[PipelineStep], tasks: int, workers: int,
                 logging_dir: Path) -> PipelineExecutor: ...


def preload_heavy_modules() -> None:
    """Import once in the parent so forked workers inherit them: `import spacy` alone takes ~1.3 s (3.5 s when
    thinc imports torch, which `import_spacy` prevents), which a fresh worker would pay again for every stage."""
    import importlib

    from mixlab.curation.text import import_spacy

    import_spacy()
    for name in PRELOADED_MODULES:
        importlib.import_module(name)


@dataclass
class LocalEngine:
    """datatrove's LocalPipelineExecutor with forked workers (that inherit the preloaded modules); with one
    worker it runs the tasks in-process."""

    name: str = "local"
    chains: bool = False

    def __call__(self, pipeline: list[PipelineStep], tasks: int, workers: int,
                 logging_dir: Path) -> PipelineExecutor:
        preload_heavy_modules()
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                     start_method="fork")


@dataclass
class SlurmEngine:
    """datatrove's SlurmPipelineExecutor: one job array per stage (`workers` of its tasks at once), each stage
    `afterok` the one before, the workers in `venv` (default: this interpreter's). `sbatch`/`squeue` must reach a
    running Slurm (`pipelines/engines/slurm_single_node.sh up` makes one on this machine).

    `wait` polls `squeue` until the jobs have left the queue, `timeout_s` at most."""

    partition: str | None = None
    time: str = "01:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2  # sbatch takes whole units
    venv: Path | None = None
    job_name: str = "mixlab-curate"
    sbatch_args: dict[str, Any] = field(default_factory=dict)
    poll_s: float = 1.0
    timeout_s: float = 3600.0
    name: str = "slurm"
    chains: bool = True

    def __post_init__(self) -> None:
        missing = [tool for tool in ("sbatch", "squeue", "scancel") if shutil.which(tool) is None]
        if missing:
            raise CurationError(f"--executor slurm: {', '.join(missing)} not on PATH; install the Slurm client "
                                "and point it at your cluster (or start one here with "
                                "`pipelines/engines/slurm_single_node.sh up`)")

    def partition_name(self) -> str:
        if self.partition:
            return self.partition
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=False).stdout
        default = next((p.rstrip("*") for p in out.split() if p.endswith("*")), None)
        if default is None:
            raise CurationError("--executor slurm: no default partition (sinfo shows none marked with *); pass "
                                "--slurm-partition")
        return default

    def __call__(self, pipeline: list[PipelineStep], tasks: int, workers: int,
                 logging_dir: Path) -> PipelineExecutor:
        from datatrove.executor.slurm import SlurmPipelineExecutor

        venv = self.venv or Path(sys.prefix)
        activate = venv / "bin" / "activate"
        if not activate.is_file():
            raise CurationError(f"--executor slurm: {activate} does not exist; the Slurm workers run in a venv "
                                "with mixlab installed (pass its folder as venv)")
        stage = logging_dir.name
        source = logging_dir.parent.name
        return SlurmPipelineExecutor(
            pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
            job_name=f"{self.job_name}-{source}-{stage}", time=self.time, partition=self.partition_name(),
            cpus_per_task=self.cpus_per_task, mem_per_cpu_gb=self.mem_per_cpu_gb, venv_path=str(activate),
            sbatch_args=dict(self.sbatch_args), condaenv=None, with_srun=False,
            slurm_logs_folder=str(logging_dir / "slurm_logs"))

    def wait(self, executors: list[PipelineExecutor]) -> None:
        """Until no job of these executors (their arrays and datatrove's stats-merge jobs, which carry the same
        job name) is in the queue."""
        names = {e.job_name for e in executors}
        deadline = time.monotonic() + self.timeout_s
        while waiting := sorted(job for job, name in slurm_queue() if name in names):
            if time.monotonic() > deadline:
                raise CurationError(f"Slurm jobs {waiting} still queued after {self.timeout_s:.0f} s; see "
                                    "`squeue`, or raise SlurmEngine.timeout_s")
            time.sleep(self.poll_s)


def slurm_queue() -> list[tuple[str, str]]:
    """(job id, job name) of every job in Slurm's queue; an array's tasks by their array job id."""
    out = subprocess.run(["squeue", "-h", "-o", "%F %j"], capture_output=True, text=True, check=False)
    if out.returncode:
        raise CurationError(f"squeue failed ({out.stderr.strip()}); is slurmctld running?")
    return sorted({tuple(line.split(maxsplit=1)) for line in out.stdout.splitlines() if " " in line})


@dataclass
class RayEngine:
    """datatrove's RayPipelineExecutor: each rank a Ray task of `cpus_per_task` CPUs, `workers` at once; a task
    whose worker dies is resubmitted (datatrove retries a rank up to 3 times).

    Connects to `address` (default `$RAY_ADDRESS`; `pipelines/engines/ray_local.sh up` starts one here), or
    without one starts a local Ray in this process with `num_cpus` CPUs and no dashboard."""

    address: str | None = None
    num_cpus: int | None = None
    cpus_per_task: int = 1
    mem_per_cpu_gb: float = 1.0
    name: str = "ray"
    chains: bool = False

    def __post_init__(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as err:
            raise CurationError("--executor ray: ray is not installed; `pip install 'mixlab[cluster]'` (or "
                                "`pip install ray`)") from err

    def connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=self.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)

    def __call__(self, pipeline: list[PipelineStep], tasks: int, workers: int,
                 logging_dir: Path) -> PipelineExecutor:
        from datatrove.executor.ray import RayPipelineExecutor

        self.connect()
        guard_ray_submissions()
        with quiet_datatrove_console(logging_dir):  # its warning that a local logging_dir must be shared
            return RayPipelineExecutor(pipeline, tasks=tasks, workers=workers, logging_dir=str(logging_dir),
                                       cpus_per_task=self.cpus_per_task, mem_per_cpu_gb=self.mem_per_cpu_gb)


def guard_ray_submissions() -> None:
    """datatrove 0.10.1's Ray executor submits each group of ranks from a thread that starts a RankWorker, asks
    it for its node's address, then hands the rank task to a future. When the worker dies in between (before its
    ranks run), that thread raises and the future is never resolved: `RayPipelineExecutor.run` waits forever.
    Here the future is resolved with the error instead; datatrove then logs it and ends the stage, whose missing
    ranks `curate` reports (a rerun runs just those). Applied once, without editing datatrove."""
    from datatrove.executor import ray as datatrove_ray

    manager = datatrove_ray.RayTaskManager
    if getattr(manager.submit_task, "mixlab_guarded", False):
        return
    submit_task = manager.submit_task

    def guarded(self: Any, executor_ref: Any, ranks: list[int], remote_options: dict) -> Any:
        promised = submit_task(self, executor_ref, ranks, remote_options)
        started = self.pg_futures[-1]  # the thread's own future, appended by submit_task

        def settle(done: Any) -> None:
            if done.exception() is not None and not promised.done():
                promised.set_exception(done.exception())

        started.add_done_callback(settle)
        return promised

    guarded.mixlab_guarded = True  # type: ignore[attr-defined]
    manager.submit_task = guarded


def curation_engine(name: str, **options: Any) -> CurationEngine:
    """The engine called `name` (local, slurm, ray), with its options (see each engine's fields)."""
    engines = {"local": LocalEngine, "slurm": SlurmEngine, "ray": RayEngine}
    if name not in engines:
        raise CurationError(f"unknown executor {name!r}: choose from {list(EXECUTORS)}")
    return engines[name](**{k: v for k, v in options.items() if v is not None})


local_executor = LocalEngine()
