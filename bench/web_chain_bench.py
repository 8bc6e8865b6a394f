"""Web filter chain: stock datatrove (URLFilter, LanguageFilter, Gopher repetition + quality, C4, FineWeb, each with
datatrove's own word tokenizer) against mixlab's fast chain (`mixlab.curation.fast_web`), on the same real documents
in the same run. Prints docs/s of each, the ratio, and every document whose decision or reason differs.

    .venv/bin/python bench/web_chain_bench.py [--quick] [--docs N] [--raw DIR]

Documents: the web-{en,de,fr,es,ru} pages of the offline corpus (the demo's size, 20 MB of raw text per language,
about 14k documents; `--quick`: 2 MB), extracted once with trafilatura (cached as JSONL),
each alone and in runs of 4 consecutive pages (long enough for Gopher's 50 words), plus adversarial texts; URLs
are made from the page ids, and a share of them from datatrove's own block lists so that each URL rule fires.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import tarfile
import time
from pathlib import Path

from datatrove.data import Document

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO / ".cache" / "mixlab-tests" / "corpus" / "raw"
CACHE = REPO / ".cache" / "mixlab-bench" / "web_chain"
LANGUAGES = ("en", "de", "fr", "es", "ru")

ADVERSARIAL = [
    "", " ", "\n\n\n", "...", "!!! ??? ...\n-- -- --\n• • •", "#" * 400, "a " * 2000,
    ("The same line repeats here with enough words to count.\n" * 300),
    ("Lorem ipsum dolor sit amet, the consectetur adipiscing elit and the sed do.\n" * 8),
    "This page has the {curly} bracket. It is the end of it. And the rest. And more. And more still.\n" * 6,
    ("We use cookies to give you the best experience. Read the privacy policy.\n"
     "JavaScript is required to view the page, and the site.\n") * 5
    + "A sentence that is kept. Another one with the words. And the third. The fourth. The fifth one.\n",
    "Wikipedia style [1] text with the citations [edit] and [citation needed]. More of the text [23].\n" * 10,
    "Trailing citation of the text. [1]\nSecond line of the text.  [2]\nThird line, the end. [3] [4]\n" * 6,
    "Tabs\tand\u00a0non-breaking\u2003spaces in the text. And\u3000ideographic ones.\t.\tOk then.\n" * 12,
    "• bullet one of the list\n• bullet two of the list\n- dash three of the list\n" * 30,
    "Ellipsis lines that trail off and the...\nAnother one that trails off with the…\n" * 25,
    "IS_ALPHA appears in this text of the document, and the filters must agree on it. " * 20,
    "Mr. Smith went to the U.S.A. at 5 p.m. and met Dr. Who. He said: \"Hello.\" Then he left. Fin.\n" * 8,
    "https://example.com/a/b?c=d and e-mail@example.com, :) ;-) <3 #hashtag @user 3.14 1,000,000 ok.\n" * 10,
]


def _url_samples() -> dict[str, list[str]]:
    """A few entries of datatrove's shipped lists, to build URLs that its rules block."""
    from datatrove.utils._import_utils import ASSETS_PATH
    from mixlab.curation.web_quality import DATATROVE_BLOCKLIST

    with tarfile.open(DATATROVE_BLOCKLIST) as tar:
        domains = tar.extractfile("domains").read(20_000).decode().splitlines()[1:40]
        urls = tar.extractfile("urls").read(20_000).decode().splitlines()[1:40]
    words = {name: [w.strip() for w in (Path(ASSETS_PATH) / f"{name}.txt").read_text().splitlines()
                    if w.strip() and not w.startswith("#")][:20]
             for name in ("banned_words", "soft_banned_words", "banned_subwords")}
    return {"domains": domains, "urls": urls, **words}


def _url(page_id: str, i: int, samples: dict[str, list[str]]) -> str:
    """Mostly a plain URL from the page id; every 7th rule-exercising (each rule in turn)."""
    path = page_id.split("/", 1)[-1]
    plain = f"https://help.example.org/{path}"
    if i % 7:
        return plain
    kind = (i // 7) % 8
    pick = i // 56
    if kind == 0:
        return f"https://{samples['domains'][pick % len(samples['domains'])]}/{path}"
    if kind == 1:
        return f"http://shop.{samples['domains'][pick % len(samples['domains'])]}/index.html"
    if kind == 2:
        return samples["urls"][pick % len(samples["urls"])]
    if kind == 3:
        return f"https://help.example.org/{samples['banned_words'][pick % 20]}/{path}"
    if kind == 4:
        soft = samples["soft_banned_words"]
        return f"https://help.example.org/{soft[pick % 20]}-{soft[(pick + 1) % 20]}/page"
    if kind == 5:
        return f"https://help.example.org/x{samples['banned_subwords'][pick % 20]}y/page"
    if kind == 6:
        return f"https://WWW.{samples['domains'][pick % len(samples['domains'])].upper()}/Page"
    return f"https://{path.replace('/', '.')[:60]}.co.uk/"


def extracted_pages(raw_dir: Path, language: str) -> list[tuple[str, str]]:
    """(id, text) of a source's pages, extracted once with trafilatura (as the recipe does) and cached."""
    source = raw_dir / f"web-{language}"
    files = sorted(source.glob("*.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"{source}: no *.jsonl.gz pages; build the test corpus first "
                                "(.venv/bin/python -m pytest -q tests/test_corpus.py) or pass --raw")
    cache = CACHE / f"pages-{language}-{sum(f.stat().st_size for f in files)}.jsonl"
    if cache.is_file():
        return [tuple(json.loads(line)) for line in cache.read_text().splitlines()]
    from datatrove.pipeline.extractors import Trafilatura

    extractor = Trafilatura(favour_precision=True, deduplicate=False, timeout=10.0)
    pages = []
    for file in files:
        with gzip.open(file, "rt") as f:
            for line in f:
                record = json.loads(line)
                text = extractor.extract(record["text"]) or ""
                pages.append((record["id"], text))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pages))
    tmp.replace(cache)
    return pages


def web_documents(raw_dir: Path = DEFAULT_RAW, languages: tuple[str, ...] = LANGUAGES,
                  max_docs: int | None = None) -> list[tuple[str, str, str, str]]:
    """(language, id, text, url) of real pages, runs of 4 pages, and adversarial texts (under each language)."""
    samples = _url_samples()
    docs: list[tuple[str, str, str, str]] = []
    for language in languages:
        pages = extracted_pages(raw_dir, language)
        texts = [(pid, text) for pid, text in pages]
        texts += [(f"{pages[i][0]}+4", "\n\n".join(t for _, t in pages[i:i + 4])) for i in range(0, len(pages), 2)]
        texts += [(f"adversarial-{language}/{j}", t) for j, t in enumerate(ADVERSARIAL)]
        docs += [(language, pid, text, _url(pid, i, samples)) for i, (pid, text) in enumerate(texts)]
    if max_docs is not None and len(docs) < max_docs:  # repeated for timing only (same verdicts)
        docs = (docs * (max_docs // len(docs) + 1))
    return docs[:max_docs] if max_docs else docs


def bench_corpus(quick: bool = False) -> Path:
    """The raw folder of the bench's own web corpus (built once from the offline sources, then cached)."""
    from mixlab.pipelines.corpus import fetch_corpus

    work = REPO / ".cache" / "mixlab-bench" / ("web_chain_quick" if quick else "web_chain_corpus")
    if not all(any((work / "raw" / f"web-{lang}").glob("*.jsonl.gz")) for lang in LANGUAGES):
        fetch_corpus(work, max_mb=2.0 if quick else 20.0, sources=[f"web-{lang}" for lang in LANGUAGES])
    return work / "raw"


def run(quick: bool = False) -> dict:
    """The issue-11 figure for `bench/run_all.py`: docs/s of each chain and the disagreements."""
    result = run_chains(web_documents(bench_corpus(quick)))
    n = result["docs"]
    return {"stock_docs_per_s": n / result["seconds"]["stock"], "fast_docs_per_s": n / result["seconds"]["fast"],
            "disagreements": result["disagreements"], "docs": n}


def run_chains(docs: list[tuple[str, str, str, str]]) -> dict:
    """Both chains on the same documents; seconds of each (after a warm-up) and the disagreements."""
    from mixlab.curation.fast_web import WebChainSettings, chain_verdict, fast_web_chain, stock_web_chain

    languages = sorted({d[0] for d in docs})
    chains = {name: {lang: build(WebChainSettings(language=lang)) for lang in languages}
              for name, build in (("stock", stock_web_chain), ("fast", fast_web_chain))}
    for per_language in chains.values():  # load lists and models outside the timed loop
        for steps in per_language.values():
            for step in steps:
                if hasattr(step, "download_data"):
                    step.download_data()
    seconds, verdicts = {}, {}
    for name in ("stock", "fast"):
        # warm-up: spaCy pipelines, fastText, the suffix list
        for lang, _, text, url in docs[:: max(1, len(docs) // 50)]:
            chain_verdict(chains[name][lang], Document(text=text, id="warm", metadata={"url": url}))
        gc.collect()  # neither chain pays for the other's garbage (a full collection lands at random otherwise)
        gc.freeze()
        start = time.perf_counter()
        verdicts[name] = [chain_verdict(chains[name][lang], Document(text=text, id=pid, metadata={"url": url}))
                          for lang, pid, text, url in docs]
        seconds[name] = time.perf_counter() - start
        gc.unfreeze()
    disagreements = [(d[0], d[1], s, f) for d, s, f in zip(docs, verdicts["stock"], verdicts["fast"], strict=True)
                     if s != f]
    reasons: dict[str, int] = {}
    for _kept, reason, *_ in verdicts["stock"]:
        reasons[reason or "kept"] = reasons.get(reason or "kept", 0) + 1
    return {"docs": len(docs), "seconds": seconds, "disagreements": disagreements, "reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=None, help="documents to time (the set repeats beyond its size)")
    parser.add_argument("--raw", type=Path, default=None,
                        help="raw corpus folder with web-<lang>/ pages (default: the bench's own corpus)")
    parser.add_argument("--quick", action="store_true", help="the 2 MB-per-language corpus (a smoke run)")
    args = parser.parse_args()
    raw = args.raw or bench_corpus(args.quick)
    result = run_chains(web_documents(raw, max_docs=args.docs))
    n = result["docs"]
    stock_rate, fast_rate = (n / result["seconds"][k] for k in ("stock", "fast"))
    print(f"web filter chain on {n} documents ({', '.join(LANGUAGES)})")
    print(f"  stock datatrove: {stock_rate:10.1f} docs/s")
    print(f"  mixlab fast:     {fast_rate:10.1f} docs/s")
    print(f"  ratio:           {fast_rate / stock_rate:10.2f}x")
    print(f"  disagreements:   {len(result['disagreements'])}")
    for lang, pid, stock, fast in result["disagreements"][:10]:
        print(f"    {lang} {pid}: stock {str(stock)[:200]} fast {str(fast)[:200]}")
    print("  stock verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(result["reasons"].items())))


if __name__ == "__main__":
    main()
