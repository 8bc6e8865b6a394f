"""FineWeb-style web steps on real pages: offline URL blocklist, C4 quality and bad words, FineWeb quality,
and the web recipe that wires them (with PII redaction) in FineWeb's order."""

from __future__ import annotations

import gzip
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter
from datatrove.utils.text import split_into_sentences
from mixlab.curation.extract import QuarantiningTrafilatura
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.web_quality import (
    DATATROVE_BLOCKLIST,
    C4BadWords,
    C4BadWordsSettings,
    C4Quality,
    C4Settings,
    DomainBlocklist,
    FinewebQuality,
    SpacySentences,
    UrlFilter,
    UrlFilterSettings,
    _word_list,
    bad_words,
)
from mixlab.pipelines.corpus import iter_raw_documents
from mixlab.pipelines.curate import curate
from mixlab.pipelines.web import WebRecipe, web_pipeline


def run_step(step, docs: list[Document]) -> list[Document]:
    return list(step.run(iter(docs), rank=0, world_size=1))


def drops(step) -> dict[str, int]:
    return {k.removeprefix("dropped_"): int(getattr(v, "total", v)) for k, v in step.stats.stats.items()
            if k.startswith("dropped_")}


def counter(step, key: str) -> int:
    value = step.stats.stats.get(key, 0)
    return int(getattr(value, "total", value))


@pytest.fixture(scope="module")
def pages(raw_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Document]]:
    """Real libreoffice-help pages of the test corpus (en, de), extracted with the recipe's Trafilatura."""
    out = {}
    for lang in ("en", "de"):
        raw = list(iter_raw_documents(raw_corpus / f"web-{lang}"))[:60]
        docs = [Document(text=r["text"], id=r["id"], metadata=dict(r["metadata"])) for r in raw]
        extract = QuarantiningTrafilatura(str(tmp_path_factory.mktemp(f"quarantine-{lang}")))
        out[lang] = [d for d in run_step(extract, docs) if d.text.strip()]
        assert len(out[lang]) >= 15, f"web-{lang}: too few pages extracted"
    return out


def copies(docs: list[Document]) -> list[Document]:
    return [Document(text=d.text, id=d.id, metadata=dict(d.metadata)) for d in docs]


# ---- URL filter ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def listed_domains() -> list[str]:
    """Real entries of datatrove's shipped lists: a two-label domain, a listed host under an unlisted
    registered domain (so that only the subdomain rule matches it), and a listed page of an unlisted host."""
    from mixlab.curation.web_quality import _suffix_extractor

    blocklist = DomainBlocklist.datatrove_shipped()
    with tarfile.open(DATATROVE_BLOCKLIST) as tar:
        member = tar.extractfile("domains")
        head = member.read(4_000_000).decode("utf-8", "replace").splitlines()[:-1]
        urls = tar.extractfile("urls").read().decode("utf-8", "replace").splitlines()
    plain = next(d for d in head if d.count(".") == 1 and d.endswith(".com"))
    sub = next(d for d in head[1000:] if d.count(".") >= 2 and d.endswith(".com")
               and _suffix_extractor()(d).top_domain_under_public_suffix not in blocklist)
    page = next(u for u in urls if "/" in u and u.split("/")[0] not in blocklist and
                _suffix_extractor()(u.split("/")[0]).top_domain_under_public_suffix not in blocklist)
    return [plain, sub, page]


def test_url_filter_counts_each_match_kind_on_real_pages(pages, listed_domains) -> None:
    plain, sub, page = listed_domains
    banned = sorted(_word_list("banned_words.txt"))[0]
    soft = sorted(_word_list("soft_banned_words.txt"))[:2]
    subword = sorted(_word_list("banned_subwords.txt"), key=len)[-1]
    urls = {
        "url_blocked_domain": [f"https://{plain}/a.html", f"http://www.{plain}/b?x=1"],
        "url_blocked_subdomain": [f"https://{sub}/page", f"https://deeper.{sub}/page"],
        "url_blocked_url": [f"http://{page}", f"https://{page}/"],
        "url_banned_word": [f"https://example.org/{banned}/page"],
        "url_soft_banned_words": [f"https://example.org/{soft[0]}-{soft[1]}.html"],
        "url_banned_subword": [f"https://example.org/x{subword}y.html"],
    }
    docs = copies(pages["en"])
    for doc in docs:
        doc.metadata["url"] = "https://help.libreoffice.org/latest/en-US/" + doc.id.split("/", 2)[2]
    listed = [url for group in urls.values() for url in group]
    assert len(docs) > len(listed) + 2
    for doc, url in zip(docs, listed, strict=False):
        doc.metadata["url"] = url
    expected = {reason: len(group) for reason, group in urls.items()}
    docs[-1].metadata.pop("url")
    step = UrlFilter()
    kept = run_step(step, docs)
    assert drops(step) == expected
    assert len(kept) == len(docs) - sum(expected.values())
    assert counter(step, "no_url") == 1
    assert all("libreoffice" in d.metadata.get("url", "libreoffice") for d in kept)


def test_url_filter_over_a_user_file_matches_domains_and_subdomains(tmp_path: Path, pages) -> None:
    listing = tmp_path / "hosts.txt"
    listing.write_text("# a hosts file\n0.0.0.0 tracker.example.net\nbad-site.org\n")
    docs = copies(pages["en"][:5])
    for doc, url in zip(docs, ["https://bad-site.org/", "https://a.b.bad-site.org/x", "https://tracker.example.net/",
                               "https://cdn.tracker.example.net/p", "https://example.net/fine"], strict=True):
        doc.metadata["url"] = url
    step = UrlFilter(UrlFilterSettings(blocklist="file", blocklist_file=str(listing), banned_words=False,
                                       soft_banned_words=False, banned_subwords=False, missing_url="drop"))
    kept = run_step(step, docs)
    assert drops(step) == {"url_blocked_domain": 2, "url_blocked_subdomain": 2}
    assert [d.metadata["url"] for d in kept] == ["https://example.net/fine"]
    with pytest.raises(ValueError, match="blocklist_file"):
        UrlFilterSettings(blocklist="file")


# ---- C4 -------------------------------------------------------------------------------------------------
def test_sentences_match_datatrove_spacy_sentencizer(pages) -> None:
    splitter = SpacySentences("en")
    lines = [line for d in pages["en"] for line in d.text.splitlines() if line.strip()][:60]
    assert sum(len(splitter.split(line)) for line in lines) > len(lines)  # some lines hold several sentences
    theirs = [[s.strip() for s in split_into_sentences(line, "en") if s.strip()] for line in lines]
    assert [splitter.split(line) for line in lines] == theirs


@pytest.mark.parametrize("lang", ["en", "de"])
def test_c4_quality_equals_datatrove_on_real_pages(pages, lang: str) -> None:
    ours, theirs = C4Quality(C4Settings(language=lang)), C4QualityFilter(language=lang)
    kept_ours = run_step(ours, copies(pages[lang]))
    kept_theirs = run_step(theirs, copies(pages[lang]))
    assert [(d.id, d.text) for d in kept_ours] == [(d.id, d.text) for d in kept_theirs]
    assert sum(drops(ours).values()) == len(pages[lang]) - len(kept_ours)
    assert counter(ours, "line_no_terminal_punct") > 0  # real pages have headings and menu lines


def test_c4_page_and_line_rules_on_real_text(pages) -> None:
    base = max((d for d in pages["en"] if "{" not in d.text), key=lambda d: d.text.count("."))
    policy = "This site uses cookies to improve the experience of every reader."
    texts = {
        "lorem": base.text + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "curly": base.text + "\nSet the value to {x} in the dialog box.",
        "policy": base.text + "\n" + policy,
        "javascript": base.text + "\nPlease enable JavaScript to view the comments.",
    }
    step = C4Quality()
    kept = run_step(step, [Document(text=t, id=k) for k, t in texts.items()])
    assert drops(step) == {"c4_lorem_ipsum": 1, "c4_curly_bracket": 1}
    assert sorted(d.id for d in kept) == ["javascript", "policy"]
    assert counter(step, "line_policy") == 1 and counter(step, "line_javascript") == 1
    assert all(policy not in d.text and "JavaScript" not in d.text for d in kept)


def test_c4_bad_words_from_the_naughty_words_package(pages) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the bad-word list comes from the npm package naughty-words")
    words = bad_words("en")
    assert len(words) > 300
    word = sorted(w for w in words if w.isalpha() and len(w) >= 5)[0]
    docs = copies(pages["en"][:6])
    docs[0].text += f"\nThis line says {word} once."
    docs[1].text += f"\nThis line says x{word}y, inside a longer word."
    step = C4BadWords()
    kept = run_step(step, docs)
    assert drops(step) == {"c4_bad_words": 1}
    assert docs[0].id not in {d.id for d in kept} and docs[1].id in {d.id for d in kept}


# ---- FineWeb --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang", ["en", "de"])
def test_fineweb_quality_equals_datatrove_on_real_pages(pages, lang: str) -> None:
    page = max(pages[lang], key=lambda d: len(d.text))
    lines = page.text.splitlines()
    derived = [
        Document(text=page.text + "\n" + "\n".join(lines[:3] * 3), id="repeated-lines"),
        Document(text="\n".join(w for w in page.text.split()[:80]), id="one-word-lines"),
        Document(text="\n".join(line.rstrip(".!?") for line in lines), id="no-punctuation"),
    ]
    docs = [*pages[lang], *derived]
    ours, theirs = FinewebQuality(language=lang), FineWebQualityFilter(language=lang)
    kept_ours = [d.id for d in run_step(ours, copies(docs))]
    kept_theirs = [d.id for d in run_step(theirs, copies(docs))]
    assert kept_ours == kept_theirs
    reasons = drops(ours)
    assert sum(reasons.values()) == len(docs) - len(kept_ours)
    assert "repeated-lines" not in kept_ours and "one-word-lines" not in kept_ours
    assert reasons.get("fineweb_char_dup_ratio", 0) >= 1 and reasons.get("fineweb_short_line_ratio", 0) >= 1


# ---- the recipe ---------------------------------------------------------------------------------------
def test_web_recipe_runs_the_steps_in_fineweb_order(raw_corpus: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "web-en"
    raw.mkdir(parents=True)
    rows = list(iter_raw_documents(raw_corpus / "web-en"))[:10]
    with gzip.open(raw / "00000.jsonl.gz", "wt", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            url = f"https://help.libreoffice.org/en-US/{row['id']}" if i % 2 else None
            handle.write(json.dumps({**row, "metadata": {**row["metadata"], "url": url}}) + "\n")
    fineweb_order = WebRecipe(use_c4=True, use_fineweb=True)
    stages = web_pipeline(tmp_path / "raw", tmp_path / "curated", tasks=1, recipe=fineweb_order)
    names = [type(step).__name__ for step in stages.stages[0].pipeline]
    assert names[1:4] == ["UrlFilter", "QuarantiningTrafilatura", "BundledLanguageFilter"]
    assert names.index("C4Quality") > names.index("FastGopherQuality")
    assert names.index("FinewebQuality") > names.index("C4Quality")
    assert names[-3:-1] == ["PiiRedaction", "DecontaminationFilter"]
    off = web_pipeline(tmp_path / "raw", tmp_path / "curated", recipe=WebRecipe(
        url_filter=None, use_c4=False, use_fineweb=False, pii=None), tasks=1)
    assert "UrlFilter" not in {type(s).__name__ for s in off.stages[0].pipeline}
    if shutil.which("npm"):
        strict = web_pipeline(tmp_path / "raw", tmp_path / "curated", tasks=1,
                              recipe=WebRecipe(use_c4=True, c4_bad_words=C4BadWordsSettings()))
        strict_names = [type(step).__name__ for step in strict.stages[0].pipeline]
        assert strict_names.index("C4BadWords") == strict_names.index("C4Quality") + 1

    manifest = curate(tmp_path / "raw", tmp_path / "curated", sources=["web-en"], tasks=1, workers=1,
                      recipes={"web-en": lambda raw, out, tasks: web_pipeline(raw, out, tasks=tasks,
                                                                               recipe=fineweb_order)})
    steps = [s.name for s in manifest.source("web-en").steps]
    assert steps[:4] == ["read", "url_filter", "extract", "language_id"]
    assert steps[-5:] == ["fineweb_quality", "pii_redaction", "decontamination_filter", "exact_dedup",
                          "minhash_dedup"] and "c4_quality" in steps
    url = next(s for s in manifest.source("web-en").steps if s.name == "url_filter")
    assert url.docs_in == len(rows) and url.kept == len(rows)
    pii = next(s for s in manifest.source("web-en").steps if s.name == "pii_redaction")
    assert set(pii.counts) <= {f"{p}{k}" for p in ("pii_", "docs_with_pii_") for k in ("email", "ip", "phone")} | {
        "docs_with_pii"}  # redactions per type are in the manifest (these help pages may hold none)
    reloaded = ShardManifest.load(tmp_path / "curated").source("web-en")
    assert next(s for s in reloaded.steps if s.name == "pii_redaction").counts == pii.counts
    assert manifest.check() == []
