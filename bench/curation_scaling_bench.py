"""Curation scaling and memory: `curate()` of the same real raw sources at 1 and 2 workers (issue 11).

    .venv/bin/python bench/curation_scaling_bench.py [--quick] [--max-mb MB] [--workers 1 2] [--tasks 2]

Data: the demo's raw sources (every source in `SOURCES`), `fetch_corpus` at `--max-mb` per source (default 3 MB,
cached under .cache/mixlab-bench/scaling; built from the project's download cache, nothing else). Each worker
count curates the same raw files into a fresh output folder, in a fresh Python process (so neither run inherits
the other's warm caches), with the heavy modules imported before the clock starts (as `mixlab curate` does).

Figures:
- docs/s per source: raw documents read by the source's first step / the source's curation seconds (all its
  stages: filters, exact dedup, MinHash stages 1-4, writing); overall: all documents / the sum of the sources'
  seconds, and / the wall time of the whole `curate()` call (which also builds the decontamination index);
- parallel efficiency: (docs/s at 2 workers / docs/s at 1 worker) / 2; and the CPU seconds (the curating process
  and its children) at 2 workers over those at 1: the work parallelism adds, which contention does not change;
- peak memory per worker: the kernel's high-water mark of resident memory (`VmHWM` in /proc/<pid>/status) of
  each process that ran datatrove tasks, sampled every 0.1 s while `curate()` runs (a high-water mark, so a
  sample misses only growth in a process's last 0.1 s); with 1 worker the tasks run in the curating process
  itself, with 2 they run in forked pool processes (`ForkPoolWorker-N`, one pool per stage, so many pids); the
  figure is the max over those processes, never a sum. Cross-check: the exact VmHWM of the curating process
  read when `curate()` returns (the worker at 1 worker; the driver at 2). Its `getrusage` max RSS is printed
  too but not judged: Linux carries into it the peak of the image replaced at exec, so a child launched from a
  large process (`make bench` runs this after the web-chain bench) reports the launcher's size.
  RSS counts pages a forked worker still shares with its parent (copy-on-write), so it over-states what each
  worker adds; the bound is checked on it anyway. PASS when every worker's peak is <= 2 GB (the issue's bound).
The machine's load average is printed at the start and end: the efficiency figure means little when other jobs
share the two cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mixlab-bench" / "scaling"
MEMORY_BOUND_BYTES = 2 * 1024**3  # issue 11: at most 2 GB per worker on the demo corpus
SAMPLE_INTERVAL_S = 0.1


@dataclass
class ScalingConfig:
    """What to curate and at which parallelism; the defaults are the issue's figures on a few MB per source."""

    max_mb: float = 3.0  # raw text per source, as `fetch_corpus(max_mb=...)`
    workdir: Path | None = None  # None: .cache/mixlab-bench/scaling/<max_mb>mb (one raw corpus per size, cached)
    sources: list[str] | None = None  # None: every demo source (`SOURCES`)
    tasks: int = 2
    worker_counts: tuple[int, ...] = (1, 2)
    memory_bound_bytes: int = MEMORY_BOUND_BYTES
    sample_interval_s: float = SAMPLE_INTERVAL_S
    keep_outputs: bool = False  # keep the curated folders (for a look at their logs) instead of removing them


# ---- the memory sampler (runs inside the curating process) ------------------------------------------------------
def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    """`VmHWM`/`VmRSS` (KiB) of a live process from /proc; {} when it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(line.split()[1]) for line in lines for k in keys if line.startswith(k + ":")}


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, over all its threads (a child hangs off the thread that forked it)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def _process_names() -> dict[int, str]:
    """pid -> multiprocess name (`ForkPoolWorker-N` for datatrove's pool workers, `SyncManager-N` for its queue
    manager) of the children this process started; read without polling them (the pool reaps its own)."""
    try:
        import multiprocess.process as mp_process
    except ImportError:
        return {}
    for _ in range(3):  # the set may change size under us while the pool starts or reaps a worker
        try:
            return {p.pid: p.name for p in list(mp_process._children) if p.pid}
        except RuntimeError:
            continue
    return {}


@dataclass
class PeakMemorySampler:
    """Samples the high-water mark of resident memory of this process and all its descendants in a thread."""

    interval_s: float = SAMPLE_INTERVAL_S
    peaks_kib: dict[int, int] = field(default_factory=dict)  # pid -> max VmHWM seen
    names: dict[int, str] = field(default_factory=dict)
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample_once(self) -> None:
        root = os.getpid()
        names = _process_names()
        pending, seen = [root], set()
        while pending:
            pid = pending.pop()
            if pid in seen:
                continue
            seen.add(pid)
            hwm = _status_kib(pid, ("VmHWM",)).get("VmHWM")
            if hwm is not None:
                self.peaks_kib[pid] = max(self.peaks_kib.get(pid, 0), hwm)
                # a pid is often seen before the starting thread has registered its name: keep looking
                known = "curate (this process)" if pid == root else names.get(pid) or self.names.get(pid)
                self.names[pid] = known or "child"
            pending += _children(pid)
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample_once()

    def __enter__(self) -> PeakMemorySampler:
        self._sample_once()
        self._thread = threading.Thread(target=self._loop, name="peak-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_once()


# ---- one curation run (a fresh process) ----------------------------------------------------------------------
def curate_once(raw: Path, out: Path, tasks: int, workers: int, sources: list[str] | None,
                interval_s: float) -> dict[str, Any]:
    """Curate `raw` into a fresh `out` at `workers`, sampling memory; the figures as a JSON-able dict."""
    from mixlab.pipelines.curate import curate, preload_heavy_modules

    if out.exists():
        shutil.rmtree(out)
    preload_heavy_modules()  # `mixlab curate` pays these imports once, before any source; not a curation cost
    console = io.StringIO()
    load_start = os.getloadavg()
    with PeakMemorySampler(interval_s) as sampler:
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        manifest = curate(raw, out, sources=sources, tasks=tasks, workers=workers, console=console)
        wall_s = time.perf_counter() - start
        cpu_s = _cpu_seconds() - cpu_start
    per_source = {}
    for name, entry in manifest.sources.items():
        timing = entry.metadata_summary.get("timing", {})
        docs = entry.steps[0].docs_in if entry.steps else 0
        per_source[name] = {"docs": docs, "kept": entry.docs, "seconds": timing.get("seconds")}
    kib = 1024
    processes = [{"pid": pid, "name": sampler.names.get(pid, "?"), "peak_bytes": hwm * kib}
                 for pid, hwm in sorted(sampler.peaks_kib.items())]
    root = os.getpid()
    if workers == 1:  # datatrove runs the ranks in-process: the curating process is the worker
        worker_peaks = [p["peak_bytes"] for p in processes if p["pid"] == root]
    else:
        worker_peaks = [p["peak_bytes"] for p in processes if p["name"].startswith("ForkPoolWorker")]
        if not worker_peaks:  # names unavailable: every child counts as a worker (the manager is only smaller)
            worker_peaks = [p["peak_bytes"] for p in processes if p["pid"] != root]
    return {
        "workers": workers, "tasks": tasks, "wall_s": wall_s, "cpu_s": cpu_s, "sources": per_source,
        "load_start": load_start, "load_end": os.getloadavg(), "samples": sampler.samples,
        "processes": processes, "worker_peak_bytes": worker_peaks,
        # the kernel's exact peak of the curating process's own memory image (VmHWM, read once curate() is
        # done: no sampling gap); getrusage's ru_maxrss is printed beside it, but Linux carries the peak of the
        # image a process replaced at exec into it, so a child launched from a large process reports that size
        "hwm_self_bytes": _own_hwm_kib() * kib,
        "rusage_self_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
        "console": console.getvalue(),
    }


def _own_hwm_kib() -> int:
    """VmHWM of this process (KiB), 0 where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _run_child(raw: Path, out: Path, config: ScalingConfig, workers: int) -> dict[str, Any]:
    """`curate_once` in a fresh interpreter; its console and errors are kept in `<workdir>/w<N>.log`."""
    result_path = config.workdir / f"w{workers}.json"
    log_path = config.workdir / f"w{workers}.log"
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--raw", str(raw), "--out", str(out),
               "--tasks", str(config.tasks), "--workers", str(workers), "--result", str(result_path),
               "--interval", str(config.sample_interval_s)]
    if config.sources:
        command += ["--sources", *config.sources]
    with log_path.open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if done.returncode != 0 or not result_path.exists():
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"curation at {workers} worker(s) failed (exit {done.returncode}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def _docs_per_s(result: dict[str, Any]) -> dict[str, float]:
    rates = {name: s["docs"] / s["seconds"] for name, s in result["sources"].items() if s.get("seconds")}
    docs = sum(s["docs"] for s in result["sources"].values())
    seconds = sum(s["seconds"] or 0.0 for s in result["sources"].values())
    rates["overall (sum of sources)"] = docs / seconds if seconds else float("nan")
    rates["overall (curate wall)"] = docs / result["wall_s"] if result["wall_s"] else float("nan")
    return rates


def run(config: ScalingConfig | None = None) -> dict[str, Any]:
    """Fetch (cached) the raw sources, curate them at each worker count, and derive the figures."""
    from mixlab.pipelines.corpus import fetch_corpus

    config = config or ScalingConfig()
    if config.workdir is None:
        config.workdir = WORK / f"{config.max_mb:g}mb"
    config.workdir.mkdir(parents=True, exist_ok=True)
    fetch_corpus(config.workdir, max_mb=config.max_mb, sources=config.sources)
    raw = config.workdir / "raw"
    load_start = os.getloadavg()
    runs: dict[int, dict[str, Any]] = {}
    for workers in config.worker_counts:
        out = config.workdir / f"curated-w{workers}"
        try:
            runs[workers] = _run_child(raw, out, config, workers)
        finally:
            if not config.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
    rates = {w: _docs_per_s(r) for w, r in runs.items()}
    kept = {w: {name: s["kept"] for name, s in r["sources"].items()} for w, r in runs.items()}
    low, high = min(runs), max(runs)
    speedup = rates[high]["overall (sum of sources)"] / rates[low]["overall (sum of sources)"]
    peak = max(max(r["worker_peak_bytes"], default=0) for r in runs.values())
    exact = max((r["hwm_self_bytes"] for w, r in runs.items() if w == 1), default=0)
    return {
        "config": {"max_mb": config.max_mb, "tasks": config.tasks, "worker_counts": list(config.worker_counts),
                   "sources": sorted(next(iter(runs.values()))["sources"])},
        "runs": runs, "docs_per_s": rates, "speedup": speedup,
        "efficiency": speedup / (high / low) if high != low else float("nan"),
        "cpu_ratio": runs[high]["cpu_s"] / runs[low]["cpu_s"] if runs[low]["cpu_s"] else float("nan"),
        "same_kept_docs": all(k == kept[low] for k in kept.values()),
        "peak_worker_bytes": peak, "peak_worker_bytes_exact": exact,
        "memory_ok": max(peak, exact) <= config.memory_bound_bytes, "memory_bound_bytes": config.memory_bound_bytes,
        "load_start": load_start, "load_end": os.getloadavg(), "cpus": os.cpu_count(),
    }


def _gib(nbytes: float) -> str:
    return f"{nbytes / 1024**3:.2f} GiB"


def _load(avg: tuple[float, float, float] | list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def report_lines(result: dict[str, Any]) -> list[str]:
    """The scaling and memory figures, one table and a few lines."""
    runs, rates = result["runs"], result["docs_per_s"]
    counts = sorted(runs, key=int)
    cfg = result["config"]
    lines = [f"curation scaling: {len(cfg['sources'])} demo sources at {cfg['max_mb']:g} MB raw text each, "
             f"tasks={cfg['tasks']}; load average (1/5/15 min) {_load(result['load_start'])} at start, "
             f"{_load(result['load_end'])} at end, {result['cpus']} CPUs"]
    header = f"  {'source':26s} {'docs':>7s}" + "".join(f" {f'docs/s w={w}':>12s}" for w in counts)
    lines.append(header)
    first = runs[counts[0]]["sources"]
    for name in list(first) + ["overall (sum of sources)", "overall (curate wall)"]:
        docs = first[name]["docs"] if name in first else sum(s["docs"] for s in first.values())
        lines.append(f"  {name:26s} {docs:7,d}" + "".join(f" {rates[w].get(name, float('nan')):12.1f}" for w in counts))
    for w in counts:
        r = runs[w]
        lines.append(f"  w={w}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, load {_load(r['load_start'])} -> "
                     f"{_load(r['load_end'])}, {len(r['worker_peak_bytes'])} worker process(es), peak per worker "
                     f"{_gib(max(r['worker_peak_bytes'], default=0))} (sampled VmHWM, {r['samples']} samples); "
                     f"curating process {_gib(r['hwm_self_bytes'])} (its VmHWM; getrusage "
                     f"{_gib(r['rusage_self_bytes'])}, which includes the launching process's image)")
    if len(counts) > 1:
        lines.append(f"  speedup {counts[0]} -> {counts[-1]} workers: {result['speedup']:.2f}x, parallel efficiency "
                     f"{result['efficiency']:.0%}; CPU seconds {counts[-1]} / {counts[0]} workers "
                     f"{result['cpu_ratio']:.2f} (the parallel overhead, which other jobs on the cores do not "
                     f"change); kept documents equal across worker counts: {'yes' if result['same_kept_docs'] else 'NO'}")
    verdict = "PASS" if result["memory_ok"] else "FAIL"
    lines.append(f"  peak memory per worker: {_gib(result['peak_worker_bytes'])} (max VmHWM of the processes that ran "
                 f"tasks; the in-process worker's own VmHWM {_gib(result['peak_worker_bytes_exact'])}); bound "
                 f"{_gib(result['memory_bound_bytes'])}: {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MB per source (a smoke run, noisier figures)")
    parser.add_argument("--max-mb", type=float, default=None, help="raw text per source (default 3)")
    parser.add_argument("--sources", nargs="+", default=None, help="default: every demo source")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--keep", action="store_true", help="keep the curated folders under the work dir")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    # internal: one curation run in this (fresh) process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--raw", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--interval", type=float, default=SAMPLE_INTERVAL_S, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = curate_once(args.raw, args.out, args.tasks, args.workers[0], args.sources, args.interval)
        print(result.pop("console"))
        args.result.write_text(json.dumps(result))
        return 0
    max_mb = args.max_mb if args.max_mb is not None else (1.0 if args.quick else 3.0)
    config = ScalingConfig(max_mb=max_mb, sources=args.sources, tasks=args.tasks,
                           worker_counts=tuple(args.workers), keep_outputs=args.keep)
    result = run(config)
    print("\n".join(report_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["memory_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
