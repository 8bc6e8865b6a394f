"""The Stack-v2-style code recipe on real files: per-language rules, data/config detection, the language
allowlist and per-language counts in the manifest.

Files come from this machine: the CPython stdlib (.py, and its test data: JSON, TOML, XML), C headers under
/usr/include (both required), and, when present, Perl modules, npm's JavaScript (plain and minified),
package.json files, CSV files and lock files (each skipped cleanly when absent).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
from datatrove.data import Document
from mixlab.curation.accounting import build_source_entry
from mixlab.curation.code_filters import (
    CODE_KINDS,
    KNOWN_LANGUAGES,
    CodeKindFilter,
    CodeKindSettings,
    CodeLanguageAllowlist,
    CodeLanguageRules,
    CodeQualityFilter,
    CodeQualitySettings,
    language_key,
    programming_language_counts,
    visible_text,
)
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.filters import CodeQualityFilter as ReimportedCodeQualityFilter
from mixlab.curation.manifest import SourceEntry
from mixlab.curation.stages import SourceLayout
from mixlab.pipelines.code import CodeRecipe, code_filters, code_pipeline
from mixlab.pipelines.curate import run_source

STDLIB = Path(sysconfig.get_paths()["stdlib"])
INCLUDE = Path("/usr/include")
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "node_modules"}


def _readable(path: Path, min_bytes: int = 1) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not min_bytes <= len(data) < 1 << 20 or b"\x00" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _files(root: Path, pattern: str, n: int, skip: set[str] = SKIP_PARTS, min_bytes: int = 1,
           name_filter=lambda name: True) -> list[Path]:
    """Up to `n` readable UTF-8 files under `root` (sorted, so the same machine gives the same set)."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.rglob(pattern)):
        if skip.intersection(path.relative_to(root).parts[:-1]) or not name_filter(path.name):
            continue
        if path.is_file() and _readable(path, min_bytes):
            found.append(path)
            if len(found) == n:
                break
    return found


def _doc(path: Path, language: str) -> Document:
    return Document(text=path.read_text("utf-8"), id=str(path),
                    metadata={"programming_language": language, "path": path.name})


def _python_files(n: int) -> list[Path]:
    return _files(STDLIB, "*.py", n, skip=SKIP_PARTS | {"test", "tests", "idlelib"}, min_bytes=2000)


def _c_headers(n: int) -> list[Path]:
    headers = _files(INCLUDE, "*.h", n, min_bytes=500)
    assert headers, f"{INCLUDE}: no C headers on this machine; the code tests need them (apt-get install libc6-dev)"
    return headers


def _node_root() -> Path:
    return Path("/usr/lib/node_modules")


# ---- settings and the rule table -----------------------------------------------------------------------
def test_language_keys_and_rule_table() -> None:
    assert [language_key(n) for n in ("Python", "C++", "C#", "Emacs Lisp", None, " ")] == \
        ["python", "cpp", "csharp", "emacs_lisp", "unknown", "unknown"]
    assert {"python", "c", "cpp", "javascript", "json", "yaml"} <= KNOWN_LANGUAGES
    settings = CodeQualitySettings(max_line_length=500)
    assert settings.rules_for("Python").max_line_length == 500  # shared value, changed once for all languages
    assert settings.rules_for("JSON").max_line_length == 100_000  # Stack v2: data formats keep long lines
    json_rules = settings.rules_for("json")
    assert (json_rules.min_chars, json_rules.max_chars, json_rules.min_alpha_fraction) == (50, 5000, 0.5)  # StarCoder
    assert settings.rules_for("Brainfuck") == settings.rules_for(None)  # the fallback: the shared rules
    own = CodeQualitySettings(languages={"Python": CodeLanguageRules(max_mean_line_length=60)})
    assert own.rules_for("python").max_mean_line_length == 60 and own.rules_for("c").max_mean_line_length == 100
    from_config = CodeQualitySettings(languages={"Go": {"max_line_length": 200}})  # a table read from JSON/YAML
    assert from_config.rules_for("go").max_line_length == 200
    with pytest.raises(CurationConfigError, match=r"unknown rules \['max_line_lenght'\]"):
        CodeQualitySettings(languages={"go": {"max_line_lenght": 200}})
    assert ReimportedCodeQualityFilter is CodeQualityFilter  # filters.py keeps the old import working
    with pytest.raises(CurationConfigError, match=r"\['pyhton'\] are not programming languages"):
        CodeLanguageAllowlist(["Python", "pyhton"])
    with pytest.raises(CurationConfigError, match="must be a list"):
        CodeLanguageAllowlist("python")
    with pytest.raises(CurationConfigError, match="are not kinds"):
        CodeKindSettings(keep=("source", "binary"))


# ---- per-language quality rules on real files --------------------------------------------------------------
def test_quality_reasons_name_the_rule_and_the_language() -> None:
    quality = CodeQualityFilter()
    generated = _doc(STDLIB / "token.py", "Python")  # "Auto-generated by Tools/scripts/generate_token.py"
    assert quality.filter(generated) == (False, "code_autogenerated_python")
    assert quality.filter(_doc(STDLIB / "textwrap.py", "Python")) is True
    short = Document(text="\n".join((STDLIB / "textwrap.py").read_text().splitlines()[:3]), id="head",
                     metadata={"programming_language": "Python"})
    assert quality.filter(short) == (False, "code_min_lines_python")
    header = _c_headers(1)[0]
    text = header.read_text()
    long_line = Document(text=text + "\n/*" + "x" * 1200 + "*/\n", id="long", metadata={"programming_language": "C"})
    assert quality.filter(long_line) == (False, "code_max_line_length_c")
    # a line over 1000 characters is allowed in JSON (Stack v2), not in Python
    licence = " ".join((STDLIB / "LICENSE.txt").read_text().split())[:3000]
    one_line = json.dumps({"licence": licence})
    assert quality.filter(Document(text=one_line, id="j", metadata={"programming_language": "JSON"})) is True
    python = Document(text=one_line + "\n" * 5, id="p", metadata={"programming_language": "Python"})
    assert quality.filter(python) == (False, "code_max_line_length_python")
    assert quality.filter(Document(text=text, id="x")) in (True, (False, "code_autogenerated"))  # no language


def test_html_needs_visible_text() -> None:
    """StarCoder's HTML rule on real pages: a page of prose is kept; the same markup without its text is not."""
    pages = [p for p in _files(Path("/usr/share/doc"), "*.html", 40, skip=set(), min_bytes=3000)
             if len(visible_text(p.read_text())) >= 0.25 * len(p.read_text())][:5]
    if not pages:
        pytest.skip("no HTML pages under /usr/share/doc")
    quality = CodeQualityFilter()
    for page in pages:
        assert quality.filter(_doc(page, "HTML")) is True, page
        markup_only = re.sub(r">[^<]+<", lambda m: ">" + "\n" * m.group(0).count("\n") + "<", page.read_text())
        stripped = Document(text=markup_only, id="m", metadata={"programming_language": "HTML"})
        assert quality.filter(stripped) == (False, "code_min_visible_chars_html"), page


def test_python_kept_share_is_what_the_shared_rules_keep() -> None:
    """The per-language table and the data detection change almost nothing for real Python."""
    docs = [_doc(p, "Python") for p in _python_files(150)]
    assert len(docs) >= 50
    shared_only = CodeQualityFilter(languages={})
    before = sum(shared_only.filter(d) is True for d in docs)
    steps = code_filters(CodeRecipe())[1:-1]  # allowlist, kind, quality (no lid.176, no stats)
    after = sum(all(step.filter(d) is True for step in steps) for d in docs)
    assert before - after <= 0.03 * len(docs), (before, after, len(docs))


def test_code_python_source_keeps_its_share(raw_corpus: Path) -> None:
    """On the test corpus's code-python source: kept share versus the rules of before (the shared ones)."""
    docs = []
    for path in sorted((raw_corpus / "code-python").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as handle:
            for line in handle:
                record = json.loads(line)
                meta = {**record.get("metadata", {}), "programming_language": "python"}
                docs.append(Document(text=record["text"], id=record["id"], metadata=meta))
    assert docs
    before = sum(CodeQualityFilter(languages={}).filter(d) is True for d in docs)
    steps = code_filters(CodeRecipe())[1:-1]
    after = sum(all(step.filter(d) is True for step in steps) for d in docs)
    print(f"code-python: {len(docs)} docs, kept before {before} ({before / len(docs):.1%}), "
          f"now {after} ({after / len(docs):.1%})")
    assert before - after <= 0.03 * len(docs)


# ---- data and config files -------------------------------------------------------------------------------
def test_data_and_config_files_are_recognised() -> None:
    kinds = CodeKindFilter()
    tomllib = STDLIB / "test" / "test_tomllib" / "data" / "valid"
    cases: list[tuple[Path, str, str]] = []  # (file, its language, the expected reason)
    cases += [(p, "JSON", "data_format") for p in _files(tomllib, "*.json", 2)]
    cases += [(p, "TOML", "config_format") for p in _files(tomllib, "*.toml", 2)]
    cases += [(p, "XML", "data_format") for p in _files(STDLIB / "test" / "xmltestdata", "*.xml", 1)]
    cases += [(p, "JSON", "config_file_name") for p in _files(_node_root(), "package.json", 1, skip=set())]
    matplotlib = Path(sysconfig.get_paths()["purelib"]) / "matplotlib"
    cases += [(p, "CSV", "data_format") for p in _files(matplotlib, "*.csv", 1, skip=set())]
    cases += [(p, "JavaScript", "data_minified") for p in _files(_node_root(), "*.min.js", 2, skip=set())]
    for root in (_node_root(), Path("/usr/lib/google-cloud-sdk")):
        cases += [(p, "JSON", "data_lock_file") for p in _files(root, "package-lock.json", 1, skip=set())]
        cases += [(p, "JSON", "data_lock_file") for p in _files(root, "Pipfile.lock", 1, skip=set())]
    # tables of numbers under a source extension (Perl's CJK collation tables; numpy's test vectors as .txt)
    cases += [(p, "Perl", "data_mostly_numbers") for p in _files(Path("/usr/share/perl"), "Big5.pm", 1)]
    numpy_data = Path(sysconfig.get_paths()["purelib"]) / "numpy" / "random" / "tests" / "data"
    cases += [(p, "Text", "data_mostly_numbers") for p in _files(numpy_data, "*.csv", 1)]
    if not cases:
        pytest.skip("no data or config files on this machine (stdlib test data, npm)")
    for path, language, reason in cases:
        assert kinds.filter(_doc(path, language)) == (False, reason), path
    # a Python test module that embeds base64 .mo files is data (Stack v2's encoded-data rule)
    gettext_test = STDLIB / "test" / "test_gettext.py"
    if gettext_test.is_file():
        assert kinds.filter(_doc(gettext_test, "Python")) == (False, "data_encoded_data")
    # real source stays, and keeping every kind only tags
    tagging = CodeKindFilter(keep=CODE_KINDS)
    for path, language, reason in cases:
        doc = _doc(path, language)
        assert tagging.filter(doc) is True and doc.metadata["code_kind"] == reason.split("_")[0]
    for path in _python_files(20) + _c_headers(20):
        doc = _doc(path, "C" if path.suffix == ".h" else "Python")
        assert kinds.filter(doc) is True and doc.metadata["code_kind"] == "source", path


# ---- the recipe end to end, on a code tree --------------------------------------------------------------------
def _build_tree(root: Path) -> Counter:
    """A repository of copies of real files; returns the number of files per language key."""
    repo = root / "raw" / "code-tree"
    counts: Counter = Counter()

    def put(paths: list[Path], folder: str, language: str, keep_name: bool = False) -> None:
        for i, path in enumerate(paths):
            target = repo / folder / (path.name if keep_name else f"{i:03d}_{path.name}")
            if keep_name and target.exists():
                target = repo / folder / f"{i:03d}" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            counts[language] += 1

    repo.mkdir(parents=True)
    shutil.copyfile(STDLIB / "LICENSE.txt", repo / "LICENSE")
    put([STDLIB / "token.py", STDLIB / "textwrap.py", *_python_files(12)], "py", "python")
    put(_c_headers(10), "include", "c")
    put(_files(Path("/usr/share/perl"), "*.pm", 4, min_bytes=1000), "perl", "perl")
    put(_files(_node_root(), "*.js", 4, skip=set(), min_bytes=1000, name_filter=lambda n: ".min." not in n),
        "js", "javascript")
    put(_files(_node_root(), "*.min.js", 1, skip=set()), "js", "javascript")
    tomllib = STDLIB / "test" / "test_tomllib" / "data" / "valid"
    put(_files(tomllib, "*.json", 3, min_bytes=60), "data", "json")
    put(_files(tomllib, "*.toml", 3, min_bytes=60), "data", "toml")
    put(_files(STDLIB / "test" / "xmltestdata", "*.xml", 2), "data", "xml")
    put(_files(_node_root(), "package.json", 1, skip=set()), "", "json", keep_name=True)
    return counts


def _curate_code_tree(raw: Path, curated: Path, source: str, recipe: CodeRecipe) -> SourceEntry:
    """What `curate()` does for one source: its stages, then its manifest entry. (`curate()` itself finds only
    JSONL/Parquet sources under raw/, not code trees.)"""
    # two tasks: with one, accounting's `merged_stage_stats` keeps datatrove's raw per-rank values, and a byte
    # count (a stat with a value) is then a dict that `_count` cannot read
    pipelines = code_pipeline(raw, curated, source=source, tasks=2, recipe=recipe)
    layout = SourceLayout(source, raw / source, curated)
    run_source(pipelines, layout, tasks=2, workers=1)
    return build_source_entry(pipelines, layout)


def _language_of(path: str) -> str:
    return {".py": "python", ".h": "c", ".pm": "perl", ".js": "javascript", ".json": "json", ".toml": "toml",
            ".xml": "xml"}[Path(path).suffix]


def _check_counts(entry: SourceEntry, expected: Counter) -> dict[str, dict[str, int]]:
    assert entry.check_accounting() == []
    per_language = programming_language_counts(entry)
    assert {lang: row["docs_in"] for lang, row in per_language.items()} == dict(expected)
    for row in per_language.values():
        assert row["kept"] + row["dropped"] == row["docs_in"] and row["bytes_in"] >= row["kept_bytes"]
    return per_language


def test_code_recipe_on_a_real_code_tree(tmp_path: Path) -> None:
    expected = _build_tree(tmp_path)
    assert expected["python"] >= 10 and expected["c"] >= 5
    raw, curated = tmp_path / "raw", tmp_path / "curated"
    source = "code-tree"

    # the default recipe: data and config files dropped, per-language rules, counts per language
    entry = _curate_code_tree(raw, curated, source, CodeRecipe(decontam=None))
    per_language = _check_counts(entry, expected)
    steps = {step.name: step for step in entry.steps}
    kind_drops = steps["code_kind_filter"].dropped
    config_named = len(list((raw / source).glob("package.json")))  # a data format that configures: config
    assert kind_drops.get("data_format", 0) == expected["xml"] + expected["json"] - config_named
    assert kind_drops.get("config_format", 0) == expected["toml"]
    assert kind_drops.get("config_file_name", 0) == config_named
    for lang in ("json", "toml", "xml"):
        assert lang not in per_language or per_language[lang]["kept"] == 0
    quality = steps["code_quality"].dropped
    assert quality.get("code_autogenerated_python", 0) >= 1  # token.py
    assert all(reason.startswith("code_") and any(reason.endswith(f"_{lang}") for lang in expected)
               for reason in quality), quality
    assert per_language["python"]["kept"] >= expected["python"] - 4
    assert per_language["c"]["kept"] >= 1
    stats = steps["code_language_stats"]
    assert sum(v for k, v in stats.counts.items() if k.endswith("_docs")) == stats.kept
    kept_paths = {json.loads(line)["metadata"]["path"]
                  for f in (curated / "work" / source / "filtered").glob("*.jsonl.gz")
                  for line in gzip.open(f, "rt")}
    assert "py/001_textwrap.py" in kept_paths and "py/000_token.py" not in kept_paths
    assert entry.docs <= stats.kept  # dedup runs after the statistics

    # allowlist and tag-only kinds: Python and C only; data files of those would be kept, tagged
    recipe = CodeRecipe(languages=["Python", "C"], kinds=CodeKindSettings(keep=CODE_KINDS), decontam=None,
                        exact=None)
    entry = _curate_code_tree(raw, curated, source, recipe)
    per_language = _check_counts(entry, expected)
    steps = {step.name: step for step in entry.steps}
    others = sum(n for lang, n in expected.items() if lang not in ("python", "c"))
    assert steps["code_language_allowlist"].dropped == ({"language_not_allowed": others} if others else {})
    for lang, row in per_language.items():
        if lang not in ("python", "c"):
            assert row["kept"] == 0 and row["dropped"] == expected[lang]
    records = [json.loads(line) for f in (curated / "work" / source / "filtered").glob("*.jsonl.gz")
               for line in gzip.open(f, "rt")]
    assert records and all(r["metadata"]["code_kind"] in CODE_KINDS for r in records)
    assert {_language_of(r["metadata"]["path"]) for r in records} <= {"python", "c"}
