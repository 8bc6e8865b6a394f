"""Chat recipe (kept for post-training): dialogues -> language tag -> format check -> decontamination -> exact
dedup (across sources) -> [sentence dedup] -> MinHash.

Dialogues are short and multilingual: language ID tags (the `lang_hint` of the corpus stays alongside).
MinHash keeps 5-grams: with 3-grams, the same question with two different short answers is a "duplicate".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    BundledLanguageFilter,
    ChatFormatFilter,
    ChatFormatSettings,
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
class ChatRecipe:
    format: ChatFormatSettings = field(default_factory=ChatFormatSettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)
    exact: ExactDedupSettings | None = field(default_factory=ExactDedupSettings)  # across sources; None: off
    sentence: SentenceDedupSettings | None = None  # datatrove's sentence dedup, opt-in
    decontam: DecontamSettings | None = field(default_factory=DecontamSettings)  # None: no decontamination


def chat_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "chat", tasks: int = 2,
                  recipe: ChatRecipe | None = None, extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """`extra_steps` (your own datatrove steps) run after the built-in filters, before decontamination and dedup."""
    recipe = recipe or ChatRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    filters = [
        BundledLanguageFilter(label_only=True),
        ChatFormatFilter(recipe.format),
        *(extra_steps or []),
    ]
    return assemble_stages(layout, "chat", filters, tasks, recipe.minhash, RegexWordTokenizer("chat"),
                           config=asdict(recipe), max_doc_bytes=recipe.max_doc_bytes, exact=recipe.exact,
                           sentence=recipe.sentence, decontam=recipe.decontam)
