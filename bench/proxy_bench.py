"""Proxies per hour on this machine: a RegMix-style swarm of small proxies, trained by mixlab as `ablate run`
trains them, against a bare torch loop of the same model measured in the same run (mixlab issue 8).

    .venv/bin/python bench/proxy_bench.py [--proxies 16] [--parallel 2] [--threads 1] [--ratio-steps N]
                                          [--workdir .cache/mixlab-bench] [--quick]

Goal: 16 proxies over 5 sources, each >= 1M parameters and >= 1M tokens, in under 30 minutes on 2 cores, and
the trainer at >= 0.95x the tokens/s of a bare loop. What it measures, in this order:

(a) anchor: a bare torch loop (forward, backward, AdamW; no sampler, clipping, logging, eval or checkpoint) of
    the proxy model over the very batches the trainer's sampler serves, with the proxy's threads;
(b) the trainer: `pretrain()` of one proxy document for the same steps, with the time of each of its parts
    (sampler, batch checks, grad clipping, logging, eval, checkpoint, set-up) taken by timing wrappers around the
    real calls, so (d) says which part costs what when the ratio is below the goal;
(c) the swarm: `run_ablation` of an `AblationSpec` of `--proxies` mixtures drawn by `sample_mixtures`, one
    `mixlab train` process per proxy (`LocalLauncher`), wall time and proxies per hour; for fewer than 16
    proxies a line extrapolates to 16 and says so.

Data: the demo corpus (`prepare_demo_data`) restricted to 5 sources, curated and tokenized once under
`<workdir>/proxy-corpus` and reused; the swarm's runs go to `<workdir>/proxy-swarm` (cleared on every run).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_WORKDIR = REPO / ".cache" / "mixlab-bench"
SWARM_SOURCES = ("web-en", "web-de", "web-fr", "code-python", "math")
GOAL_PROXIES, GOAL_MINUTES, GOAL_RATIO = 16, 30.0, 0.95
GOAL_PARAMS, GOAL_TOKENS = 1_000_000, 1_000_000

# The proxy, written out field by field (no preset): ~1.2M non-embedding + 0.5M embedding parameters at vocab
# 4096, 256 steps x 32 x 128 = 1,048,576 tokens. A short context and a small vocabulary keep a CPU step cheap (at
# vocab 8192 the lm_head and its softmax cost as much as the 6 blocks); batch 32 runs ~6% faster than 16.
PROXY_MODEL: dict[str, Any] = dict(d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=384, max_seq_len=128)
PROXY_TRAIN: dict[str, Any] = dict(total_steps=256, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=16,
                                   schedule="wsd", log_every=16, eval_every=256, checkpoint_every=256,
                                   progress_bar=False)
# one eval at the end over 32 windows per source: light, but every proxy has its per-source losses
PROXY_EVAL: dict[str, Any] = dict(windows_per_source=32, batch_size=32, bootstrap_resamples=200)
PROXY_VOCAB = 4096
MAX_EPOCHS = 4.0
# sparse Dirichlet draws give weights like 1e-20, which the planner warns cannot be sampled: they become 0, and
# the source stays in the mixture (the planner notes it is never drawn) so that every proxy is evaluated on it
MIN_WEIGHT = 1e-3


@dataclass
class BenchConfig:
    """What one benchmark run does; the defaults are the recorded run."""

    workdir: Path = DEFAULT_WORKDIR
    proxies: int = GOAL_PROXIES
    parallel: int = 2  # proxies at once (LocalLauncher); 2 x 1 thread beats 1 x 2 threads for a model this small
    threads: int = 1  # per proxy, and for the anchor and the trainer measurement
    ratio_steps: int | None = None  # steps of (a) and (b); None: a whole proxy (PROXY_TRAIN's total_steps)
    max_mb: float = 20.0  # raw text per source of the demo corpus
    vocab_size: int = PROXY_VOCAB
    concentration: float = 1.0  # of the Dirichlet around the natural token shares (RegMix's sparse swarm)
    seed: int = 0
    model: dict[str, Any] = field(default_factory=lambda: dict(PROXY_MODEL))
    train: dict[str, Any] = field(default_factory=lambda: dict(PROXY_TRAIN))

    @property
    def steps(self) -> int:
        return int(self.ratio_steps or self.train["total_steps"])


class ProxyBenchError(RuntimeError):
    """The benchmark cannot run as asked; the message names the directory or run and what to do."""


# ---- data ------------------------------------------------------------------------------------------------
def prepare_data(config: BenchConfig) -> Path:
    """The demo corpus over SWARM_SOURCES, curated and tokenized once (every demo stage is idempotent)."""
    from mixlab.curation import ShardManifest
    from mixlab.pipelines.demo import DemoConfig, prepare_demo_data

    work = Path(config.workdir) / "proxy-corpus"
    curated = work / "curated"
    if (curated / "manifest.json").exists():
        manifest = ShardManifest.load(curated)
        ready = manifest.tokenizer is not None and manifest.tokenizer.vocab_size == config.vocab_size
        if ready and all(manifest.sources.get(s) and manifest.sources[s].tokens.get("train") for s in SWARM_SOURCES):
            return curated
    prepare_demo_data(DemoConfig(workdir=work, max_mb=config.max_mb, vocab_size=config.vocab_size,
                                 sources=SWARM_SOURCES))
    return curated


def train_tokens(curated: Path) -> dict[str, int]:
    from mixlab.pipelines.pretrain import tokenized_manifest

    manifest = tokenized_manifest(curated)
    tokens = {s: int(manifest.sources[s].tokens.get("train", 0)) if s in manifest.sources else 0
              for s in SWARM_SOURCES}
    empty = [s for s, n in tokens.items() if n == 0]
    if empty:
        raise ProxyBenchError(f"{curated}: sources {empty} have no train tokens; delete {curated.parent} and rerun "
                              "to rebuild the corpus")
    return tokens


# ---- documents -------------------------------------------------------------------------------------------
def base_document(config: BenchConfig, curated: Path, runs: Path) -> dict[str, Any]:
    """The proxy's run document with every model and train field written out (what `ablate run` launches)."""
    return {"runs_dir": str(runs), "data": {"curated": str(curated)}, "model": dict(config.model),
            "train": {**config.train, "threads": config.threads}, "eval": dict(PROXY_EVAL),
            "plan": {"max_epochs": MAX_EPOCHS}, "tags": {"bench": "proxy"}}


def swarm_spec(config: BenchConfig, curated: Path, runs: Path):
    """`config.proxies` mixtures from `sample_mixtures` around the natural token shares, each capped so that no
    source repeats more than MAX_EPOCHS times in one proxy; one list variant per mixture, no base run."""
    from mixlab.ablations.spec import AblationSpec
    from mixlab.mixtures import MixtureSchedule
    from mixlab.mixtures.search import sample_mixtures

    tokens = train_tokens(curated)
    budget = config.train["total_steps"] * config.train["batch_size"] * config.train["seq_len"]
    caps = {s: min(1.0, 0.95 * MAX_EPOCHS * n / budget) for s, n in tokens.items()}
    table = sample_mixtures(tokens, config.proxies, concentration=config.concentration, seed=config.seed,
                            max_weight=caps)
    variants = []
    for i, row in enumerate(table.iter_rows(named=True)):
        weights = {s: float(w) if w >= MIN_WEIGHT else 0.0 for s, w in row.items()}
        schedule = MixtureSchedule.constant(weights, name="swarm", normalize=True)
        variants.append({"name": f"mix{i:02d}", "mixture": schedule.to_dict()})
    return AblationSpec("proxy-bench", base_document(config, curated, runs), variants=tuple(variants), mode="list",
                        include_base=False, description="bench/proxy_bench.py swarm")


# ---- (a) the anchor --------------------------------------------------------------------------------------
def proxy_batches(config: BenchConfig, curated: Path, steps: int) -> list[torch.Tensor]:
    """The first `steps` batches the trainer's sampler serves for the first swarm mixture."""
    from mixlab.pipelines.pretrain import build_sampler, tokenized_manifest
    from mixlab.pipelines.run_config import run_config_from_document

    document = next(iter(swarm_spec(config, curated, Path(config.workdir) / "unused").documents().values()))
    run_config = run_config_from_document(document, vocab_size=config.vocab_size)
    sampler = build_sampler(tokenized_manifest(curated), run_config.schedule, run_config.train)
    return [torch.from_numpy(sampler.next_batch().tokens) for _ in range(steps)]


def anchor_seconds(config: BenchConfig, batches: list[torch.Tensor]) -> float:
    """The bare loop of bench/run_all.py (imported), on the proxy model with the proxy's threads."""
    sys.path.insert(0, str(BENCH_DIR))
    from mixlab.training import ModelConfig
    from run_all import bare_loop_seconds

    torch.set_num_threads(config.threads)
    model_config = ModelConfig.from_dict({**config.model, "vocab_size": config.vocab_size})
    return bare_loop_seconds(model_config, batches, lr=config.train["lr"], weight_decay=0.1)


# ---- (b) the trainer, with its parts timed ---------------------------------------------------------------
@dataclass
class PartTimes:
    """Seconds and calls per part of a trainer run, from timing wrappers around the real calls."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed


@contextlib.contextmanager
def timed_parts(parts: PartTimes) -> Iterator[None]:
    """Wrap, for the duration, the calls whose cost (d) reports; restored afterwards."""
    import mixlab.pipelines.pretrain as pretrain_module
    import mixlab.training.trainer as trainer_module
    from mixlab.mixtures import MixtureSampler
    from mixlab.training import HeldOutEvaluator, RunRecord

    targets = [(MixtureSampler, "next_batch", "sampler"), (trainer_module, "_batch_tensor", "batch checks"),
               (torch.nn.utils, "clip_grad_norm_", "grad clipping"), (RunRecord, "log_metrics", "logging"),
               (RunRecord, "log_eval", "logging"), (HeldOutEvaluator, "evaluate", "eval"),
               (trainer_module, "save_checkpoint", "checkpoint"), (pretrain_module, "train", "train()")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for owner, attr, name in targets:
            setattr(owner, attr, parts.wrap(name, getattr(owner, attr)))
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def trainer_measurement(config: BenchConfig, curated: Path, steps: int) -> dict[str, Any]:
    """One proxy document (the first swarm mixture) trained in-process by `pretrain` for `steps` steps."""
    from mixlab.pipelines.pretrain import pretrain
    from mixlab.pipelines.run_config import run_config_from_document

    runs = Path(config.workdir) / "proxy-trainer" / "runs"
    shutil.rmtree(runs.parent, ignore_errors=True)
    document = next(iter(swarm_spec(config, curated, runs).documents().values()))
    train = document["train"]
    train.update(total_steps=steps, warmup_steps=min(train["warmup_steps"], steps),
                 eval_every=min(train["eval_every"], steps), checkpoint_every=min(train["checkpoint_every"], steps))
    run_config = run_config_from_document(document, vocab_size=config.vocab_size)
    parts = PartTimes()
    start = time.perf_counter()
    with timed_parts(parts):
        record = pretrain(run_config)
    wall = time.perf_counter() - start
    if record.status != "completed":
        raise ProxyBenchError(f"{record.path}: the trainer measurement ended {record.status!r}: "
                              f"{record.summary.get('error')}")
    summary = record.summary
    return {"wall_s": wall, "train_s": parts.seconds["train()"], "steps_s": float(summary["train_time_s"]),
            "tokens": int(summary["tokens"]), "params": int(summary["params"]),
            "non_embedding_params": int(summary["non_embedding_params"]), "parts": parts,
            "final_loss": float(summary["final_loss"])}


def process_start_seconds() -> float:
    """What a `mixlab train` process pays before its first step: the interpreter, torch and mixlab imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import mixlab.pipelines.cli, mixlab.pipelines.pretrain"], check=True)
    return time.perf_counter() - start


# ---- (c) the swarm ---------------------------------------------------------------------------------------
def run_swarm(config: BenchConfig, curated: Path) -> dict[str, Any]:
    from mixlab.ablations.launch import LocalLauncher, run_ablation
    from mixlab.training import RunRecord

    root = Path(config.workdir) / "proxy-swarm"
    shutil.rmtree(root, ignore_errors=True)  # a rerun must train every proxy again, not skip completed ones
    spec = swarm_spec(config, curated, root / "runs")
    launcher = LocalLauncher(parallel=config.parallel, threads=config.threads)
    start = time.perf_counter()
    proxies = run_ablation(spec, launcher)
    wall = time.perf_counter() - start
    failed = [p.run_id for p in proxies if p.status != "completed"]
    if failed:
        raise ProxyBenchError(f"proxies {failed} did not complete; see their logs in {root / 'ablations' / spec.name}")
    records = [RunRecord.load(p.path) for p in proxies]
    return {"wall_s": wall, "proxies": len(records), "parallel": launcher.plan(len(records))[0],
            "tokens": [int(r.summary["tokens"]) for r in records],
            "steps_s": [float(r.summary["train_time_s"]) for r in records],
            "params": int(records[0].summary["params"]),
            "non_embedding_params": int(records[0].summary["non_embedding_params"]),
            "evals": sum(bool(r.evals()) for r in records),
            # each proxy's own tokens/s per logging window: a shared machine shows as windows far below the median
            "window_tok_s": sorted(float(m["tokens_per_s"]) for r in records for m in r.metrics()),
            "final_loss": [float(r.summary["final_loss"]) for r in records]}


# ---- the whole benchmark ---------------------------------------------------------------------------------
def run(config: BenchConfig) -> dict[str, Any]:
    """(a)-(d) as the module docstring says; returns every figure (main() prints them)."""
    load_before, threads_before = os.getloadavg(), torch.get_num_threads()
    curated = prepare_data(config)
    steps = config.steps
    batches = proxy_batches(config, curated, steps)
    # the anchor before and after the trainer: on a shared machine their spread says how far to trust the ratio
    anchor_before = anchor_seconds(config, batches)
    trainer = trainer_measurement(config, curated, steps)
    anchor_after = anchor_seconds(config, batches)
    start_s = process_start_seconds()
    swarm = run_swarm(config, curated)
    torch.set_num_threads(threads_before)  # (a) and (b) set the proxy's threads; a caller such as run_all has its own
    return {"config": config, "steps": steps, "tokens": steps * batches[0].shape[0] * (batches[0].shape[1] - 1),
            "anchor_s": (anchor_before + anchor_after) / 2, "anchor_runs_s": (anchor_before, anchor_after),
            "trainer": trainer, "process_start_s": start_s, "swarm": swarm,
            "load": (load_before, os.getloadavg()), "torch": torch.__version__}


def breakdown(result: dict[str, Any]) -> list[tuple[str, float]]:
    """Seconds of each part of the trainer measurement beyond the bare loop's time, largest first."""
    trainer, parts = result["trainer"], result["trainer"]["parts"].seconds
    steps_s = trainer["steps_s"]
    inside_steps = sum(parts.get(k, 0.0) for k in ("sampler", "batch checks", "grad clipping"))
    rows = [(name, parts.get(name, 0.0)) for name in ("sampler", "batch checks", "grad clipping", "logging", "eval",
                                                       "checkpoint")]
    rows.append(("model step vs bare loop (fwd/bwd/AdamW, loss.item)", steps_s - inside_steps - result["anchor_s"]))
    rows.append(("rest of train() (progress bar, loop)", trainer["train_s"] - steps_s - parts.get("logging", 0.0)
                 - parts.get("eval", 0.0) - parts.get("checkpoint", 0.0)))
    rows.append(("pretrain() set-up (plan, sampler, evaluator, run dir)", trainer["wall_s"] - trainer["train_s"]))
    return sorted(rows, key=lambda r: -r[1])


def report_lines(result: dict[str, Any]) -> list[str]:
    config: BenchConfig = result["config"]
    trainer, swarm = result["trainer"], result["swarm"]
    tokens = result["tokens"]
    anchor = tokens / result["anchor_s"]
    before, after = result["anchor_runs_s"]
    rows = [("anchor: bare torch loop, before (b)", tokens / before, before),
            ("anchor: bare torch loop, after (b)", tokens / after, after),
            ("anchor: mean", anchor, result["anchor_s"]),
            ("trainer steps (train_time_s)", tokens / trainer["steps_s"], trainer["steps_s"]),
            ("trainer train() incl. log/eval/ckpt", tokens / trainer["train_s"], trainer["train_s"]),
            ("pretrain() incl. set-up", tokens / trainer["wall_s"], trainer["wall_s"])]
    lines = [f"proxy: d_model {config.model['d_model']}, {config.model['n_layers']} layers, heads "
             f"{config.model['n_heads']}/{config.model['n_kv_heads']}, ffn {config.model['ffn_hidden']}, vocab "
             f"{config.vocab_size}: {trainer['params']:,} params in all, {trainer['non_embedding_params']:,} "
             f"non-embedding (tied embedding {trainer['params'] - trainer['non_embedding_params']:,})",
             f"       batch {config.train['batch_size']} x seq {config.train['seq_len']}, "
             f"{config.train['total_steps']} steps = {swarm['tokens'][0]:,} tokens per proxy, {config.threads} "
             f"thread(s), fp32; (a)/(b) over {result['steps']} steps = {tokens:,} tokens",
             "", f"{'(a)/(b) one proxy model':40s} {'tokens/s':>10s} {'seconds':>8s} {'vs anchor':>9s}"]
    lines += [f"{name:40s} {rate:10,.0f} {sec:8.1f} {rate / anchor:8.3f}x" for name, rate, sec in rows]
    ratio = tokens / trainer["train_s"] / anchor
    lines.append(f"trainer / bare loop = {ratio:.3f}x (goal >= {GOAL_RATIO}): {'met' if ratio >= GOAL_RATIO else 'NOT met'}")

    parts = trainer["parts"]
    lines += ["", f"(d) where the trainer's time goes beyond the bare loop ({result['steps']} steps; "
              "largest first; the process start is paid once per proxy on top):"]
    for name, seconds in breakdown(result):
        calls = parts.calls.get(name)
        lines.append(f"    {name:56s} {seconds:7.2f} s  {100 * seconds / result['anchor_s']:5.1f}% of the loop"
                     + (f"  ({calls} calls)" if calls else ""))
    lines.append(f"    {'process start (python + torch + mixlab imports)':56s} {result['process_start_s']:7.2f} s")

    wall = swarm["wall_s"]
    per_hour = 3600 * swarm["proxies"] / wall
    waves = math.ceil(swarm["proxies"] / swarm["parallel"])
    lines += ["", f"(c) swarm: {swarm['proxies']} proxies x {swarm['tokens'][0]:,} tokens over {len(SWARM_SOURCES)} "
              f"sources, {swarm['parallel']} at a time x {config.threads} thread(s), LocalLauncher, one "
              "`mixlab train` process each",
              f"    wall {wall / 60:.1f} min, {per_hour:.1f} proxies/hour; per proxy {wall / waves:.0f} s of wall per "
              f"wave, {sum(swarm['steps_s']) / len(swarm['steps_s']):.0f} s in steps; "
              f"{swarm['evals']}/{swarm['proxies']} evaluated; final train loss "
              f"{min(swarm['final_loss']):.3f}-{max(swarm['final_loss']):.3f}"]
    windows = swarm["window_tok_s"]
    median = windows[len(windows) // 2]
    at_median = (math.ceil(GOAL_PROXIES / swarm["parallel"]) * (swarm["tokens"][0] / median + wall / waves
                                                                 - sum(swarm["steps_s"]) / len(swarm["steps_s"])))
    lines.append(f"    the proxies' own logs ({len(windows)} windows of {config.train['log_every']} steps): "
                 f"{windows[0]:,.0f}-{windows[-1]:,.0f} tokens/s per proxy, median {median:,.0f}; at the median, with "
                 f"the measured per-proxy overhead, {GOAL_PROXIES} proxies take {at_median / 60:.1f} min (an estimate: "
                 "slow windows are other jobs on the machine)")
    goal_size = swarm["params"] >= GOAL_PARAMS and min(swarm["tokens"]) >= GOAL_TOKENS
    if not goal_size:
        lines.append(f"    these proxies are smaller than the goal's (>= {GOAL_PARAMS:,} params, >= {GOAL_TOKENS:,} tokens): "
                     "the time below does not count towards it")
    if swarm["proxies"] >= GOAL_PROXIES:
        minutes = wall / 60 * GOAL_PROXIES / swarm["proxies"]
        lines.append(f"    measured: {GOAL_PROXIES} proxies in {minutes:.1f} min (goal < {GOAL_MINUTES:.0f}): "
                     f"{'met' if minutes < GOAL_MINUTES and goal_size else 'NOT met'}")
    else:
        minutes = wall / waves * math.ceil(GOAL_PROXIES / swarm["parallel"]) / 60
        lines.append(f"    EXTRAPOLATED from {swarm['proxies']} measured proxies ({waves} wave(s) of "
                     f"{swarm['parallel']}): {GOAL_PROXIES} proxies would take about {minutes:.1f} min (goal < "
                     f"{GOAL_MINUTES:.0f}): {'would meet it' if minutes < GOAL_MINUTES and goal_size else 'NOT met'}")
    (l1, _, _), (l2, _, _) = result["load"]
    lines.append(f"\ntorch {result['torch']}, {os.cpu_count()} cores, load average {l1:.1f} at the start, "
                 f"{l2:.1f} at the end ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxies", type=int, default=GOAL_PROXIES, help="swarm size (2: an affordable run, "
                        "extrapolated to 16)")
    parser.add_argument("--parallel", type=int, default=2, help="proxies at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per proxy (and for (a)/(b))")
    parser.add_argument("--ratio-steps", type=int, help="steps of (a) and (b) (default: a whole proxy)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="corpus cache and runs")
    parser.add_argument("--seed", type=int, default=0, help="of the sampled mixtures")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 proxies of 32 steps, ratio over 32")
    args = parser.parse_args(argv)
    if args.proxies < 1 or args.parallel < 1 or args.threads < 1:
        parser.error("--proxies, --parallel and --threads must be >= 1")
    config = BenchConfig(workdir=args.workdir, proxies=args.proxies, parallel=args.parallel, threads=args.threads,
                         ratio_steps=args.ratio_steps, seed=args.seed)
    if args.quick:
        config.proxies = min(config.proxies, 2)
        config.train.update(total_steps=32, warmup_steps=4, log_every=8, eval_every=32, checkpoint_every=32)
        config.ratio_steps = config.ratio_steps or 32
    print("\n".join(report_lines(run(config))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
