"""Code recipe (Stack-v2 style): source files -> language fields -> language allowlist -> data/config files ->
per-language quality rules -> statistics per language -> decontamination -> exact dedup (across sources) ->
MinHash over code tokens (no prose filters).

`programming_language` comes from the raw metadata (the code-tree reader names it from the extension);
`language` is the natural language of the comments (lid.176 tags it), as in every other source. Every code
step counts its drops per programming language, and the statistics step what is kept
(`code_lang_<language>_docs` / `_bytes` in the manifest's step counts; `programming_language_counts` sums them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    CodeKindFilter,
    CodeKindSettings,
    CodeLanguageAllowlist,
    CodeLanguageStats,
    CodeLanguageTagger,
    CodeQualityFilter,
    CodeQualitySettings,
    DecontamSettings,
    ExactDedupSettings,
    MinhashSettings,
    RegexWordTokenizer,
    SentenceDedupSettings,
    SourceLayout,
    SourcePipelines,
    assemble_stages,
)


@dataclass
class CodeRecipe:
    programming_language: str | None = None  # for documents whose raw metadata names none
    languages: list[str] | None = None  # allowlist of programming languages; None: no allowlist (keeps every one)
    kinds: CodeKindSettings = field(default_factory=CodeKindSettings)  # data/config files: dropped, or tagged
    quality: CodeQualitySettings = field(default_factory=CodeQualitySettings)  # shared and per-language rules
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)
    exact: ExactDedupSettings | None = field(default_factory=ExactDedupSettings)  # across sources; None: off
    sentence: SentenceDedupSettings | None = None  # datatrove's sentence dedup, opt-in (it cuts code apart)
    decontam: DecontamSettings | None = field(default_factory=DecontamSettings)  # HumanEval, GSM8K; None: off


def code_filters(recipe: CodeRecipe) -> list[PipelineStep]:
    """The recipe's code steps, in order: cheap decisions (language, kind) before the per-line rules."""
    return [
        CodeLanguageTagger(recipe.programming_language),
        *([CodeLanguageAllowlist(recipe.languages)] if recipe.languages is not None else []),
        CodeKindFilter(recipe.kinds),
        CodeQualityFilter(recipe.quality),
        CodeLanguageStats(),
    ]


def code_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "code-python", tasks: int = 2,
                  recipe: CodeRecipe | None = None, extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """`extra_steps` (your own datatrove steps) run after the built-in filters and statistics, before
    decontamination and dedup."""
    recipe = recipe or CodeRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [*code_filters(recipe), *(extra_steps or [])]
    return assemble_stages(layout, "code", filters, tasks, recipe.minhash, RegexWordTokenizer("code"),
                           config=asdict(recipe), max_doc_bytes=recipe.max_doc_bytes, exact=recipe.exact,
                           sentence=recipe.sentence, decontam=recipe.decontam)
