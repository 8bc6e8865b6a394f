"""The fused web chain gives stock datatrove's decisions, drop reasons, language tags and kept text, document by
document, on real extracted pages in five languages and on adversarial texts."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_top_duplicate,
    get_n_grams,
)
from mixlab.curation.fast_web import (
    FastGopherQuality,
    FastGopherRepetition,
    FusedWebQuality,
    NgramIndex,
    SharedBlocklistUrlFilter,
    SharedWordSplit,
    WebChainSettings,
    chain_verdict,
    fast_gopher_pair,
    fast_web_chain,
    stock_quality_filters,
    stock_web_chain,
)
from mixlab.curation.filters import GopherSettings, gopher_filters
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import web_chain_bench  # noqa: E402


@pytest.fixture(scope="module")
def web_docs(raw_corpus: Path) -> list[tuple[str, str, str, str]]:
    return web_chain_bench.web_documents(raw_corpus)


def _outcomes(chains: dict, docs) -> list[tuple]:
    return [chain_verdict(chains[lang], Document(text=text, id=pid, metadata={"url": url}))
            for lang, pid, text, url in docs]


def test_fast_chain_matches_stock_on_real_pages(web_docs):
    languages = sorted({d[0] for d in web_docs})
    assert len(languages) >= 3 and len(web_docs) >= 300
    stock_chains = {lang: stock_web_chain(WebChainSettings(language=lang)) for lang in languages}
    for chain in stock_chains.values():  # one stock URLFilter for every language: it parses its lists on first use
        chain[0] = stock_chains[languages[0]][0]
    stock = _outcomes(stock_chains, web_docs)
    fast = _outcomes({lang: fast_web_chain(WebChainSettings(language=lang)) for lang in languages}, web_docs)
    differ = [(d[0], d[1], s, f) for d, s, f in zip(web_docs, stock, fast, strict=True) if s != f]
    assert not differ, differ[:5]
    reasons = {s[1] for s in stock}
    # the set exercises every family: URL rules, language ID, Gopher, C4 and kept pages
    assert {"url:domain", "url:hard_blacklisted", "lid:None", "quality:gopher_short_doc",
            "quality:too_few_sentences", None} <= reasons


@pytest.mark.parametrize("terminal_punct", [False, True])
def test_fused_quality_matches_stock_on_adversarial_texts(web_docs, terminal_punct):
    """Quality filters alone (C4 in both of its terminal-punctuation modes) on edge-case texts and on pages
    cut and spliced at random lines."""
    rng = random.Random(0)
    texts = list(web_chain_bench.ADVERSARIAL) + [
        "\n".join(rng.sample(text.splitlines(), k=len(text.splitlines()))) for _, _, text, _ in web_docs[::5]
    ] + ["x" * 1200 + " word. " * 10, "\n \n\t\n", "word " * 60 + "\n" + "[1] [2] [3]\n" * 10]
    for language in ("en", "de", "ru"):
        settings = WebChainSettings(language=language, c4_filter_no_terminal_punct=terminal_punct)
        stock = stock_quality_filters(settings)
        fused = [FusedWebQuality.from_stock(stock_quality_filters(settings))]
        for text in texts:
            assert chain_verdict(stock, Document(text=text, id="s")) == chain_verdict(fused, Document(text=text, id="f")), \
                (language, text[:200])


def test_affix_rules_from_python_give_spacys_tokens(web_docs):
    """The chunks' tokens by spaCy's affix algorithm run from Python are spaCy's own, language by language."""
    extra = ["(don't)", "U.S.A.", "e.g.,", "hello:)", "«quoted»", "l'homme", "x-y-z", "http://a.b/c?d=e", "3.14%",
             "...", "!!!", "(((a)))", "C++", "né(e)", "ул.", "т.е.", "EE.", "a.m.", "¿Qué?", "don't."]
    for language in ("en", "de", "fr", "es", "ru"):
        chunks = list(dict.fromkeys(c for lang, _, text, _ in web_docs if lang == language for c in text.split()))
        chunks += extra + [c for t in web_chain_bench.ADVERSARIAL for c in t.split()]
        split = SharedWordSplit(language)
        nlp = split.nlp
        decided = 0
        with nlp.memory_zone():
            for chunk in chunks:
                tokens = split._affix_tokens(chunk)
                if tokens is not None:
                    decided += 1
                    assert tokens == tuple(t.text for t in nlp.tokenizer(chunk)), (language, chunk)
        assert decided > 0.9 * len(chunks)


def test_special_cases_spanning_whitespace_go_to_the_stock_filters(web_docs):
    """spaCy matches Spanish "EE. UU." and Russian "в т.ч." across chunks: such texts take the stock path."""
    cases = {"es": "Los EE. UU. y la UE firmaron el acuerdo. Es una noticia importante para todos. ",
             "ru": "Это важно, в т.ч. для всех нас. Мы говорим об этом уже давно, и это так. "}
    for language, sentence in cases.items():
        pages = [text for lang, _, text, _ in web_docs if lang == language][:6]
        texts = [sentence * 12, "\n".join(page + "\n" + sentence * 3 for page in pages)]
        settings = WebChainSettings(language=language)
        fused = FusedWebQuality.from_stock(stock_quality_filters(settings))
        assert not fused.split.covers(texts[0]) and fused.split.covers(pages[0])
        for text in texts:
            assert chain_verdict(stock_quality_filters(settings), Document(text=text, id="s")) == \
                chain_verdict([fused], Document(text=text, id="f")), (language, text[:100])
        assert fused.stats["stock_fallback"].total == len(texts)


def test_recipe_gopher_pair_with_warm_tokenizer_gives_the_stock_pair_answers(web_docs, tmp_path):
    """pipelines/web.py runs `fast_gopher_pair` over mixlab's Gopher pair (warm spaCy words): each of the two steps
    answers as the stock step it replaces, and the manifest still names them gopher_repetition / gopher_quality."""
    from mixlab.curation.accounting import step_name
    from mixlab.pipelines.web import web_pipeline

    for language in ("fr", "ru"):
        pair = gopher_filters(GopherSettings(language=language), WarmSpacyTokenizer(language))
        fast = fast_gopher_pair(gopher_filters(GopherSettings(language=language), WarmSpacyTokenizer(language)))
        assert [type(s) for s in fast] == [FastGopherRepetition, FastGopherQuality]
        for lang, pid, text, _ in web_docs:
            if lang == language:
                for stock_step, fast_step in zip(pair, fast, strict=True):
                    assert stock_step.filter(Document(text=text, id=pid)) == fast_step.filter(Document(text=text, id=pid))
    regex_pair = gopher_filters(GopherSettings(language="de"), RegexWordTokenizer("de"))
    assert fast_gopher_pair(regex_pair) == regex_pair  # a splitter the shared split does not reproduce: left as is
    stages = web_pipeline(tmp_path / "raw", tmp_path / "curated", language="en", tasks=1)
    names = [step_name(step) for step in stages.stages[0].pipeline if isinstance(step, FastGopherRepetition | FastGopherQuality)]
    assert names == ["gopher_repetition", "gopher_quality"]


def test_ngram_index_matches_datatrove_on_collisions_and_ties():
    """Concatenation collisions ("ab"+"c" == "a"+"bc") and ties between equally frequent n-grams."""
    rng = random.Random(1)
    alphabet = ["a", "b", "ab", "c", "bc", "abc", "x"]
    for _ in range(300):
        words = [rng.choice(alphabet) for _ in range(rng.randint(0, 60))]
        index = NgramIndex(words)
        for n in (2, 3, 4):
            grams = get_n_grams(words, n)
            assert index.top_ngram_chars(n) == (find_top_duplicate(grams) if grams else None), (words, n)
        for n in range(5, 11):
            assert index.duplicate_ngram_chars(n) == find_all_duplicate(words, n), (words, n)


def test_url_filter_matches_stock_on_case_and_list_entries():
    from datatrove.pipeline.filters import URLFilter
    from mixlab.curation.web_quality import _suffix_extractor

    stock = URLFilter()
    stock.tldextractor = _suffix_extractor()
    shared = SharedBlocklistUrlFilter()
    samples = web_chain_bench._url_samples()
    urls = [web_chain_bench._url(f"web-en/page/{i}.html", i, samples) for i in range(0, 7 * 8 * 3)]
    urls += [samples["urls"][0], samples["urls"][0].upper(), f"https://{samples['domains'][0].upper()}/",
             "http://127.0.0.1/x", "https://localhost/"]
    for url in urls:
        assert stock.filter(Document(text="", id=url, metadata={"url": url})) == \
            shared.filter(Document(text="", id=url, metadata={"url": url})), url
