"""Code recipe: source files -> code quality rules -> MinHash over code tokens (no prose filters)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from curation.dedup import MinhashSettings
from curation.filters import CodeQualityFilter
from curation.stages import SourceLayout, SourcePipelines, assemble_stages
from curation.text import RegexWordTokenizer


@dataclass
class CodeRecipe:
    min_lines: int = 5
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    minhash: MinhashSettings = field(default_factory=MinhashSettings)


def code_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "code-python", tasks: int = 2,
                  recipe: CodeRecipe | None = None) -> SourcePipelines:
    recipe = recipe or CodeRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [
        CodeQualityFilter(min_lines=recipe.min_lines, max_line_length=recipe.max_line_length,
                          max_mean_line_length=recipe.max_mean_line_length,
                          min_alnum_fraction=recipe.min_alnum_fraction),
    ]
    return assemble_stages(layout, "code", filters, tasks, recipe.minhash, RegexWordTokenizer("code"),
                           config=asdict(recipe))
