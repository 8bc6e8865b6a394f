"""Math (FineMath / OpenWebMath style): extraction that keeps TeX and code blocks, the `math-web` source, and the
math scorer in the recipe, on real pages (SymPy's and Python's HTML docs) and the test corpus."""

from __future__ import annotations

import gzip
import html as htmlmod
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import trafilatura
from datatrove.data import Document
from mixlab.curation.classify import ClassifierTrainConfig, ExampleSpec, load_classifier, train_classifier
from mixlab.curation.downloads import Downloads, SourceUnavailable, default_cache_dir
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.math_extract import MathTrafilatura, extract_math_html, rewrite_math_html
from mixlab.pipelines.corpus import fetch_corpus, iter_raw_documents
from mixlab.pipelines.curate import curate
from mixlab.pipelines.math import MathRecipe, math_pipeline, raw_records_are_html

SYMPY_HTML = "usr/share/doc/python-sympy-doc/html"
SYMPY_PAGES = ("modules/simplify/hyperexpand.html", "modules/integrals/integrals.html",
               "tutorials/intro-tutorial/calculus.html")
PYTHON_PAGES = ("library/itertools.html", "tutorial/controlflow.html")
_IMG = re.compile(r"<img\b[^>]*>", re.S)
_ALT = re.compile(r'\balt="([^"]*)"')
_PRE = re.compile(r"<pre\b[^>]*>(.*?)</pre>", re.S)
_TAG = re.compile(r"<[^>]+>")


def _package_root(package: str) -> Path:
    try:
        return Downloads(default_cache_dir()).deb(package)
    except SourceUnavailable as err:
        pytest.skip(f"{package} cannot be fetched here: {err}")


@pytest.fixture(scope="module")
def sympy_html() -> Path:
    return _package_root("python-sympy-doc") / SYMPY_HTML


@pytest.fixture(scope="module")
def python_html() -> Path:
    return _package_root("python3.11-doc") / "usr/share/doc/python3.11/html"


def page_formulas(page: str) -> list[str]:
    """The TeX of a Sphinx imgmath page, counted from the HTML with regexes (not the extractor's parser): inline
    formulas are `<img class="math" alt=TeX>`, display ones `<div class="math"><p><img alt=TeX>`."""
    found = []
    for match in _IMG.finditer(page):
        tag, alt = match.group(0), _ALT.search(match.group(0))
        display = re.search(r'<div class="math">\s*<p>\s*$', page[max(0, match.start() - 40):match.start()])
        if alt and ('class="math"' in tag or display):
            found.append(" ".join(htmlmod.unescape(alt.group(1)).split()))
    return found


def page_code_blocks(page: str) -> list[str]:
    """The text of every `<pre>` block (tags removed, entities decoded), as it reads in a browser."""
    return [htmlmod.unescape(_TAG.sub("", m.group(1))).strip("\n") for m in _PRE.finditer(page)]


def plain_trafilatura(page: str) -> str:
    return trafilatura.extract(page, favor_precision=True, include_comments=False, deduplicate=False) or ""


def test_downloads_live_in_curation_and_old_imports_still_work():
    import mixlab.curation.decontam as decontam
    import mixlab.curation.downloads as downloads
    import mixlab.pipelines.corpus as corpus

    for name in ("Downloads", "SourceUnavailable", "default_cache_dir", "GSM8K_WHEEL"):
        assert getattr(corpus, name) is getattr(downloads, name)
    assert decontam.Downloads is downloads.Downloads and decontam.SourceUnavailable is downloads.SourceUnavailable
    # curation is the lowest layer: importing it pulls in no pipelines module
    probe = ("import sys, mixlab.curation.decontam; "
             "print(sorted(m for m in sys.modules if m.startswith('mixlab.pipelines')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("rel", SYMPY_PAGES)
def test_sympy_pages_keep_their_formulas_as_tex(sympy_html: Path, rel: str):
    page = (sympy_html / rel).read_text(encoding="utf-8")
    formulas = page_formulas(page)
    assert len(formulas) >= 20, f"{rel}: expected a page full of formulas, found {len(formulas)}"
    text = extract_math_html(page)
    kept = [tex for tex in formulas if f"${tex}$" in text]
    assert len(kept) == len(formulas), [tex for tex in formulas if f"${tex}$" not in text][:5]
    assert 0.9 * len(formulas) <= text.formulas <= len(formulas)  # an identical formula may sit in dropped text
    # display formulas ($$...$$) are the <div class="math"> ones
    displays = page.count('<div class="math">')
    assert text.display_formulas == displays and text.count("$$") >= 2 * displays
    # plain trafilatura drops them: not one formula with a TeX command survives
    commands = [tex for tex in formulas if "\\" in tex]
    plain = plain_trafilatura(page)
    assert commands and not [tex for tex in commands if tex in plain]


@pytest.mark.parametrize("rel", PYTHON_PAGES)
def test_python_doc_code_blocks_are_kept_fenced_and_verbatim(python_html: Path, rel: str):
    page = (python_html / rel).read_text(encoding="utf-8")
    blocks = [b for b in page_code_blocks(page) if b.strip()]
    indented = [b for b in blocks if re.search(r"\n {4,}\S", b)]  # whitespace is part of the code
    assert len(indented) >= 5, f"{rel}: expected indented code blocks, found {len(indented)}"
    text = extract_math_html(page)
    assert text.code_blocks == len(blocks)
    assert all(re.search(rf"```[^\n]*\n{re.escape(b)}\n```", text) for b in blocks)
    plain = plain_trafilatura(page)
    assert not [b for b in indented if b in plain], "plain trafilatura now keeps indentation: the test shows nothing"


def test_sympy_pretty_printed_output_keeps_its_layout(sympy_html: Path):
    page = (sympy_html / "modules/integrals/integrals.html").read_text(encoding="utf-8")
    fraction = next(b for b in page_code_blocks(page) if "-- + -- + x" in b)  # x**3/3 + x**2/2 + x, drawn
    assert fraction in extract_math_html(page)
    assert fraction not in plain_trafilatura(page)


def test_mathjax_mathml_katex_and_delimited_spans():
    """The other ways pages carry TeX (no offline page has them, so one page holds each form)."""
    page = """<html><body><article><h1>Forms of TeX</h1>
    <p>MathJax 2 writes <span class="MathJax_Preview">x2</span><script type="math/tex">x^2 + y^2</script> inline
    and then <script type="math/tex; mode=display">\\int_0^1 f(x)\\,dx</script> as a display.</p>
    <p>MathML with an annotation <math><semantics><mi>a</mi><annotation encoding="application/x-tex">\\alpha_1
    </annotation></semantics></math> and with alttext <math alttext="\\beta" display="block"><mi>b</mi></math>.</p>
    <p>KaTeX: <span class="katex"><span class="katex-mathml"><math><semantics><mi>g</mi><annotation
    encoding="application/x-tex">\\gamma</annotation></semantics></math></span><span class="katex-html">g</span></span>
    and Sphinx mathjax <span class="math notranslate nohighlight">\\(e^{i\\pi} + 1 = 0\\)</span> are both kept.</p>
    <div class="math notranslate nohighlight">\\[\\sum_{n=1}^\\infty \\frac{1}{n^2} = \\frac{\\pi^2}{6}\\]</div>
    <p>A plain picture <img src="cat.png" alt="a cat"> is not a formula, and the code stays:</p>
    <div class="highlight-python"><pre>for n in range(3):
    print(n)</pre></div>
    <p>Enough words follow here so that the extractor sees a real article body and keeps every paragraph.</p>
    </article></body></html>"""
    text = extract_math_html(page)
    for tex in ("$x^2 + y^2$", "$$\\int_0^1 f(x)\\,dx$$", "$\\alpha_1$", "$$\\beta$$", "$\\gamma$",
                "$e^{i\\pi} + 1 = 0$", "$$\\sum_{n=1}^\\infty \\frac{1}{n^2} = \\frac{\\pi^2}{6}$$"):
        assert tex in text, (tex, text)
    assert "x2" not in text and "$a cat$" not in text  # the preview is not kept twice; a photo is no formula
    assert "```python\nfor n in range(3):\n    print(n)\n```" in text
    assert (text.formulas, text.display_formulas, text.code_blocks) == (7, 3, 1)
    assert rewrite_math_html("not html at all <<<").formulas == []
    declared = ('<?xml version="1.0" encoding="utf-8"?><html><body><article><p>A circle of radius r has the area '
                '<img class="math" alt="\\pi r^2"> and that is what everyone learns about it at school.</p></article>'
                '</body></html>')
    assert "$\\pi r^2$" in extract_math_html(declared)  # lxml refuses such a str; the bytes parse


def test_step_counts_formulas_and_drops_a_page_without_text(tmp_path: Path, sympy_html: Path):
    pages = [(sympy_html / rel).read_text(encoding="utf-8") for rel in SYMPY_PAGES[:2]]
    docs = [Document(text=p, id=f"page-{i}", metadata={"source": "math-web"}) for i, p in enumerate(pages)]
    docs.append(Document(text="<html><body><script>var x = 1;</script></body></html>", id="empty", metadata={}))
    step = MathTrafilatura(str(tmp_path / "quarantine"))
    out = list(step.run(iter(docs)))
    assert [d.id for d in out] == ["page-0", "page-1"] and all(type(d.text) is str for d in out)
    stats = step.stats
    expected = [extract_math_html(p) for p in pages]
    assert stats["tex_formulas"].total == sum(e.formulas for e in expected)
    assert stats["code_blocks"].total == sum(e.code_blocks for e in expected)
    assert stats["tex_docs"].total == 2 and stats["dropped_empty_extraction"].total == 1


def test_math_web_source_curates_with_tex(tmp_path: Path, sympy_html: Path):
    corpus = fetch_corpus(tmp_path, max_mb=1.0, sources=["math-web"])
    entry = corpus["sources"]["math-web"]
    assert entry["kind"] == "math" and entry["docs"] >= 3
    raw = tmp_path / "raw"
    assert raw_records_are_html(raw / "math-web") and not raw_records_are_html(tmp_path / "nothing-here")
    raw_pages = list(iter_raw_documents(raw / "math-web"))
    assert all(d["metadata"]["format"] == "html" and d["metadata"]["kind"] == "math" for d in raw_pages)
    assert all(page_formulas(d["text"]) for d in raw_pages)  # the source takes pages that show math
    expected_tex = sum(len(page_formulas(d["text"])) for d in raw_pages)
    manifest = curate(raw, tmp_path / "curated", sources=["math-web"], tasks=1, workers=1)
    steps = {s.name: s for s in manifest.sources["math-web"].steps}
    extract = steps["extract"]
    assert extract.docs_in == len(raw_pages)
    assert extract.counts["tex_formulas"] > 0.9 * expected_tex, (extract.counts, expected_tex)
    assert extract.counts["tex_docs"] == extract.kept  # every extracted page kept its formulas
    texts = pq.read_table(tmp_path / "curated" / "data" / "math-web", columns=["text"]).column("text").to_pylist()
    assert texts and sum(t.count("$") for t in texts) >= 2 * extract.counts["tex_formulas"] * 0.9
    assert any("```" in t for t in texts)
    print({name: (s.docs_in, s.kept, s.dropped, s.counts) for name, s in steps.items()}, expected_tex)


def test_demo_math_source_is_plain_text_without_a_scorer(raw_corpus: Path, tmp_path: Path):
    assert not raw_records_are_html(raw_corpus / "math") and raw_records_are_html(raw_corpus / "web-en")
    pipelines = math_pipeline(raw_corpus, tmp_path)
    names = [type(s).__name__ for s in pipelines.stages[0].pipeline]
    assert "MathTrafilatura" not in names and "ClassifierScorer" not in names
    assert pipelines.config["html"] is False and pipelines.config["scorer_model_sha256"] is None


@pytest.fixture(scope="module")
def math_classifier(curated_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("math-classifier")
    train_classifier([ExampleSpec("source", "math")], [ExampleSpec("source", "web-en"),
                                                       ExampleSpec("source", "code-python")],
                     out, ClassifierTrainConfig(name="math"), curated_dir)
    return out


def _filtered_scores(curated: Path) -> list[float]:
    """The math score of every document the filter stage wrote (before MinHash dedup)."""
    scores = []
    for path in sorted((curated / "work" / "math" / "filtered").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            scores += [json.loads(line)["metadata"]["math_score"] for line in handle]
    return scores


def test_math_scorer_scores_into_parquet_and_counts_threshold_drops(raw_corpus: Path, tmp_path: Path,
                                                                    math_classifier: Path):
    def run(name: str, min_score: float | None) -> tuple[ShardManifest, Path]:
        recipe = MathRecipe(scorer=str(math_classifier), min_score=min_score)
        curated = tmp_path / name
        builder = {"math": lambda r, c, t: math_pipeline(r, c, source="math", tasks=t, recipe=recipe)}
        return curate(raw_corpus, curated, sources=["math"], tasks=2, workers=1, recipes=builder), curated

    field = load_classifier(math_classifier).field
    manifest, curated = run("scored", None)  # score only: every document keeps its score
    all_scores = _filtered_scores(curated)
    table = pq.read_table(curated / "data" / "math")
    parquet_scores = [m[field] for m in table.column("metadata").to_pylist()]
    assert len(parquet_scores) == manifest.sources["math"].docs and all(0.0 <= s <= 1.0 for s in parquet_scores)
    threshold = sorted(all_scores)[len(all_scores) // 4]  # a quarter of the documents score below it
    below = sum(s < threshold for s in all_scores)
    assert below > 0

    manifest, curated = run("thresholded", threshold)
    steps = {s.name: s for s in manifest.sources["math"].steps}
    drop = steps["score_threshold_filter"]
    assert drop.dropped == {f"{field}_below": below} and drop.kept == len(all_scores) - below
    assert steps["classifier_scorer"].docs_in == len(all_scores)  # the scorer saw what the threshold saw
    kept = [m[field] for m in pq.read_table(curated / "data" / "math").column("metadata").to_pylist()]
    assert kept and min(kept) >= threshold
    print(f"threshold {threshold:.4f}: {below} of {len(all_scores)} dropped, {len(kept)} curated")
