"""Kill trials for curation: a run interrupted at a random point and run again must write the same shards, byte
for byte, and the same manifest accounting as a run that was never interrupted, on every engine.

    .venv/bin/python -m mixlab.pipelines.kill_trials --raw WORK/raw --sources math --trials 10 [--executor local]
    .venv/bin/python -m mixlab.pipelines.kill_trials --raw WORK/raw --executor slurm --resume-executor local

How each engine is interrupted (the real thing a user meets):
- local: `kill -9` of the `mixlab curate` process group (the parent and its forked workers);
- slurm: `kill -9` of the submitting `mixlab curate`, then `scancel` of every job it queued (running array
  tasks die mid-write), then the same command again;
- ray: `kill -9` of one datatrove RankWorker process (and the pool processes it runs ranks in) while the run goes
  on; datatrove resubmits that rank, and the run must finish with the same result without a rerun.

The point is random and the same on every engine: after k of the run's datatrove ranks finished (k drawn from
1 .. all-1) plus up to half a second, from a seeded generator (the seed is printed; `--seed` replays a trial). Every run goes through the real CLI in its own process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mixlab.curation.executors import slurm_queue
from mixlab.curation.manifest import ShardManifest

KILLABLE = ("local", "slurm", "ray")


@dataclass
class KillTrial:
    """One trial: where it was interrupted and whether the result equals the uninterrupted run's."""

    executor: str
    resume_executor: str
    seed: int
    kill_after_s: float
    interrupted: bool  # False when the run had already finished at the kill point (the trial proves nothing)
    identical_shards: bool
    same_accounting: bool
    seconds: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.interrupted and self.identical_shards and self.same_accounting


def curate_command(raw: Path, out: Path, executor: str, sources: list[str], tasks: int = 2,
                   recipes: tuple[str, ...] = ()) -> list[str]:
    """`mixlab curate` of `sources` on `executor`; `recipes` are `--recipe` specs (SOURCE=module:function)."""
    return [sys.executable, "-m", "mixlab.pipelines.cli", "curate", "--raw", str(raw), "--out", str(out),
            "--sources", *sources, "--tasks", str(tasks), "--executor", executor,
            *(arg for spec in recipes for arg in ("--recipe", spec))]


def run_curate(raw: Path, out: Path, executor: str, sources: list[str], timeout_s: float = 1800,
               recipes: tuple[str, ...] = ()) -> float:
    """An uninterrupted `mixlab curate`; its wall time. A failure raises with the end of its output."""
    start = time.perf_counter()
    done = subprocess.run(curate_command(raw, out, executor, sources, recipes=recipes), capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode:
        raise RuntimeError(f"mixlab curate --executor {executor} into {out} exited {done.returncode}:\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - start


def shard_digests(curated: Path) -> dict[str, str]:
    """sha256 of every Parquet shard, by its path inside the curated directory."""
    return {p.relative_to(curated).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((curated / "data").rglob("*.parquet"))}


def accounting(curated: Path) -> dict[str, dict]:
    """What the manifest counts per source: docs, bytes, quarantined, checksums and every step's counts."""
    manifest = ShardManifest.load(curated)
    problems = manifest.check() + manifest.verify_checksums()
    if problems:
        raise RuntimeError(f"{curated}: the manifest does not add up: {problems[:3]}")
    return {name: {"docs": entry.docs, "bytes": entry.bytes, "quarantined": entry.quarantined,
                   "shards": [s.sha256 for s in entry.shards], "steps": [asdict(step) for step in entry.steps]}
            for name, entry in sorted(manifest.sources.items())}


def _start(raw: Path, out: Path, executor: str, sources: list[str], recipes: tuple[str, ...]) -> subprocess.Popen:
    log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(curate_command(raw, out, executor, sources, recipes=recipes), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _children(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def ray_rank_workers() -> list[int]:
    """PIDs of the Ray actor processes running datatrove ranks right now: titled `ray::RankWorker...`, with the
    pool process the ranks run in already started (a worker that is still starting has none)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if cmdline.startswith(b"ray::RankWorker") and _children(int(entry.name)):
                pids.append(int(entry.name))
    return sorted(pids)


def _kill_tree(pid: int) -> None:
    for child in _children(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _curation_jobs() -> list[str]:
    """Queued or running Slurm jobs that `mixlab curate` submitted (their names start `mixlab-curate-`)."""
    return sorted(job for job, name in slurm_queue() if name.startswith("mixlab-curate-"))


def _scancel_curation_jobs() -> int:
    jobs = _curation_jobs()
    if jobs:
        subprocess.run(["scancel", *jobs], check=False, capture_output=True)
    deadline = time.monotonic() + 120
    while _curation_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    return len(jobs)


def completed_ranks(curated: Path) -> int:
    """datatrove completion markers written so far, over every stage of every source."""
    logs = curated / "logs"
    return sum(1 for _ in logs.glob("*/*/completions/*")) if logs.is_dir() else 0


def _wait_for(condition, process: subprocess.Popen, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll `condition()` until it holds (True) or the process ends or the time runs out (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(poll_s)
    return False


def kill_trial(raw: Path, work: Path, sources: list[str], reference: Path, seed: int, executor: str = "local",
               resume_executor: str | None = None, timeout_s: float = 1800,
               recipes: tuple[str, ...] = ()) -> KillTrial:
    """Run `mixlab curate` on `executor`, interrupt it at a seeded random point, finish it (on `resume_executor`,
    default the same engine) and compare with `reference` (an uninterrupted run, on any engine).

    The point is engine-independent: once a random number k of the reference's datatrove ranks (1 <= k < all) have
    written their completion marker, plus a random 0-0.5 s (inside the next ranks' work)."""
    if executor not in KILLABLE:
        raise ValueError(f"executor {executor!r}: choose from {KILLABLE}")
    resume_executor = resume_executor or executor
    chance = random.Random(seed)
    ranks = completed_ranks(reference)
    if ranks < 2:
        raise ValueError(f"{reference}: {ranks} datatrove ranks; a kill trial needs a run of at least 2")
    k, delay = chance.randint(1, ranks - 1), chance.uniform(0.0, 0.5)
    out = work / f"{executor}-{resume_executor}-{seed}"
    start = time.perf_counter()
    process = _start(raw, out, executor, sources, recipes)
    reached = _wait_for(lambda: completed_ranks(out) >= k, process, timeout_s)
    time.sleep(delay)
    kill_after = time.perf_counter() - start
    interrupted = reached and process.poll() is None
    detail = f"after {k}/{ranks} ranks + {delay:.2f} s"
    if executor == "ray":
        found = interrupted and _wait_for(lambda: bool(ray_rank_workers()), process, 60)
        workers = ray_rank_workers() if found else []
        interrupted = bool(workers)
        if workers:
            victim = chance.choice(workers)
            _kill_tree(victim)
            detail += f", killed Ray worker {victim} (of {len(workers)})"
        if resume_executor == executor:
            process.wait(timeout=timeout_s)
            if process.returncode:
                detail += f"; the run exited {process.returncode} and was run again"
        else:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        if executor == "slurm":
            detail += f", scancel of {_scancel_curation_jobs()} jobs"
    if executor != "ray" or process.returncode or resume_executor != executor:
        run_curate(raw, out, resume_executor, sources, timeout_s, recipes)
    seconds = time.perf_counter() - start
    identical = shard_digests(out) == shard_digests(reference) and bool(shard_digests(reference))
    same = accounting(out) == accounting(reference)
    return KillTrial(executor, resume_executor, seed, round(kill_after, 2), interrupted, identical, same,
                     round(seconds, 1), detail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixlab.pipelines.kill_trials", description=__doc__.split("\n")[0])
    parser.add_argument("--raw", type=Path, required=True, help="raw directory (from `mixlab corpus fetch`)")
    parser.add_argument("--work", type=Path, default=Path("kill-trials"), help="where the curated copies go")
    parser.add_argument("--sources", nargs="+", default=["math"], help="sources to curate (default: math)")
    parser.add_argument("--executor", choices=KILLABLE, default="local", help="the engine to interrupt")
    parser.add_argument("--resume-executor", choices=KILLABLE, help="finish on another engine (default: the same)")
    parser.add_argument("--trials", type=int, default=10, help="how many kill points (default 10)")
    parser.add_argument("--seed", type=int, default=20261207, help="first trial's seed (then seed+1, ...)")
    parser.add_argument("--recipe", action="append", default=[], metavar="SOURCE=MODULE:FUNCTION",
                        help="a recipe of your own, as for `mixlab curate --recipe`")
    parser.add_argument("--json", type=Path, help="also write the trials here")
    args = parser.parse_args(argv)
    reference = args.work / "reference"
    recipes = tuple(args.recipe)
    reference_s = run_curate(args.raw, reference, "local", args.sources, recipes=recipes)
    print(f"reference: local, {reference_s:.1f} s, {len(shard_digests(reference))} shards, "
          f"{completed_ranks(reference)} datatrove ranks")
    trials = []
    for i in range(args.trials):
        trial = kill_trial(args.raw, args.work, args.sources, reference, args.seed + i, args.executor,
                           args.resume_executor, recipes=recipes)
        trials.append(trial)
        print(f"trial {i + 1}/{args.trials} seed {trial.seed}: {trial.executor} -> {trial.resume_executor}, killed "
              f"at {trial.kill_after_s:.1f} s, interrupted={trial.interrupted}, shards identical="
              f"{trial.identical_shards}, accounting equal={trial.same_accounting} {trial.detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(t) for t in trials], indent=2))
    passed = sum(t.passed for t in trials)
    print(f"{passed}/{len(trials)} trials interrupted a run and gave the same shards and accounting")
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    raise SystemExit(main())
