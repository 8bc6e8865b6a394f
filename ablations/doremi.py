"""`mixlab ablate doremi SPEC`: DoReMi (Xie et al. 2023) end to end on the spec's base run.

1. Reference: `<spec>-doremi-ref`, the base on the uniform mixture over the chosen sources (as the paper).
2. Proxy: `<spec>-doremi-proxy`, the same base and start mixture with the `doremi` mixture policy
   (`mixtures.policies.DoReMiPolicy`): excess held-out loss over the reference moves the weights.
3. Final: `<spec>-doremi-final`, the base trained on the proxy's time-averaged weights (`doremi`) against the
   `uniform` and `natural` (train-token shares) mixtures, per final seed.

Each stage is an ordinary list spec run with `run_ablation`, so a rerun skips what finished and resumes the rest.
The report gives, per final variant, the held-out loss per source at the last step, the excess over the
reference (loss - reference loss), the worst source's excess and the mean loss, and says whether DoReMi has the
lowest worst-source excess, whatever the outcome. Written to `<runs_dir>/../ablations/<spec>/doremi/`.

The reference the policy compares with: by default (`reference="final"`) the trained reference's per-source
losses at its last step, the paper's choice (the excess is how far the proxy is from what a trained model
reaches). `reference="matched"` passes the reference run directory, compared step by step; that needs a proxy
seed other than the reference's, or the proxy repeats the reference exactly and the weights never move.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from mixlab.ablations.launch import (
    Launcher,
    LocalLauncher,
    ProxyRun,
    base_document,
    check_same_runs,
    require_completed,
    resolved_config,
    run_ablation,
    runs_dir,
)
from mixlab.ablations.outputs import report_dict, write_report_json
from mixlab.ablations.spec import AblationSpec
from mixlab.training import RunRecord

STAGE_NAME = "doremi"
FINAL_VARIANTS = ("doremi", "uniform", "natural")


class DoReMiError(ValueError):
    """A DoReMi request that cannot run as given; the message names the spec, run or field and the fix."""


@dataclass
class DoReMiConfig:
    """The sources DoReMi weighs, the policy's settings and the seeds of each stage."""

    sources: tuple[str, ...] | None = None  # default: every source with train tokens in the base's curated dir
    eta: float = 1.0  # exponentiated-gradient step size
    c: float = 1e-3  # smoothing with the uniform mixture at each update
    update_every: int = 10  # steps between policy decisions (with signal "eval": only after a new eval)
    signal: Literal["eval", "train"] = "eval"  # held-out evals or the proxy's training loss per source
    reference: Literal["final", "matched"] = "final"  # see the module docstring
    reference_mixture: str = "uniform"  # the reference's (and the proxy's starting) mixture: uniform | natural
    seed: int = 0  # the reference run's seed
    proxy_seed: int | None = None  # default: `seed`
    final_seeds: tuple[int, ...] | None = None  # default: the spec's seeds

    def __post_init__(self) -> None:
        if self.sources is not None:
            if isinstance(self.sources, str):
                self.sources = (self.sources,)
            self.sources = tuple(str(s) for s in self.sources)
            if len(set(self.sources)) != len(self.sources):
                raise DoReMiError(f"doremi sources {list(self.sources)} repeat a name; list each source once")
            if len(self.sources) < 3:
                raise DoReMiError(f"doremi sources {list(self.sources)}: give at least 3 sources (DoReMi weighs "
                                  "sources against each other; with fewer there is little to learn)")
        if isinstance(self.eta, bool) or not isinstance(self.eta, int | float) or not self.eta > 0:
            raise DoReMiError(f"doremi eta={self.eta!r} must be a number > 0")
        if isinstance(self.c, bool) or not isinstance(self.c, int | float) or not 0 <= self.c <= 1:
            raise DoReMiError(f"doremi c={self.c!r} must be in [0, 1] (the share of uniform mixed into each update)")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise DoReMiError(f"doremi update_every={self.update_every!r} must be a whole number >= 1 (steps)")
        if self.signal not in ("eval", "train"):
            raise DoReMiError(f"doremi signal={self.signal!r}: choose 'eval' or 'train'")
        if self.reference not in ("final", "matched"):
            raise DoReMiError(f"doremi reference={self.reference!r}: choose 'final' (the trained reference's last "
                              "losses) or 'matched' (its losses at the same step)")
        if self.reference_mixture not in ("uniform", "natural"):
            raise DoReMiError(f"doremi reference_mixture={self.reference_mixture!r}: choose 'uniform' or 'natural'")
        if self.final_seeds is not None:
            self.final_seeds = tuple(int(s) for s in self.final_seeds)
        if self.final_seeds is not None and (not self.final_seeds or len(set(self.final_seeds)) != len(self.final_seeds)):
            raise DoReMiError(f"doremi final_seeds {list(self.final_seeds)} must be distinct and at least one")
        if self.reference == "matched" and self.proxy_seed_or_default == self.seed:
            raise DoReMiError(f"doremi reference='matched' with proxy_seed = seed = {self.seed}: the proxy would "
                              "train exactly as the reference (same seed, same start mixture), every excess would be "
                              "0 and the weights would never move; set proxy_seed to another seed, or use "
                              "reference='final'")

    @property
    def proxy_seed_or_default(self) -> int:
        return self.seed if self.proxy_seed is None else int(self.proxy_seed)


# ---------------------------------------------------------------------------------------------- mixtures
def natural_shares(spec: AblationSpec, sources: Sequence[str] | None = None) -> dict[str, float]:
    """Train-token shares of `sources` (default: every source with train tokens) in the base's curated data."""
    from mixlab.pipelines.pretrain import tokenized_manifest

    config = resolved_config(base_document(spec))
    manifest = tokenized_manifest(config.curated_dir)
    train_tokens = {name: int(entry.tokens.get("train", 0)) for name, entry in manifest.sources.items()}
    if sources is None:
        sources = sorted(name for name, tokens in train_tokens.items() if tokens > 0)
        if len(sources) < 3:
            raise DoReMiError(f"{manifest.root}: DoReMi needs at least 3 sources with train tokens; found "
                              f"{list(sources)}: tokenize more sources")
    missing = [s for s in sources if train_tokens.get(s, 0) <= 0]
    if missing:
        raise DoReMiError(f"{manifest.root}: doremi sources {missing} have no train tokens (tokenized sources: "
                          f"{sorted(n for n, t in train_tokens.items() if t)}): fix the names or tokenize them")
    total = sum(train_tokens[s] for s in sources)
    return {s: train_tokens[s] / total for s in sorted(sources)}


def _mixture(weights: Mapping[str, float], name: str) -> dict[str, Any]:
    """A one-stage schedule document (the whole run on `weights`)."""
    return {"stages": [{"name": name, "weights": {s: float(w) for s, w in sorted(weights.items())}}]}


def _stage_base(spec: AblationSpec, weights: Mapping[str, float]) -> dict[str, Any]:
    base = dict(spec.base)
    base["mixture"] = _mixture(weights, STAGE_NAME)
    base["policy"] = None
    return base


def reference_spec(spec: AblationSpec, config: DoReMiConfig, start: Mapping[str, float]) -> AblationSpec:
    """`<spec>-doremi-ref`: the base on the start mixture (uniform by default), one run."""
    return AblationSpec(f"{spec.name}-doremi-ref", _stage_base(spec, start), seeds=(config.seed,),
                        description=f"DoReMi reference of {spec.name}: {config.reference_mixture} mixture")


def proxy_spec(spec: AblationSpec, config: DoReMiConfig, start: Mapping[str, float],
               reference: str | Mapping[str, float]) -> AblationSpec:
    """`<spec>-doremi-proxy`: the base on the same start mixture with the doremi policy against `reference` (the
    reference run directory, or its final per-source losses)."""
    base = _stage_base(spec, start)
    base["policy"] = {"name": "doremi", "reference": reference if isinstance(reference, str) else dict(reference),
                      "eta": float(config.eta), "c": float(config.c), "update_every": int(config.update_every),
                      "signal": config.signal}
    return AblationSpec(f"{spec.name}-doremi-proxy", base, seeds=(config.proxy_seed_or_default,),
                        description=f"DoReMi proxy of {spec.name}: the doremi policy from the {config.reference_mixture}"
                                    " mixture")


def final_spec(spec: AblationSpec, config: DoReMiConfig, mixtures: Mapping[str, Mapping[str, float]]) -> AblationSpec:
    """`<spec>-doremi-final`: the base on each of `mixtures` (doremi, uniform, natural), per final seed."""
    variants = tuple({"name": name, "mixture": _mixture(weights, name)} for name, weights in mixtures.items())
    return AblationSpec(f"{spec.name}-doremi-final", _stage_base(spec, next(iter(mixtures.values()))),
                        variants=variants, seeds=config.final_seeds or spec.seeds, mode="list", include_base=False,
                        description=f"DoReMi final runs of {spec.name}: {', '.join(mixtures)}")


# ---------------------------------------------------------------------------------------------- reading runs
def _run_stage(spec: AblationSpec, launcher: Launcher) -> list[ProxyRun]:
    check_same_runs(spec, error=DoReMiError)
    proxies = run_ablation(spec, launcher)
    require_completed(spec, proxies, DoReMiError)
    return proxies


def final_losses(run: str | Path) -> tuple[int, dict[str, float], float | None]:
    """(step, {source: held-out loss}, the token-weighted "all" loss) at the run's last evaluated step."""
    rows = RunRecord.load(run).evals()
    if not rows:
        raise DoReMiError(f"{run}: the run has no evals (evals.jsonl); train it with an evaluator")
    step = max(int(r["step"]) for r in rows)
    at = [r for r in rows if int(r["step"]) == step and isinstance(r.get("loss"), int | float)]
    losses = {str(r["source"]): float(r["loss"]) for r in at if r["source"] != "all"}
    overall = next((float(r["loss"]) for r in at if r["source"] == "all"), None)
    return step, losses, overall


def weights_by_step(changes: Sequence[Mapping[str, Any]], total_steps: int) -> list[dict[str, float]]:
    """The weights the sampler drew each optimizer step 0 .. total_steps - 1 with, from a run's mixture changes
    (a change at step s is in force from the batch after s steps on; of two at one step the later holds)."""
    if not changes:
        raise DoReMiError("the run logged no mixture changes (mixture.jsonl): it was not trained with a policy")
    ordered = sorted(enumerate(changes), key=lambda ic: (int(ic[1]["step"]), ic[0]))
    if int(ordered[0][1]["step"]) != 0:
        raise DoReMiError(f"the first mixture change is at step {ordered[0][1]['step']}, not 0: the weights of the "
                          "first steps are unknown")
    out, current, i = [], {}, 0
    for step in range(total_steps):
        while i < len(ordered) and int(ordered[i][1]["step"]) <= step:
            current = {str(k): float(v) for k, v in ordered[i][1]["weights"].items()}
            i += 1
        out.append(current)
    return out


def time_averaged_weights(run: str | Path) -> dict[str, float]:
    """The weights of a policy run averaged over every optimizer step it trained (DoReMi's final mixture)."""
    record = RunRecord.load(run)
    total = int(record.summary.get("total_steps") or record.summary.get("step") or 0)
    if total < 1:
        raise DoReMiError(f"{run}: the run trained no step; train the proxy first")
    per_step = weights_by_step(record.mixture_changes(), total)
    sources = sorted({s for w in per_step for s in w})
    mean = {s: float(np.mean([w.get(s, 0.0) for w in per_step])) for s in sources}
    total_weight = sum(mean.values())
    return {s: v / total_weight for s, v in mean.items()}


def policy_average(run: str | Path) -> dict[str, float] | None:
    """The policy's own running average from the run's last checkpoint (over the steps it decided at, which
    leaves out the final step), as a cross-check of `time_averaged_weights`; None without one."""
    from mixlab.training import latest_checkpoint, read_checkpoint

    latest = latest_checkpoint(Path(run) / "checkpoints")
    if latest is None:
        return None
    state = read_checkpoint(latest).trainer_state.get("policy") or {}
    steps, sums = state.get("weight_steps"), state.get("weight_sum")
    if not steps or not sums:
        return None
    total = sum(float(v) for v in sums.values())
    return {str(k): float(v) / total for k, v in sorted(sums.items())}


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class VariantResult:
    """One final mixture: its weights, per-source loss (mean over seeds) and excess over the reference."""

    name: str
    weights: dict[str, float]
    runs: list[str]
    loss: dict[str, float]  # per source, mean over the variant's seeds, at the last step
    excess: dict[str, float]  # loss - reference loss, per source
    worst_source: str
    worst_excess: float
    mean_loss: float  # unweighted mean over the sources
    overall_loss: float | None  # the evaluator's token-weighted "all" row, mean over seeds
    loss_by_seed: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class DoReMiReport:
    spec: str
    sources: list[str]
    reference_mixture: str
    reference_kind: str
    reference_run: str
    reference_step: int
    reference_loss: dict[str, float]
    proxy_run: str
    proxy_changes: list[dict[str, Any]]  # the proxy's mixture changes (step, weights, cause)
    proxy_total_steps: int
    policy: dict[str, Any]
    policy_average: dict[str, float] | None
    variants: dict[str, VariantResult]
    best_worst_excess: str  # the variant with the lowest worst-source excess
    doremi_lowest_worst_excess: bool
    json_path: Path | None = None
    png_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)

    def lines(self) -> list[str]:
        sources = self.sources
        width = max(9, *(len(s) for s in sources))
        head = f"{'':10s}" + "".join(f"{s:>{width + 9}s}" for s in sources) + f"{'worst':>{width + 10}s}{'mean':>8s}"
        moved = sum(1 for c in self.proxy_changes if str(c.get("cause", "")).startswith("doremi"))
        lines = [f"DoReMi {self.spec}: {len(sources)} sources, reference {Path(self.reference_run).name} "
                 f"({self.reference_mixture}), proxy {Path(self.proxy_run).name} (eta {self.policy['eta']:g}, c "
                 f"{self.policy['c']:g}, update every {self.policy['update_every']}, {moved} weight changes)",
                 "weights" + " " * 3 + "".join(f"{s:>{width + 9}s}" for s in sources)]
        for name, result in self.variants.items():
            lines.append(f"{name:10s}" + "".join(f"{result.weights.get(s, 0.0):>{width + 9}.3f}" for s in sources))
        lines.append(f"held-out loss at step {self.reference_step} (excess over the reference)")
        lines.append(head)
        lines.append(f"{'reference':10s}" + "".join(f"{self.reference_loss[s]:>{width + 9}.4f}" for s in sources)
                     + f"{'':>{width + 10}s}{float(np.mean([self.reference_loss[s] for s in sources])):>8.4f}")
        for name, result in self.variants.items():
            cells = "".join(f"{result.loss[s]:>{width}.4f} ({result.excess[s]:+.3f})" for s in sources)
            worst = f"{result.worst_source} {result.worst_excess:+.3f}"
            lines.append(f"{name:10s}{cells}{worst:>{width + 10}s}{result.mean_loss:>8.4f}")
        others = ", ".join(f"{n} {r.worst_excess:+.3f}" for n, r in self.variants.items() if n != "doremi")
        verdict = "yes" if self.doremi_lowest_worst_excess else f"no (lowest: {self.best_worst_excess})"
        lines.append(f"doremi has the lowest worst-source excess: {verdict} (doremi "
                     f"{self.variants['doremi'].worst_excess:+.3f}; {others})")
        if self.json_path:
            lines.append(f"report: {self.json_path}" + (f", {self.png_path}" if self.png_path else ""))
        return lines


def doremi_dir(spec: AblationSpec) -> Path:
    """Where doremi.json and doremi.png go: `<runs_dir>/../ablations/<spec>/doremi/`."""
    return runs_dir(spec).parent / "ablations" / spec.name / "doremi"


def _variant_result(name: str, weights: Mapping[str, float], runs: Sequence[ProxyRun], sources: Sequence[str],
                    reference: Mapping[str, float], step: int) -> VariantResult:
    by_seed: dict[int, dict[str, float]] = {}
    overall: list[float] = []
    for proxy in runs:
        at, losses, all_loss = final_losses(proxy.path)
        missing = [s for s in sources if s not in losses]
        if at != step or missing:
            raise DoReMiError(f"{proxy.path}: its last eval is at step {at} with sources {sorted(losses)}, but the "
                              f"reference's is at step {step} with {list(sources)}: final runs and the reference "
                              "need the same steps and evaluated sources")
        by_seed[proxy.variant.seed] = {s: losses[s] for s in sources}
        if all_loss is not None:
            overall.append(all_loss)
    loss = {s: float(np.mean([by_seed[seed][s] for seed in by_seed])) for s in sources}
    excess = {s: loss[s] - reference[s] for s in sources}
    worst = max(sources, key=lambda s: (excess[s], s))
    return VariantResult(name=name, weights=dict(weights), runs=[str(p.path) for p in runs], loss=loss, excess=excess,
                         worst_source=worst, worst_excess=excess[worst], mean_loss=float(np.mean(list(loss.values()))),
                         overall_loss=float(np.mean(overall)) if overall else None, loss_by_seed=by_seed)


def run_doremi(spec: AblationSpec, config: DoReMiConfig | None = None,
               launcher: Launcher | None = None) -> DoReMiReport:
    """Reference, proxy with the doremi policy, final runs on the averaged / uniform / natural weights; write
    doremi.json and doremi.png and return the report. A rerun trains only what has not completed."""
    config = config or DoReMiConfig()
    launcher = launcher or LocalLauncher()
    natural = natural_shares(spec, config.sources)
    sources = sorted(natural)
    uniform = dict.fromkeys(sources, 1.0 / len(sources))
    start = uniform if config.reference_mixture == "uniform" else natural

    ref = reference_spec(spec, config, start)
    (ref_run,) = _run_stage(ref, launcher)
    ref_step, ref_losses, _ = final_losses(ref_run.path)
    unevaluated = [s for s in sources if s not in ref_losses]
    if unevaluated:
        raise DoReMiError(f"{ref_run.path}: sources {unevaluated} have no held-out eval (too few val tokens for a "
                          "window?): raise the val fraction when tokenizing, or leave them out of doremi sources")
    reference: str | dict[str, float] = (str(ref_run.path.resolve()) if config.reference == "matched"
                                         else {s: ref_losses[s] for s in sources})

    proxy = proxy_spec(spec, config, start, reference)
    (proxy_run,) = _run_stage(proxy, launcher)
    averaged = time_averaged_weights(proxy_run.path)
    averaged = {s: averaged.get(s, 0.0) for s in sources}

    mixtures = {"doremi": averaged, "uniform": uniform, "natural": natural}
    final = final_spec(spec, config, mixtures)
    finals = _run_stage(final, launcher)
    variants = {name: _variant_result(name, mixtures[name], [p for p in finals if p.variant.name == name], sources,
                                      ref_losses, ref_step) for name in FINAL_VARIANTS}
    best = min(variants, key=lambda n: (variants[n].worst_excess, n != "doremi"))
    proxy_record = RunRecord.load(proxy_run.path)
    report = DoReMiReport(
        spec=spec.name, sources=sources, reference_mixture=config.reference_mixture, reference_kind=config.reference,
        reference_run=str(ref_run.path), reference_step=ref_step, reference_loss={s: ref_losses[s] for s in sources},
        proxy_run=str(proxy_run.path), proxy_changes=proxy_record.mixture_changes(),
        proxy_total_steps=int(proxy_record.summary.get("total_steps") or 0),
        policy={"eta": config.eta, "c": config.c, "update_every": config.update_every, "signal": config.signal},
        policy_average=policy_average(proxy_run.path), variants=variants, best_worst_excess=best,
        doremi_lowest_worst_excess=best == "doremi")
    out = doremi_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    report.json_path, report.png_path = out / "doremi.json", out / "doremi.png"
    write_report_json(report.json_path, report.to_dict())
    plot_doremi(report, report.png_path)
    return report


def plot_doremi(report: DoReMiReport, path: Path) -> Path:
    """Left: the proxy's weights over its steps; right: each source's excess loss per final variant (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mixlab.ablations.plots import save_figure

    sources = report.sources
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    per_step = weights_by_step(report.proxy_changes, max(1, report.proxy_total_steps))
    steps = np.arange(len(per_step) + 1)
    for i, source in enumerate(sources):
        values = [w.get(source, 0.0) for w in per_step]
        left.step(steps, [*values, values[-1]], where="post", color=f"C{i % 10}", label=source)
        left.axhline(report.variants["doremi"].weights[source], color=f"C{i % 10}", lw=0.8, ls=":")
    left.set(title="proxy weights (dotted: time average)", xlabel="step", ylabel="weight", ylim=(0, None))
    left.legend(fontsize=7)
    x = np.arange(len(sources) + 1)
    width = 0.8 / len(report.variants)
    for j, (name, result) in enumerate(report.variants.items()):
        values = [result.excess[s] for s in sources] + [result.worst_excess]
        right.bar(x + (j - (len(report.variants) - 1) / 2) * width, values, width, label=name, color=f"C{j % 10}")
    right.axhline(0.0, color="black", lw=0.8)
    right.set_xticks(x, [*sources, "worst"], rotation=30, ha="right", fontsize=8)
    right.set(title=f"excess held-out loss over the reference (step {report.reference_step})", ylabel="loss - ref")
    right.legend(fontsize=7)
    save_figure(fig, path)
    return path
