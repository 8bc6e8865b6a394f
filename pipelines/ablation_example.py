"""The shipped example ablation, in one command: web-, code- and math-heavy mixtures against a balanced base on the
demo corpus, 2 seeds each, then the report and what the data says.

For every heavy mixture the check is computed, never assumed: the source it favours most (the largest weight
ratio to the base) should have a lower held-out loss than under the base, by more than the seed noise. The
outcome is printed and written to the report's `summary.json` either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.ablations import AblationSpec
from mixlab.ablations.launch import LocalLauncher, require_completed, run_ablation
from mixlab.mixtures import MixtureSchedule

EXAMPLE_SPEC = Path(__file__).with_name("specs") / "mixes.yaml"


@dataclass
class MixAblationExample:
    """Where the example runs and how many proxies train at once."""

    workdir: Path = Path("demo-output")
    spec: Path = EXAMPLE_SPEC
    parallel: int | None = None
    threads: int | None = None
    max_mb: float | None = None  # raw text per source for the demo corpus (default: the demo's)


@dataclass
class FavouredSourceCheck:
    """Did a heavy mixture lower the loss of the source it favours, beyond the seed noise?"""

    variant: str
    source: str
    weight_ratio: float  # the source's weight in the variant / in the base
    metric: str
    variant_mean: float
    base_mean: float
    difference: float  # variant - base (negative: lower loss)
    noise: float | None  # the seed-noise bar the difference is compared with (None: one seed, no estimate)
    beyond_noise: bool | None

    @property
    def holds(self) -> bool:
        return self.difference < 0 and bool(self.beyond_noise)

    def line(self) -> str:
        if self.beyond_noise is None:
            verdict = ("lower" if self.difference < 0 else "not lower") + ", no seed noise estimate (one seed)"
        else:
            verdict = "lower, beyond seed noise" if self.holds else (
                "lower, within seed noise" if self.difference < 0 else "not lower")
        noise = f", seed-noise bar {self.noise:.4f}" if self.noise is not None else ""
        return (f"{self.variant}: favours {self.source} ({self.weight_ratio:.1f}x the base's weight); {self.metric} "
                f"{self.variant_mean:.4f} vs base {self.base_mean:.4f} ({self.difference:+.4f}{noise}): {verdict}")


@dataclass
class MixAblationOutcome:
    report: Path
    checks: list[FavouredSourceCheck] = field(default_factory=list)

    def lines(self) -> list[str]:
        return ["What the data says:", *("  " + c.line() for c in self.checks), f"Report: {self.report.resolve()}"]


def example_spec(config: MixAblationExample) -> AblationSpec:
    """The shipped spec with its paths under `config.workdir`."""
    spec = AblationSpec.from_yaml(config.spec)
    work = Path(config.workdir)
    spec.base = {**spec.base, "runs_dir": str(work / "runs"), "data": {**spec.base.get("data", {}),
                                                                      "curated": str(work / "curated")}}
    return spec


def _weights(document: Any) -> dict[str, float]:
    """Token-share weights of a one-stage mixture document (the example's variants)."""
    schedule = MixtureSchedule.from_dict(document)
    stage = schedule.stages[0]
    total = sum(stage.weights.values())
    return {source: w / total for source, w in stage.weights.items()}


def favoured_source_checks(spec: AblationSpec) -> list[FavouredSourceCheck]:
    """For each mixture variant: its most favoured source against the base (the largest weight ratio, among the
    sources the base trains on), on that source's held-out loss at the last step, over the seeds."""
    from mixlab.ablations.ablation_report import ranked_table
    from mixlab.ablations.results import ablation_results

    axis = next((a for a in spec.axes if a.field == "mixture"), None)
    if axis is None or not spec.base.get("mixture"):
        raise ValueError(f"spec {spec.name!r}: the favoured-source check needs a base mixture and a `mixture` axis")
    results = ablation_results(spec)
    base = {s: w for s, w in _weights(spec.base["mixture"]).items() if w > 0}
    checks = []
    for label, document in axis.labelled():
        weights = _weights(document)
        source = max(base, key=lambda s: weights.get(s, 0.0) / base[s])
        metric = f"{source}/loss"
        table = ranked_table(results, metric, base_variant="base")
        row = table.filter(table["variant"] == f"mixture={label}").row(0, named=True)
        base_row = table.filter(table["variant"] == "base").row(0, named=True)
        checks.append(FavouredSourceCheck(
            variant=label, source=source, weight_ratio=weights.get(source, 0.0) / base[source], metric=metric,
            variant_mean=row["mean"], base_mean=base_row["mean"], difference=row["diff_to_base"],
            noise=row["noise_bar"], beyond_noise=row["exceeds_seed_noise"]))
    return checks


def run_mix_example(config: MixAblationExample) -> MixAblationOutcome:
    """Build the demo corpus (reused when present), train the spec's proxies (a rerun resumes), report."""
    import json

    from mixlab.ablations.ablation_report import report_ablation
    from mixlab.ablations.outputs import json_safe
    from mixlab.pipelines.demo import DemoConfig, prepare_demo_data

    demo = DemoConfig(workdir=Path(config.workdir), **({"max_mb": config.max_mb} if config.max_mb else {}))
    prepare_demo_data(demo)
    spec = example_spec(config)
    print(f"\n=== mixlab ablate example: {len(spec.expand())} proxies of spec {spec.name!r} ===", flush=True)
    proxies = run_ablation(spec, LocalLauncher(parallel=config.parallel, threads=config.threads))
    require_completed(spec, proxies)
    report = report_ablation(spec)
    checks = favoured_source_checks(spec)
    summary_path = report.parent / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["favoured_source_checks"] = [{**c.__dict__, "holds": c.holds} for c in checks]
    summary_path.write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    return MixAblationOutcome(report=report, checks=checks)
