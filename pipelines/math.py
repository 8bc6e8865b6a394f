"""Math recipe: word problems, proof comments and math web pages -> language tag -> light math rules ->
[math score and threshold] -> MinHash.

Math text is full of symbols that Gopher would count as noise, so only light rules apply; language ID
only tags (formulas confuse it), it does not filter.

HTML sources (FineMath / OpenWebMath style): when the raw records are HTML pages, they are extracted first by
`MathTrafilatura`, which keeps formulas as `$tex$` / `$$tex$$` and code blocks fenced. `MathRecipe.html`
None (the default) decides from the raw folder: an HTML tree or WARC files, or JSONL whose first record has
`metadata.format == "html"` or starts like an HTML page (`<!doctype html`, `<html`). The demo's `math` source
(GSM8K, set.mm comments) is plain text, so it is curated as before.

Math scorer: `MathRecipe.scorer` names a classifier directory made by `mixlab classify train` (e.g. the
"math-vs-not" preset). Each document's score goes into `metadata[<name>_score]`, kept in the curated Parquet
as an extra float metadata column, and documents below `min_score` are dropped with reason `<name>_score_below`
(the threshold itself is in the recorded recipe). Only this source's Parquet then has that column: annotate the
other sources with the same model (`mixlab classify annotate`) to keep one schema across `data/`.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from mixlab.curation import (
    EXTRACT_TIMEOUT_S,
    BundledLanguageFilter,
    ClassifierScorer,
    DecontamSettings,
    ExactDedupSettings,
    MathQualityFilter,
    MathQualitySettings,
    MathTrafilatura,
    MinhashSettings,
    RegexWordTokenizer,
    ScoreThresholdFilter,
    SourceLayout,
    SourcePipelines,
    assemble_stages,
    detect_reader_kind,
    load_classifier,
)

_HTML_START = re.compile(r"\s*(<!doctype\s+html|<html[\s>])", re.I)


@dataclass
class MathRecipe:
    quality: MathQualitySettings = field(default_factory=MathQualitySettings)
    minhash: MinhashSettings = field(default_factory=MinhashSettings)
    max_doc_bytes: int | None = None  # raw records above are quarantined as too_large; None: 4 MiB (the reader's)
    html: bool | None = None  # extract HTML keeping TeX and code; None: detect from the raw records
    extract_timeout_s: float = EXTRACT_TIMEOUT_S
    scorer: str | None = None  # a `mixlab classify train` directory; None: no math score
    min_score: float | None = 0.5  # with a scorer: drop documents scoring below; None: score only
    exact: ExactDedupSettings | None = field(default_factory=ExactDedupSettings)  # None: off
    decontam: DecontamSettings | None = field(default_factory=DecontamSettings)  # None: off

    def __post_init__(self) -> None:
        if self.scorer is not None and self.min_score is not None:
            ScoreThresholdFilter("score", min_score=self.min_score)  # refuses a threshold that is not a number


def raw_records_are_html(raw_source_dir: str | Path) -> bool:
    """Whether a raw source holds HTML pages: an HTML tree or WARC files, or JSONL whose first record says
    `metadata.format == "html"` or starts like a page. Only the first record is read."""
    folder = Path(raw_source_dir)
    kind = detect_reader_kind(folder)
    if kind in ("html", "warc"):
        return True
    if kind != "jsonl":
        return False
    for path in sorted(folder.glob("*.jsonl.gz")) + sorted(folder.glob("*.jsonl")):
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                line = next((ln for ln in handle if ln.strip()), None)
            record = json.loads(line) if line else None
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # the reader quarantines this file; the next one decides
        if not isinstance(record, dict):
            continue
        metadata = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
        return metadata.get("format") == "html" or bool(_HTML_START.match(str(record.get("text", ""))[:200]))
    return False


def _score_steps(recipe: MathRecipe) -> tuple[list[PipelineStep], str, str]:
    """The scorer and threshold steps, the score field and the model checksum (a retrained model re-curates)."""
    classifier = load_classifier(recipe.scorer)  # refused here, with what to do, before any stage runs
    steps: list[PipelineStep] = [ClassifierScorer(recipe.scorer)]
    if recipe.min_score is not None:
        steps.append(ScoreThresholdFilter(classifier.field, min_score=recipe.min_score))
    return steps, classifier.field, classifier.card["model_sha256"]


def math_pipeline(raw_dir: str | Path, curated_dir: str | Path, source: str = "math", tasks: int = 2,
                  recipe: MathRecipe | None = None, extra_steps: list[PipelineStep] | None = None) -> SourcePipelines:
    """`extra_steps` (your own datatrove steps) run after the built-in filters and the score threshold, before
    MinHash dedup."""
    recipe = recipe or MathRecipe()
    layout = SourceLayout(source, Path(raw_dir) / source, Path(curated_dir))
    html = recipe.html if recipe.html is not None else raw_records_are_html(layout.raw_dir)
    scoring, score, model_sha = _score_steps(recipe) if recipe.scorer is not None else ([], None, None)
    filters = [
        *([MathTrafilatura(str(layout.quarantine), timeout=recipe.extract_timeout_s)] if html else []),
        BundledLanguageFilter(label_only=True),
        MathQualityFilter(recipe.quality),
        *scoring,
        *(extra_steps or []),
    ]
    # html as detected, and the scorer's model checksum: a retrained model re-curates
    config = {**asdict(recipe), "html": html, "scorer_model_sha256": model_sha}
    return assemble_stages(layout, "math", filters, tasks, recipe.minhash, RegexWordTokenizer("math"),
                           config=config, max_doc_bytes=recipe.max_doc_bytes, exact=recipe.exact,
                           decontam=recipe.decontam, score_fields=[score] if score is not None else ())
