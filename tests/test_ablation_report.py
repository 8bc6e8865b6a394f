"""The ablation report: a page built from real proxy runs (two mixtures x two seeds), whose tables are the
results table's own numbers, whose noise rule says what it claims, and whose weight plot uses the tokens the
runs really trained on."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mixlab.ablations.ablation_plots import metric_vs_weight
from mixlab.ablations.ablation_report import (
    bpb_chance_levels,
    bpb_signal,
    build_ablation_report,
    exceeds_seed_noise,
    key_metrics,
    loss_units_differ,
    pooled_seed_std,
    ranked_table,
    report_task_signal,
    trained_shares,
    weight_points,
)
from mixlab.ablations.launch import DONE, proxy_runs, resolved_config
from mixlab.ablations.results import ablation_results
from mixlab.ablations.spec import AblationSpec, Axis
from mixlab.pipelines.pretrain import pretrain
from mixlab.training import RunRecord
from PIL import Image

BASE_MIX = {"stages": [{"name": "all", "weights": {"web-en": 0.5, "code-python": 0.25, "math": 0.25}}]}
CODE_MIX = {"stages": [{"name": "all", "weights": {"web-en": 0.2, "code-python": 0.6, "math": 0.2}}]}
CODE_HEAVY = "mixture=code-heavy"


@pytest.fixture(scope="module")
def ablation(tokenized_curated: Path, tmp_path_factory) -> AblationSpec:
    """Base mixture vs a code-heavy one, two seeds each, trained in-process (tiny model, 20 steps)."""
    runs = tmp_path_factory.mktemp("ablation-report") / "runs"
    base = {"runs_dir": str(runs), "data": {"curated": str(tokenized_curated)}, "mixture": BASE_MIX,
            "model": {"preset": "tiny"},
            "train": {"preset": "tiny", "total_steps": 20, "checkpoint_every": 20, "eval_every": 5,
                      "warmup_steps": 4, "progress_bar": False},
            "eval": {"windows_per_source": 8, "bootstrap_resamples": 50}}
    spec = AblationSpec("mixrep", base, axes=(Axis("mixture", {"code-heavy": CODE_MIX}),), seeds=(0, 1),
                        description="does more code help code and hurt the rest?")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for proxy in proxy_runs(spec):
            pretrain(resolved_config(proxy.variant.document(spec.base)))
    finally:
        torch.set_num_threads(threads)
    return spec


def _with_fake_tasks(results: pl.DataFrame) -> pl.DataFrame:
    """The real results plus a made-up cloze task per eval step (rising with step, higher for code-heavy)."""
    evals = results.filter(pl.col("metric") == "all/loss")
    boost = (pl.col("variant") == CODE_HEAVY).cast(pl.Float64) * 0.05
    fake = [evals.with_columns(pl.lit(f"task/cloze/{kind}").alias("metric"),
                               (offset + pl.col("step") / 100 + pl.col("seed") / 1000 + boost).alias("value"))
            for kind, offset in (("accuracy", 0.25), ("margin", 0.0))]
    return pl.concat([results, *fake])


def test_report_page_embeds_every_figure_as_a_valid_png(ablation: AblationSpec):
    path = build_ablation_report(ablation, chance={"cloze": 0.25})
    assert path == Path(ablation.base["runs_dir"]).parent / "ablations" / "mixrep" / "report" / "report.html"
    page = path.read_text()
    summary = json.loads((path.parent / "summary.json").read_text())
    assert "mixrep" in page and "does more code help code" in page and "4 of 4 proxies completed" in page
    assert "<script" not in page and "http" not in page  # opens offline
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    files = sorted(path.parent.glob("*.png"))
    assert {"eval_loss", "eval_bpb", "train_loss", "weight_loss"} <= set(summary["images"])
    assert len(embedded) == len(files) == len(summary["images"])
    on_disk = {f.read_bytes(): f.name for f in files}
    for data in embedded:
        png = base64.b64decode(data)
        assert png in on_disk and on_disk[png] in page  # the image beside the page, named under its figure
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size[0] > 200
        image.verify()
    assert summary["proxies"] == {**summary["proxies"], "completed": 4, "total": 4}
    assert set(summary["ranked"]) == set(key_metrics(ablation_results(ablation)))
    assert {row["task"] for row in summary["signal"]["bpb"]} == {"all/bpb", "code-python/bpb", "math/bpb",
                                                                 "web-en/bpb"}
    assert "signal" in summary and "tasks" not in summary["signal"]  # no task metrics in these runs

    # the same runs with task rows: their curves, rankings and signal checks appear
    task_path = build_ablation_report(ablation, path.parent.parent / "with-tasks", chance={"cloze": 0.25},
                                      results=_with_fake_tasks(ablation_results(ablation)))
    tasks = json.loads((task_path.parent / "summary.json").read_text())
    assert {"task_accuracy", "task_margin"} <= set(tasks["images"])
    assert {row["task"] for row in tasks["signal"]["tasks"]} == {"task/cloze/accuracy", "task/cloze/margin"}
    accuracy = tasks["ranked"]["task/cloze/accuracy"]  # higher is better: the boosted variant first
    assert [row["variant"] for row in accuracy] == [CODE_HEAVY, "base"]
    assert accuracy[0]["diff_to_base"] == pytest.approx(0.05) and accuracy[0]["exceeds_seed_noise"] is True
    assert "task/cloze/accuracy" in task_path.read_text()


def test_ranked_table_is_the_results_tables_own_mean_and_std(ablation: AblationSpec):
    results = ablation_results(ablation)
    for metric in ("all/loss", "code-python/loss", "math/bpb", "web-en/bpb"):
        rows = results.filter(pl.col("metric") == metric)
        last = rows.group_by("run").agg(pl.col("step").max())
        finals = rows.join(last, on=["run", "step"])
        assert set(finals["step"]) == {20}
        table = ranked_table(results, metric)
        assert table.height == 2 and set(table["variant"]) == {"base", CODE_HEAVY}
        for row in table.iter_rows(named=True):
            values = finals.filter(pl.col("variant") == row["variant"])["value"].to_numpy()
            assert row["seeds"] == len(values) == 2
            assert row["mean"] == pytest.approx(values.mean(), rel=1e-12)
            assert row["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert table["mean"].to_list() == sorted(table["mean"].to_list())  # loss and bpb: lower first
        assert table["rank"].to_list() == [1, 2]
        base, other = (table.filter(pl.col("variant") == v).row(0, named=True) for v in ("base", CODE_HEAVY))
        assert other["diff_to_base"] == pytest.approx(other["mean"] - base["mean"])
        assert other["exceeds_seed_noise"] == exceeds_seed_noise(other["diff_to_base"], base["std"], 2, other["std"], 2)
        assert base["diff_to_base"] is None and base["verdict"] == "base"
    with pytest.raises(ValueError, match="not in the results table"):
        ranked_table(results, "nope/loss")


def test_exceeds_seed_noise_on_constructed_numbers():
    pooled = math.sqrt((2 * 0.1 ** 2 + 2 * 0.2 ** 2) / 4)  # 3 seeds each: 2 degrees of freedom per side
    assert pooled_seed_std(0.1, 3, 0.2, 3) == pytest.approx(pooled)
    assert exceeds_seed_noise(0.4, 0.1, 3, 0.2, 3) is True  # 0.4 > 2 x 0.158
    assert exceeds_seed_noise(-0.4, 0.1, 3, 0.2, 3) is True  # the sign does not matter
    assert exceeds_seed_noise(0.3, 0.1, 3, 0.2, 3) is False
    assert exceeds_seed_noise(0.3, 0.1, 3, 0.2, 3, k=1.0) is True
    assert exceeds_seed_noise(5.0, None, 1, None, 1) is None  # one seed each: no estimate, no claim
    assert pooled_seed_std(0.1, 3, None, 1) == pytest.approx(0.1)  # a lone seed adds nothing


def test_ranked_table_and_signal_on_constructed_task_rows():
    rows = []
    for variant, seeds, level in (("base", (0, 1, 2), 0.30), ("big", (0, 1, 2), 0.40), ("lone", (0,), 0.50)):
        for seed in seeds:
            for step in (10, 20, 30):
                value = level + step / 1000 + seed / 100
                run = f"{variant}-s{seed}"
                rows += [{"run": run, "variant": variant, "seed": seed, "status": "completed", "step": step,
                          "metric": "task/cloze/accuracy", "value": value},
                         {"run": run, "variant": variant, "seed": seed, "status": "completed", "step": step,
                          "metric": "all/loss", "value": 6 - value},
                         {"run": run, "variant": variant, "seed": seed, "status": "completed", "step": step,
                          "metric": "all/bpb", "value": (6 - value) / 2}]
    results = pl.DataFrame(rows)
    table = ranked_table(results, "task/cloze/accuracy")
    assert table["variant"].to_list() == ["lone", "big", "base"]  # accuracy: higher first
    big = table.filter(pl.col("variant") == "big").row(0, named=True)
    assert big["mean"] == pytest.approx(0.43 + 0.01) and big["std"] == pytest.approx(0.01)
    assert big["exceeds_seed_noise"] is True and "beyond seed noise" in big["verdict"]  # 0.1 > 2 x 0.01
    lone = table.filter(pl.col("variant") == "lone").row(0, named=True)
    assert lone["std"] is None and lone["pooled_seed_std"] == pytest.approx(0.01)  # the base's seeds still count
    single = ranked_table(results.filter(pl.col("seed") == 0), "task/cloze/accuracy")
    assert single["exceeds_seed_noise"].null_count() == 3
    assert "no seed noise estimate" in single.filter(pl.col("variant") == "big")["verdict"][0]

    tasks, notes = report_task_signal(results, {"cloze": 0.25})
    assert tasks["task"].to_list() == ["task/cloze/accuracy"] and tasks["chance"][0] == 0.25 and not notes
    assert tasks["rho"][0] == pytest.approx(1.0) and tasks["above_random"][0] is True
    missing, notes = report_task_signal(results, {})
    assert missing is None and "no chance level for task 'cloze'" in notes[0]
    bpb, _ = bpb_signal(results, vocab_size=600)
    assert bpb["chance"][0] == pytest.approx(0.5 * math.log(600))  # uniform guess: bpb / loss x ln(V)
    assert bpb["rho"][0] == pytest.approx(1.0)  # a falling bpb counts as improving
    assert bpb_signal(results, vocab_size=None)[0] is None


def test_weight_plot_uses_the_tokens_each_run_trained(ablation: AblationSpec):
    shares = trained_shares(ablation)
    for proxy in proxy_runs(ablation):
        served = RunRecord.load(proxy.path).metrics()[-1]["tokens_by_source"]
        mine = shares.filter(pl.col("run") == proxy.run_id)
        assert dict(zip(mine["source"], mine["tokens"], strict=True)) == served
        for source, tokens in served.items():
            share = mine.filter(pl.col("source") == source)["share"][0]
            assert share == pytest.approx(tokens / sum(served.values()))
    mean = shares.group_by("variant", "source").agg(pl.col("share").mean())
    code = {v: s for v, src, s in mean.rows() if src == "code-python"}
    assert code[CODE_HEAVY] > code["base"] + 0.2  # the trained shares follow the mixtures (0.6 vs 0.25)

    results = ablation_results(ablation)
    points = weight_points(results, shares, ["code-python/loss", "web-en/loss"])
    figure = metric_vs_weight(points, ["base", CODE_HEAVY], "loss vs share")
    for ax, source in zip(figure.axes, ("code-python", "web-en"), strict=True):
        want = points.filter(pl.col("source") == source)
        for variant, dots in zip(("base", CODE_HEAVY), ax.collections[::2], strict=True):
            expected = want.filter(pl.col("variant") == variant).sort("seed")
            run_shares = [shares.filter((pl.col("run") == r) & (pl.col("source") == source))["share"][0]
                          for r in expected["run"]]
            assert np.allclose(dots.get_offsets()[:, 0], run_shares)  # x: each seed's trained share
            assert np.allclose(dots.get_offsets()[:, 1], expected["value"].to_numpy())


def test_the_examples_favoured_source_check_reads_the_ranked_table(ablation: AblationSpec):
    """`mixlab ablate example`'s verdict: code-heavy favours code-python (2.4x the base's weight) and is judged on
    code-python/loss against the base, with the ranked table's own numbers (whatever the outcome)."""
    from mixlab.ablations import ranked_table
    from mixlab.pipelines.ablation_example import favoured_source_checks

    (check,) = favoured_source_checks(ablation)
    table = ranked_table(ablation_results(ablation), "code-python/loss")
    row = table.filter(pl.col("variant") == CODE_HEAVY).row(0, named=True)
    assert (check.variant, check.source, check.metric) == ("code-heavy", "code-python", "code-python/loss")
    assert check.weight_ratio == pytest.approx(0.6 / 0.25)
    assert (check.difference, check.noise, check.beyond_noise) == (row["diff_to_base"], row["noise_bar"],
                                                                   row["exceeds_seed_noise"])
    assert check.holds == (row["diff_to_base"] < 0 and bool(row["exceeds_seed_noise"]))
    assert check.source in check.line() and ("beyond seed noise" in check.line()) == check.holds


def test_a_tokenizer_axis_is_ranked_by_bpb_with_each_variants_own_chance(tmp_path: Path):
    """Two tokenizers (as `mixlab tokenize --vocab-sizes 300,400` names them): the smaller vocabulary cuts text
    into more tokens per byte, so its next token is easier and its per-token loss lower, while its bits per byte
    are higher. The report ranks by bpb, leaves the loss tables out and says why, and each variant's uniform
    guess comes from its own vocabulary and tokens per byte."""
    base = {"runs_dir": str(tmp_path / "runs"), "data": {"curated": str(tmp_path / "curated")},
            "model": {"preset": "tiny"}, "train": {"preset": "tiny", "total_steps": 40}}
    spec = AblationSpec("tok", base, axes=(Axis("tokenizer", ["bpe-300", "bpe-400"]),), seeds=(0, 1),
                        include_base=False)
    tokens_per_byte = {"tokenizer=bpe-300": 0.5, "tokenizer=bpe-400": 0.4}
    start_loss = {"tokenizer=bpe-300": 3.0, "tokenizer=bpe-400": 3.3}  # per token: bpe-300 lower all along
    rows, vocab_sizes = [], {}
    for proxy in proxy_runs(spec):
        variant, seed = proxy.variant.name, proxy.variant.seed
        vocab_sizes[proxy.run_id] = int(proxy.variant.labels["tokenizer"].split("-")[1])
        common = {"run": proxy.run_id, "variant": variant, "seed": seed, "status": DONE,
                  "tokenizer": proxy.variant.labels["tokenizer"]}
        for step in (10, 20, 30, 40):
            for source, offset in (("all", 0.0), ("web-de", 0.1)):
                loss = start_loss[variant] + offset - step / 50 + seed / 100
                rows += [{**common, "step": step, "metric": f"{source}/loss", "value": loss},
                         {**common, "step": step, "metric": f"{source}/bpb",
                          "value": loss * tokens_per_byte[variant] / math.log(2)}]
    results = pl.DataFrame(rows)
    assert vocab_sizes == {"tok-tokenizer_bpe-300-s0": 300, "tok-tokenizer_bpe-300-s1": 300,
                           "tok-tokenizer_bpe-400-s0": 400, "tok-tokenizer_bpe-400-s1": 400}
    by_loss = ranked_table(results, "all/loss", None)["variant"].to_list()
    by_bpb = ranked_table(results, "all/bpb", None)["variant"].to_list()
    assert by_loss == list(reversed(by_bpb)) == ["tokenizer=bpe-300", "tokenizer=bpe-400"]  # opposite orders

    # the uniform guess per variant: ln(V) nats per token at that variant's own tokens per byte
    levels, notes = bpb_chance_levels(results, vocab_sizes, "all/bpb")
    assert not notes
    want = {v: tokens_per_byte[v] * math.log(int(v.split("-")[1])) / math.log(2) for v in tokens_per_byte}
    assert levels == pytest.approx(want)
    assert levels["tokenizer=bpe-300"] > levels["tokenizer=bpe-400"] + 0.5  # one shared level would be off
    bpb, notes = bpb_signal(results, vocab_sizes)
    row = bpb.filter(pl.col("task") == "all/bpb").row(0, named=True)
    finals = results.filter((pl.col("metric") == "all/bpb") & (pl.col("step") == 40))
    assert row["final"] == pytest.approx(finals["value"].mean())
    assert row["chance"] == pytest.approx(sum(want.values()) / 2)  # two runs of each variant
    assert row["margin"] == pytest.approx(row["chance"] - row["final"]) and row["above_random"] is True
    assert all(f"{v} {c:.4g}" in row["chance_per_variant"] for v, c in want.items())
    partial, notes = bpb_signal(results, {r: s for r, s in vocab_sizes.items() if "400" not in r})
    assert set(partial["chance_per_variant"].str.contains("bpe-400")) == {False}
    assert "tok-tokenizer_bpe-400-s0" in notes[0]

    assert "tokenizer" in loss_units_differ(spec, vocab_sizes)
    plain = AblationSpec("lr", base, axes=(Axis("train.lr", [0.001]),))
    assert loss_units_differ(plain, {"a": 300, "b": 300}) is None
    assert "300, 400" in loss_units_differ(plain, {"a": 300, "b": 400})

    path = build_ablation_report(spec, tmp_path / "report", results=results, vocab_sizes=vocab_sizes)
    page = path.read_text()
    summary = json.loads((path.parent / "summary.json").read_text())
    assert set(summary["ranked"]) == {"all/bpb", "web-de/bpb"}  # no per-token loss table
    assert [r["variant"] for r in summary["ranked"]["all/bpb"]] == by_bpb
    assert summary["ranked_by_bpb_only"] is True
    assert summary["unranked"]["metrics"] == ["all/loss", "web-de/loss"]
    assert "Per-token loss is not ranked" in page and "ranked by bits per byte only" in page
    assert "<code>all/loss</code></h3>" not in page and "<code>all/bpb</code></h3>" in page
    assert {r["task"]: r["chance"] for r in summary["signal"]["bpb"]}["all/bpb"] == pytest.approx(row["chance"])
