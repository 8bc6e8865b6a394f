"""`mixlab ablate …`: the ablation commands (plan, run, status, results, report) and the playbook's protocols
(the shipped example, RegMix, DoReMi, annealing), each a thin layer over `mixlab.ablations`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SPEC_HELP = "the ablation spec (YAML: name, base run document, axes or variants, seeds)"
LAUNCHERS = ("local", "slurm")
LOCAL_FLAGS = ["parallel", "threads"]
SLURM_FLAGS = ["partition", "time_limit", "cpus_per_task", "max_parallel"]


def _given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _launcher(args: argparse.Namespace):
    """The launcher the flags ask for: the local process pool (default) or Slurm job arrays."""
    local, slurm = _given(args, LOCAL_FLAGS), _given(args, SLURM_FLAGS)
    if getattr(args, "launcher", "local") == "slurm":
        if local:
            raise ValueError(f"--{'/--'.join(k.replace('_', '-') for k in local)}: local-launcher options; with "
                             "--launcher slurm use --max-parallel and --cpus-per-task")
        from mixlab.ablations.slurm import SlurmLauncher

        return SlurmLauncher(**slurm)
    if slurm:
        raise ValueError(f"--{'/--'.join(k.replace('_', '-') for k in slurm)}: Slurm options; add --launcher slurm "
                         "(the default launcher is the local process pool)")
    from mixlab.ablations.launch import LocalLauncher

    return LocalLauncher(**local)


def _spec(args: argparse.Namespace):
    from mixlab.ablations.spec import AblationSpec

    return AblationSpec.from_yaml(args.spec)


# ---- handlers ------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from mixlab.ablations.launch import LocalLauncher, plan_lines

    launcher = LocalLauncher(**_given(args, ["parallel", "threads"]))
    print("\n".join(plan_lines(_spec(args), launcher, measure=not args.no_measure)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from mixlab.ablations.launch import run_ablation, status_lines

    spec = _spec(args)
    proxies = run_ablation(spec, _launcher(args))
    print("\n".join(status_lines(proxies)))
    ok = all(p.status == "completed" for p in proxies)
    if ok and not args.no_report:
        from mixlab.ablations.ablation_report import report_ablation

        print(f"report: {report_ablation(spec)}")
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    from mixlab.ablations.launch import proxy_runs, status_lines

    print("\n".join(status_lines(proxy_runs(_spec(args)))))
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from mixlab.ablations.results import write_results

    print(f"results: {write_results(_spec(args), args.out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mixlab.ablations.ablation_report import report_ablation

    print(f"report: {report_ablation(_spec(args), args.out)}")
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from mixlab.pipelines.ablation_example import MixAblationExample, run_mix_example

    fields = _given(args, ["workdir", "parallel", "threads"])
    outcome = run_mix_example(MixAblationExample(**fields))
    print("\n".join(outcome.lines()))
    return 0


def cmd_regmix(args: argparse.Namespace) -> int:
    from mixlab.ablations.regmix import RegMixConfig, run_regmix

    fields = _given(args, ["proxies", "concentration", "seed", "target", "regressor", "higher_is_better"])
    report = run_regmix(_spec(args), RegMixConfig(**fields), _launcher(args))
    print("\n".join(report.lines()))
    return 0


def cmd_doremi(args: argparse.Namespace) -> int:
    from mixlab.ablations.doremi import DoReMiConfig, run_doremi

    fields = _given(args, ["sources", "eta", "update_every"])
    report = run_doremi(_spec(args), DoReMiConfig(**fields), _launcher(args))
    print("\n".join(report.lines()))
    return 0


def cmd_anneal(args: argparse.Namespace) -> int:
    from mixlab.ablations.anneal import AnnealConfig, run_anneal

    fields = _given(args, ["parent", "candidate", "candidate_share", "steps", "step", "seeds"])
    report = run_anneal(AnnealConfig(**fields), _launcher(args))
    print("\n".join(report.lines()))
    return 0


# ---- parser --------------------------------------------------------------------------------------
def _launch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: a process pool on this machine (default); slurm: one job array per launch")
    p.add_argument("--parallel", type=int, help="local: proxies trained at once (default: one per 2 cores)")
    p.add_argument("--threads", type=int, help="local: CPU threads per proxy (default: cores / parallel)")
    p.add_argument("--partition", help="slurm: the partition")
    p.add_argument("--time-limit", dest="time_limit", help="slurm: time limit per proxy, e.g. 02:00:00")
    p.add_argument("--cpus-per-task", dest="cpus_per_task", type=int, help="slurm: CPUs per proxy")
    p.add_argument("--max-parallel", dest="max_parallel", type=int, help="slurm: array tasks running at once")


def ablate_options(abl: argparse.ArgumentParser) -> None:
    """The actions of `mixlab ablate` on its parser (pipelines/cli.py's COMMANDS names it)."""
    abl.description = ("An ablation spec (YAML: name, base run document, axes or variants, seeds) expands into one "
                       "proxy run per variant and seed, named by what differs from the base. Every proxy is an "
                       "ordinary run in the base's runs_dir; a rerun of any command skips finished proxies and "
                       "resumes interrupted ones from their checkpoints. Results and reports go to "
                       "<runs_dir>/../ablations/<spec name>/.")
    abl.formatter_class = argparse.RawDescriptionHelpFormatter
    abl.epilog = ("examples:\n"
                  "  mixlab ablate example                  # the shipped mixture ablation on the demo corpus\n"
                  "  mixlab ablate plan mixes.yaml          # what will run: tokens, estimated time per proxy\n"
                  "  mixlab ablate run mixes.yaml           # train what has not completed, then write the report\n"
                  "  mixlab ablate regmix mixes.yaml --proxies 16 --target all/loss\n"
                  "  mixlab ablate doremi mixes.yaml\n"
                  "  mixlab ablate anneal --parent runs/demo --candidate math")
    actions = abl.add_subparsers(dest="ablate_command", required=True, metavar="ACTION")

    p = actions.add_parser("plan", help="every proxy: status, steps, tokens, time estimated from a measured step")
    p.add_argument("spec", type=Path, help=SPEC_HELP)
    p.add_argument("--parallel", type=int, help="proxies trained at once (default: one per 2 cores)")
    p.add_argument("--threads", type=int, help="CPU threads per proxy (default: cores / parallel)")
    p.add_argument("--no-measure", action="store_true", help="plan without measuring a step (no time estimate)")
    p.set_defaults(func=cmd_plan)

    p = actions.add_parser("run", help="train every proxy that has not completed, then write results and report")
    p.add_argument("spec", type=Path, help=SPEC_HELP)
    _launch_options(p)
    p.add_argument("--no-report", action="store_true", help="do not write the report afterwards")
    p.set_defaults(func=cmd_run)

    p = actions.add_parser("status", help="where each proxy stands")
    p.add_argument("spec", type=Path, help=SPEC_HELP)
    p.set_defaults(func=cmd_status)

    p = actions.add_parser("results", help="every logged value as one Parquet table (run x step x metric x value)")
    p.add_argument("spec", type=Path, help=SPEC_HELP)
    p.add_argument("--out", type=Path, help="the Parquet file (default: <runs>/../ablations/<spec>/results.parquet)")
    p.set_defaults(func=cmd_results)

    p = actions.add_parser("report", help="the HTML report: curves with seed bands, ranked table, task signal")
    p.add_argument("spec", type=Path, help=SPEC_HELP)
    p.add_argument("--out", type=Path, help="the report folder (default: <runs>/../ablations/<spec>/report)")
    p.set_defaults(func=cmd_report)

    p = actions.add_parser("example", help="the shipped example: 4 mixtures x 2 seeds on the demo corpus, one command",
                           description="Builds the demo corpus (reused when present), runs the shipped spec "
                                       "pipelines/specs/mixes.yaml (web-, code- and math-heavy mixtures against a "
                                       "balanced base, 2 seeds each, proxy models, cloze tasks at every eval), "
                                       "writes the report and says, for each heavy mix, whether it lowered the "
                                       "loss of the data it favours by more than the seed noise.")
    p.add_argument("--workdir", type=Path, help="work directory (default demo-output, shared with `mixlab demo`)")
    p.add_argument("--parallel", type=int, help="proxies trained at once (default: one per 2 cores)")
    p.add_argument("--threads", type=int, help="CPU threads per proxy (default: cores / parallel)")
    p.set_defaults(func=cmd_example)

    p = actions.add_parser("regmix", help="mixture search from a swarm of proxies (RegMix / Olmix), verified",
                           description="Samples mixtures from a Dirichlet around the natural token shares within "
                                       "the planner's max-epoch limits, trains the swarm on the spec's base, fits "
                                       "linear, log-linear and LightGBM regressions of the target, searches the "
                                       "simplex for the best predicted mixture and verifies it with final proxies "
                                       "against the natural and uniform mixtures.")
    p.add_argument("spec", type=Path, help=SPEC_HELP + "; its base is what the swarm trains")
    p.add_argument("--proxies", type=int, help="swarm size (default 16)")
    p.add_argument("--concentration", type=float, help="Dirichlet concentration around the natural shares")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--target", help="the metric to optimise, e.g. all/loss, code-python/bpb, task/gsm8k/margin")
    p.add_argument("--higher-is-better", action=argparse.BooleanOptionalAction,
                   help="whether the target is maximised (default: from its name: loss/bpb lower, accuracy/margin "
                        "higher)")
    p.add_argument("--regressor", choices=["linear", "log-linear", "lightgbm", "best"],
                   help="the regression that searches (best: the highest cross-validated Spearman)")
    _launch_options(p)
    p.set_defaults(func=cmd_regmix)

    p = actions.add_parser("doremi", help="DoReMi end to end: reference, proxy with the policy, final vs baselines")
    p.add_argument("spec", type=Path, help=SPEC_HELP + "; its base is what the three stages train")
    p.add_argument("--sources", nargs="+", help="the sources to weigh (default: every source with train tokens)")
    p.add_argument("--eta", type=float, help="the policy's step size")
    p.add_argument("--update-every", dest="update_every", type=int, help="steps between weight updates")
    _launch_options(p)
    p.set_defaults(func=cmd_doremi)

    p = actions.add_parser("anneal", help="annealing ablation: a new source in a short LR decay from a checkpoint",
                           description="From a checkpoint of PARENT, decays the LR over a short run on 40%% of the "
                                       "current mixture plus 60%% of the candidate, against a control run on the "
                                       "current mixture (SmolLM3, Llama 3).")
    p.add_argument("--parent", type=Path, required=True, help="the parent run directory")
    p.add_argument("--candidate", nargs="+", required=True, help="the candidate source(s)")
    p.add_argument("--candidate-share", dest="candidate_share", type=float, help="the candidate's share (default 0.6)")
    p.add_argument("--steps", type=int, help="steps of the anneal (default: 10%% of the parent's)")
    p.add_argument("--step", type=int, help="the parent's checkpoint step (default: its latest)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds of both runs")
    _launch_options(p)
    p.set_defaults(func=cmd_anneal)
