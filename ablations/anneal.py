"""`mixlab ablate anneal`: is a new source worth adding? Test it in a short LR decay from a checkpoint.

SmolLM3 and Llama 3 judge a candidate source by annealing: from a checkpoint of the main run, decay the learning
rate linearly to 0 over a short run on 40% of the current mixture plus 60% of the candidate, and compare with a
control run that anneals the same way on the current mixture alone. Both runs start from the parent's weights and
AdamW moments (`train.init_from`), at the LR the parent had at that step (from its metrics.jsonl), with warmup 0
and a fresh sampler. The report gives per-source and overall held-out loss and bits per byte and the downstream
task scores when the parent had them, candidate minus control, with the seed noise when there is more than one
seed. Runs are an ordinary list spec (`<parent>-anneal-<candidate>`), so a rerun trains only what is missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mixlab.ablations.launch import (
    Launcher,
    LocalLauncher,
    ProxyRun,
    check_same_runs,
    require_completed,
    resolved_config,
    run_ablation,
    runs_dir,
)
from mixlab.ablations.outputs import write_report_json
from mixlab.ablations.spec import AblationSpec
from mixlab.training import RunRecord

VARIANTS = ("control", "candidate")
STAGE_NAME = "anneal"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")


class AnnealError(ValueError):
    """An anneal that cannot run as asked; the message names the run, checkpoint or field and the fix."""


@dataclass
class AnnealConfig:
    """What to anneal from, on what, for how long."""

    parent: Path  # the parent run directory
    candidate: tuple[str, ...] | Mapping[str, float]  # source(s) (equal split) or {source: weight within the 60%}
    step: int | None = None  # the parent's checkpoint step; default its latest
    candidate_share: float = 0.6  # of the anneal's tokens; the rest is the current mixture
    steps: int | None = None  # anneal length in optimizer steps; default 10% of the parent's steps
    lr: float | None = None  # the LR the decay starts from; default the parent's at `step` (metrics.jsonl)
    seeds: tuple[int, ...] = (0,)
    name: str | None = None  # the spec's name (prefixes the run ids); default <parent>-anneal-<candidate>
    eval_every: int | None = None  # default: once, at the end of the anneal

    def __post_init__(self) -> None:
        self.parent = Path(self.parent)
        if isinstance(self.candidate, str):
            self.candidate = (self.candidate,)
        if isinstance(self.candidate, Mapping):
            weights = {str(k): v for k, v in self.candidate.items()}
            bad = {k: v for k, v in weights.items()
                   if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0}
            if not weights or bad or sum(weights.values()) <= 0:
                raise AnnealError(f"anneal candidate {dict(self.candidate)}: give source: weight pairs with weights "
                                  ">= 0 and a positive total")
            self.candidate = weights
        else:
            names = tuple(str(c) for c in self.candidate)
            if not names or len(set(names)) != len(names):
                raise AnnealError(f"anneal candidate {list(names)}: name at least one source, each once")
            self.candidate = names
        share = self.candidate_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < 1:
            raise AnnealError(f"anneal candidate_share={share!r} must be in (0, 1): the candidate's share of the "
                              "anneal's tokens (0.6 in SmolLM3's recipe)")
        for name in ("step", "steps", "eval_every"):
            value = getattr(self, name)
            low = 0 if name == "step" else 1
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise AnnealError(f"anneal {name}={value!r} must be a whole number >= {low}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float)
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise AnnealError(f"anneal lr={self.lr!r} must be a number > 0 (or unset: the parent's LR at the step)")
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise AnnealError(f"anneal seeds {list(self.seeds)} must be distinct and at least one")

    @property
    def candidate_weights(self) -> dict[str, float]:
        """The candidate's own mixture, normalised (its sources share the candidate's part of the tokens)."""
        raw = dict(self.candidate) if isinstance(self.candidate, Mapping) else dict.fromkeys(self.candidate, 1.0)
        total = sum(raw.values())
        return {s: w / total for s, w in sorted(raw.items()) if w > 0}


# ---------------------------------------------------------------------------------------------- the parent
def _parent_record(config: AnnealConfig) -> RunRecord:
    try:
        return RunRecord.load(config.parent)
    except FileNotFoundError as err:
        raise AnnealError(f"anneal parent {config.parent}: not a run directory ({err}); point --parent at a run "
                          "of `mixlab train`") from err


def parent_checkpoint(config: AnnealConfig) -> tuple[Path, int]:
    """The parent's checkpoint to anneal from (`config.step`, else its latest) and its step."""
    from mixlab.training import list_checkpoints, read_checkpoint

    found = {read_checkpoint(p).step: p for p in list_checkpoints(config.parent / "checkpoints")}
    if not found:
        raise AnnealError(f"{config.parent}: the parent run has no checkpoint in checkpoints/; train it (with "
                          "train.checkpoint_every) first")
    step = max(found) if config.step is None else config.step
    if step not in found:
        raise AnnealError(f"{config.parent}: no checkpoint at step {step}; it has steps {sorted(found)} (older ones "
                          "are pruned by train.keep_last_checkpoints): pick one of them")
    return found[step].resolve(), step


def parent_lr(parent: RunRecord, step: int) -> float:
    """The LR of the parent's last logged update at or before `step` (metrics.jsonl logs each update's LR)."""
    rows = [r for r in parent.metrics() if int(r["step"]) <= step and isinstance(r.get("lr"), int | float)]
    if not rows:
        raise AnnealError(f"{parent.path}: metrics.jsonl logs no LR at or before step {step}; give the anneal's lr "
                          "explicitly")
    return float(max(rows, key=lambda r: int(r["step"]))["lr"])


def current_mixture(parent: RunRecord, step: int) -> dict[str, float]:
    """The weights the parent drew with right after `step`: its policy's last change at or before the step
    (mixture.jsonl), else its schedule's weights there (as the planner flattened it for the run)."""
    changes = [c for c in parent.mixture_changes() if int(c["step"]) <= step]
    if changes:
        weights = max(enumerate(changes), key=lambda ic: (int(ic[1]["step"]), ic[0]))[1]["weights"]
    else:
        from mixlab.pipelines.pretrain import plan_run, sampler_steps, tokenized_manifest

        document = _parent_document(parent)
        config = resolved_config(document)
        if config.schedule is None:
            raise AnnealError(f"{parent.path}: run.json records no mixture; anneal needs the parent's schedule")
        schedule = plan_run(config, tokenized_manifest(config.curated_dir)).schedule
        resolved = schedule.resolve(sampler_steps(config.train), config.train.batch_size, config.train.seq_len)
        batch = min(step * config.train.grad_accum, sampler_steps(config.train) - 1)
        weights = resolved.weights_at_step(batch)
    weights = {str(s): float(w) for s, w in weights.items() if float(w) > 0}
    total = sum(weights.values())
    return {s: w / total for s, w in sorted(weights.items())}


def _parent_document(parent: RunRecord) -> dict[str, Any]:
    from mixlab.pipelines.run_config import read_run_document

    document = read_run_document(parent.path / "run.json")
    document["runs_dir"] = str(parent.path.resolve().parent)
    return document


# ---------------------------------------------------------------------------------------------- the spec
def _spec_name(config: AnnealConfig, parent: RunRecord) -> str:
    if config.name:
        return config.name
    return _NAME_CHARS.sub("_", f"{parent.run_id}-anneal-{'+'.join(config.candidate_weights)}")


def anneal_mixtures(config: AnnealConfig, parent: RunRecord | None = None,
                    step: int | None = None) -> dict[str, dict[str, float]]:
    """control: the parent's current mixture; candidate: (1 - share) x current + share x the candidate."""
    parent = parent or _parent_record(config)
    step = parent_checkpoint(config)[1] if step is None else step
    current = current_mixture(parent, step)
    candidate = config.candidate_weights
    share = float(config.candidate_share)
    mixed = {s: (1 - share) * current.get(s, 0.0) + share * candidate.get(s, 0.0) for s in {*current, *candidate}}
    return {"control": current, "candidate": dict(sorted(mixed.items()))}


def _check_candidate(config: AnnealConfig, document: Mapping[str, Any], current: Mapping[str, float]) -> None:
    from mixlab.pipelines.pretrain import tokenized_manifest

    manifest = tokenized_manifest(document["data"]["curated"])
    available = {n for n, s in manifest.sources.items() if s.tokens.get("train")}
    mixture = document.get("mixture") or {}
    selections = {str(s.get("name")) for s in mixture.get("selections") or () if isinstance(s, Mapping)}
    unknown = sorted(set(config.candidate_weights) - available - selections)
    if unknown:
        raise AnnealError(f"anneal candidate {unknown}: no such source with train tokens in {manifest.root} "
                          f"(sources: {sorted(available)}): fix the name or tokenize it")


def anneal_spec(config: AnnealConfig) -> AblationSpec:
    """The list spec of the anneal: `control` and `candidate`, each per seed, from the parent's checkpoint with a
    linear LR decay from the parent's LR to 0 (warmup 0) over `steps`."""
    parent = _parent_record(config)
    checkpoint, step = parent_checkpoint(config)
    lr = parent_lr(parent, step) if config.lr is None else float(config.lr)
    if lr <= 1e-12:
        raise AnnealError(f"{parent.path}: the parent's LR at step {step} is {lr:g}: its decay had ended there, so "
                          "there is nothing to anneal from; pick a checkpoint of the stable phase (step) or give lr")
    document = _parent_document(parent)
    parent_steps = int(parent.summary.get("total_steps") or resolved_config(document).train.steps)
    steps = config.steps or max(1, round(0.1 * parent_steps))
    mixtures = anneal_mixtures(config, parent, step)
    _check_candidate(config, document, mixtures["control"])
    if max(abs(mixtures["candidate"].get(s, 0.0) - mixtures["control"].get(s, 0.0)) for s in mixtures["candidate"]) < 1e-9:
        raise AnnealError(f"anneal candidate {config.candidate_weights} has the current mixture's own shares: both "
                          "runs would train the same data; pick a source the parent is not (or less) trained on")
    train = {k: v for k, v in dict(document.get("train") or {}).items() if k != "preset"}
    train.update(total_steps=steps, token_budget=None, lr=lr, min_lr=0.0, warmup_steps=0, schedule="wsd",
                 decay_start_step=0, decay_fraction=1.0, init_from=str(checkpoint), resume=True, log_every=1,
                 eval_every=config.eval_every or steps, checkpoint_every=max(1, steps // 4), progress_bar=False)
    base = {**document, "train": train, "policy": None,
            "tags": {**(document.get("tags") or {}), "anneal_parent": parent.run_id, "anneal_step": str(step)}}
    selections = (document.get("mixture") or {}).get("selections")

    def mixture(name: str) -> dict[str, Any]:
        # both runs name the same leaves (the candidate at weight 0 in the control), so both are evaluated on
        # the same held-out sources, the candidate's included
        leaves = sorted({*mixtures["control"], *mixtures["candidate"]})
        stage = {"name": STAGE_NAME, "weights": {s: float(mixtures[name].get(s, 0.0)) for s in leaves}}
        return {"stages": [stage], **({"selections": selections} if selections else {})}

    base["mixture"] = mixture("control")
    base.pop("run_id", None)
    return AblationSpec(_spec_name(config, parent), base,
                        variants=tuple({"name": name, "mixture": mixture(name)} for name in VARIANTS),
                        seeds=config.seeds, mode="list", include_base=False,
                        description=f"anneal of {parent.run_id} from step {step}: {config.candidate_share:g} of "
                                    f"{'+'.join(config.candidate_weights)} against the current mixture")


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class MetricComparison:
    """One metric at the anneal's last step: each variant's mean over seeds, candidate - control, and the
    standard error of that difference from the seeds (None with one seed per variant)."""

    metric: str
    control: float
    candidate: float
    delta: float
    noise: float | None
    control_by_seed: dict[int, float] = field(default_factory=dict)
    candidate_by_seed: dict[int, float] = field(default_factory=dict)

    @property
    def beyond_noise(self) -> bool | None:
        """|delta| above twice the noise; None when there is no seed noise to compare with."""
        return None if not self.noise else abs(self.delta) > 2 * self.noise


@dataclass
class AnnealReport:
    name: str
    parent: str
    checkpoint: str
    step: int
    lr: float
    steps: int
    candidate: dict[str, float]
    candidate_share: float
    mixtures: dict[str, dict[str, float]]  # control / candidate weights
    runs: dict[str, list[str]]
    token_shares: dict[str, dict[str, float]]  # trained tokens per source / all, per variant (mean over seeds)
    final_step: int
    metrics: list[MetricComparison]
    json_path: Path | None = None

    def metric(self, name: str) -> MetricComparison:
        for row in self.metrics:
            if row.metric == name:
                return row
        raise KeyError(f"the anneal report has no metric {name!r}; it has {[m.metric for m in self.metrics]}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["json_path"] = str(self.json_path) if self.json_path else None
        for row, out in zip(self.metrics, data["metrics"], strict=True):
            out["beyond_noise"] = row.beyond_noise
        return data

    def lines(self) -> list[str]:
        seeds = len(next(iter(self.runs.values()), []))
        candidate = " + ".join(f"{s} {w:.2f}" for s, w in self.candidate.items())
        lines = [f"anneal {self.name}: {Path(self.parent).name} from step {self.step}, LR {self.lr:.3g} -> 0 over "
                 f"{self.steps} steps, {seeds} seed(s)",
                 f"candidate {self.candidate_share:.0%} of tokens: {candidate}"]
        for name in VARIANTS:
            shares = ", ".join(f"{s} {v:.3f}" for s, v in self.token_shares.get(name, {}).items())
            lines.append(f"  {name:9s} trained shares: {shares}")
        width = max(12, *(len(m.metric) for m in self.metrics)) if self.metrics else 12
        lines.append(f"{'metric':{width}s}  {'control':>9s}  {'candidate':>9s}  {'delta':>9s}  {'noise':>8s}")
        for m in self.metrics:
            noise = f"{m.noise:8.4f}" if m.noise else f"{'-':>8s}"
            flag = "" if m.beyond_noise is None else ("  beyond noise" if m.beyond_noise else "  within noise")
            lines.append(f"{m.metric:{width}s}  {m.control:9.4f}  {m.candidate:9.4f}  {m.delta:+9.4f}  {noise}{flag}")
        lines.append("delta = candidate - control at the last step (loss, bpb: lower is better; tasks: higher)")
        if self.json_path:
            lines.append(f"report: {self.json_path}")
        return lines


def final_metrics(run: str | Path) -> tuple[int, dict[str, float]]:
    """(last eval step, {metric: value}) of a run: `<source>/loss|bpb`, `all/...`, `task/<name>/accuracy|margin`."""
    record = RunRecord.load(run)
    evals = record.evals()
    if not evals:
        raise AnnealError(f"{run}: the run has no evals (evals.jsonl); it needs the parent's evaluator")
    step = max(int(r["step"]) for r in evals)
    values: dict[str, float] = {}
    for row in evals:
        if int(row["step"]) == step:
            for metric in ("loss", "bpb"):
                if isinstance(row.get(metric), int | float):
                    values[f"{row['source']}/{metric}"] = float(row[metric])
    for row in record.tasks():
        if int(row["step"]) == step:
            for metric in ("accuracy", "margin"):
                if isinstance(row.get(metric), int | float):
                    values[f"task/{row['task']}/{metric}"] = float(row[metric])
    return step, values


def _token_shares(runs: Sequence[ProxyRun]) -> dict[str, float]:
    shares: dict[str, list[float]] = {}
    for proxy in runs:
        tokens = RunRecord.load(proxy.path).summary.get("tokens_by_source") or {}
        total = sum(tokens.values()) or 1
        for source, count in tokens.items():
            shares.setdefault(source, []).append(count / total)
    return {s: float(np.sum(v) / len(runs)) for s, v in sorted(shares.items())}


def _compare(metric: str, control: Mapping[int, float], candidate: Mapping[int, float]) -> MetricComparison:
    c, k = np.array(list(control.values())), np.array(list(candidate.values()))
    noise = (float(math.sqrt(c.var(ddof=1) / len(c) + k.var(ddof=1) / len(k)))
             if len(c) > 1 and len(k) > 1 else None)
    return MetricComparison(metric, float(c.mean()), float(k.mean()), float(k.mean() - c.mean()), noise,
                            dict(control), dict(candidate))


def anneal_dir(spec: AblationSpec) -> Path:
    """Where anneal.json goes: `<runs_dir>/../ablations/<spec>/`, beside the runs' documents."""
    return runs_dir(spec).parent / "ablations" / spec.name


def run_anneal(config: AnnealConfig, launcher: Launcher | None = None) -> AnnealReport:
    """Train the control and candidate anneals (what has not completed), compare them and write anneal.json."""
    spec = anneal_spec(config)
    check_same_runs(spec, error=AnnealError)
    proxies = run_ablation(spec, launcher or LocalLauncher())
    require_completed(spec, proxies, AnnealError)
    by_variant: dict[str, dict[int, dict[str, float]]] = {name: {} for name in VARIANTS}
    steps = set()
    for proxy in proxies:
        step, values = final_metrics(proxy.path)
        steps.add(step)
        by_variant[proxy.variant.name][proxy.variant.seed] = values
    common = sorted(set.intersection(*(set(v) for runs in by_variant.values() for v in runs.values())),
                    key=lambda m: (m.startswith("task/"), m.split("/")[0] == "all", m))
    metrics = [_compare(m, {s: v[m] for s, v in by_variant["control"].items()},
                        {s: v[m] for s, v in by_variant["candidate"].items()}) for m in common]
    parent = _parent_record(config)
    checkpoint, step = parent_checkpoint(config)
    train = spec.base["train"]
    report = AnnealReport(
        name=spec.name, parent=str(parent.path), checkpoint=str(checkpoint), step=step, lr=float(train["lr"]),
        steps=int(train["total_steps"]), candidate=config.candidate_weights,
        candidate_share=float(config.candidate_share),
        mixtures={v["name"]: {s: w for s, w in v["mixture"]["stages"][0]["weights"].items() if w > 0}
                  for v in spec.variants},
        runs={name: [str(p.path) for p in proxies if p.variant.name == name] for name in VARIANTS},
        token_shares={name: _token_shares([p for p in proxies if p.variant.name == name]) for name in VARIANTS},
        final_step=max(steps), metrics=metrics)
    out = anneal_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    report.json_path = out / "anneal.json"
    write_report_json(report.json_path, report.to_dict())
    return report
