"""Web recipe in FineWeb's order: URL filter -> Trafilatura text -> language ID -> Gopher repetition + quality
-> C4 quality (+ bad words) -> FineWeb quality -> [your steps] -> PII redaction -> 13-gram decontamination
-> exact dedup (across sources) -> [sentence dedup] -> MinHash."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    EXTRACT_TIMEOUT_S,
    LANGUAGE_THRESHOLD,
    BundledLanguageFilter,
    C4BadWords,
    C4BadWordsSettings,
    C4Quality,
    C4Settings,
    CurationConfigError,
    DecontamSettings,
    DomainBlocklist,
    ExactDedupSettings,
    FinewebQuality,
    FineWebSettings,
    GopherSettings,
    MinhashSettings,
    PiiRedaction,
    PiiSettings,
    QuarantiningTrafilatura,
    SentenceDedupSettings,
    SourceLayout,
    SourcePipelines,
    UrlFilter,
    UrlFilterSettings,
    WarmSpacyTokenizer,
    assemble_stages,
    bad_words,
    fast_gopher_pair,
    gopher_filters,
)


@dataclass
class WebRecipe:
    """Settings of the web recipe for one language, in FineWeb's order of steps.

    `url_filter`, `c4_bad_words` and `pii` set to None turn those steps off; `use_c4` / `use_fineweb` turn
    those on (their settings default to the recipe's language). They are off by default: their rules were tuned on
    Common Crawl, and the offline corpus's help pages (short, list-like) lose over half their documents to them,
    which starves the demo's mixtures; turn them on for crawl data. `c4` defaults to FineWeb's
    use of C4 (no terminal-punctuation rule: FineWeb found it removes too much); C4's bad-words rule is off
    by default, as in FineWeb (its list comes from the npm package `naughty-words`). The URL filter keeps pages that have no
    `metadata["url"]` (local HTML trees) and counts them as `no_url`.
    """

    language: str = "en"
    language_threshold: float = LANGUAGE_THRESHOLD
    extract_timeout_s: float = EXTRACT_TIMEOUT_S
    url_filter: UrlFilterSettings | None = field(default_factory=UrlFilterSettings)
    gopher: GopherSettings | None = None  # None: GopherSettings(language=language)
    c4: C4Settings | None = None  # None: C4Settings(language=language, filter_no_terminal_punct=False)
    use_c4: bool = False
    c4_bad_words: C4BadWordsSettings | None = None  # e.g. C4BadWordsSettings(default_language="en")
    fineweb: FineWebSettings | None = None  # None: FineWebSettings(language=language)
    use_fineweb: bool = False
    pii: PiiSettings | None = field(default_factory=PiiSettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)
    exact: ExactDedupSettings | None = field(default_factory=ExactDedupSettings)  # across sources; None: off
    sentence: SentenceDedupSettings | None = None  # datatrove's sentence dedup, opt-in (it cuts text)
    decontam: DecontamSettings | None = field(default_factory=DecontamSettings)  # None: no decontamination

    def __post_init__(self) -> None:
        if self.gopher is None:
            self.gopher = GopherSettings(language=self.language)
        if not self.use_c4:
            self.c4 = None
        elif self.c4 is None:
            self.c4 = C4Settings(language=self.language, filter_no_terminal_punct=False)
        if not self.use_fineweb:
            self.fineweb = None
        elif self.fineweb is None:
            self.fineweb = FineWebSettings(language=self.language)
        for name, settings in (("c4", self.c4), ("fineweb", self.fineweb)):
            if settings is not None and settings.language != self.language:
                raise CurationConfigError(f"WebRecipe.{name}.language={settings.language!r} differs from "
                                          f"WebRecipe.language={self.language!r}; set both to the same "
                                          f"language (or leave {name} unset)", [name, "language"])


def web_pipeline(raw_dir: str | Path, curated_dir: str | Path, language: str = "en", source: str | None = None,
                 tasks: int = 2, recipe: WebRecipe | None = None,
                 extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """Stages for `raw_dir/<source>` (default source `web-<language>`); `extra_steps` (your own datatrove
    steps) run after the built-in quality filters, before PII redaction, decontamination and dedup."""
    recipe = recipe or WebRecipe(language=language)
    source = source or f"web-{recipe.language}"
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    words = WarmSpacyTokenizer(recipe.language)
    before_extraction: list[PipelineStep] = []
    if recipe.url_filter is not None:
        if recipe.url_filter.blocklist == "datatrove":
            DomainBlocklist.datatrove_shipped()  # hashed once here, before the workers fork, then shared
        before_extraction.append(UrlFilter(recipe.url_filter))
    quality: list[PipelineStep] = []
    if recipe.c4 is not None:
        quality.append(C4Quality(recipe.c4))
    if recipe.c4_bad_words is not None:
        if recipe.c4_bad_words.words_file is None:
            bad_words(recipe.c4_bad_words.default_language)  # fetched (npm pack) once, before the workers
        quality.append(C4BadWords(recipe.c4_bad_words))
    if recipe.fineweb is not None:
        quality.append(FinewebQuality(recipe.fineweb, words))
    filters = [
        *before_extraction,
        QuarantiningTrafilatura(str(layout.quarantine), timeout=recipe.extract_timeout_s),
        BundledLanguageFilter([recipe.language], language_threshold=recipe.language_threshold),
        *fast_gopher_pair(gopher_filters(recipe.gopher, words)),  # the stock pair's answers, words split once
        *quality,
        *(extra_steps or []),
        *([PiiRedaction(recipe.pii)] if recipe.pii is not None else []),
    ]
    return assemble_stages(layout, "web", filters, tasks, recipe.minhash, words, config=asdict(recipe),
                           max_doc_bytes=recipe.max_doc_bytes, exact=recipe.exact, sentence=recipe.sentence,
                           decontam=recipe.decontam)
