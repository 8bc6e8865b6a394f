"""Small, fast checks of curation's settings, accounting rules and errors (no corpus needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters.base_filter import BaseFilter
from mixlab.curation.accounting import CountedStep, count_plain_steps, step_name
from mixlab.curation.console import DocumentProgress, quiet_datatrove_console
from mixlab.curation.extract import EXTRACT_TIMEOUT_S
from mixlab.curation.filters import (
    STOP_WORDS,
    ChatFormatFilter,
    ChatFormatSettings,
    CodeQualityFilter,
    CodeQualitySettings,
    GopherSettings,
    MathQualityFilter,
    MathQualitySettings,
    gopher_filters,
)
from mixlab.curation.lid import LANGUAGE_THRESHOLD
from mixlab.curation.manifest import SourceEntry, StepStats
from mixlab.curation.text import RegexWordTokenizer
from mixlab.pipelines.chat import ChatRecipe, chat_pipeline
from mixlab.pipelines.code import CodeRecipe, code_pipeline
from mixlab.pipelines.curate import curate
from mixlab.pipelines.math import MathRecipe, math_pipeline
from mixlab.pipelines.web import WebRecipe


def test_accounting_compares_the_last_step_with_the_shards_even_when_there_are_none() -> None:
    lost = SourceEntry(name="math", kind="math", docs=0, steps=[StepStats("read", 5, 5), StepStats("dedup", 5, 4, {"dup": 1})])
    assert lost.check_accounting() == ["math: last step kept 4 but shards hold 0 docs"]
    empty = SourceEntry(name="math", kind="math", docs=0, steps=[StepStats("read", 3, 0, {"quarantine_bad": 3})],
                       quarantined=3)
    assert empty.check_accounting() == []
    assert SourceEntry(name="new", kind="web").check_accounting() == []  # no steps: nothing to compare


def test_gopher_settings_keep_explicit_values_and_fill_only_unset_ones() -> None:
    assert GopherSettings(language="de", max_avg_word_length=15).max_avg_word_length == 15
    assert GopherSettings(language="de").max_avg_word_length == 12  # the German default
    assert GopherSettings(language="en").max_avg_word_length == 10  # the paper's
    assert GopherSettings(language="de", min_doc_words=0).min_doc_words == 0  # 0 turns a rule off, not "unset"
    german = GopherSettings(language="de")
    assert german.stop_words == STOP_WORDS["de"] and german.min_stop_words == 2
    assert GopherSettings(language="ja").min_stop_words == 0  # no list: the stop-word rule is skipped
    assert GopherSettings(language="ja", stop_words=["の", "に"]).min_stop_words == 2
    with pytest.raises(ValueError, match="needs a stop-word list"):
        GopherSettings(language="ja", min_stop_words=2)
    quality = gopher_filters(GopherSettings(language="de", max_avg_word_length=15), RegexWordTokenizer("de"))[1]
    assert quality.max_avg_word_length == 15


def test_filter_defaults_live_in_their_settings(tmp_path: Path) -> None:
    assert CodeQualityFilter().settings == CodeRecipe().quality == CodeQualitySettings()
    assert MathQualityFilter().settings == MathRecipe().quality == MathQualitySettings()
    assert ChatFormatFilter().settings == ChatRecipe().format == ChatFormatSettings()
    assert CodeQualityFilter(min_lines=3).settings == CodeQualitySettings(min_lines=3)  # keyword overrides
    assert WebRecipe().language_threshold == LANGUAGE_THRESHOLD
    assert WebRecipe().extract_timeout_s == EXTRACT_TIMEOUT_S

    def step(pipelines, cls):
        return next(s for s in pipelines.stages[0].pipeline if isinstance(s, cls))

    code = code_pipeline(tmp_path, tmp_path, recipe=CodeRecipe(quality=CodeQualitySettings(min_lines=9)))
    assert step(code, CodeQualityFilter).settings.min_lines == 9
    math = math_pipeline(tmp_path, tmp_path, recipe=MathRecipe(quality=MathQualitySettings(min_words=7)))
    assert step(math, MathQualityFilter).settings.min_words == 7
    chat = chat_pipeline(tmp_path, tmp_path, recipe=ChatRecipe(format=ChatFormatSettings(max_chars=99)))
    assert step(chat, ChatFormatFilter).settings.max_chars == 99
    assert chat.config["format"]["max_chars"] == 99  # fingerprinted: a changed setting re-curates


def test_recipes_use_only_the_curation_package_interface() -> None:
    """Stage boundaries: pipelines build sources from what `curation/__init__.py` exports, not its modules."""
    import ast

    from mixlab import curation

    root = Path(__file__).resolve().parents[1] / "pipelines"
    for name in ("web", "code", "math", "chat", "curate", "corpus", "multilingual", "tokenize"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mixlab.curation"):
                assert node.module == "mixlab.curation", f"pipelines/{name}.py imports {node.module}"
                assert all(alias.name in curation.__all__ for alias in node.names)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mixlab.curation.") for a in node.names), f"pipelines/{name}.py"


def test_curate_without_a_raw_corpus_says_to_fetch_it(tmp_path: Path) -> None:
    missing = tmp_path / "work"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: does not exist.*mixlab corpus fetch --out WORKDIR"):
        curate(missing, tmp_path / "curated")
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{missing}: holds no raw sources.*mixlab corpus fetch --out"):
        curate(missing, tmp_path / "curated")
    (missing / "raw" / "math").mkdir(parents=True)
    (missing / "raw" / "math" / "00000.jsonl.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no raw files for \['chat'\] \(found \['math'\]\)"):
        curate(missing, tmp_path / "curated", sources=["chat"])
    assert not (tmp_path / "curated").exists()


class _KeepAll(BaseFilter):
    name = "keep all"

    def filter(self, doc: Document) -> bool:
        return True


def _run_datatrove(logging_dir: Path) -> None:
    docs = [Document(text=f"document {i}", id=str(i)) for i in range(3)]
    LocalPipelineExecutor([docs, _KeepAll()], tasks=1, workers=1, logging_dir=str(logging_dir)).run()


def test_quiet_console_hides_task_logs_and_leaves_loguru_on_the_real_stderr(tmp_path, capsys, monkeypatch):
    """datatrove re-adds `sys.stderr` (the filter, then) as loguru's sink when a task ends; after the context
    loguru must write to the real stderr, not keep going through the filter (which drops lines it finds noisy)."""
    from loguru import logger

    monkeypatch.delenv("MIXLAB_VERBOSE", raising=False)
    try:
        with quiet_datatrove_console():
            _run_datatrove(tmp_path / "quiet")
        assert "Launching pipeline" not in capsys.readouterr().err  # INFO stays in the run's logs/ folder
        assert "Launching pipeline" in next((tmp_path / "quiet" / "logs").glob("task_*.log")).read_text()
        logger.info("an info line after the run")
        logger.warning("a warning that mentions an empty page")  # the filter would drop it as trafilatura noise
        err = capsys.readouterr().err
        assert "an empty page" in err and "an info line" not in err

        monkeypatch.setenv("MIXLAB_VERBOSE", "1")
        with quiet_datatrove_console():
            _run_datatrove(tmp_path / "verbose")
        assert "Launching pipeline" in capsys.readouterr().err
    finally:
        logger.remove()
        logger.add(sys.__stderr__, level="WARNING")  # not pytest's capture stream, which closes after the test


def test_datatrove_output_is_hidden_and_its_errors_are_one_line_naming_the_log(tmp_path, capsys, monkeypatch):
    """Two workers (forked) with one task on no input: datatrove warns, prints stats blocks and a final
    merged stats block in the parent; only an ERROR gets through, shortened, with the log folder."""
    from loguru import logger

    monkeypatch.delenv("MIXLAB_VERBOSE", raising=False)
    docs = [Document(text=f"document {i}", id=str(i)) for i in range(3)]

    def log_an_error(data, rank: int = 0, world_size: int = 1):
        logger.warning("a datatrove-style warning")
        logger.error("something went wrong in a step")
        yield from data

    try:
        with quiet_datatrove_console(tmp_path / "logs-dir"):
            LocalPipelineExecutor([docs, log_an_error, _KeepAll()], tasks=2, workers=1,
                                  logging_dir=str(tmp_path / "logs-dir")).run()
        err = capsys.readouterr().err
        assert err.splitlines() == [f"datatrove error: something went wrong in a step (log: {tmp_path / 'logs-dir' / 'logs'})"] * 2
        assert "a datatrove-style warning" in (tmp_path / "logs-dir" / "logs" / "task_00000.log").read_text()
    finally:
        logger.remove()
        logger.add(sys.__stderr__, level="WARNING")


def test_progress_counts_documents_read_by_forked_workers(tmp_path) -> None:
    import io

    docs = [Document(text=f"document {i}", id=str(i)) for i in range(100)]
    stream = io.StringIO()
    progress = DocumentProgress("math filter", total=207, tasks=2, initial=7, stream=stream, enabled=True)
    with quiet_datatrove_console(tmp_path), progress:
        LocalPipelineExecutor([docs, progress.counter, _KeepAll()], tasks=2, workers=2, logging_dir=str(tmp_path),
                              start_method="fork").run()
    assert progress.read() == 7 + 2 * 100  # each rank reads the whole list: the slots of both forked workers count
    assert "math filter" in stream.getvalue() and "207/207" in stream.getvalue()


def test_plain_steps_are_wrapped_to_be_counted() -> None:
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def drop_odd(data, rank: int = 0, world_size: int = 1):
        yield from (d for d in data if int(d.id) % 2 == 0)

    reader, keep, writer = JsonlReader("/nonexistent"), _KeepAll(), JsonlWriter("/nonexistent")
    wrapped = count_plain_steps([reader, drop_odd, keep, writer])
    assert wrapped[0] is reader and wrapped[2] is keep and wrapped[3] is writer
    assert isinstance(wrapped[1], CountedStep) and step_name(wrapped[1]) == "drop_odd"
    assert count_plain_steps(wrapped) == wrapped  # already counted: not wrapped twice
    out = list(wrapped[1].run(iter([Document(text="x", id=str(i)) for i in range(5)])))
    assert [d.id for d in out] == ["0", "2", "4"]
    stats = wrapped[1].stats
    assert (stats["total"].total, stats["forwarded"].total, stats["dropped"].total) == (5, 3, 2)


def test_spacy_tokenizes_without_importing_torch_and_torch_still_imports_after() -> None:
    """thinc, under spaCy, imports torch when it is installed (2.3 s of every curation process); curation's
    spaCy import hides it, and only for that import."""
    import subprocess

    code = ("import sys; from mixlab.curation.text import blank_nlp; "
            "print([t.text for t in blank_nlp('fr')('Bonjour, le monde.')]); print('torch' in sys.modules); "
            "import torch; print(int(torch.ones(2).sum()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["['Bonjour', ',', 'le', 'monde', '.']", "False", "2"]
