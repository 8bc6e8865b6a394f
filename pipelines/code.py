"""Code recipe: source files -> language fields -> code quality rules -> MinHash over code tokens (no prose
filters). `programming_language` comes from the raw metadata; `language` is the natural language of the
comments (lid.176 tags it), as in every other source."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    CodeLanguageTagger,
    CodeQualityFilter,
    CodeQualitySettings,
    MinhashSettings,
    RegexWordTokenizer,
    SourceLayout,
    SourcePipelines,
    assemble_stages,
)


@dataclass
class CodeRecipe:
    programming_language: str | None = None  # for documents whose raw metadata names none
    quality: CodeQualitySettings = field(default_factory=CodeQualitySettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)


def code_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "code-python", tasks: int = 2,
                  recipe: CodeRecipe | None = None, extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """`extra_steps` (your own datatrove steps) run after the built-in filters, before MinHash dedup."""
    recipe = recipe or CodeRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [CodeLanguageTagger(recipe.programming_language), CodeQualityFilter(recipe.quality),
               *(extra_steps or [])]
    return assemble_stages(layout, "code", filters, tasks, recipe.minhash, RegexWordTokenizer("code"),
                           config=asdict(recipe),
                           max_doc_bytes=recipe.max_doc_bytes)
