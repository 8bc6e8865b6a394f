"""Math recipe: word problems and proof comments -> language tag -> light math rules -> MinHash.

Math text is full of symbols that Gopher would count as noise, so only light rules apply; language ID
only tags (formulas confuse it), it does not filter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    BundledLanguageFilter,
    MathQualityFilter,
    MathQualitySettings,
    MinhashSettings,
    RegexWordTokenizer,
    SourceLayout,
    SourcePipelines,
    assemble_stages,
)


@dataclass
class MathRecipe:
    quality: MathQualitySettings = field(default_factory=MathQualitySettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)


def math_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "math", tasks: int = 2,
                  recipe: MathRecipe | None = None, extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """`extra_steps` (your own datatrove steps) run after the built-in filters, before MinHash dedup."""
    recipe = recipe or MathRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [
        BundledLanguageFilter(label_only=True),
        MathQualityFilter(recipe.quality),
        *(extra_steps or []),
    ]
    return assemble_stages(layout, "math", filters, tasks, recipe.minhash, RegexWordTokenizer("math"),
                           config=asdict(recipe),
                           max_doc_bytes=recipe.max_doc_bytes)
