"""The annealing ablation from a real parent run: both anneals start from the parent's weights, decay the
parent's LR to 0, and the candidate run trains on 40% current mixture + 60% candidate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mixlab.ablations.anneal import AnnealConfig, AnnealError, anneal_spec, run_anneal
from mixlab.ablations.launch import LocalLauncher
from mixlab.pipelines.pretrain import pretrain
from mixlab.pipelines.run_config import run_config_from_document
from mixlab.training import RunRecord

PARENT_MIX = {"chat": 0.5, "code-python": 0.3, "web-de": 0.2}
CANDIDATE = "math"
STEP = 40  # a checkpoint of the parent's stable phase (its LR decays from step 48 of 60)
ANNEAL_STEPS = 20


@pytest.fixture(scope="module")
def parent(tokenized_curated: Path, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("anneal") / "runs"
    document = {"run_id": "parent", "runs_dir": str(runs), "data": {"curated": str(tokenized_curated)},
                "mixture": {"stages": [{"name": "main", "weights": PARENT_MIX}]}, "model": {"preset": "tiny"},
                "train": {"preset": "tiny", "total_steps": 60, "warmup_steps": 4, "log_every": 1, "eval_every": 60,
                          "checkpoint_every": 20, "keep_last_checkpoints": 3, "threads": 1, "progress_bar": False},
                "eval": {"windows_per_source": 8, "bootstrap_resamples": 50}}
    return pretrain(run_config_from_document(document, vocab_size=600)).path


def _metrics(run: Path) -> list[dict]:
    return RunRecord.load(run).metrics()


def test_anneal_starts_from_the_parent_decays_its_lr_and_trains_the_candidate_share(parent: Path):
    config = AnnealConfig(parent=parent, candidate=[CANDIDATE], step=STEP, steps=ANNEAL_STEPS)
    report = run_anneal(config, LocalLauncher(parallel=1, threads=1))
    runs = {name: Path(paths[0]) for name, paths in report.runs.items()}
    assert set(runs) == {"control", "candidate"}
    parent_metrics = {m["step"]: m for m in _metrics(parent)}
    checkpoint = parent / "checkpoints" / f"step_{STEP:08d}"

    untrained = parent_metrics[1]["loss"]  # the parent's first step: a model that has seen one batch
    near_step = sum(parent_metrics[s]["loss"] for s in range(STEP - 4, STEP + 1)) / 5
    assert untrained - near_step > 0.5  # the parent did learn: there is a gap to tell the two apart
    for name, run in runs.items():
        record = RunRecord.load(run)
        assert record.status == "completed"
        assert record.summary["initialized_from"] == {"checkpoint": str(checkpoint.resolve()), "step": STEP}
        metrics = _metrics(run)
        assert [m["step"] for m in metrics] == list(range(1, ANNEAL_STEPS + 1))
        first = metrics[0]["loss"]
        assert first < untrained - 0.5, (name, first, untrained)  # it starts from trained weights
        # the LR decays linearly from the parent's at the checkpoint to 0
        assert report.lr == parent_metrics[STEP]["lr"] > 0
        lrs = [m["lr"] for m in metrics]
        assert lrs[0] == pytest.approx(report.lr * (1 - 1 / ANNEAL_STEPS))
        assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # on the parent's own mixture the first step's loss is the parent's loss there
    assert abs(_metrics(runs["control"])[0]["loss"] - near_step) < 0.3

    # the mixtures: control = the parent's, candidate = 0.4 x parent + 0.6 x math, and the trained tokens follow
    assert report.mixtures["control"] == pytest.approx(PARENT_MIX)
    expected = {**{s: 0.4 * w for s, w in PARENT_MIX.items()}, CANDIDATE: 0.6}
    assert report.mixtures["candidate"] == pytest.approx(expected)
    trained = RunRecord.load(runs["candidate"]).config["mixture"]["stages"][0]["weights"]
    assert trained == pytest.approx(expected)
    tokens = RunRecord.load(runs["candidate"]).summary["tokens_by_source"]
    rows = ANNEAL_STEPS * 8
    for source, weight in expected.items():
        share = tokens.get(source, 0) / sum(tokens.values())
        assert abs(share - weight) < 4 * math.sqrt(weight * (1 - weight) / rows), (source, share, weight)
    assert RunRecord.load(runs["control"]).summary["tokens_by_source"].get(CANDIDATE, 0) == 0
    assert report.token_shares["candidate"][CANDIDATE] == pytest.approx(tokens[CANDIDATE] / sum(tokens.values()))

    # the comparison is candidate - control from the runs' last evals
    last = {}
    for name, run in runs.items():
        rows_ = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
        last[name] = {r["source"]: r for r in rows_ if r["step"] == ANNEAL_STEPS}
    for metric in ("all/loss", "all/bpb", "math/loss", "chat/bpb"):
        source, key = metric.split("/")
        row = report.metric(metric)
        assert row.delta == pytest.approx(last["candidate"][source][key] - last["control"][source][key])
        assert row.noise is None  # one seed: no seed noise to report
    assert report.metric("math/loss").delta < 0  # 60% of the anneal on math lowers its held-out loss
    assert report.json_path.exists() and "beyond_noise" in report.json_path.read_text()
    assert "math/loss" in "\n".join(report.lines())

    # a rerun trains nothing
    before = {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs.values()}
    assert run_anneal(config, LocalLauncher(parallel=1, threads=1)).to_dict() == report.to_dict()
    assert {run: (run / "metrics.jsonl").stat().st_mtime_ns for run in runs.values()} == before
    # the same runs asked for with another share are refused, not reported as the old ones
    with pytest.raises(AnnealError, match="another mixture"):
        run_anneal(AnnealConfig(parent=parent, candidate=[CANDIDATE], step=STEP, steps=ANNEAL_STEPS,
                                candidate_share=0.5))


def test_anneal_defaults_and_refusals(parent: Path):
    # default: the latest checkpoint, 10% of the parent's steps, the parent's LR there
    with pytest.raises(AnnealError, match="decay had ended"):  # the latest (step 60) is at the end of the decay
        anneal_spec(AnnealConfig(parent=parent, candidate="math"))
    spec = anneal_spec(AnnealConfig(parent=parent, candidate="math", step=20, seeds=[0, 1]))
    documents = spec.documents()
    assert sorted(documents) == ["parent-anneal-math-candidate-s0", "parent-anneal-math-candidate-s1",
                                 "parent-anneal-math-control-s0", "parent-anneal-math-control-s1"]
    train = spec.base["train"]
    assert (train["total_steps"], train["warmup_steps"], train["decay_start_step"], train["min_lr"]) == (6, 0, 0, 0.0)
    assert train["init_from"].endswith("step_00000020")
    with pytest.raises(AnnealError, match=r"no checkpoint at step 30; it has steps \[20, 40, 60\]"):
        anneal_spec(AnnealConfig(parent=parent, candidate="math", step=30))
    with pytest.raises(AnnealError, match="no such source"):
        anneal_spec(AnnealConfig(parent=parent, candidate="klingon", step=20))
    with pytest.raises(AnnealError, match="candidate_share"):
        AnnealConfig(parent=parent, candidate="math", candidate_share=1.5)
    with pytest.raises(AnnealError, match="not a run directory"):
        anneal_spec(AnnealConfig(parent=parent.parent / "nope", candidate="math"))
