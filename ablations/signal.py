"""Which eval tasks carry signal at proxy scale: the playbook's four checks, per task, over an ablation's runs.

A task is worth reading only if its score moves with training (monotonicity), moves less between seeds than
between variants (noise), sits clearly above a random guess (above random), and orders the variants the same
way from one evaluation to the next (ranking consistency). Each check is a pure function over a long table
(one row per run, step and task) returning a small dataclass; a check that cannot be computed (one seed, a
constant series, a single variant) returns None with the reason, never NaN and never an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

REQUIRED_COLUMNS = ("run", "seed", "step", "task", "value")


# ---- the input table ------------------------------------------------------------------------
def as_table(table: pl.DataFrame | Iterable[Mapping[str, Any]], variant_column: str | None = "variant"
             ) -> pl.DataFrame:
    """Takes a polars DataFrame or a list of dicts with columns run, seed, step, task, value and the variant
    column (None: each run is its own variant); returns a frame with exactly those columns, run/variant/task
    as strings, step as int and value as float, or raises naming what is missing or malformed."""
    frame = table if isinstance(table, pl.DataFrame) else pl.DataFrame(list(table))
    needed = [*REQUIRED_COLUMNS, *([variant_column] if variant_column else [])]
    missing = [name for name in needed if name not in frame.columns]
    if missing:
        hint = ("; pass variant_column=None if each run is its own variant"
                if variant_column in missing else "")
        raise ValueError(f"signal table lacks column(s) {missing}; it has {frame.columns}. Give one row per "
                         f"run, step and task with columns {needed}{hint}")
    if frame.height == 0:
        raise ValueError("signal table is empty: give at least one evaluation (run, seed, step, task, value)")
    try:
        out = frame.select(
            pl.col("run").cast(pl.Utf8),
            pl.col("seed"),
            pl.col("step").cast(pl.Int64),
            pl.col("task").cast(pl.Utf8),
            pl.col("value").cast(pl.Float64),
            (pl.col(variant_column) if variant_column else pl.col("run")).cast(pl.Utf8).alias("variant"),
        )
    except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError) as exc:
        raise ValueError(f"signal table: step must be an integer and value a number ({exc})") from exc
    nulls = [name for name in out.columns if out[name].null_count()]
    if nulls:
        raise ValueError(f"signal table has empty cells in {nulls}; fill or drop those rows first")
    bad = out.filter(~pl.col("value").is_finite())
    if bad.height:
        where = ", ".join(f"{r['run']}@{r['step']}/{r['task']}" for r in bad.head(5).iter_rows(named=True))
        raise ValueError(f"signal table has {bad.height} non-finite value(s) (e.g. {where}); a diverged run's "
                         "evals carry no signal: drop those rows or the run before checking")
    dups = out.group_by("run", "step", "task").len().filter(pl.col("len") > 1)
    if dups.height:
        where = ", ".join(f"{r['run']}@{r['step']}/{r['task']}" for r in dups.head(5).iter_rows(named=True))
        raise ValueError(f"signal table has {dups.height} repeated (run, step, task) row(s) (e.g. {where}); "
                         "keep one value per evaluation")
    split = out.group_by("run").agg(pl.col("variant").n_unique().alias("n"), pl.col("seed").n_unique().alias("s"))
    split = split.filter((pl.col("n") > 1) | (pl.col("s") > 1))
    if split.height:
        raise ValueError(f"run(s) {sorted(split['run'].to_list())[:5]} carry more than one variant or seed; "
                         "a run must have one of each")
    return out


def _one_task(frame: pl.DataFrame, task: str | None) -> tuple[str, pl.DataFrame]:
    tasks = sorted(frame["task"].unique().to_list())
    if task is None:
        if len(tasks) != 1:
            raise ValueError(f"the table holds tasks {tasks}: name one with task=...")
        task = tasks[0]
    elif task not in tasks:
        raise ValueError(f"task {task!r} not in the table; tasks there: {tasks}")
    return task, frame.filter(pl.col("task") == task)


def _final_step(rows: pl.DataFrame) -> int | None:
    """The last step every run of the task evaluated: finals are compared like with like, so one run that
    stopped early moves the comparison to its last step rather than comparing it against finished runs."""
    common: set[int] | None = None
    for _, group in rows.group_by("run"):
        steps = set(group["step"].to_list())
        common = steps if common is None else common & steps
    return max(common) if common else None


def _finals(rows: pl.DataFrame, step: int) -> pl.DataFrame:
    return rows.filter(pl.col("step") == step).select("run", "seed", "variant", "value")


def _constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) == 0.0)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# ---- monotonicity ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Monotonicity:
    """Spearman rho of score against step, oriented so that +1 means "improves at every evaluation"."""

    rho: float | None                # mean over the runs where it is defined
    per_run: dict[str, float | None]
    reason: str | None = None        # why rho (or some run's rho) is None


def monotonicity(table: pl.DataFrame | Iterable[Mapping[str, Any]], task: str | None = None,
                 higher_is_better: bool = True, variant_column: str | None = "variant") -> Monotonicity:
    """Spearman rho of each run's score against step (ties share ranks), averaged over runs; a loss-like task
    (higher_is_better=False) is negated first, so a falling loss gives +1. A run with fewer than 3 evaluations
    or a constant score has no rho (2 points are always +-1, a constant has no order) and is left out."""
    task, rows = _one_task(as_table(table, variant_column), task)
    sign = 1.0 if higher_is_better else -1.0
    per_run: dict[str, float | None] = {}
    skipped: list[str] = []
    for (run,), group in sorted(rows.group_by("run"), key=lambda item: str(item[0][0])):
        group = group.sort("step")
        values = sign * group["value"].to_numpy()
        why = (f"{run}: {len(values)} evaluation(s), needs 3" if len(values) < 3
               else f"{run}: constant score" if _constant(values) else None)
        if why:
            skipped.append(why)
        per_run[run] = None if why else float(stats.spearmanr(group["step"].to_numpy(), values).statistic)
    defined = [r for r in per_run.values() if r is not None]
    reason = "; ".join(skipped) or None
    if not defined:
        return Monotonicity(None, per_run, f"no run has a defined rho ({reason})")
    return Monotonicity(float(np.mean(defined)), per_run, reason)


# ---- noise over seeds -----------------------------------------------------------------------
@dataclass(frozen=True)
class Noise:
    """Standard deviation over seeds of the final score, per variant and pooled, against the variant spread."""

    std: float | None                   # pooled over variants with >= 2 seeds
    per_variant: dict[str, float | None]
    seeds: dict[str, int]
    step: int | None                    # the final step compared
    spread: float | None = None         # max - min of the variant means at that step (>= 2 variants)
    reason: str | None = None

    @property
    def snr(self) -> float | None:
        """Variant spread over seed std: above 1, the variants differ by more than the seeds do."""
        if self.std is None or self.spread is None:
            return None
        return math.inf if self.std == 0 else self.spread / self.std


def noise(table: pl.DataFrame | Iterable[Mapping[str, Any]], task: str | None = None, ddof: int = 1,
          variant_column: str | None = "variant") -> Noise:
    """Std over seeds of each variant's final score (numpy's std with `ddof`, 1 by default: with 2-5 seeds the
    population std understates the spread), pooled as the root of the dof-weighted mean variance. A variant
    with fewer than 2 seeds has no std."""
    task, rows = _one_task(as_table(table, variant_column), task)
    step = _final_step(rows)
    if step is None:
        return Noise(None, {}, {}, None, None, "the runs share no evaluation step: no common final score")
    finals = _finals(rows, step)
    per_variant: dict[str, float | None] = {}
    seeds: dict[str, int] = {}
    means: list[float] = []
    weighted, dof = 0.0, 0
    for (variant,), group in sorted(finals.group_by("variant"), key=lambda item: str(item[0][0])):
        values = group["value"].to_numpy()
        seeds[variant] = len(values)
        means.append(float(values.mean()))
        if len(values) < 2 or len(values) <= ddof:
            per_variant[variant] = None
            continue
        per_variant[variant] = float(np.std(values, ddof=ddof))
        weighted += (len(values) - ddof) * per_variant[variant] ** 2
        dof += len(values) - ddof
    spread = float(max(means) - min(means)) if len(means) >= 2 else None
    lone = [v for v, s in per_variant.items() if s is None]
    reason = f"variant(s) {lone} have fewer than 2 seeds at step {step}" if lone else None
    if dof == 0:
        return Noise(None, per_variant, seeds, step, spread, f"no variant has >= 2 seeds at step {step}: "
                     "add seeds to the ablation to measure noise")
    return Noise(math.sqrt(weighted / dof), per_variant, seeds, step, spread, reason)


# ---- above random ---------------------------------------------------------------------------
Chance = float | Mapping[str, float]
"""A task's chance level: one for every run, or one per variant (e.g. bpb under a tokenizer axis, where each
variant's uniform guess depends on its own vocabulary)."""


@dataclass(frozen=True)
class AboveRandom:
    """How far the final score sits from chance, in the better direction, against its error."""

    final: float                        # mean final score over runs
    chance: float                       # the chance level, or the mean of the runs' own levels per variant
    margin: float                       # final - chance (chance - final when lower is better)
    stderr: float | None                # of the mean: binomial from n_items, else over runs
    seed_std: float | None
    k: float
    above: bool | None                  # margin > k * max(stderr, seed_std); None when neither is known
    per_variant: dict[str, float] = field(default_factory=dict)  # each variant's margin
    step: int | None = None
    reason: str | None = None
    chance_per_variant: dict[str, float] | None = None  # each variant's own level; None for one level for all


def _variant_levels(task: str, variants: Iterable[str], chance: Mapping[str, float]) -> dict[str, float]:
    """The per-variant chance levels of the variants present, or an error naming those without one."""
    present = sorted(set(variants))
    lacking = [v for v in present if v not in chance]
    if lacking:
        raise ValueError(f"task {task!r}: no chance level for variant(s) {lacking}; give one per variant or "
                         "drop those variants' rows")
    return {v: float(chance[v]) for v in present}


def above_random(table: pl.DataFrame | Iterable[Mapping[str, Any]], chance: Chance, task: str | None = None,
                 higher_is_better: bool = True, k: float = 2.0, n_items: int | None = None, ddof: int = 1,
                 variant_column: str | None = "variant") -> AboveRandom:
    """The mean final score against `chance` (e.g. 1/num_choices for accuracy, log(vocab) for a loss). It is
    above random when the margin exceeds k times the larger of the standard error (binomial with `n_items`
    for an accuracy, else std over runs / sqrt(runs)) and the seed std: a margin that seeds or item sampling
    could erase is no margin. A mapping variant -> level measures each run from its own variant's level: the
    check runs on score - level, so `chance` is then the mean level over the final runs (and the margin the
    mean of the runs' margins); a constant per variant leaves the seed std unchanged."""
    task, rows = _one_task(as_table(table, variant_column), task)
    step = _final_step(rows)
    if step is None:
        raise ValueError(f"task {task!r}: the runs share no evaluation step, so there is no final score to "
                         "compare with chance; evaluate every run at its last step")
    finals = _finals(rows, step)
    values = finals["value"].to_numpy()
    levels: dict[str, float] | None = None
    if isinstance(chance, Mapping):
        levels = _variant_levels(task, rows["variant"].to_list(), chance)
        run_chance = np.array([levels[v] for v in finals["variant"].to_list()])
        level = float(run_chance.mean())
    else:
        level = float(chance)
        run_chance = np.full(len(values), level)
    final = float(values.mean())
    sign = 1.0 if higher_is_better else -1.0
    margin = sign * (final - level)
    per_variant = {v: sign * (float(g["value"].mean()) - (level if levels is None else levels[v]))
                   for (v,), g in sorted(finals.group_by("variant"), key=lambda item: str(item[0][0]))}
    if n_items is not None:
        if n_items < 1:
            raise ValueError(f"task {task!r}: n_items must be >= 1, got {n_items}")
        p = min(max(final, 0.0), 1.0)
        stderr: float | None = math.sqrt(p * (1 - p) / (n_items * len(values)))
    elif len(values) >= 2:
        stderr = float(np.std(values - run_chance, ddof=1) / math.sqrt(len(values)))
    else:
        stderr = None
    seed_std = noise(rows, task, ddof=ddof, variant_column="variant").std
    scales = [s for s in (stderr, seed_std) if s is not None]
    if not scales:
        return AboveRandom(final, level, margin, None, None, k, None, per_variant, step,
                           "one run and no item count: no error to compare the margin with; give n_items or "
                           "more seeds", levels)
    bar = k * max(scales)
    above = margin > bar
    against = (f"over chance {_fmt(level)}" if levels is None
               else f"{'above' if higher_is_better else 'below'} the variants' own chance levels")
    reason = None if above else f"margin {_fmt(margin)} {against} is within {k:g} x {_fmt(max(scales))}"
    return AboveRandom(final, level, margin, stderr, seed_std, k, above, per_variant, step, reason, levels)


# ---- ranking consistency --------------------------------------------------------------------
@dataclass(frozen=True)
class RankingConsistency:
    """Kendall tau (tau-b: ties allowed) between the variant rankings at consecutive last evaluations."""

    tau: float | None                                 # mean over the defined pairs
    pairs: list[tuple[int, int, float | None]]        # (step, next step, tau)
    steps: list[int]
    reason: str | None = None


def ranking_consistency(table: pl.DataFrame | Iterable[Mapping[str, Any]], task: str | None = None,
                        last: int = 3, variant_column: str | None = "variant") -> RankingConsistency:
    """Ranks the variants by their mean score over seeds at each of the `last` evaluation steps every variant
    reached, and averages Kendall tau over consecutive pairs. The direction does not matter: both rankings
    flip together. A step where all variants tie has no ranking, so its pairs are None."""
    if last < 2:
        raise ValueError(f"last must be >= 2 evaluations to compare rankings, got {last}")
    task, rows = _one_task(as_table(table, variant_column), task)
    means = rows.group_by("variant", "step").agg(pl.col("value").mean())
    variants = sorted(means["variant"].unique().to_list())
    if len(variants) < 2:
        return RankingConsistency(None, [], [], f"one variant ({variants[0]}): nothing to rank")
    per_step = means.group_by("step").agg(pl.col("variant").n_unique().alias("n"))
    steps = sorted(per_step.filter(pl.col("n") == len(variants))["step"].to_list())[-last:]
    if len(steps) < 2:
        return RankingConsistency(None, [], steps, f"variants share {len(steps)} evaluation step(s); "
                                                   "needs 2 to compare rankings")
    wide = means.filter(pl.col("step").is_in(steps)).sort("variant")
    score = {s: wide.filter(pl.col("step") == s).sort("variant")["value"].to_numpy() for s in steps}
    pairs: list[tuple[int, int, float | None]] = []
    for a, b in zip(steps, steps[1:], strict=False):
        if _constant(score[a]) or _constant(score[b]):
            pairs.append((a, b, None))
        else:
            pairs.append((a, b, float(stats.kendalltau(score[a], score[b]).statistic)))
    defined = [t for _, _, t in pairs if t is not None]
    tied = [f"{a}->{b}" for a, b, t in pairs if t is None]
    reason = f"all variants tie at step pair(s) {tied}" if tied else None
    if not defined:
        return RankingConsistency(None, pairs, steps, reason)
    return RankingConsistency(float(np.mean(defined)), pairs, steps, reason)


# ---- the verdict per task -------------------------------------------------------------------
@dataclass(frozen=True)
class SignalThresholds:
    """What a task must show to be trusted; defaults follow the playbook's reading of its four checks."""

    min_rho: float = 0.5     # monotonicity: the score mostly improves with training
    min_snr: float = 1.0     # noise: variants differ by more than the seed std
    k: float = 2.0           # above random: margin > k x max(stderr, seed std)
    min_tau: float = 0.5     # ranking: variants keep their order across the last evaluations
    last: int = 3            # evaluation steps compared for the ranking
    ddof: int = 1            # seed std


@dataclass(frozen=True)
class TaskSignal:
    """The four checks for one task and whether to trust it, with the reason in words."""

    task: str
    higher_is_better: bool
    monotonicity: Monotonicity
    noise: Noise
    above_random: AboveRandom
    ranking: RankingConsistency
    trustworthy: bool
    reason: str


def _verdict(mono: Monotonicity, nz: Noise, ar: AboveRandom, rank: RankingConsistency,
             th: SignalThresholds) -> tuple[bool, str]:
    """Every check must pass; one that cannot be computed fails with its reason, since unknown is not trusted."""
    good: list[str] = []
    bad: list[str] = []

    def judge(ok: bool | None, passed: str, failed: str, unknown: str) -> None:
        (good if ok else bad).append(passed if ok else (failed if ok is False else f"cannot judge {unknown}"))

    judge(None if mono.rho is None else mono.rho >= th.min_rho,
          f"monotonic (rho {_fmt(mono.rho or 0)})",
          f"not monotonic (rho {_fmt(mono.rho or 0)} < {th.min_rho:g})", f"monotonicity: {mono.reason}")
    snr = nz.snr
    judge(None if snr is None else snr >= th.min_snr,
          f"low noise (seed std {_fmt(nz.std or 0)}, variant spread {_fmt(nz.spread or 0)})",
          f"noisy (seed std {_fmt(nz.std or 0)} vs variant spread {_fmt(nz.spread or 0)})",
          "noise: " + (nz.reason if nz.std is None else "one variant, no spread to compare with"))
    judge(ar.above, f"above random (margin {_fmt(ar.margin)})", f"not above random ({ar.reason})",
          f"above random: {ar.reason}")
    judge(None if rank.tau is None else rank.tau >= th.min_tau,
          f"stable ranking (tau {_fmt(rank.tau or 0)})",
          f"ranking flips (tau {_fmt(rank.tau or 0)} < {th.min_tau:g})", f"ranking: {rank.reason}")
    return (not bad), "; ".join(bad) if bad else ", ".join(good)


def task_signal(table: pl.DataFrame | Iterable[Mapping[str, Any]], chance: Mapping[str, Chance],
                higher_is_better: Mapping[str, bool], n_items: Mapping[str, int] | None = None,
                thresholds: SignalThresholds | None = None, variant_column: str | None = "variant",
                tasks: Sequence[str] | None = None) -> list[TaskSignal]:
    """All four checks for every task in the table (or `tasks`, in that order; else sorted by task), each with a
    verdict. Every task needs a chance level (one number, or a mapping variant -> level: see above_random) and a
    direction; `n_items` (items per task) gives accuracies a binomial error."""
    th = thresholds or SignalThresholds()
    frame = as_table(table, variant_column)
    names = sorted(frame["task"].unique().to_list()) if tasks is None else list(tasks)
    for label, given in (("chance", chance), ("higher_is_better", higher_is_better)):
        lacking = [t for t in names if t not in given]
        if lacking:
            raise ValueError(f"{label} has no entry for task(s) {lacking}: give one per task "
                             f"(chance: 1/num_choices for accuracy; higher_is_better: False for a loss)")
    out: list[TaskSignal] = []
    for task in names:
        _, rows = _one_task(frame, task)
        hib = bool(higher_is_better[task])
        level = chance[task]
        mono = monotonicity(rows, task, hib, variant_column="variant")
        nz = noise(rows, task, ddof=th.ddof, variant_column="variant")
        ar = above_random(rows, level if isinstance(level, Mapping) else float(level), task, hib, th.k,
                          None if n_items is None else n_items.get(task), th.ddof, variant_column="variant")
        rank = ranking_consistency(rows, task, th.last, variant_column="variant")
        ok, why = _verdict(mono, nz, ar, rank, th)
        out.append(TaskSignal(task, hib, mono, nz, ar, rank, ok, why))
    return out


SIGNAL_TABLE_SCHEMA = {
    "task": pl.Utf8, "higher_is_better": pl.Boolean, "rho": pl.Float64, "seed_std": pl.Float64,
    "variant_spread": pl.Float64, "final": pl.Float64, "chance": pl.Float64, "margin": pl.Float64,
    "above_random": pl.Boolean, "tau": pl.Float64, "trustworthy": pl.Boolean, "reason": pl.Utf8,
    "chance_per_variant": pl.Utf8,
}


def _chance_per_variant(levels: Mapping[str, float] | None) -> str | None:
    """`variant level, ...` (4 significant digits) for the table; None where one level serves every run."""
    return None if levels is None else ", ".join(f"{v} {c:.4g}" for v, c in sorted(levels.items()))


def signal_table(table: pl.DataFrame | Iterable[Mapping[str, Any]], chance: Mapping[str, Chance],
                 higher_is_better: Mapping[str, bool], n_items: Mapping[str, int] | None = None,
                 thresholds: SignalThresholds | None = None, variant_column: str | None = "variant",
                 tasks: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per task for the report: the four checks as numbers (null where not computable), the verdict
    and its reason. With per-variant chance levels `chance` is their mean over the final runs and
    `chance_per_variant` lists them (null where the task has one level)."""
    rows = [{
        "task": s.task,
        "higher_is_better": s.higher_is_better,
        "rho": s.monotonicity.rho,
        "seed_std": s.noise.std,
        "variant_spread": s.noise.spread,
        "final": s.above_random.final,
        "chance": s.above_random.chance,
        "margin": s.above_random.margin,
        "above_random": s.above_random.above,
        "tau": s.ranking.tau,
        "trustworthy": s.trustworthy,
        "reason": s.reason,
        "chance_per_variant": _chance_per_variant(s.above_random.chance_per_variant),
    } for s in task_signal(table, chance, higher_is_better, n_items, thresholds, variant_column, tasks)]
    return pl.DataFrame(rows, schema=SIGNAL_TABLE_SCHEMA)
