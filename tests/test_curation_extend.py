"""Your own datatrove steps in a recipe, empty sources, errors that name the log, the caller's environment,
and a console with one line per source. Every curate here is real, on a slice of the test corpus's math."""

from __future__ import annotations

import importlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from mixlab.curation import CurationError, SourceLayout
from mixlab.pipelines.corpus import iter_raw_documents
from mixlab.pipelines.curate import curate, load_recipe_specs
from mixlab.pipelines.math import math_pipeline
from test_curation import write_raw

REPO_ROOT = Path(__file__).resolve().parents[1]

# The README's example, as a user writes it in a module of their own.
MY_STEPS = '''
from datatrove.pipeline.filters.base_filter import BaseFilter
from mixlab.pipelines.math import math_pipeline


class DropWord(BaseFilter):
    """Drops documents that contain a word."""

    name = "drop word"

    def __init__(self, word: str):
        super().__init__()
        self.word = word

    def filter(self, doc):
        return self.word not in doc.text.lower() or (False, f"contains_{self.word}")


def math_without_apples(raw_dir, curated_dir, tasks):
    return math_pipeline(raw_dir, curated_dir, tasks=tasks, extra_steps=[DropWord("apples")])
'''


class KeepShortDocuments(PipelineStep):
    """A plain PipelineStep (not a BaseFilter) that drops long documents without counting them."""

    name = "keep short documents"

    def __init__(self, max_chars: int):
        super().__init__()
        self.max_chars = max_chars

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if len(doc.text) <= self.max_chars:
                yield doc


class DropAll(BaseFilter):
    name = "drop all"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        return False, "not_wanted"


class Boom(BaseFilter):
    name = "boom"

    def filter(self, doc: Document) -> bool:
        raise RuntimeError(f"cannot judge {doc.id}")


def math_slice(raw_corpus: Path, root: Path, docs: int, files: int = 2) -> Path:
    """`root/raw/math` with the first `docs` math documents of the test corpus."""
    write_raw(root / "raw", "math", list(iter_raw_documents(raw_corpus / "math"))[:docs], files=files)
    return root / "raw"


def rows(curated: Path, source: str) -> list[dict]:
    return [r for p in sorted(SourceLayout(source, Path(), curated).output.glob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]


def repo_cache_listing() -> set[str]:
    """What is under the checkout's `.cache/mixlab`, downloads aside (other sessions may fetch meanwhile)."""
    root = REPO_ROOT / ".cache" / "mixlab"
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.relative_to(root).parts[0] != "downloads"} if root.exists() else set()


@pytest.fixture
def my_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The README example's module, importable as `my_steps`."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "my_steps.py").write_text(MY_STEPS)
    monkeypatch.syspath_prepend(str(folder))
    yield "my_steps"
    sys.modules.pop("my_steps", None)


def test_own_steps_from_the_cli_spec_are_counted_and_the_environment_is_untouched(
        raw_corpus: Path, tmp_path: Path, my_steps: str) -> None:
    raw = math_slice(raw_corpus, tmp_path, 300)
    curated = tmp_path / "curated"
    recipes = load_recipe_specs([f"{my_steps}:math_without_apples"], raw, curated)
    assert list(recipes) == ["math"]
    drop_word = importlib.import_module(my_steps).DropWord
    with_plain = {"math": lambda r, c, t: math_pipeline(r, c, tasks=t, extra_steps=[
        drop_word("apples"), KeepShortDocuments(max_chars=400)])}
    env, cache = dict(os.environ), repo_cache_listing()
    manifest = curate(raw, curated, sources=["math"], recipes=with_plain, console=io.StringIO())
    assert dict(os.environ) == env  # HF_HOME, XDG_CACHE_HOME, HF_HUB_OFFLINE, DATATROVE_* all gone again
    assert repo_cache_listing() == cache  # no cache in the checkout
    steps = {s.name: s for s in manifest.source("math").steps}
    assert [s.name for s in manifest.source("math").steps] == [
        "read", "language_id", "math_quality", "drop_word", "keep_short_documents", "decontamination_filter",
        "exact_dedup", "minhash_dedup"]
    assert steps["drop_word"].dropped == {"contains_apples": steps["drop_word"].dropped_total}
    assert steps["drop_word"].dropped_total > 0
    assert steps["keep_short_documents"].dropped == {"unspecified": steps["keep_short_documents"].dropped_total}
    assert steps["keep_short_documents"].dropped_total > 0
    assert manifest.check() == []
    kept = rows(curated, "math")
    assert kept and all("apples" not in r["text"].lower() and len(r["text"]) <= 400 for r in kept)

    only_spec = curate(raw, tmp_path / "curated-spec", sources=["math"], recipes=recipes, console=io.StringIO())
    assert [s.name for s in only_spec.source("math").steps][3] == "drop_word"
    assert only_spec.source("math").docs > manifest.source("math").docs  # no length limit here


def test_recipe_specs_fail_early_with_clear_errors(raw_corpus: Path, tmp_path: Path, my_steps: str) -> None:
    raw = math_slice(raw_corpus, tmp_path, 10)
    (tmp_path / "user_code" / "bad_recipes.py").write_text(textwrap.dedent("""
        from mixlab.pipelines.math import math_pipeline
        NOT_A_FUNCTION = 3
        def returns_steps(raw_dir, curated_dir, tasks):
            return []
        def math_recipe(raw_dir, curated_dir, tasks):
            return math_pipeline(raw_dir, curated_dir, tasks=tasks)
    """))
    cases = {
        "no_such_module_xyz:f": r"cannot import module 'no_such_module_xyz'",
        f"{my_steps}:missing": r"has no 'missing'",
        "bad_recipes:NOT_A_FUNCTION": r"is a int, not a function",
        "bad_recipes:returns_steps": r"returned list, not SourcePipelines",
        "chat=bad_recipes:math_recipe": r"builds source 'math', not 'chat'",
        "just_a_name": r"expected module:function or SOURCE=module:function",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_recipe_specs([spec], raw, tmp_path / "curated")
    assert list(load_recipe_specs(["math=bad_recipes:math_recipe"], raw, tmp_path / "curated")) == ["math"]
    sys.modules.pop("bad_recipes", None)


def test_a_filter_that_drops_everything_gives_an_empty_source(raw_corpus: Path, tmp_path: Path) -> None:
    raw = math_slice(raw_corpus, tmp_path, 40)
    curated = tmp_path / "curated"
    recipes = {"math": lambda r, c, t: math_pipeline(r, c, tasks=t, extra_steps=[DropAll()])}
    console = io.StringIO()
    manifest = curate(raw, curated, sources=["math"], recipes=recipes, console=console)
    entry = manifest.source("math")
    assert entry.docs == 0 and entry.shards == [] and manifest.check() == []
    assert entry.steps[0].docs_in == 40
    drop_all = next(s for s in entry.steps if s.name == "drop_all")
    assert drop_all.dropped == {"not_wanted": drop_all.docs_in} and drop_all.docs_in > 0
    assert entry.steps[-1].name == "minhash_dedup" and entry.steps[-1].docs_in == 0
    line, = console.getvalue().splitlines()
    assert "WARNING: empty source" in line and f"drop_all dropped {drop_all.docs_in} (not_wanted" in line
    assert not list(SourceLayout("math", Path(), curated).output.glob("*.parquet"))
    # run again: nothing to do, and still no "No files found" from a later stage
    again = io.StringIO()
    assert curate(raw, curated, sources=["math"], recipes=recipes, console=again).source("math").steps == entry.steps
    assert "unchanged" in again.getvalue()


def test_a_failing_step_names_its_log(raw_corpus: Path, tmp_path: Path) -> None:
    raw = math_slice(raw_corpus, tmp_path, 10)
    recipes = {"math": lambda r, c, t: math_pipeline(r, c, tasks=t, extra_steps=[Boom()])}
    env = dict(os.environ)
    with pytest.raises(CurationError, match=r"math: datatrove stage 'filter' failed: RuntimeError: cannot judge "
                                            r".*the traceback is in .*logs/math/filter/logs/task_0000\d\.log") as err:
        curate(raw, tmp_path / "curated", sources=["math"], recipes=recipes, console=io.StringIO())
    log_file = Path(str(err.value).rsplit("the traceback is in ", 1)[1])
    assert "Traceback" in log_file.read_text() and "cannot judge" in log_file.read_text()
    assert dict(os.environ) == env  # restored on error too


def test_console_has_one_line_per_source_and_no_datatrove_output(raw_corpus: Path, tmp_path: Path) -> None:
    """A script calling `curate()`: one file per source and two tasks make datatrove warn ("No files found
    for rank=1"), print stats blocks and INFO lines; none of it may reach the console."""
    raw = math_slice(raw_corpus, tmp_path, 60, files=1)
    write_raw(raw, "chat", list(iter_raw_documents(raw_corpus / "chat"))[:60], files=1)
    script = (f"from mixlab.pipelines.curate import curate; "
              f"curate({str(raw)!r}, {str(tmp_path / 'curated')!r}, sources=['chat', 'math'])")
    env = {k: v for k, v in os.environ.items() if k != "MIXLAB_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    assert [line.split()[0] for line in lines] == ["chat", "math"], lines
    assert all("docs read →" in line and " kept " in line and line.rstrip().endswith(" s") for line in lines), lines
    for noise in ("| INFO", "| WARNING", "| SUCCESS", "Stats", "📉", "PipelineStats", "No files found"):
        assert noise not in done.stdout + done.stderr
    # datatrove's own logs are where they belong
    task_logs = (tmp_path / "curated" / "logs" / "math" / "filter" / "logs").glob("task_*.log")
    assert any("No files found" in p.read_text() for p in task_logs)
    assert json.loads((tmp_path / "curated" / "manifest.json").read_text())["sources"]["math"]["docs"] > 0
