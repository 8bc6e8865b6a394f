"""Web recipe: raw HTML -> Trafilatura text -> language ID -> Gopher repetition + quality -> MinHash."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    EXTRACT_TIMEOUT_S,
    LANGUAGE_THRESHOLD,
    BundledLanguageFilter,
    GopherSettings,
    MinhashSettings,
    QuarantiningTrafilatura,
    SourceLayout,
    SourcePipelines,
    WarmSpacyTokenizer,
    assemble_stages,
    gopher_filters,
)


@dataclass
class WebRecipe:
    """Settings of the web recipe for one language (FineWeb's order of steps, minus URL/C4 filters,
    which need blocklists or word lists that cannot be fetched offline)."""

    language: str = "en"
    language_threshold: float = LANGUAGE_THRESHOLD
    extract_timeout_s: float = EXTRACT_TIMEOUT_S
    gopher: GopherSettings | None = None  # None: GopherSettings(language=language)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)

    def __post_init__(self) -> None:
        if self.gopher is None:
            self.gopher = GopherSettings(language=self.language)


def web_pipeline(raw_dir: str | Path, curated_dir: str | Path, language: str = "en", source: str | None = None,
                 tasks: int = 2, recipe: WebRecipe | None = None,
                 extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """Stages for `raw_dir/<source>` (default source `web-<language>`); `extra_steps` (your own datatrove
    steps) run after the built-in filters, before MinHash dedup."""
    recipe = recipe or WebRecipe(language=language)
    source = source or f"web-{recipe.language}"
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    words = WarmSpacyTokenizer(recipe.language)
    filters = [
        QuarantiningTrafilatura(str(layout.quarantine), timeout=recipe.extract_timeout_s),
        BundledLanguageFilter([recipe.language], language_threshold=recipe.language_threshold),
        *gopher_filters(recipe.gopher, words),
        *(extra_steps or []),
    ]
    return assemble_stages(layout, "web", filters, tasks, recipe.minhash, words, config=asdict(recipe),
                           max_doc_bytes=recipe.max_doc_bytes)
