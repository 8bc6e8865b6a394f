"""The planner: what a schedule will draw from each source and selection, checked before any training.

A plan answers, per leaf (a source or a named selection) and stage: how many tokens exist, how many the run draws,
and how many passes over the data that makes. It refuses what would waste or break a run, naming the stage and the
leaf and what to change:
- a leaf repeated past its epoch limit: past ~4 epochs repeated tokens lose most of their value (Muennighoff et al.,
  2023, "Scaling Data-Constrained Language Models"), so 30 passes over a small source is almost always a mistake;
- NaN, negative or all-zero weights, weights that do not sum to 1 (unless normalisation is asked for);
- an unknown source, or a selection that matches nothing;
- stage bounds that overlap or leave gaps.
It warns about weights too small to give a leaf one sequence per hundred steps (Megatron-LM crashed building its
blend index for a 0.001/0.999 mixture, NVIDIA/Megatron-LM#705) and about leaves that are never drawn.
`mixlab mix plan` prints the plan; `mixlab train` refuses the same things before a run directory exists.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from mixlab.curation.manifest import ShardManifest
from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError
from mixlab.mixtures.selection import leaf_problems as realisation_problems
from mixlab.mixtures.selection import leaf_tokens

DEFAULT_MAX_EPOCHS = 4.0
MIN_ROWS_PER_100_STEPS = 1.0  # below one sequence per hundred steps a weight is noise (and crashed Megatron-LM)
BOUND_KEYS = ("fraction", "tokens", "steps", "start_step")
_WEIGHT_SAMPLES_PER_STAGE = 33  # steps inspected per stage for small weights (start, end and a curriculum between)


class PlanError(ScheduleError):
    """A mixture that the planner refuses; the message lists every refusal, each naming stage, leaf and fix."""


@dataclass
class PlanLimits:
    """How far a run may repeat its sources: `max_epochs` for every source, `max_epochs_by_source` per source."""

    max_epochs: float = DEFAULT_MAX_EPOCHS
    max_epochs_by_source: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in {"max_epochs": self.max_epochs, **self.max_epochs_by_source}.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise PlanError(f"plan: the epoch limit of {name} must be a positive number, got {value!r}")

    def limit(self, source: str) -> float:
        return float(self.max_epochs_by_source.get(source, self.max_epochs))

    def to_dict(self) -> dict[str, Any]:
        return {"max_epochs": self.max_epochs, "max_epochs_by_source": dict(self.max_epochs_by_source)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PlanLimits:
        unknown = sorted(set(values) - {"max_epochs", "max_epochs_by_source"})
        if unknown:
            raise PlanError(f"plan: unknown fields {unknown}; known: ['max_epochs', 'max_epochs_by_source']")
        return cls(**dict(values))


# ---- the plan ------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One resolved stage: steps [start_step, end_step) of `seq_len` tokens per row."""

    name: str
    index: int
    start_step: int
    end_step: int
    seq_len: int
    tokens: int  # trained positions: steps * batch_size * seq_len

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


@dataclass
class LeafPlan:
    """One leaf over the run: what exists, what each stage draws, and the passes over the data that makes."""

    name: str
    kind: str  # "source" or "selection"
    available_tokens: int
    limit: float
    rows_by_stage: dict[str, float] = field(default_factory=dict)  # expected sequences drawn per stage
    tokens_by_stage: dict[str, float] = field(default_factory=dict)  # rows * the stage's seq_len
    windows_by_stage: dict[str, int] = field(default_factory=dict)  # (tokens - 1) // stage seq_len
    share_by_stage: dict[str, float] = field(default_factory=dict)  # its share of the stage's rows
    epochs: float = 0.0  # sum over stages of rows / windows
    repeats: int = 1  # how often a pass shows its most repeated document (a selection's long-document factor)

    @property
    def document_repeats(self) -> float:
        """What the epoch limit bounds: the most times one document is seen (epochs x long-document factor)."""
        return self.epochs * self.repeats

    @property
    def tokens_drawn(self) -> float:
        return sum(self.tokens_by_stage.values())

    @property
    def rows_drawn(self) -> float:
        return sum(self.rows_by_stage.values())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "available_tokens": self.available_tokens,
                "limit": self.limit, "epochs": self.epochs, "repeats": self.repeats,
                "document_repeats": self.document_repeats, "tokens_drawn": self.tokens_drawn,
                "tokens_by_stage": dict(self.tokens_by_stage), "rows_by_stage": dict(self.rows_by_stage),
                "windows_by_stage": dict(self.windows_by_stage), "share_by_stage": dict(self.share_by_stage)}


@dataclass
class MixturePlan:
    """A schedule laid over a budget and the data that exists; `problems` are refusals, `warnings` are not."""

    total_steps: int
    batch_size: int
    seq_len: int
    limits: PlanLimits
    schedule: MixtureSchedule | None = None  # the flat schedule that was resolved (None: it could not be built)
    resolved: Any = None  # the ResolvedSchedule (None when the schedule could not be resolved)
    stages: list[StagePlan] = field(default_factory=list)
    leaves: dict[str, LeafPlan] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    flattening: str = ""  # explain_flattening() of a hierarchical schedule

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def total_tokens(self) -> int:
        return sum(stage.tokens for stage in self.stages)

    def check(self) -> None:
        """Raise PlanError listing every refusal (not only the first)."""
        if self.problems:
            raise PlanError("the planner refuses this mixture:\n  " + "\n  ".join(self.problems))

    def table(self) -> str:
        """The plan as text: the budget, each stage's bounds, and per leaf the tokens available and drawn."""
        lines = [f"budget: {self.total_steps:,d} steps x {self.batch_size} sequences = {self.total_tokens:,d} "
                 f"tokens (run seq_len {self.seq_len})" if self.stages else
                 f"budget: {self.total_steps:,d} steps x {self.batch_size} sequences of {self.seq_len} tokens; "
                 "the schedule could not be laid over it (see below)"]
        for st in self.stages:
            lines.append(f"  stage {st.name!r}: steps [{st.start_step:,d}, {st.end_step:,d}), seq_len {st.seq_len}, "
                         f"{st.tokens:,d} tokens")
        if self.flattening:
            lines += ["", "hierarchical weights, flattened by the available tokens:",
                      *("  " + line for line in self.flattening.splitlines())]
        if self.leaves:
            width = max(14, *(len(name) for name in self.leaves))
            stage_cols = [st.name for st in self.stages]
            col = max(12, *(len(n) + 2 for n in stage_cols)) if stage_cols else 12
            header = f"{'leaf':{width}s} {'kind':9s} {'available':>12s} " + " ".join(
                f"{n:>{col}s}" for n in stage_cols) + f" {'drawn':>12s} {'epochs':>7s} {'limit':>5s}"
            lines += ["", "tokens available, drawn per stage, and epochs over the run:", header]
            for name, leaf in sorted(self.leaves.items()):
                cells = " ".join(f"{leaf.tokens_by_stage.get(n, 0.0):>{col},.0f}" for n in stage_cols)
                row = (f"{name:{width}s} {leaf.kind:9s} {leaf.available_tokens:>12,d} {cells} "
                       f"{leaf.tokens_drawn:>12,.0f} {leaf.epochs:>7.2f} {leaf.limit:>5g}")
                if leaf.epochs > leaf.limit:
                    row += f"  <- over the limit of {leaf.limit:g}"
                lines.append(row)
        if self.warnings:
            lines += ["", "warnings:", *(f"  {w}" for w in self.warnings)]
        if self.problems:
            lines += ["", "refused:", *(f"  {p}" for p in self.problems)]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """A PNG of the token share of each leaf over training (stacked), stage boundaries marked."""
        if self.resolved is None:
            raise PlanError("the plan has no resolved schedule to plot: " + "; ".join(self.problems))
        from mixlab.mixtures.plan_plot import plot_token_shares

        return plot_token_shares(self, Path(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_steps": self.total_steps, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "total_tokens": self.total_tokens, "limits": self.limits.to_dict(),
            "stages": [{"name": s.name, "index": s.index, "start_step": s.start_step, "end_step": s.end_step,
                        "seq_len": s.seq_len, "tokens": s.tokens} for s in self.stages],
            "leaves": {name: leaf.to_dict() for name, leaf in sorted(self.leaves.items())},
            "problems": list(self.problems), "warnings": list(self.warnings), "flattening": self.flattening,
            "ok": self.ok,
        }


# ---- planning ------------------------------------------------------------------------------------
def plan_mixture(
    schedule: MixtureSchedule | Mapping[str, Any] | str | Path,
    available_tokens: Mapping[str, int],
    total_steps: int,
    batch_size: int,
    seq_len: int,
    limits: PlanLimits | None = None,
    *,
    normalize: bool | None = None,
    leaf_problems: Sequence[str] = (),
) -> MixturePlan:
    """Lay `schedule` over `total_steps` global batches of `batch_size` rows and the tokens of each leaf.

    `schedule` may also be a schedule document (a mapping, YAML text or a file): then every stage that cannot be
    built is reported, not only the first. `available_tokens` holds the train tokens of every leaf (sources and
    selections) and may name more sources: curated sources no stage uses are warned about. `normalize` overrides
    the schedule's own choice of normalising weights that do not sum to 1. `leaf_problems` are refusals found
    against a manifest (`mixtures.selection.leaf_problems`), reported with the plan's own.
    """
    limits = limits or PlanLimits()
    for name, value in (("total_steps", total_steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"plan: {name} must be a whole number >= 1, got {value!r}")
    plan = MixturePlan(total_steps=total_steps, batch_size=batch_size, seq_len=seq_len, limits=limits)
    plan.problems += [p for p in leaf_problems if p not in plan.problems]

    built, problems = _build_schedule(schedule, normalize, total_steps, batch_size, seq_len)
    plan.problems += problems
    if built is None:  # still name the unknown leaves of the stages that could be read
        for part in _stages_alone(schedule, normalize):
            for leaf in part.sources:
                if leaf not in available_tokens and leaf not in part.selection_names and repr(leaf) not in \
                        " ".join(plan.problems):
                    plan.problems.append(
                        f"stage(s) {_quoted(s.name for s in part.stages)} weight {leaf!r}, which is neither a "
                        f"tokenized source nor a selection of this data (known: {sorted(available_tokens)}): fix "
                        "the name, tokenize the source, define the selection, or remove it from the stage")
        return plan
    if not built.is_flat:
        try:
            plan.flattening = built.explain_flattening(available_tokens)
            built = built.flatten(available_tokens)
        except (ScheduleError, KeyError) as err:
            plan.problems.append(f"the hierarchical weights cannot be flattened: {_text(err)}")
            return plan
    plan.schedule = built
    try:
        resolved = built.resolve(total_steps, batch_size, seq_len)
    except ScheduleError as err:
        plan.problems.append(str(err))
        return plan
    plan.resolved = resolved
    for rs in resolved.stages:
        plan.stages.append(StagePlan(rs.name, rs.index, rs.start_step, rs.end_step, rs.seq_len,
                                     (rs.end_step - rs.start_step) * batch_size * rs.seq_len))
    _fill_leaves(plan, built, resolved, available_tokens)
    _leaf_refusals(plan, built, available_tokens)
    _leaf_warnings(plan, built, resolved, available_tokens)
    return plan


def plan_for_manifest(
    manifest: Any,
    schedule: MixtureSchedule | Mapping[str, Any] | str | Path,
    total_steps: int,
    batch_size: int,
    seq_len: int,
    limits: PlanLimits | None = None,
    *,
    normalize: bool | None = None,
    split: str = "train",
) -> MixturePlan:
    """The plan of a schedule over a tokenized manifest: token counts of sources and selections come from the
    manifest and the documents' sidecars (no token is read), and unknown leaves are refused by name."""
    if not isinstance(manifest, ShardManifest):
        manifest = ShardManifest.load(manifest)
    available = {name: int(src.tokens.get(split, 0)) for name, src in manifest.sources.items()
                 if src.tokens.get(split)}
    built, problems = _build_schedule(schedule, normalize, total_steps, batch_size, seq_len)
    if built is None:  # every problem of the document, and those of its readable stages' leaves
        found = list(dict.fromkeys(p for part in _stages_alone(schedule, normalize)
                                   for p in realisation_problems(manifest, part)))
        return plan_mixture(schedule, available, total_steps, batch_size, seq_len, limits, normalize=normalize,
                            leaf_problems=found)
    found = list(realisation_problems(manifest, built))
    selections = tuple(built.selections)
    for leaf in built.sources:  # one by one: a leaf that cannot be counted is already in `found`
        try:
            available.update(leaf_tokens(manifest, [leaf], selections, split))
        except ValueError:
            continue
    return plan_mixture(built, available, total_steps, batch_size, seq_len, limits, leaf_problems=found)


def _build_schedule(schedule: MixtureSchedule | Mapping[str, Any] | str | Path, normalize: bool | None,
                    total_steps: int, batch_size: int, seq_len: int) -> tuple[MixtureSchedule | None, list[str]]:
    """The schedule object, or None and every problem that stops it from being built."""
    if isinstance(schedule, MixtureSchedule):
        if normalize is not None and schedule.normalize != normalize:
            try:
                schedule = replace(schedule, normalize=normalize)
            except ValueError as err:
                return None, [str(err)]
        return schedule, []
    where = ""
    if isinstance(schedule, str | Path):
        where, data = _read_document(schedule)
    else:
        data = dict(schedule)
    if not isinstance(data, Mapping):
        return None, [f"{where or 'schedule'}: expected a mapping with `stages`"]
    prefix = f"{where}: " if where else ""
    if "data_stages" in data:  # a nanotron config
        try:
            return MixtureSchedule.from_nanotron_config(data), []
        except ScheduleError as err:
            return None, [prefix + str(err)]
    data = dict(data)
    if normalize is not None:
        data["normalize"] = normalize
    try:
        return MixtureSchedule.from_dict(data), []
    except ValueError as err:  # ScheduleError, or a selection's own error
        first = str(err)
    problems = [prefix + p for p in _document_problems(data, total_steps, batch_size, seq_len)]
    return None, problems or [prefix + first]


def _stages_alone(schedule: Mapping[str, Any] | str | Path | MixtureSchedule,
                  normalize: bool | None) -> list[MixtureSchedule]:
    """Each stage of a document that can be built on its own (bounds aside): its leaves can still be checked."""
    if isinstance(schedule, MixtureSchedule):
        return []
    data = _read_document(schedule)[1] if isinstance(schedule, str | Path) else schedule
    stages = data.get("stages") if isinstance(data, Mapping) else None
    if not isinstance(stages, list):
        return []
    parts = []
    for raw in stages:
        if not isinstance(raw, Mapping):
            continue
        alone = {k: v for k, v in raw.items() if k not in BOUND_KEYS}
        document = {**data, "stages": [alone], **({} if normalize is None else {"normalize": normalize})}
        try:
            parts.append(MixtureSchedule.from_dict(document))
        except ValueError:
            continue
    return parts


def _document_problems(data: Mapping[str, Any], total_steps: int, batch_size: int, seq_len: int) -> list[str]:
    """Every stage that cannot be built on its own, then the bounds of all stages together (weights aside)."""
    stages = data.get("stages")
    if not isinstance(stages, list) or not all(isinstance(s, Mapping) for s in stages):
        return []
    problems = []
    for raw in stages:
        alone = {k: v for k, v in raw.items() if k not in BOUND_KEYS}
        try:
            MixtureSchedule.from_dict({**data, "stages": [alone]})
        except ValueError as err:
            problems.append(str(err))
    placeholder = {k: v for k, v in data.items() if k != "selections"}
    bounds_only = [{**{k: v for k, v in raw.items() if k not in ("weights", "curriculum")},
                    "weights": {"any": 1.0}} for raw in stages]
    try:
        MixtureSchedule.from_dict({**placeholder, "stages": bounds_only}).resolve(total_steps, batch_size, seq_len)
    except ValueError as err:
        problems.append(str(err))
    return list(dict.fromkeys(problems))


def _read_document(source: str | Path) -> tuple[str, Any]:
    text = str(source)
    if isinstance(source, Path) or ("\n" not in text and Path(text).is_file()):
        path = Path(source)
        if not path.is_file():
            raise PlanError(f"{path}: no such schedule file")
        try:
            return str(path), yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PlanError(f"{path}: not valid YAML ({err})") from err
    try:
        return "schedule text", yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PlanError(f"schedule text: not valid YAML ({err})") from err


def _fill_leaves(plan: MixturePlan, schedule: MixtureSchedule, resolved: Any,
                 available_tokens: Mapping[str, int]) -> None:
    selections = {s.name: s for s in schedule.selections}
    for leaf in resolved.sources:
        long_docs = selections[leaf].long_docs if leaf in selections else None
        plan.leaves[leaf] = LeafPlan(leaf, "selection" if leaf in selections else "source",
                                     int(available_tokens.get(leaf, 0)), plan.limits.limit(leaf),
                                     repeats=long_docs.factor if long_docs else 1)
    for st in plan.stages:
        rows = resolved.expected_rows(st.index) if st.steps else {}
        tokens = resolved.expected_tokens(st.index) if st.steps else {}
        stage_rows = st.steps * plan.batch_size
        for leaf, lp in plan.leaves.items():
            r, t = float(rows.get(leaf, 0.0)), float(tokens.get(leaf, 0.0))
            windows = max(0, (lp.available_tokens - 1) // st.seq_len)
            lp.rows_by_stage[st.name], lp.tokens_by_stage[st.name] = r, t
            lp.windows_by_stage[st.name] = windows
            lp.share_by_stage[st.name] = r / stage_rows if stage_rows else 0.0
            if r > 0:
                lp.epochs += r / windows if windows else math.inf


def _kind(plan: MixturePlan, leaf: str) -> str:
    return plan.leaves[leaf].kind if leaf in plan.leaves else "source"


def _leaf_refusals(plan: MixturePlan, schedule: MixtureSchedule, available_tokens: Mapping[str, int]) -> None:
    named_elsewhere = " ".join(plan.problems)
    for leaf, lp in sorted(plan.leaves.items()):
        using = [st for st in plan.stages if lp.rows_by_stage.get(st.name, 0.0) > 0]
        naming = [stage.name for stage in schedule.stages if leaf in stage.leaves]
        if repr(leaf) in named_elsewhere and (leaf not in available_tokens or not lp.available_tokens):
            continue  # the manifest check already said what is wrong with it
        if leaf not in available_tokens:
            plan.problems.append(
                f"stage(s) {_quoted(naming)} weight {lp.kind} {leaf!r}, which is neither a tokenized source nor a "
                f"selection of this data (known: {sorted(available_tokens)}): fix the name, tokenize the source, "
                "define the selection, or remove it from the stage")
            continue
        if lp.available_tokens == 0:
            plan.problems.append(
                f"{lp.kind} {leaf!r} (weighted by stage(s) {_quoted(naming)}) has no train tokens: "
                + ("widen its source pattern or `where` filters" if lp.kind == "selection" else "tokenize it")
                + ", or remove it from the stage(s)")
            continue
        short = [st for st in using if lp.windows_by_stage[st.name] == 0]
        if short:
            plan.problems.append(
                f"{lp.kind} {leaf!r} has {lp.available_tokens:,d} train tokens, fewer than one window of "
                f"seq_len + 1 in stage(s) {_quoted([st.name for st in short])} (seq_len "
                f"{', '.join(str(st.seq_len) for st in short)}): give it more data, a shorter seq_len, or weight 0 there")
            continue
        if lp.document_repeats > lp.limit:
            stages = ", ".join(f"{st.name!r} ({lp.share_by_stage[st.name]:.1%})" for st in using)
            upsampled = (f" ({lp.epochs:.1f} passes, its long documents {lp.repeats}x in each: lower "
                         "long_docs.factor too)" if lp.repeats > 1 else "")
            plan.problems.append(
                f"{lp.kind} {leaf!r} would be repeated {lp.document_repeats:.1f} times{upsampled} (limit "
                f"{lp.limit:g}) by stage(s) {stages}: "
                f"lower its weight there, shorten the run, add data to it, or raise the limit with "
                f"plan.max_epochs_by_source.{leaf} (or plan.max_epochs)")


def _leaf_warnings(plan: MixturePlan, schedule: MixtureSchedule, resolved: Any,
                   available_tokens: Mapping[str, int]) -> None:
    batch = plan.batch_size
    for st in plan.stages:
        if not st.steps:
            plan.warnings.append(f"stage {st.name!r} gets no step of the {plan.total_steps:,d}: lengthen the run "
                                 "or its bound, or remove it")
            continue
        smallest: dict[str, float] = {}
        for step in _sample_steps(st.start_step, st.end_step):
            for leaf, w in resolved.weights_at_step(step).items():
                if w > 0:
                    smallest[leaf] = min(w, smallest.get(leaf, w))
        for leaf, w in sorted(smallest.items()):
            if w * batch * 100 < MIN_ROWS_PER_100_STEPS:
                plan.warnings.append(
                    f"stage {st.name!r}: {_kind(plan, leaf)} {leaf!r} has weight {w:.3g}, {w * batch * 100:.3g} "
                    f"sequences per 100 steps at batch {batch}: too small to be sampled evenly (Megatron-LM's "
                    f"blended index crashed on a 0.001/0.999 mixture, NVIDIA/Megatron-LM#705); raise it to at least "
                    f"{1 / (batch * 100):.2g} or set it to 0")
    for leaf, lp in sorted(plan.leaves.items()):
        if lp.rows_drawn == 0 and leaf in available_tokens:
            plan.warnings.append(f"{lp.kind} {leaf!r} is never drawn (weight 0 wherever it is named): give it a "
                                 "weight or remove it from the schedule")
    patterns = [s.source for s in schedule.selections]
    unused = {name: tokens for name, tokens in sorted(available_tokens.items())
              if name not in plan.leaves and not any(fnmatch.fnmatchcase(name, p) for p in patterns if p)}
    if unused:
        listed = ", ".join(f"{name} ({tokens:,d} train tokens)" for name, tokens in unused.items())
        plan.warnings.append(f"the schedule leaves out curated source(s) {listed}: they are never drawn; give "
                             "them a weight in a stage to train on them")


def _sample_steps(start: int, end: int) -> list[int]:
    """A few steps of [start, end): both ends and evenly spaced ones (a curriculum moves in between)."""
    count = min(end - start, _WEIGHT_SAMPLES_PER_STAGE)
    if count <= 1:
        return [start]
    return sorted({start + round(i * (end - 1 - start) / (count - 1)) for i in range(count)})


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "(none)"


def _text(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


# ---- the older entry points (kept: callers and tests use them) -------------------------------------
