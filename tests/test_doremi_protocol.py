"""DoReMi end to end on real sources: a reference run, a proxy whose weights the policy moves, final runs on the
proxy's time-averaged weights against uniform and natural, excess losses read back from the runs, and a rerun
that trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mixlab.ablations.doremi import DoReMiConfig, DoReMiError, run_doremi
from mixlab.ablations.launch import LocalLauncher
from mixlab.ablations.spec import AblationSpec
from mixlab.training import RunRecord

SOURCES = ("chat", "code-python", "math")
STEPS = 30


def _spec(curated: Path, runs: Path) -> AblationSpec:
    base = {"runs_dir": str(runs), "data": {"curated": str(curated)}, "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": STEPS, "warmup_steps": 3, "eval_every": 5, "log_every": 5,
                      "checkpoint_every": STEPS, "progress_bar": False},
            "eval": {"windows_per_source": 8, "bootstrap_resamples": 50}}
    return AblationSpec("dm", base)


def _last_eval(run: Path) -> dict[str, float]:
    """source -> loss at the run's last eval step, straight from evals.jsonl (the last row of a step wins)."""
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines() if line.strip()]
    last = max(r["step"] for r in rows)
    return {r["source"]: r["loss"] for r in rows if r["step"] == last and r["source"] != "all"}


def _mean_logged_weights(run: Path) -> dict[str, float]:
    """The mean over steps 0..T-1 of the weights in force, from mixture.jsonl: the change at step s holds from
    step s until the next change (computed here with searchsorted, not the module's loop)."""
    changes = [json.loads(line) for line in (run / "mixture.jsonl").read_text().splitlines() if line.strip()]
    starts = np.array([c["step"] for c in changes])
    index = np.searchsorted(starts, np.arange(STEPS), side="right") - 1  # the latest change at or before the step
    matrix = np.array([[changes[i]["weights"][s] for s in SOURCES] for i in index])
    mean = matrix.mean(axis=0)
    return dict(zip(SOURCES, (mean / mean.sum()).tolist(), strict=True))


def _trained_weights(run: Path) -> dict[str, float]:
    stages = RunRecord.load(run).config["mixture"]["stages"]
    assert len(stages) == 1
    return stages[0]["weights"]


def test_doremi_end_to_end_reports_excess_losses_and_reruns_nothing(tokenized_curated: Path, tmp_path: Path):
    spec = _spec(tokenized_curated, tmp_path / "runs")
    config = DoReMiConfig(sources=SOURCES, eta=5.0, update_every=5)
    launcher = LocalLauncher(parallel=1, threads=1)
    report = run_doremi(spec, config, launcher)

    runs = tmp_path / "runs"
    ref, proxy = runs / "dm-doremi-ref-base-s0", runs / "dm-doremi-proxy-base-s0"
    finals = {name: runs / f"dm-doremi-final-{name}-s0" for name in ("doremi", "uniform", "natural")}
    for run in (ref, proxy, *finals.values()):
        assert RunRecord.load(run).status == "completed"

    # the policy moved the proxy's weights, at its cadence, away from the uniform start
    changes = RunRecord.load(proxy).mixture_changes()
    assert changes[0]["step"] == 0 and changes[0]["weights"] == pytest.approx(dict.fromkeys(SOURCES, 1 / 3))
    decided = [c for c in changes if c["cause"].startswith("doremi")]
    assert len(decided) >= 2 and all(c["step"] % 5 == 0 for c in decided)
    assert max(abs(w - 1 / 3) for c in decided for w in c["weights"].values()) > 0.05
    # its reference is the trained reference's last per-source losses
    assert RunRecord.load(proxy).config["policy"]["reference"] == pytest.approx(_last_eval(ref))

    # the averaged weights are the mean of the logged weights over the steps, and the final run trained on them
    expected = _mean_logged_weights(proxy)
    assert report.variants["doremi"].weights == pytest.approx(expected, abs=1e-12)
    assert max(abs(expected[s] - 1 / 3) for s in SOURCES) > 0.01  # not the uniform mixture again
    assert _trained_weights(finals["doremi"]) == pytest.approx(expected, abs=1e-12)
    assert report.policy_average == pytest.approx(expected, abs=2 / STEPS)  # the policy's own (steps 1..T-1)
    assert _trained_weights(finals["uniform"]) == pytest.approx(dict.fromkeys(SOURCES, 1 / 3))
    manifest = json.loads((tokenized_curated / "manifest.json").read_text())
    tokens = {s: manifest["sources"][s]["tokens"]["train"] for s in SOURCES}
    natural = {s: t / sum(tokens.values()) for s, t in tokens.items()}
    assert _trained_weights(finals["natural"]) == pytest.approx(natural)
    assert max(natural.values()) - min(natural.values()) > 0.05  # natural is a mixture of its own

    # excess = loss - reference loss, from the runs' evals; the worst source is the largest excess
    ref_loss = _last_eval(ref)
    assert report.reference_loss == pytest.approx({s: ref_loss[s] for s in SOURCES})
    for name, run in finals.items():
        loss = _last_eval(run)
        result = report.variants[name]
        assert result.loss == pytest.approx({s: loss[s] for s in SOURCES})
        assert result.excess == pytest.approx({s: loss[s] - ref_loss[s] for s in SOURCES})
        assert result.worst_excess == pytest.approx(max(loss[s] - ref_loss[s] for s in SOURCES))
        assert result.mean_loss == pytest.approx(np.mean([loss[s] for s in SOURCES]))
    # the uniform final run is the reference again (same base, seed and mixture): no excess at all
    assert max(abs(v) for v in report.variants["uniform"].excess.values()) < 1e-6
    worst = {n: r.worst_excess for n, r in report.variants.items()}
    assert report.doremi_lowest_worst_excess == (worst["doremi"] <= min(worst.values()))

    saved = json.loads(report.json_path.read_text())
    assert report.json_path == tmp_path / "ablations" / "dm" / "doremi" / "doremi.json"
    assert saved["variants"]["natural"]["excess"] == pytest.approx(report.variants["natural"].excess)
    assert report.png_path.stat().st_size > 10_000
    text = "\n".join(report.lines())
    assert "worst-source excess" in text and "natural" in text

    # a rerun trains nothing and reports the same
    before = {run: ((run / "metrics.jsonl").stat().st_mtime_ns, (run / "run.json").read_bytes())
              for run in (ref, proxy, *finals.values())}
    again = run_doremi(spec, config, launcher)
    assert {run: ((run / "metrics.jsonl").stat().st_mtime_ns, (run / "run.json").read_bytes())
            for run in before} == before
    assert again.to_dict() == report.to_dict()


def test_doremi_refuses_bad_settings(tokenized_curated: Path, tmp_path: Path):
    with pytest.raises(DoReMiError, match="at least 3 sources"):
        DoReMiConfig(sources=["math", "web-en"])
    with pytest.raises(DoReMiError, match="set proxy_seed to another seed"):
        DoReMiConfig(reference="matched")
    with pytest.raises(DoReMiError, match=r"\['no-such-source'\] have no train tokens"):
        run_doremi(_spec(tokenized_curated, tmp_path / "runs"), DoReMiConfig(sources=["math", "web-en",
                                                                                       "no-such-source"]))
