"""SmolLM3's pre-training mixture at proxy scale: the real three stages, projected onto the demo's sources.

SmolLM3 was trained in three stages (`../shared/reference/smollm3/pretraining_3_stages.yaml`: stable from step 1,
stable 2 from step 3,450,001, decay from step 4,198,001 of 4,720,000) over ~70 datasets, then extended to long
context (`long_context_4k_to_32k.yaml`). This recipe imports those stages from the shipped nanotron configs,
groups every dataset into the demo source it resembles (web in five languages, Python code, math), keeps the
stage boundaries as shares of the run, optionally appends a long-context stage at a longer sequence length, plans
the result (table and PNG, refusing what the planner refuses) and trains it on the demo corpus.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mixlab.mixtures.nanotron import read_nanotron_config
from mixlab.mixtures.planner import PlanLimits
from mixlab.mixtures.schedule import MixtureSchedule, ScheduleError, Stage

log = logging.getLogger("mixlab.smollm3")

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm3"
PRETRAINING_CONFIG = REFERENCE_DIR / "pretraining_3_stages.yaml"
LONG_CONTEXT_CONFIG = REFERENCE_DIR / "long_context_4k_to_32k.yaml"
DECAY_STAGE = "decay stage"  # the stage of the shipped config where SmolLM3's learning rate anneals

# FineWeb2 languages the demo corpus has; SmolLM3's other languages have no demo source and are dropped.
_FW2_LANGUAGES = {"fra": "web-fr", "deu": "web-de", "spa": "web-es", "rus": "web-ru"}
# (pattern, demo source or None to drop); the first match wins, and a name no pattern matches is an error,
# so a changed upstream config is noticed rather than silently projected.
_PROJECTION: tuple[tuple[str, str | None], ...] = (
    (r"^fw2-", "fw2"),  # resolved by language below
    (r"^(multilingual_wiki|mwiki)$", None),
    (r"^(fineweb-edu|dclm|pes2o|wiki|stackexchange|cosmopedia2|natural_reasoning)$", "web-en"),
    (r"^(stack-|pull-requests$|kaggle$|jupyter-scripts$|github-issues$|open-?codereasoning)", "code-python"),
    (r"^(finemath|infiwebmath|megamath|dolmino_math|tiny-gsm|openmath|problem-solving$|2students$)", "math"),
    (r"^reasoning_", None),  # long-context reasoning traces in chat format: post-training data, not in the demo
)


def demo_source_for(name: str) -> str | None:
    """The demo source a SmolLM3 dataset name projects onto, or None when the demo has nothing like it."""
    for pattern, target in _PROJECTION:
        if re.search(pattern, name):
            if target != "fw2":
                return target
            language = next((code for code in _FW2_LANGUAGES if re.search(rf"(^|[-_]){code}($|[-_])", name)), None)
            return _FW2_LANGUAGES.get(language) if language else None
    raise ScheduleError(
        f"SmolLM3 dataset {name!r} has no projection onto the demo sources; add a pattern for it to "
        "mixlab.pipelines.smollm3._PROJECTION"
    )


def _project(schedule: MixtureSchedule, available: set[str] | None) -> MixtureSchedule:
    def target(name: str) -> str | None:
        projected = demo_source_for(name)
        return projected if available is None or projected in available else None

    return schedule.map_sources(target)


@dataclass(frozen=True)
class LongContextStage:
    """A stage appended after the three pre-training stages at a longer sequence length (SmolLM3 went 4k → 32k;
    at demo scale 256 → 1024), weighted by SmolLM3's long-context mixture."""

    fraction: float = 0.1  # share of the proxy run
    seq_len: int = 1024
    config: Path = LONG_CONTEXT_CONFIG
    # the stage's RoPE base (SmolLM3 raised 50k -> 2M for 4k -> 32k); None keeps the model's
    rope_theta: float | None = None


def smollm3_schedule(
    available: set[str] | None = None,
    config: str | Path = PRETRAINING_CONFIG,
    long_context: LongContextStage | None = None,
) -> MixtureSchedule:
    """SmolLM3's stages from the shipped nanotron config, projected onto the demo sources in `available`
    (None: all seven). Weights are renormalised per stage (the decay stage's raw weights sum to 1.00565 and
    projection drops languages). With `long_context`, a last stage at `long_context.seq_len` takes
    `long_context.fraction` of the run and the three stages share the rest in SmolLM3's proportions."""
    imported = read_nanotron_config(config, bounds="fraction").schedule
    stages = _project(imported, available).stages
    description = f"SmolLM3 {len(stages)} stages ({Path(config).name}) projected onto the demo sources"
    if long_context is not None:
        if not 0 < long_context.fraction < 1:
            raise ScheduleError(f"long_context.fraction {long_context.fraction} must be in (0, 1)")
        lc = _project(read_nanotron_config(long_context.config, bounds="fraction").schedule, available)
        keep = 1.0 - long_context.fraction
        shares = [s.fraction for s in stages[:-1]]
        shares.append(1.0 - sum(shares))  # the last stage is bounded by "the rest"
        stages = (
            *(replace(s, fraction=share * keep) for s, share in zip(stages, shares, strict=True)),
            Stage("long context", dict(lc.stages[0].weights), long_context.fraction, seq_len=long_context.seq_len,
                  rope_theta=long_context.rope_theta),
        )
        description += f" + a long-context stage at seq_len {long_context.seq_len}"
    return MixtureSchedule(stages, description, normalize=True)


@dataclass
class SmolLM3ProxyConfig:
    """The SmolLM3 proxy run; its corpus is the demo's (same workdir: curation and tokenization are reused)."""

    workdir: Path = Path("demo-output")
    curated: Path | None = None  # a tokenized curated directory; None: WORKDIR/curated, built as the demo does
    steps: int = 300
    run_id: str = "smollm3-proxy"
    model_preset: str = "demo"
    train_preset: str = "demo"
    long_context: LongContextStage | None = field(default_factory=LongContextStage)
    config: Path = PRETRAINING_CONFIG  # SmolLM3's nanotron config with the three stages
    seed: int = 0
    max_mb: float = 20.0  # raw text per source, as the demo
    plan: PlanLimits = field(default_factory=PlanLimits)  # epoch limits the planner refuses past


def run_smollm3(config: SmolLM3ProxyConfig) -> Path:
    """Import, project, plan (table + PNG; refusals stop here) and train SmolLM3's stages on the demo corpus;
    returns the report's path."""
    from mixlab.ablations import build_report
    from mixlab.pipelines.demo import DemoConfig, prepare_demo_data
    from mixlab.pipelines.pretrain import PretrainError, plan_run, pretrain, tokenized_manifest
    from mixlab.pipelines.run_config import RunConfig
    from mixlab.pipelines.summary import train_summary_lines
    from mixlab.training import ModelConfig, TrainConfig

    for path in (config.config, *([config.long_context.config] if config.long_context else [])):
        if not Path(path).is_file():
            raise ScheduleError(f"{path}: SmolLM3's nanotron config is not there; it ships in shared/reference/smollm3/ "
                                "beside the checkout: point SmolLM3ProxyConfig.config (`--config`) at a copy")
    work = Path(config.workdir)  # (the configs are checked first: building the corpus takes minutes)
    if config.curated is not None:
        manifest = tokenized_manifest(config.curated)
    else:
        manifest = None
        if (work / "curated" / "manifest.json").exists():  # the demo's corpus, when this workdir has it tokenized
            try:
                manifest = tokenized_manifest(work / "curated")
            except PretrainError:
                manifest = None
        if manifest is None:  # else build it the demo's way
            manifest = prepare_demo_data(DemoConfig(workdir=work, max_mb=config.max_mb))
    available = {n for n, s in manifest.sources.items() if s.tokens.get("train")}
    schedule = smollm3_schedule(available, config.config, config.long_context)
    train = TrainConfig.preset(config.train_preset, total_steps=config.steps, seed=config.seed)
    train = replace(train, eval_every=max(1, train.steps // 3), checkpoint_every=max(1, train.steps // 3))
    # the learning rate anneals from SmolLM3's decay stage on (through the long-context stage, if any)
    resolved = schedule.resolve(train.steps * train.grad_accum, train.batch_size, train.seq_len)
    decay = next(s for s in resolved.stages if s.name == DECAY_STAGE)
    train = replace(train, decay_start_step=decay.start_step // train.grad_accum)
    longest = max(s.seq_len or train.seq_len for s in schedule.stages)
    model = ModelConfig.preset(config.model_preset, vocab_size=manifest.tokenizer.vocab_size)
    model = replace(model, max_seq_len=max(model.max_seq_len, longest))  # RoPE: a longer context, same weights

    reports = work / "reports" / config.run_id
    reports.mkdir(parents=True, exist_ok=True)
    run_config = RunConfig(manifest.root, work / "runs", config.run_id, schedule, model, train, plan=config.plan,
                           tags={"recipe": "smollm3", "mixture": "smollm3-3-stages"})
    plan = plan_run(run_config, manifest)  # the plan `pretrain` checks (it logs the warnings)
    print(plan.table())
    print(f"plan: {plan.plot(reports / 'plan.png')}")
    plan.check()  # a refused plan stops here, drawn, before a run directory exists

    run = pretrain(run_config)
    print("\n".join(train_summary_lines(run.summary, run.status, run.path)))
    report = build_report(run.path, reports, manifest_dir=manifest.root)
    return report.html_path
