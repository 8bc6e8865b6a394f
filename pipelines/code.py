"""Code recipe: source files -> code quality rules -> MinHash over code tokens (no prose filters)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixlab.curation import (
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
    quality: CodeQualitySettings = field(default_factory=CodeQualitySettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)


def code_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "code-python", tasks: int = 2,
                  recipe: CodeRecipe | None = None) -> SourcePipelines:
    recipe = recipe or CodeRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [CodeQualityFilter(recipe.quality)]
    return assemble_stages(layout, "code", filters, tasks, recipe.minhash, RegexWordTokenizer("code"),
                           config=asdict(recipe))
