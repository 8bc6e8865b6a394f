"""Ablation specs expand into one run document per proxy, named by what differs from the base."""

from pathlib import Path

import pytest
from mixlab.ablations.spec import AblationSpec, AblationSpecError, Axis
from mixlab.pipelines.run_config import run_config_from_document
from mixlab.training import TrainConfig
from stdlib_corpus import copy_untokenized_sources

BASE = {"runs_dir": "runs", "data": {"curated": "curated"}, "model": {"preset": "tiny", "vocab_size": 600},
        "train": {"preset": "tiny", "total_steps": 40},
        "mixture": {"stages": [{"name": "all", "weights": {"web-en": 0.5, "code-python": 0.25, "math": 0.25}}]}}
CODE_HEAVY = {"stages": [{"name": "all", "weights": {"web-en": 0.2, "code-python": 0.6, "math": 0.2}}]}
MATH_HEAVY = {"stages": [{"name": "all", "weights": {"web-en": 0.2, "code-python": 0.2, "math": 0.6}}]}


def grid() -> AblationSpec:
    return AblationSpec("mix", BASE, axes=(Axis("mixture", {"code-heavy": CODE_HEAVY, "math-heavy": MATH_HEAVY}),
                                           Axis("train.lr", [1e-3, 3e-3])), seeds=(0, 1))


def test_a_grid_crosses_every_axis_and_seed_and_names_what_differs():
    variants = grid().expand()
    assert len(variants) == (1 + 2 * 2) * 2
    names = list(dict.fromkeys(v.name for v in variants))
    assert names == ["base", "mixture=code-heavy-lr=0.001", "mixture=code-heavy-lr=0.003",
                     "mixture=math-heavy-lr=0.001", "mixture=math-heavy-lr=0.003"]
    assert [v.run_id for v in variants[:2]] == ["mix-base-s0", "mix-base-s1"]
    docs = grid().documents()
    assert len(docs) == len(variants)  # run ids are unique
    config = run_config_from_document(docs["mix-mixture_math-heavy-lr_0.003-s1"])
    assert config.train.lr == 3e-3 and config.train.seed == 1 and config.run_id == "mix-mixture_math-heavy-lr_0.003-s1"
    assert config.schedule.stages[0].weights["math"] == 0.6
    base = run_config_from_document(docs["mix-base-s0"])
    assert base.schedule.stages[0].weights["math"] == 0.25 and base.train.lr == TrainConfig.preset("tiny").lr
    assert BASE["train"] == {"preset": "tiny", "total_steps": 40}  # expansion never changes the base


def test_a_list_spec_and_its_yaml_describe_the_same_runs(tmp_path: Path):
    spec = AblationSpec("layers", BASE, mode="list", seeds=(3,),
                        variants=({"model.n_layers": 3}, {"name": "wide", "model.d_model": 96, "model.n_heads": 4}))
    assert [v.name for v in spec.expand()] == ["base", "n_layers=3", "wide"]
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert AblationSpec.from_yaml(path).documents() == spec.documents()
    assert run_config_from_document(spec.documents()["layers-wide-s3"]).model.d_model == 96
    assert AblationSpec.from_yaml(path).to_dict() == spec.to_dict()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"axes": (Axis("train.seed", [1, 2]),)}, "seeds are the spec's `seeds`"),
    ({"seeds": (0, 0)}, "must be distinct"),
    ({"mode": "list", "variants": ({"train.lr": 1e-3}, {"train.lr": 1e-3})}, "both named 'lr=0.001'"),
    ({"mode": "sweep"}, "choose one of"),
    ({"axes": (Axis("train.lr", [1e-3]),), "variants": ({"train.lr": 2e-3},)}, "set mode: list"),
])
def test_bad_specs_say_what_to_change(kwargs, match):
    with pytest.raises(AblationSpecError, match=match):
        AblationSpec("bad", BASE, **kwargs).expand()


def test_a_document_value_needs_a_label():
    with pytest.raises(AblationSpecError, match="is a document; give the values as"):
        Axis("mixture", [CODE_HEAVY])


def test_an_unknown_section_names_the_variant():
    spec = AblationSpec("typo", BASE, axes=(Axis("trian.lr", [1e-3]),))
    with pytest.raises(ValueError, match=r"variant 'lr=0.001': trian.lr: unknown section 'trian'"):
        spec.documents()


def test_a_named_list_variant_may_set_a_whole_document():
    schedule = {"stages": [{"name": "all", "weights": {"web-en": 0.2, "code-python": 0.8}}]}
    spec = AblationSpec(name="docs", base={"runs_dir": "runs", "train": {"lr": 0.001}}, mode="list",
                        variants=({"name": "code-heavy", "mixture": schedule, "train.lr": 0.002},))
    variant = spec.expand()[-1]
    assert variant.name == "code-heavy" and variant.labels == {"mixture": "code-heavy", "train.lr": "0.002"}
    assert variant.document(spec.base)["mixture"] == schedule
    with pytest.raises(AblationSpecError, match="is a document"):
        AblationSpec(name="docs", base={"runs_dir": "runs"}, mode="list", variants=({"mixture": schedule},)).expand()


def test_a_tokenizer_axis_trains_each_candidate_on_its_own_token_dataset(curated_dir: Path, tmp_path: Path):
    """`mixlab tokenize` writes one token dataset per candidate; a `tokenizer` axis points each proxy at its own,
    sizes its model from that vocabulary, and the report ranks the variants by bits per byte."""

    from mixlab.ablations.ablation_report import ranked_table
    from mixlab.ablations.launch import LocalLauncher, resolved_config, run_ablation
    from mixlab.ablations.results import ablation_results
    from mixlab.curation import ShardManifest
    from mixlab.curation.token_shards import read_doc_metadata
    from mixlab.pipelines.cli import main

    # two web sources of the real curated corpus, untokenized
    curated = copy_untokenized_sources(curated_dir, tmp_path / "curated", ("web-de", "web-ru"))
    assert main(["tokenize", "--curated", str(curated), "--vocab-sizes", "300,400", "--val-fraction", "0.1"]) == 0

    base = {"runs_dir": str(tmp_path / "runs"), "data": {"curated": str(curated)}, "model": {"preset": "tiny"},
            "mixture": {"stages": [{"name": "all", "weights": {"web-de": 0.5, "web-ru": 0.5}}]},
            "train": {"preset": "tiny", "total_steps": 6, "checkpoint_every": 6, "eval_every": 6, "warmup_steps": 2,
                      "progress_bar": False}}
    spec = AblationSpec("tok", base, axes=(Axis("tokenizer", ["bpe-300", "bpe-400"]),), include_base=False)
    documents = spec.documents()
    assert sorted(documents) == ["tok-tokenizer_bpe-300-s0", "tok-tokenizer_bpe-400-s0"]
    for vocab in (300, 400):
        document = documents[f"tok-tokenizer_bpe-{vocab}-s0"]
        assert document["data"]["curated"] == str(curated / "tokenized" / f"bpe-{vocab}")
        assert "tokenizer" not in document and resolved_config(document).model.vocab_size == vocab
    # the same held-out documents in both token datasets: bits per byte is measured on the same text
    held_out = [sorted(read_doc_metadata(ShardManifest.load(curated / "tokenized" / name), "web-ru", "val",
                                         ["id"]).column("id").to_pylist()) for name in ("bpe-300", "bpe-400")]
    assert held_out[0] == held_out[1] and held_out[0]

    run_ablation(spec, LocalLauncher(parallel=1, threads=1))
    table = ranked_table(ablation_results(spec), "all/bpb", base_variant="tokenizer=bpe-300")
    rows = {row["variant"]: row for row in table.iter_rows(named=True)}
    assert set(rows) == {"tokenizer=bpe-300", "tokenizer=bpe-400"}
    assert all(0 < row["mean"] < 20 for row in rows.values())  # bits per byte of a barely trained model
    larger, smaller = rows["tokenizer=bpe-400"], rows["tokenizer=bpe-300"]
    assert larger["diff_to_base"] == larger["mean"] - smaller["mean"]
    assert "than base" in rows["tokenizer=bpe-400"]["verdict"]


@pytest.mark.parametrize(("base", "value", "match"), [
    ({"model": {"preset": "tiny", "vocab_size": 600}}, "bpe-300", "leave it out"),
    ({"eval": {"curated": "other"}}, "bpe-300", "eval.curated"),
    ({}, "../elsewhere", "name a token dataset"),
])
def test_a_tokenizer_axis_refuses_what_belongs_to_another_tokenizer(base, value, match):
    document = {**BASE, "model": {"preset": "tiny"}, **base}
    with pytest.raises(AblationSpecError, match=match):
        AblationSpec("tok", document, axes=(Axis("tokenizer", [value]),), include_base=False).documents()
