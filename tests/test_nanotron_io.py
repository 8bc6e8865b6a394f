"""nanotron data_stages import and export: SmolLM3's two configs round-trip exactly; mixlab token folders map to
their source; train_steps and sequence_length are honoured."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mixlab.curation import ShardManifest
from mixlab.mixtures.nanotron import (
    nanotron_source_name,
    read_nanotron_config,
    to_nanotron_config,
    to_nanotron_data_stages,
)
from mixlab.mixtures.schedule import Curriculum, MixtureSchedule, ScheduleError, Stage

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "smollm3"
CONFIGS = ["pretraining_3_stages.yaml", "long_context_4k_to_32k.yaml"]
needs_reference = pytest.mark.skipif(not REFERENCE.exists(), reason="SmolLM3 reference configs not on this machine")


@needs_reference
@pytest.mark.parametrize("name", CONFIGS)
def test_smollm3_configs_round_trip_exactly(name):
    original = yaml.safe_load((REFERENCE / name).read_text())
    imported = read_nanotron_config(REFERENCE / name)
    assert imported.train_steps == original["tokens"]["train_steps"]
    assert imported.sequence_length == original["tokens"]["sequence_length"]
    exported = to_nanotron_config(imported.schedule, imported.dataset_folders, imported.train_steps,
                                  read_paths=imported.read_paths, sequence_length=imported.sequence_length)
    for ours, theirs in zip(exported["data_stages"], original["data_stages"], strict=True):
        assert ours["name"] == theirs["name"]
        assert ours["start_training_step"] == theirs["start_training_step"]
        for key in ("dataset_folder", "dataset_read_path", "dataset_weights"):
            assert ours["data"]["dataset"][key] == theirs["data"]["dataset"][key], (ours["name"], key)
    assert exported["tokens"] == {"train_steps": imported.train_steps, "sequence_length": imported.sequence_length}
    # through YAML text, as nanotron would read it, and back: the same schedule
    again = read_nanotron_config(yaml.safe_dump(exported, sort_keys=False))
    assert again.schedule == imported.schedule and again.dataset_folders == imported.dataset_folders
    assert again.read_paths == imported.read_paths and again.train_steps == imported.train_steps
    # exported onto the original config (model, optimizer, tokenizer fields kept), it *is* the original
    assert to_nanotron_config(imported.schedule, imported.dataset_folders, imported.train_steps,
                              read_paths=imported.read_paths, base=original) == original


@needs_reference
def test_the_long_context_config_imports_its_run_shape():
    imported = read_nanotron_config(REFERENCE / "long_context_4k_to_32k.yaml")
    assert [s.name for s in imported.schedule.stages] == ["lc stage"]
    assert imported.sequence_length == 32768 and imported.train_steps == 20000
    resolved = imported.schedule.resolve(imported.train_steps, 1, imported.sequence_length)
    assert resolved.stages[0].end_step == 20000 and resolved.seq_len_at_step(0) == 32768
    assert len(resolved.sources) == 56 and sum(resolved.weights_at_step(0).values()) == pytest.approx(1.0)


def test_train_steps_and_stage_sequence_length_are_honoured():
    config = {
        "tokens": {"train_steps": 100, "sequence_length": 256},
        "data_stages": [
            {"name": "short", "start_training_step": 1,
             "data": {"dataset": {"dataset_folder": ["/d/web", "/d/code"], "dataset_weights": [0.7, 0.3]}}},
            {"name": "long", "start_training_step": 81, "sequence_length": 1024,
             "data": {"dataset": {"dataset_folder": ["/d/web"], "dataset_weights": [1.0]}}},
        ],
    }
    imported = read_nanotron_config(config)
    assert imported.sequence_length == 256 and imported.train_steps == 100
    assert imported.schedule.stages[1].seq_len == 1024 and imported.schedule.stages[1].start_step == 80
    resolved = imported.schedule.resolve(100, 2, 256)
    assert [(s.start_step, s.end_step, s.seq_len) for s in resolved.stages] == [(0, 80, 256), (80, 100, 1024)]
    with pytest.raises(ScheduleError, match=r"last stage starts at step 81 after train_steps 50"):
        read_nanotron_config(config, train_steps=50)
    longer = read_nanotron_config(config, train_steps=400)
    assert longer.train_steps == 400
    assert longer.schedule.as_fractions(400).stages[0].fraction == pytest.approx(80 / 400)
    # one tokens.sequence_length per nanotron run: a stage with its own is refused on export, naming it
    with pytest.raises(ScheduleError, match=r"stage 'long' has seq_len 1024 but the run 256"):
        to_nanotron_config(imported.schedule, imported.dataset_folders, 100, sequence_length=256)
    with pytest.raises(ScheduleError, match=r"pass sequence_length="):
        to_nanotron_config(imported.schedule, imported.dataset_folders, 100)
    late = {**config, "data_stages": [{**config["data_stages"][0], "start_training_step": 5}]}
    with pytest.raises(ScheduleError, match=r"stage 'short' starts at step 5, but nanotron counts steps from 1"):
        read_nanotron_config(late)


def test_dataset_folders_of_mixlab_token_shards_map_to_their_sources(tokenized_curated: Path):
    manifest = ShardManifest.load(tokenized_curated)
    names = ["web-en", "code-python", "math"]
    folders = {name: str(manifest.resolve(f"tokens/{name}/train")) for name in names}
    assert all(Path(f).is_dir() for f in folders.values())
    assert nanotron_source_name(folders["web-en"] + "/") == "web-en"
    assert nanotron_source_name(str(manifest.resolve("tokens/math/val"))) == "math"
    config = {
        "tokens": {"train_steps": 50, "sequence_length": 64},
        "data_stages": [
            {"name": "stable", "start_training_step": 1, "data": {"dataset": {
                "dataset_folder": [folders["web-en"], folders["code-python"]], "dataset_weights": [0.6, 0.4]}}},
            {"name": "decay", "start_training_step": 41, "data": {"dataset": {
                "dataset_folder": [folders[n] for n in names], "dataset_weights": [0.2, 0.4, 0.4]}}},
        ],
    }
    imported = read_nanotron_config(config)  # used to fail: "two dataset paths map to the source name 'train'"
    assert imported.schedule.sources == sorted(names)
    assert imported.dataset_folders == folders
    available = {n for n, s in manifest.sources.items() if s.tokens.get("train")}
    imported.schedule.check_sources(available)
    exported = to_nanotron_data_stages(imported.schedule, folders, 50)
    assert [s["start_training_step"] for s in exported] == [1, 41]
    assert exported[1]["data"]["dataset"] == {"dataset_folder": [folders[n] for n in names],
                                              "dataset_weights": [0.2, 0.4, 0.4]}
    assert read_nanotron_config({**config, "data_stages": exported}).schedule == imported.schedule


def test_export_refusals_name_the_stage_and_leaf():
    schedule = MixtureSchedule((
        Stage("stable", {"web": 0.5, "code": 0.5}, 0.5),
        Stage("anneal", {"web": 1.0}, curriculum=Curriculum({"code": 1.0}, "linear")),
    ))
    paths = {"web": "/d/web", "code": "/d/code"}
    with pytest.raises(ScheduleError, match=r"stage 'anneal' has a linear curriculum.*curriculum_pieces=N"):
        to_nanotron_data_stages(schedule, paths, 100)
    with pytest.raises(ScheduleError, match=r"stage 'stable': no dataset path for \['code'\]"):
        to_nanotron_data_stages(schedule, {"web": "/d/web"}, 100, curriculum_pieces=2)
    pieces = to_nanotron_data_stages(schedule, paths, 100, curriculum_pieces=2)
    assert [(p["name"], p["start_training_step"]) for p in pieces] == [
        ("stable", 1), ("anneal (1/2)", 51), ("anneal (2/2)", 76)]
    # each piece carries the mean weights of its 25 steps: t = k / 49 for k in 0..24, mean 12 / 49
    first = dict(zip(pieces[1]["data"]["dataset"]["dataset_folder"],
                     pieces[1]["data"]["dataset"]["dataset_weights"], strict=True))
    assert first["/d/code"] == pytest.approx(12 / 49) and first["/d/web"] == pytest.approx(37 / 49)
    tokens = MixtureSchedule((Stage("a", {"web": 1.0}, tokens=640), Stage("b", {"web": 1.0})))
    with pytest.raises(ScheduleError, match="pass batch_size= and seq_len="):
        to_nanotron_data_stages(tokens, paths, 100)
    placed = to_nanotron_data_stages(tokens, paths, 100, batch_size=2, seq_len=32)
    assert [p["start_training_step"] for p in placed] == [1, 11]
