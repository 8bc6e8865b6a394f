"""`mixlab ablate regmix SPEC`: mixture search from proxy runs (RegMix, Olmix), end to end.

1. Sample mixtures from a Dirichlet around the natural token shares of the base's curated data, capped so that no
   source passes the planner's epoch limit in the base's token budget (the planner never refuses a swarm member).
2. Train the swarm: an ordinary list spec `<spec>-swarm-<draw key>`, one proxy per mixture (a rerun skips finished proxies).
3. Fit the target metric at each proxy's last step on the weights: linear, Olmix's log-linear law and LightGBM,
   each scored by cross-validated Spearman (the ranking is what the search relies on).
4. Search the simplex within the caps for the best predicted mixture.
5. Verify: `<spec>-verify` trains the chosen mixture, the natural and the uniform ones, and compares prediction and
   measurement, so a regression that only fits its own swarm is caught.

Only the spec's base is used (its axes or variants are not): every proxy is the base with another mixture.
Results land in `<runs_dir>/../ablations/<spec>/regmix/` (regmix.json, regmix.png).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from mixlab.ablations.launch import (
    Launcher,
    LocalLauncher,
    base_document,
    check_same_runs,
    require_completed,
    resolved_config,
    run_ablation,
    runs_dir,
)
from mixlab.ablations.outputs import report_dict, write_report_json
from mixlab.ablations.results import ablation_results
from mixlab.ablations.spec import AblationSpec
from mixlab.mixtures.search import (
    REGRESSORS,
    MixtureRegression,
    fit_mixture_regression,
    project_to_caps,
    sample_mixtures,
    search_simplex,
    weight_caps,
)

STAGE_NAME = "regmix"
VERIFY_VARIANTS = ("regmix", "natural", "uniform")
# caps are shrunk by this much so float rounding in sampling/projection never lands a weight past the limit
CAP_MARGIN = 1e-6


class RegMixError(ValueError):
    """A regmix request that cannot run as given; the message names the spec, run or field and the fix."""


@dataclass
class RegMixConfig:
    """How the swarm is drawn, what it is scored on, and how the winner is checked."""

    proxies: int = 16  # swarm size
    concentration: float = 1.0  # Dirichlet alpha = concentration * natural share: small = varied, sparse mixtures
    seed: int = 0  # sampling, CV folds and the simplex search
    target: str = "all/loss"  # a metric of the results table at each proxy's last step (`web-en/loss`, ...)
    higher_is_better: bool | None = None  # None: from the target's name (loss/bpb: lower; accuracy/margin: higher)
    regressor: str = "lightgbm"  # the fit the search uses: linear | log-linear | lightgbm | best (highest CV rho)
    sources: tuple[str, ...] | None = None  # default: every source with a train window in the base's curated dir
    verify_seeds: tuple[int, ...] = (0, 1, 2)
    cv_folds: int = 5  # K-fold CV of each regressor (leave-one-out when the swarm is smaller)
    search_samples: int = 100_000
    refine_steps: int = 200
    threads: int = 1  # LightGBM threads
    lightgbm: dict[str, Any] = field(default_factory=dict)  # extra LightGBMRegressor fields

    def __post_init__(self) -> None:
        if isinstance(self.proxies, bool) or not isinstance(self.proxies, int) or self.proxies < 3:
            raise RegMixError(f"regmix proxies={self.proxies!r}: need at least 3 proxies to fit and cross-validate")
        if not (isinstance(self.concentration, int | float) and math.isfinite(self.concentration)
                and self.concentration > 0):
            raise RegMixError(f"regmix concentration={self.concentration!r} must be a positive number")
        if self.regressor not in (*REGRESSORS, "best"):
            raise RegMixError(f"regmix regressor={self.regressor!r}; choose one of {[*REGRESSORS, 'best']}")
        self.verify_seeds = tuple(int(s) for s in self.verify_seeds)
        if not self.verify_seeds or len(set(self.verify_seeds)) != len(self.verify_seeds):
            raise RegMixError(f"regmix verify_seeds={list(self.verify_seeds)} must be distinct and at least one")
        if self.sources is not None:
            self.sources = tuple(self.sources)
            if not self.sources or len(set(self.sources)) != len(self.sources):
                raise RegMixError(f"regmix sources={list(self.sources)} must be distinct and at least one")
        if self.cv_folds < 2:
            raise RegMixError(f"regmix cv_folds={self.cv_folds} must be >= 2")
        from mixlab.ablations.ablation_report import higher_is_better

        try:
            known = higher_is_better(self.target)
        except ValueError:
            known = None
        if self.higher_is_better is None:
            if known is None:
                raise RegMixError(f"regmix target {self.target!r}: say whether higher is better (higher_is_better= / "
                                  "--higher-is-better or --no-higher-is-better)")
            self.higher_is_better = known
        elif known is not None and self.higher_is_better != known:
            raise RegMixError(f"regmix target {self.target!r} is {'higher' if known else 'lower'}-is-better, but "
                              f"higher_is_better={self.higher_is_better} was given: leave it out")

    def swarm_key(self) -> str:
        """A short digest of what decides the swarm's mixtures: another draw is another swarm, never mixed up."""
        import hashlib
        import json

        drawn = {"proxies": self.proxies, "concentration": float(self.concentration), "seed": self.seed,
                 "sources": list(self.sources) if self.sources else None}
        return hashlib.sha256(json.dumps(drawn, sort_keys=True).encode()).hexdigest()[:6]


# ------------------------------------------------------------------------------------------------- the swarm


@dataclass(frozen=True)
class MixtureSpace:
    """The sources a regmix spec mixes, their natural shares and the planner's caps for the base's budget."""

    sources: tuple[str, ...]
    natural: dict[str, float]  # train-token shares (within `sources`)
    caps: dict[str, float]  # the largest weight each source may take without passing its epoch limit
    run_tokens: int

    def clip(self, weights: Mapping[str, float]) -> dict[str, float]:
        """`weights` moved into the caps (unchanged when already inside)."""
        cap = np.array([self.caps[s] for s in self.sources])
        row = project_to_caps(np.array([[float(weights[s]) for s in self.sources]]), cap)[0]
        return {s: float(v) for s, v in zip(self.sources, row, strict=True)}

    @property
    def uniform(self) -> dict[str, float]:
        return self.clip(dict.fromkeys(self.sources, 1.0 / len(self.sources)))


def mixture_space(spec: AblationSpec, sources: Sequence[str] | None = None) -> MixtureSpace:
    """Natural shares and caps from the base's curated manifest, token budget and `plan` limits.

    The caps use what the planner counts: a source of A train tokens holds (A - 1) // seq_len windows, and a run
    drawing w * R tokens of it makes w * R / (windows * seq_len) passes, which must stay within its limit."""
    from mixlab.pipelines.pretrain import tokenized_manifest

    document = base_document(spec)
    config = resolved_config(document)
    if config.policy is not None:
        raise RegMixError(f"spec {spec.name!r}: the base has an adaptive mixture policy ({config.policy.get('name')})"
                          "; regmix proxies need fixed mixtures: remove base.policy")
    manifest = tokenized_manifest(config.curated_dir)
    seq_len = config.train.seq_len
    train_tokens = {name: int(entry.tokens.get("train", 0)) for name, entry in manifest.sources.items()}
    windows = {name: max(0, (tokens - 1) // seq_len) for name, tokens in train_tokens.items()}
    if sources is None:
        sources = tuple(sorted(name for name, w in windows.items() if w > 0))
        if len(sources) < 2:
            raise RegMixError(f"{manifest.root}: regmix needs at least 2 sources with a train window of {seq_len + 1} "
                              f"tokens; found {list(sources)}")
    else:
        sources = tuple(sources)
        short = [s for s in sources if windows.get(s, 0) == 0]
        if short:
            raise RegMixError(f"{manifest.root}: regmix sources {short} have no train window of {seq_len + 1} tokens "
                              f"(tokenized sources: {sorted(n for n, t in train_tokens.items() if t)}): fix the "
                              "names, tokenize them, or leave them out of regmix sources")
    dotted = [s for s in sources if "." in s]
    if dotted:
        raise RegMixError(f"sources {dotted}: a '.' in a source name cannot be set as a spec field; rename them")
    run_tokens = config.train.steps * config.train.tokens_per_step
    limits = config.plan
    by_source = {s: limits.limit(s) for s in sources if s in limits.max_epochs_by_source}
    try:
        caps = weight_caps({s: windows[s] * seq_len for s in sources}, run_tokens, limits.max_epochs, by_source)
    except ValueError as err:
        raise RegMixError(f"spec {spec.name!r}: {err}") from err
    caps = {s: c if c >= 1.0 else c * (1.0 - CAP_MARGIN) for s, c in caps.items()}
    total = sum(train_tokens[s] for s in sources)
    natural = {s: train_tokens[s] / total for s in sources}
    return MixtureSpace(sources, natural, caps, run_tokens)


def _weight_field(source: str) -> str:
    return f"mixture.stages.0.weights.{source}"


def _mixture_base(spec: AblationSpec, natural: Mapping[str, float]) -> dict[str, Any]:
    """The base with a one-stage schedule over the regmix sources; variants set each weight in it.

    (Each weight is its own field, so variant labels are plain numbers and the results table has one column per
    source weight.)"""
    base = dict(spec.base)
    base["mixture"] = {"stages": [{"name": STAGE_NAME, "weights": {s: float(w) for s, w in natural.items()}}]}
    return base


def _variant(name: str, weights: Mapping[str, float]) -> dict[str, Any]:
    return {"name": name, **{_weight_field(s): float(w) for s, w in weights.items()}}


def sampled_mixtures(spec: AblationSpec, config: RegMixConfig, space: MixtureSpace | None = None) -> pl.DataFrame:
    """The swarm's mixtures: one row per proxy, one column per source, within the caps and summing to 1."""
    space = space or mixture_space(spec, config.sources)
    return sample_mixtures(space.natural, config.proxies, config.concentration, config.seed, max_weight=space.caps)


def regmix_swarm_spec(spec: AblationSpec, config: RegMixConfig, space: MixtureSpace | None = None) -> AblationSpec:
    """The list spec `<spec>-swarm-<draw key>`: the base once per sampled mixture (`mix-00`, ...), trained with the
    spec's first seed."""
    space = space or mixture_space(spec, config.sources)
    table = sampled_mixtures(spec, config, space)
    width = max(2, len(str(table.height - 1)))
    variants = tuple(_variant(f"mix-{i:0{width}d}", row) for i, row in enumerate(table.iter_rows(named=True)))
    return AblationSpec(f"{spec.name}-swarm-{config.swarm_key()}", _mixture_base(spec, space.natural), variants=variants,
                        seeds=(spec.seeds[0],), mode="list", include_base=False,
                        description=f"regmix swarm of {spec.name}: {table.height} mixtures around the natural shares")


def regmix_verify_spec(spec: AblationSpec, config: RegMixConfig, chosen: Mapping[str, float],
                       space: MixtureSpace | None = None) -> AblationSpec:
    """The list spec `<spec>-verify`: the chosen mixture, the natural and the uniform ones, per verify seed."""
    space = space or mixture_space(spec, config.sources)
    mixtures = {"regmix": dict(chosen), "natural": space.clip(space.natural), "uniform": space.uniform}
    return AblationSpec(f"{spec.name}-verify", _mixture_base(spec, space.natural),
                        variants=tuple(_variant(name, w) for name, w in mixtures.items()),
                        seeds=config.verify_seeds, mode="list", include_base=False,
                        description=f"regmix verification of {spec.name}: chosen vs natural vs uniform")


def variant_weights(variant_fields: Mapping[str, Any], sources: Sequence[str]) -> dict[str, float]:
    return {s: float(variant_fields[_weight_field(s)]) for s in sources}


# ------------------------------------------------------------------------------------------------- the report


@dataclass
class FitSummary:
    """One regression of the target on the weights and how well it ranks unseen mixtures."""

    kind: str
    cv_spearman: float | None  # Spearman rho of out-of-fold predictions vs measured (None: constant or failed)
    train_spearman: float | None
    error: str | None = None  # why it could not be fitted (e.g. log-linear on non-positive targets)
    cv_predictions: list[float] | None = None  # per swarm proxy, in swarm order


@dataclass
class VerifyRun:
    """One verify mixture: its weights, the chosen regression's prediction and the measured target."""

    name: str
    weights: dict[str, float]
    predicted: float
    measured: float  # mean over the verify seeds
    by_run: dict[str, float]  # run id -> target at its last step


@dataclass
class RegMixReport:
    """Everything regmix found: the swarm, the fits, the chosen mixture and how it did against the baselines."""

    spec: str
    target: str
    higher_is_better: bool
    regressor: str
    sources: list[str]
    natural: dict[str, float]
    caps: dict[str, float]
    run_tokens: int
    swarm: list[dict[str, Any]]  # {run, variant, weights: {source: w}, target}
    fits: dict[str, FitSummary]
    chosen: dict[str, float]
    predicted_best: float
    verify: dict[str, VerifyRun]
    beats_natural: bool
    beats_uniform: bool
    json_path: Path | None = None
    png_path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return report_dict(self)

    def lines(self) -> list[str]:
        """The report for the console: fits, chosen mixture against natural, and the verify runs."""
        better = "higher" if self.higher_is_better else "lower"
        out = [f"regmix {self.spec}: {len(self.swarm)} proxies, target {self.target} ({better} is better), "
               f"search with {self.regressor}", "", "regressor   CV spearman  train spearman"]
        for kind, fit in self.fits.items():
            if fit.error:
                out.append(f"{kind:11s} failed: {fit.error}")
            else:
                out.append(f"{kind:11s} {_fmt(fit.cv_spearman):>11s}  {_fmt(fit.train_spearman):>14s}")
        width = max(6, *(len(s) for s in self.sources))
        out += ["", f"{'source':{width}s}  {'chosen':>7s}  {'natural':>7s}  {'uniform':>7s}  {'cap':>6s}"]
        natural, uniform = self.verify["natural"].weights, self.verify["uniform"].weights
        for s in self.sources:
            out.append(f"{s:{width}s}  {self.chosen[s]:7.3f}  {natural[s]:7.3f}  {uniform[s]:7.3f}  "
                       f"{min(1.0, self.caps[s]):6.3f}")
        clipped = [s for s in self.sources if self.natural[s] > self.caps[s]]
        if clipped:
            out.append(f"(natural token shares of {', '.join(f'{s} {self.natural[s]:.3f}' for s in clipped)} are over "
                       "their caps: the natural verify run uses them clipped, as above)")
        out += ["", f"{'verify':8s}  {'predicted':>9s}  {'measured':>9s}  runs"]
        for name, run in self.verify.items():
            out.append(f"{name:8s}  {run.predicted:9.4f}  {run.measured:9.4f}  {len(run.by_run)}")
        out += ["", f"regmix {'beats' if self.beats_natural else 'does not beat'} natural and "
                    f"{'beats' if self.beats_uniform else 'does not beat'} uniform on {self.target}"]
        if self.json_path:
            out.append(f"report: {self.json_path}" + (f", plot: {self.png_path}" if self.png_path else ""))
        return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ------------------------------------------------------------------------------------------------- the protocol


def regmix_dir(spec: AblationSpec) -> Path:
    """Where regmix.json and regmix.png go: `<runs_dir>/../ablations/<spec>/regmix/`."""
    return runs_dir(spec).parent / "ablations" / spec.name / "regmix"


def run_regmix(spec: AblationSpec, config: RegMixConfig | None = None,
               launcher: Launcher | None = None) -> RegMixReport:
    """Sample, train the swarm, fit, search, verify; write regmix.json and regmix.png and return the report.

    Rerunning trains only what has not completed (swarm and verify proxies are ordinary runs)."""
    config = config or RegMixConfig()
    launcher = launcher or LocalLauncher()
    space = mixture_space(spec, config.sources)
    swarm_spec = regmix_swarm_spec(spec, config, space)
    require_completed(swarm_spec, run_ablation(swarm_spec, launcher), RegMixError)
    swarm_values = final_values(swarm_spec, config.target)
    swarm = []
    for variant in swarm_spec.expand():
        swarm.append({"run": variant.run_id, "variant": variant.name,
                      "weights": variant_weights(variant.fields, space.sources),
                      "target": swarm_values[variant.run_id]})
    table = pl.DataFrame({**{s: [row["weights"][s] for row in swarm] for s in space.sources},
                          "target": [row["target"] for row in swarm]})
    fits, models = fit_all(table, list(space.sources), config)
    kind = _chosen_kind(config, fits)
    model = models[kind]
    sign = -1.0 if config.higher_is_better else 1.0
    best = search_simplex(_Signed(model, sign), sources=list(space.sources), caps=space.caps,
                          n_samples=config.search_samples, refine_steps=config.refine_steps, seed=config.seed)
    chosen = space.clip(best.mixture)  # already inside; the clip only guards float noise at a cap

    verify_spec = regmix_verify_spec(spec, config, chosen, space)
    check_same_runs(verify_spec, error=RegMixError)
    require_completed(verify_spec, run_ablation(verify_spec, launcher), RegMixError)
    verify_values = final_values(verify_spec, config.target)
    verify: dict[str, VerifyRun] = {}
    for variant in verify_spec.expand():
        weights = variant_weights(variant.fields, space.sources)
        entry = verify.setdefault(variant.name, VerifyRun(variant.name, weights, _predict(model, weights),
                                                          math.nan, {}))
        entry.by_run[variant.run_id] = verify_values[variant.run_id]
    for entry in verify.values():
        entry.measured = float(np.mean(list(entry.by_run.values())))

    def beats(other: str) -> bool:
        return sign * verify["regmix"].measured < sign * verify[other].measured

    report = RegMixReport(spec=spec.name, target=config.target, higher_is_better=config.higher_is_better,
                          regressor=kind, sources=list(space.sources), natural=dict(space.natural),
                          caps=dict(space.caps), run_tokens=space.run_tokens, swarm=swarm, fits=fits, chosen=chosen,
                          predicted_best=_predict(model, chosen), verify=verify, beats_natural=beats("natural"),
                          beats_uniform=beats("uniform"))
    out = regmix_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    report.json_path, report.png_path = out / "regmix.json", out / "regmix.png"
    write_report_json(report.json_path, report.to_dict())
    plot_regmix(report, report.png_path)
    return report


def final_values(spec: AblationSpec, target: str) -> dict[str, float]:
    """run id -> the target metric at the run's last logged step, from the spec's results table."""
    results = ablation_results(spec)
    rows = results.filter(pl.col("metric") == target)
    if rows.is_empty():
        known = sorted(set(results["metric"].to_list()))
        raise RegMixError(f"spec {spec.name!r}: the results table has no metric {target!r}; it has {known}: set "
                          "regmix target to one of them")
    last = rows.sort("step").group_by("run", maintain_order=True).last()
    values = dict(zip(last["run"].to_list(), last["value"].to_list(), strict=True))
    missing = [v.run_id for v in spec.expand() if v.run_id not in values]
    if missing:
        raise RegMixError(f"spec {spec.name!r}: runs {missing} logged no {target!r}: check their eval settings")
    bad = {run: v for run, v in values.items() if not math.isfinite(v)}
    if bad:
        raise RegMixError(f"spec {spec.name!r}: {target!r} is not finite in runs {bad}: the regression needs "
                          "finite targets; look at those runs (diverged?) and rerun them")
    return {run: float(v) for run, v in values.items()}


# ------------------------------------------------------------------------------------------------- fitting


@dataclass
class _Signed:
    """A regression whose predictions are multiplied by `sign`: the search minimises, a target may be maximised."""

    model: MixtureRegression
    sign: float

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Signed:  # the Regressor protocol; never refitted
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.sign * np.asarray(self.model.predict(np.asarray(X, dtype=float)), dtype=float)


def _predict(model: MixtureRegression, weights: Mapping[str, float]) -> float:
    return float(model.predict(np.array([[weights[s] for s in model.sources]]))[0])


def _params(kind: str, rows: int, config: RegMixConfig) -> dict[str, Any]:
    """LightGBM defaults suit hundreds of proxies; a small swarm needs small leaves or the trees never split."""
    if kind != "lightgbm":
        return {}
    return {"num_threads": config.threads, "min_child_samples": max(2, min(10, rows // 4)), **config.lightgbm}


def fit_all(table: pl.DataFrame, sources: list[str],
            config: RegMixConfig) -> tuple[dict[str, FitSummary], dict[str, MixtureRegression]]:
    """Every regressor fitted on the whole swarm, and its K-fold cross-validated Spearman rho."""
    from scipy.stats import spearmanr

    y = table["target"].to_numpy().astype(float)
    n = len(y)
    folds = np.array_split(np.random.default_rng(config.seed).permutation(n), min(config.cv_folds, n))
    fits: dict[str, FitSummary] = {}
    models: dict[str, MixtureRegression] = {}

    def rho(a: np.ndarray, b: np.ndarray) -> float | None:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return None  # a constant prediction ranks nothing
        value = float(spearmanr(a, b).statistic)
        return value if math.isfinite(value) else None

    for kind in REGRESSORS:
        try:
            model = fit_mixture_regression(table, "target", kind=kind, sources=sources,
                                           **_params(kind, n, config))
            oof = np.empty(n)
            for held in folds:
                train = np.setdiff1d(np.arange(n), held)
                part = fit_mixture_regression(table[train.tolist()], "target", kind=kind, sources=sources,
                                              **_params(kind, len(train), config))
                oof[held] = part.predict(table[held.tolist()])
        except ValueError as err:
            fits[kind] = FitSummary(kind, None, None, error=str(err))
            continue
        models[kind] = model
        fits[kind] = FitSummary(kind, rho(oof, y), rho(model.predict(table), y),
                                cv_predictions=[float(v) for v in oof])
    return fits, models


def _chosen_kind(config: RegMixConfig, fits: Mapping[str, FitSummary]) -> str:
    if config.regressor == "best":
        ranked = [(f.cv_spearman, kind) for kind, f in fits.items() if f.error is None and f.cv_spearman is not None]
        if ranked:
            return max(ranked)[1]
        usable = [kind for kind, f in fits.items() if f.error is None]
        if not usable:
            raise RegMixError("no regression could be fitted: " + "; ".join(f"{k}: {f.error}" for k, f in fits.items()))
        return "lightgbm" if "lightgbm" in usable else usable[0]
    fit = fits[config.regressor]
    if fit.error:
        raise RegMixError(f"the {config.regressor} regression could not be fitted ({fit.error}): choose another "
                          "regmix regressor")
    return config.regressor


# ------------------------------------------------------------------------------------------------- outputs


def plot_regmix(report: RegMixReport, path: Path) -> Path:
    """Left: CV-predicted vs measured target over the swarm (and the verify runs); right: chosen vs natural."""
    from mixlab.ablations.plots import plt, save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    measured = [row["target"] for row in report.swarm]
    cv = report.fits[report.regressor].cv_predictions or []
    left.scatter(cv, measured, s=18, color="C0", label=f"swarm ({report.regressor}, out-of-fold)")
    for i, (name, run) in enumerate(report.verify.items()):
        left.scatter([run.predicted], [run.measured], s=60, marker="*", color=f"C{i + 1}", label=f"verify: {name}")
    values = [v for v in [*cv, *measured, *(r.predicted for r in report.verify.values()),
                          *(r.measured for r in report.verify.values())] if math.isfinite(v)]
    if values:
        lo, hi = min(values), max(values)
        left.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    left.set_xlabel(f"predicted {report.target}")
    left.set_ylabel(f"measured {report.target}")
    left.set_title("Predicted vs measured")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    x = np.arange(len(report.sources))
    right.bar(x - 0.2, [report.chosen[s] for s in report.sources], 0.4, label="regmix", color="C1")
    right.bar(x + 0.2, [report.natural[s] for s in report.sources], 0.4, label="natural shares", color="C2")
    right.scatter(x, [min(1.0, report.caps[s]) for s in report.sources], marker="_", s=200, color="black",
                  label="cap")
    right.set_xticks(x, report.sources, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("weight")
    right.set_title("Chosen mixture vs natural shares")
    right.legend(fontsize=7)
    save_figure(fig, path)
    return path
