"""Multilingual recipe: one pipeline per language, with that language's word splitter and thresholds.

raw HTML -> Trafilatura -> lid.176 (per-language threshold) -> Gopher repetition + quality (per-language
thresholds and stop words) -> per-language statistics -> MinHash (words split by the language's splitter).

Thresholds are derived FineWeb-2 style from a sample of the language's own documents
(`calibrate_language`, method in `mixlab.curation.multilingual`). Languages the raw corpus of
`pipelines/corpus.py` lacks are built here from the same kind of offline packages (`Downloads`):
Japanese and Chinese LibreOffice help pages, and Hebrew (right-to-left; Debian has no Hebrew or Arabic
LibreOffice help) from the chatterbot-corpus wheel's dialogues, which are plain text, not HTML.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    DEFAULT_TAIL,
    EXTRACT_TIMEOUT_S,
    BundledFT176LID,
    BundledLanguageFilter,
    DecontamSettings,
    ExactDedupSettings,
    LanguageStatsStep,
    LanguageThresholds,
    MinhashSettings,
    QuarantiningTrafilatura,
    ShardManifest,
    SourceEntry,
    SourceLayout,
    SourcePipelines,
    assemble_stages,
    derive_language_threshold,
    derive_thresholds,
    language_scores,
    multilingual_filters,
    offline_word_tokenizer,
    statistics_from_counts,
)
from mixlab.pipelines.corpus import (
    CHATTERBOT_WHEEL,
    FILES_PER_SOURCE,
    Downloads,
    RawDocument,
    _html_pages,
    _write_shards,
    default_cache_dir,
)

MULTILINGUAL_LANGUAGES = ("en", "de", "fr", "es", "ru", "ja", "zh", "he")
RTL_LANGUAGES = frozenset({"he", "ar", "fa", "ur"})


@dataclass(frozen=True)
class LanguageSource:
    """Where the offline documents of one language come from."""

    language: str
    package: str  # Debian package, or "pypi:<wheel>" for the chatterbot dialogues
    subdir: str = ""  # HTML tree inside the package
    chat_folder: str = ""  # chatterbot-corpus data folder
    html: bool = True


LANGUAGE_SOURCES: dict[str, LanguageSource] = {
    **{ll: LanguageSource(ll, f"libreoffice-help-{ll}", f"usr/share/libreoffice/help/{ll}/text")
       for ll in ("de", "fr", "es", "ru", "ja")},
    "en": LanguageSource("en", "libreoffice-help-en-us", "usr/share/libreoffice/help/en-US/text"),
    "zh": LanguageSource("zh", "libreoffice-help-zh-cn", "usr/share/libreoffice/help/zh-CN/text"),
    "he": LanguageSource("he", f"pypi:{CHATTERBOT_WHEEL[0]}", chat_folder="hebrew", html=False),
}


def _language_source(language: str) -> LanguageSource:
    if language not in LANGUAGE_SOURCES:
        raise ValueError(f"language {language!r} has no offline source; choose one of "
                         f"{', '.join(sorted(LANGUAGE_SOURCES))}")
    return LANGUAGE_SOURCES[language]


def _chat_documents(dl: Downloads, spec: LanguageSource, source: str) -> list[RawDocument]:
    import yaml

    folder = dl.wheel(*CHATTERBOT_WHEEL) / "chatterbot_corpus" / "data" / spec.chat_folder
    docs = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            lines = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(lines) < 2:
                continue
            docs.append(RawDocument(
                id=f"{source}/{spec.chat_folder}/{path.stem}/{i:04d}", text="\n".join(lines),
                metadata={"source": source, "kind": "web", "path": f"{spec.package}:{spec.chat_folder}/{path.name}#{i}",
                          "lang_hint": spec.language, "origin": spec.package}))
    return sorted(docs, key=lambda d: hashlib.sha1(d.id.encode()).hexdigest())


def language_documents(language: str, limit: int, dl: Downloads | None = None,
                       source: str | None = None) -> list[RawDocument]:
    """Up to `limit` raw documents of `language`, in the corpus's deterministic spread order."""
    spec = _language_source(language)
    dl = dl or Downloads(default_cache_dir())
    source = source or f"multi-{language}"
    if not spec.html:
        return _chat_documents(dl, spec, source)[:limit]
    docs = []
    for doc in _html_pages(source, spec.package, spec.subdir, language, "libreoffice").documents(dl):
        docs.append(doc)
        if len(docs) >= limit:
            break
    return docs


def write_language_source(raw_dir: str | Path, language: str, limit: int, dl: Downloads | None = None) -> Path:
    """`raw_dir/multi-<language>/NNNNN.jsonl.gz`, in the raw corpus format, for `multilingual_pipeline`."""
    source = f"multi-{language}"
    out = Path(raw_dir) / source
    docs = language_documents(language, limit, dl, source)
    if not docs:
        raise ValueError(f"{source}: no documents found in {_language_source(language).package}")
    _write_shards(docs, out, FILES_PER_SOURCE)
    return out


def extracted_texts(docs: list[RawDocument], html: bool = True, timeout_s: float = EXTRACT_TIMEOUT_S) -> list[str]:
    """Text of raw documents as the recipe's extraction step sees it (Trafilatura for HTML)."""
    if not html:
        return [d.text for d in docs]
    from datatrove.pipeline.extractors import Trafilatura

    extractor = Trafilatura(favour_precision=True, timeout=timeout_s, deduplicate=False)
    out = []
    for doc in docs:
        text = extractor.extract(doc.text)
        if text and text.strip():
            out.append(text)
    return out


def calibrate_language(language: str, texts: list[str], tail: float = DEFAULT_TAIL) -> LanguageThresholds:
    """FineWeb-2 thresholds of `language` from a sample of its (extracted) documents: Gopher thresholds and
    stop words from the metric distributions, the language-ID cut from the lid.176 score distribution."""
    scores = language_scores(texts, language, BundledFT176LID(None))
    thresholds = derive_thresholds(texts, language, offline_word_tokenizer(language), tail=tail)
    if scores:
        thresholds.language_score = derive_language_threshold(scores)
    return thresholds


@dataclass
class MultilingualRecipe:
    """Settings of the recipe for one language; `thresholds=None` takes the generic defaults of
    `LanguageThresholds` (calibrate first with `calibrate_language` for the FineWeb-2 way)."""

    language: str = "en"
    thresholds: LanguageThresholds | None = None
    html: bool | None = None  # None: from LANGUAGE_SOURCES (Hebrew dialogues are plain text)
    extract_timeout_s: float = EXTRACT_TIMEOUT_S
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None
    exact: ExactDedupSettings | None = field(default_factory=ExactDedupSettings)  # across sources; None: off
    decontam: DecontamSettings | None = field(default_factory=DecontamSettings)  # None: off

    def __post_init__(self) -> None:
        if self.thresholds is None:
            self.thresholds = LanguageThresholds(language=self.language)
        if self.thresholds.language != self.language:
            raise ValueError(f"MultilingualRecipe(language={self.language!r}): thresholds are for "
                             f"{self.thresholds.language!r}")
        if self.html is None:
            self.html = LANGUAGE_SOURCES[self.language].html if self.language in LANGUAGE_SOURCES else True


class TextAsIs(PipelineStep):
    """Marks plain-text sources (no extraction); keeps the step list the same shape for every language."""

    name = "📝 Plain text (no extraction)"

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc: Document
            self.stat_update("plain_text")
            yield doc


def multilingual_pipeline(raw_dir: str | Path, curated_dir: str | Path, language: str = "en",
                          source: str | None = None, tasks: int = 2, recipe: MultilingualRecipe | None = None,
                          extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """Stages for `raw_dir/<source>` (default `multi-<language>`), with the language's splitter and
    thresholds; `extra_steps` run after the built-in filters, before MinHash."""
    recipe = recipe or MultilingualRecipe(language=language)
    source = source or f"multi-{recipe.language}"
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    words = offline_word_tokenizer(recipe.language)
    thresholds = recipe.thresholds
    extract: PipelineStep = (QuarantiningTrafilatura(str(layout.quarantine), timeout=recipe.extract_timeout_s)
                             if recipe.html else TextAsIs())
    filters = [
        extract,
        BundledLanguageFilter([recipe.language], language_threshold=thresholds.language_score),
        *multilingual_filters(thresholds, words),
        LanguageStatsStep(recipe.language, words),
        *(extra_steps or []),
    ]
    config = {**asdict(recipe), "splitter": type(words).__name__, "splitter_code": getattr(words, "spacy_code", None)}
    return assemble_stages(layout, "web", filters, tasks, recipe.minhash, words, config=config,
                           max_doc_bytes=recipe.max_doc_bytes, exact=recipe.exact, decontam=recipe.decontam)


def language_stats_lines(entry: SourceEntry) -> list[str]:
    """One console line per language of a curated source, from the per-language counts its manifest entry keeps
    (`LanguageStatsStep`): documents, words, sentences and the means, over the documents that reached the step."""
    lines = []
    for step in entry.steps:
        for language, stats in statistics_from_counts(step.counts).items():
            s = stats.summary()
            lines.append(f"    {language:4s} {s['docs']:6,d} docs  {s['words']:9,d} words  "
                         f"{s['mean_words_per_doc']:8.1f} words/doc  {s['sentences']:7,d} sentences  "
                         f"{s['mean_sentences_per_doc']:6.1f} sentences/doc  {s['mean_word_length']:5.2f} chars/word")
    return lines


def curate_languages(raw_dir: str | Path, curated_dir: str | Path, languages: list[str] | tuple[str, ...],
                     docs_per_language: int = 40, tasks: int = 2, workers: int = 1, tail: float = DEFAULT_TAIL,
                     console: TextIO | None = None) -> ShardManifest:
    """Write `multi-<language>` raw sources, calibrate each language's thresholds on its own documents, curate
    them, and print the per-language statistics of each source under its curation line."""
    from mixlab.pipelines.curate import curate

    out = console or sys.stderr
    recipes = {}
    for language in languages:
        write_language_source(raw_dir, language, docs_per_language)
        spec = _language_source(language)
        sample = extracted_texts(language_documents(language, docs_per_language), spec.html)
        recipe = MultilingualRecipe(language=language, thresholds=calibrate_language(language, sample, tail))
        recipes[f"multi-{language}"] = lambda r, c, t, _rec=recipe: multilingual_pipeline(r, c, _rec.language,
                                                                                          tasks=t, recipe=_rec)
    manifest = curate(raw_dir, curated_dir, sources=list(recipes), tasks=tasks, workers=workers, recipes=recipes,
                      console=out)
    print("per-language statistics (documents that passed the filters, before MinHash):", file=out)
    for source in recipes:
        print(f"  {source}", file=out)
        for line in language_stats_lines(manifest.source(source)):
            print(line, file=out)
    return manifest
