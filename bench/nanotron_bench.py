"""The nanotron backend's throughput (mixlab issue 12): world size 1 against the embedded backend, measured in the
same run, and 2- and 4-process layouts with the share of time spent communicating.

    .venv/bin/python bench/nanotron_bench.py [--steps 14] [--skip-multi]

Workload: the demo model (d_model 256, 4 layers, 8 heads / 4 kv heads, seq 256, batch 8, vocab 4096) on the
bench corpus (run_all.prepare), fp32, the real trainers (`train` and `train_nanotron`) with the real sampler,
no eval; a checkpoint only at the end, outside the measured window.

- world size 1 (2 threads): embedded and nanotron alternately, three runs each; each backend's figure is the
  median of its three, so a machine that slows down during the run
  shows as the spread of the anchor rather than as a backend cost. Goal: the nanotron backend within 5% of the
  embedded one.
- 2 and 4 processes (torchrun, 1 thread each; this machine has 2 cores, so 4 processes share them): tp2, pp2,
  dp2, tp2 x pp2, tp2 x dp2, pp2 x dp2.

Every figure comes from a torch.profiler trace of the whole run: the measured window runs from the end of the
warm-up steps' AdamW step to the end of the last one; tokens/s is a step's tokens over the median step time in
the window (robust to a neighbour's burst on a shared machine), and the communication share is the part of the
window during which a gloo collective or point-to-point transfer was in flight on rank 0 (the union of its `gloo:*` intervals; overlapped DDP all-reduces count as in flight).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WARMUP_STEPS = 3
MULTI = {2: ["tp2:2:1", "pp2:1:2", "dp2:1:1"], 4: ["tp2xpp2:2:2", "tp2xdp2:2:1", "pp2xdp2:1:2"]}


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def window_figures(profile, tokens_per_step: int) -> dict:
    """tokens/s and communication share in the window after the warm-up steps (see the module docstring)."""
    events = profile.events()
    step_ends = sorted(e.time_range.end for e in events if e.name.startswith("Optimizer.step#"))
    if len(step_ends) <= WARMUP_STEPS:
        raise SystemExit(f"only {len(step_ends)} optimizer steps in the trace: raise --steps")
    start, end = step_ends[WARMUP_STEPS - 1], step_ends[-1]
    comm = [(max(e.time_range.start, start), min(e.time_range.end, end)) for e in events
            if e.name.startswith("gloo:") and e.time_range.end > start and e.time_range.start < end]
    durations = sorted(b - a for a, b in zip(step_ends[WARMUP_STEPS - 1:-1], step_ends[WARMUP_STEPS:], strict=True))
    median_s = durations[len(durations) // 2] / 1e6
    return {"tok_s": tokens_per_step / median_s, "comm_share": _union_length(comm) / (end - start),
            "steps": len(durations)}


def worker(curated: Path, out: Path, specs: list[str], steps: int, threads: int) -> None:
    """Train each spec (`name:embedded` or `name:tp:pp`) under the profiler; rank 0 appends a JSON line to out."""
    import torch
    import torch.distributed as dist
    from mixlab.curation import ShardManifest
    from mixlab.mixtures import MixtureSchedule
    from mixlab.pipelines.pretrain import build_sampler
    from mixlab.training import ModelConfig, RunRecord, RunStore, TrainConfig, train
    from mixlab.training.nanotron_layout import ParallelLayout
    from mixlab.training.nanotron_trainer import train_nanotron
    from torch.profiler import ProfilerActivity, profile

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    manifest = ShardManifest.load(curated)
    schedule = MixtureSchedule.constant({"web-en": 0.3, "code-python": 0.4, "math": 0.3})
    config = TrainConfig.preset("demo", total_steps=steps, warmup_steps=2, log_every=steps, eval_every=10**6,
                                checkpoint_every=10**6, progress_bar=False, threads=threads, precision="fp32")
    model_config = ModelConfig.preset("demo", vocab_size=manifest.tokenizer.vocab_size, max_seq_len=config.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) if world == 1 else out.parent / "runs"
        for spec in specs:
            name, *layout = spec.split(":")
            if rank == 0:
                RunStore(runs).create(f"bench-{name}", {})
            if world > 1:
                dist.barrier()
            run = RunRecord.load(runs / f"bench-{name}")
            sampler = build_sampler(manifest, schedule, config)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                if layout == ["embedded"]:
                    train(run, model_config, config, sampler)
                else:
                    tp, pp = int(layout[0]), int(layout[1])
                    train_nanotron(run, model_config, config, sampler, layout=ParallelLayout(tp=tp, pp=pp))
            if rank == 0:
                row = {"name": name, "world": world, **window_figures(prof, config.tokens_per_step)}
                with out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            del prof
            torch.set_num_threads(threads)
    if world > 1:
        dist.destroy_process_group()


def _launch(curated: Path, out: Path, specs: list[str], steps: int, nproc: int, threads: int) -> None:
    script = [str(Path(__file__).resolve()), "worker", str(curated), str(out), *specs, "--steps", str(steps),
              "--threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(threads)
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
                   *script]
    subprocess.run(command, check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14, help=f"optimizer steps per run, {WARMUP_STEPS} of them "
                                                               "warm-up (default 14)")
    parser.add_argument("--skip-multi", action="store_true", help="only the world-size-1 comparison")
    args = parser.parse_args(argv)
    from run_all import prepare

    curated = prepare(max_mb=2.0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        alternating = [spec for k in "abc" for spec in (f"embedded-{k}:embedded", f"nanotron-{k}:1:1")]
        _launch(curated, out, alternating, args.steps, 1, 2)
        if not args.skip_multi:
            for nproc, specs in MULTI.items():
                _launch(curated, out, specs, args.steps, nproc, 1)
        rows = {r["name"]: r for r in map(json.loads, out.read_text().splitlines())}
    embedded = sorted(rows.pop(f"embedded-{k}")["tok_s"] for k in "abc")
    anchor = embedded[1]
    rows["nanotron-1"] = sorted((rows.pop(f"nanotron-{k}") for k in "abc"), key=lambda r: r["tok_s"])[1]
    print(f"\nnanotron backend, demo model, seq 256 x batch 8, fp32; {args.steps - WARMUP_STEPS} measured steps per "
          f"run; anchor: embedded backend at world size 1 = {anchor:,.0f} tok/s (median of "
          f"{', '.join(f'{v:,.0f}' for v in embedded)})")
    print(f"{'layout':10s} {'procs':>5s} {'tok/s':>9s} {'vs anchor':>10s} {'comm share':>11s}")
    for name, row in sorted(rows.items(), key=lambda item: item[1]["world"]):
        print(f"{name:10s} {row['world']:5d} {row['tok_s']:9,.0f} {row['tok_s'] / anchor:9.3f}x "
              f"{row['comm_share']:10.1%}")
    ratio = rows["nanotron-1"]["tok_s"] / anchor
    print(f"world size 1: nanotron / embedded = {ratio:.3f} (goal >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker_args = argparse.ArgumentParser()
    worker_args.add_argument("mode")
    worker_args.add_argument("curated", type=Path)
    worker_args.add_argument("out", type=Path)
    worker_args.add_argument("specs", nargs="+")
    worker_args.add_argument("--steps", type=int, required=True)
    worker_args.add_argument("--threads", type=int, required=True)
    options = worker_args.parse_args()
    worker(options.curated, options.out, options.specs, options.steps, options.threads)
elif __name__ == "__main__":
    sys.exit(main())
