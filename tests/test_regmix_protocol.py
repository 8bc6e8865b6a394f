"""`mixlab ablate regmix`: a swarm the planner accepts, real proxies trained, fits and search, and a verify run
whose numbers are the results table's; a rerun trains nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from mixlab.ablations.launch import ProxyRun, proxy_runs, resolved_config
from mixlab.ablations.regmix import (
    RegMixConfig,
    RegMixError,
    mixture_space,
    regmix_swarm_spec,
    regmix_verify_spec,
    run_regmix,
    variant_weights,
)
from mixlab.ablations.results import ablation_results
from mixlab.ablations.spec import AblationSpec
from mixlab.pipelines.pretrain import plan_run, pretrain, tokenized_manifest

STEPS = 12


class InProcessLauncher:
    """Trains each proxy in this process with one torch thread (no interpreter start per proxy) and records
    which proxies it was asked to train."""

    def __init__(self) -> None:
        self.launched: list[str] = []

    def launch(self, proxies: Sequence[ProxyRun]) -> dict[str, int]:
        torch.set_num_threads(1)
        for proxy in proxies:
            pretrain(resolved_config(yaml.safe_load(proxy.document_path.read_text())))
            self.launched.append(proxy.run_id)
        return dict.fromkeys((p.run_id for p in proxies), 0)


def base_spec(curated: Path, runs: Path, math_epochs: float = 0.005) -> AblationSpec:
    # math may be seen only `math_epochs` times: its cap binds well below its natural share
    base = {"runs_dir": str(runs), "data": {"curated": str(curated)}, "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": STEPS, "warmup_steps": 2, "eval_every": STEPS,
                      "checkpoint_every": STEPS, "log_every": 4, "progress_bar": False},
            "eval": {"windows_per_source": 4, "bootstrap_resamples": 10},
            "plan": {"max_epochs": 4, "max_epochs_by_source": {"math": math_epochs}}}
    return AblationSpec("mixsearch", base)


CONFIG = RegMixConfig(proxies=6, concentration=1.0, seed=3, verify_seeds=(0,), search_samples=2000,
                      refine_steps=10, lightgbm={"n_estimators": 100})


def test_the_swarm_respects_the_caps_and_the_planner_accepts_every_member(tokenized_curated: Path, tmp_path: Path):
    spec = base_spec(tokenized_curated, tmp_path / "runs")
    space = mixture_space(spec)
    manifest = tokenized_manifest(tokenized_curated)
    assert set(space.sources) == {n for n, s in manifest.sources.items() if s.tokens.get("train")}
    assert space.caps["math"] < space.natural["math"]  # the limit binds
    swarm = regmix_swarm_spec(spec, CONFIG)
    variants = swarm.expand()
    assert swarm.name == f"mixsearch-swarm-{CONFIG.swarm_key()}" and swarm.mode == "list"
    assert [v.name for v in variants] == [f"mix-{i:02d}" for i in range(6)]
    assert len({tuple(variant_weights(v.fields, space.sources).values()) for v in variants}) == 6
    for variant in variants:
        weights = variant_weights(variant.fields, space.sources)
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(0 <= w <= space.caps[s] for s, w in weights.items()), (variant.name, weights, space.caps)
        document = variant.document(swarm.base)
        assert document["mixture"]["stages"][0]["weights"] == weights
        plan = plan_run(resolved_config(document), manifest)
        assert plan.ok, plan.problems
        assert plan.leaves["math"].epochs <= 0.005
    assert regmix_swarm_spec(spec, CONFIG).documents() == swarm.documents()  # same seed, same swarm

    # the caps are the planner's own limit, not a looser one: just past math's cap the planner refuses
    document = variants[0].document(swarm.base)
    over = {s: 0.0 for s in space.sources} | {"math": min(1.0, space.caps["math"] * 1.01)}
    rest = [s for s in space.sources if s != "math"]
    over.update({s: (1 - over["math"]) / len(rest) for s in rest})
    document["mixture"]["stages"][0]["weights"] = over
    refused = plan_run(resolved_config(document), manifest)
    assert not refused.ok and any("'math'" in p for p in refused.problems)

    with pytest.raises(RegMixError, match="no-such-source"):
        mixture_space(spec, ["web-en", "no-such-source"])


def test_regmix_end_to_end_verifies_against_natural_and_uniform_and_reruns_nothing(tokenized_curated: Path,
                                                                                  tmp_path: Path):
    runs = tmp_path / "runs"
    spec = base_spec(tokenized_curated, runs)
    launcher = InProcessLauncher()
    report = run_regmix(spec, CONFIG, launcher)
    swarm_spec = regmix_swarm_spec(spec, CONFIG)
    verify_ids = [f"mixsearch-verify-{name}-s0" for name in ("regmix", "natural", "uniform")]
    assert launcher.launched == [v.run_id for v in swarm_spec.expand()] + verify_ids  # every proxy really trained
    assert all(p.status == "completed" for p in proxy_runs(swarm_spec))

    # the swarm's targets are the results table's last-step all/loss
    table = ablation_results(swarm_spec).filter(pl.col("metric") == "all/loss")
    for row in report.swarm:
        runs_rows = table.filter(pl.col("run") == row["run"]).sort("step")
        assert runs_rows["step"][-1] == STEPS and row["target"] == runs_rows["value"][-1]
    assert len({row["target"] for row in report.swarm}) > 1  # mixtures really change the loss

    assert set(report.fits) == {"linear", "log-linear", "lightgbm"} and report.regressor == "lightgbm"
    for fit in report.fits.values():
        assert fit.error is None and len(fit.cv_predictions) == 6
        assert fit.cv_spearman is None or -1 <= fit.cv_spearman <= 1

    space = mixture_space(spec)
    assert sum(report.chosen.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(report.chosen[s] <= space.caps[s] for s in space.sources)

    # three verify runs, each measured value being the results table's
    assert list(report.verify) == ["regmix", "natural", "uniform"]
    verify_spec = regmix_verify_spec(spec, CONFIG, report.chosen)
    assert [v.run_id for v in verify_spec.expand()] == verify_ids
    verify_table = ablation_results(verify_spec).filter(pl.col("metric") == "all/loss")
    for name, run in report.verify.items():
        (run_id,) = run.by_run
        assert run_id == f"mixsearch-verify-{name}-s0"
        rows = verify_table.filter(pl.col("run") == run_id).sort("step")
        assert run.measured == rows["value"][-1] == run.by_run[run_id]
        assert np.isfinite(run.predicted)
        assert sum(run.weights.values()) == pytest.approx(1.0, abs=1e-9)
    assert report.verify["regmix"].weights == report.chosen
    assert report.verify["natural"].weights["math"] <= space.caps["math"]  # natural was clipped into the cap
    assert report.verify["uniform"].weights["web-en"] == pytest.approx(1 / len(space.sources))
    assert report.beats_natural == (report.verify["regmix"].measured < report.verify["natural"].measured)
    assert report.beats_uniform == (report.verify["regmix"].measured < report.verify["uniform"].measured)

    out = runs.parent / "ablations" / "mixsearch" / "regmix"
    saved = json.loads((out / "regmix.json").read_text())
    assert saved["chosen"] == report.chosen and len(saved["swarm"]) == 6
    assert saved["verify"]["natural"]["measured"] == report.verify["natural"].measured
    assert set(saved["fits"]) == {"linear", "log-linear", "lightgbm"}
    assert (out / "regmix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("verify" in line for line in report.lines())

    # a rerun trains nothing and reports the same
    run_dirs = sorted(p for p in runs.iterdir() if (p / "run.json").exists())
    assert len(run_dirs) == 9
    before = {p.name: ((p / "metrics.jsonl").stat().st_mtime_ns, (p / "run.json").read_bytes()) for p in run_dirs}
    again = InProcessLauncher()
    rerun = run_regmix(spec, CONFIG, again)
    assert again.launched == []
    assert {p.name: ((p / "metrics.jsonl").stat().st_mtime_ns, (p / "run.json").read_bytes())
            for p in run_dirs} == before
    assert rerun.chosen == report.chosen and rerun.verify["regmix"].measured == report.verify["regmix"].measured

    # a target the table does not have is named with the ones it has
    with pytest.raises(RegMixError, match="no metric 'task/none'.*all/loss"):
        run_regmix(spec, RegMixConfig(**{**CONFIG.__dict__, "target": "task/none"}), again)

