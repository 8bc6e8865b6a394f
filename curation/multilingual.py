"""Per-language Gopher thresholds, stop words and statistics, set the FineWeb-2 way.

FineWeb-2 keeps FineWeb's filters but gives every language its own thresholds and stop words
(`configs/{iso3}_{script}.yml` in the FineWeb-2 repository: `dup_line_frac`, `top_n_grams`, `dup_n_grams`,
`min/max_avg_word_length`, `max_non_alpha_words_ratio`, `stopwords`, `language_score`). They are not
hand-tuned constants: each is read off the distribution of that metric over a sample of the language's
documents, measured with the language's own word splitter. `derive_thresholds` does this on a sample you
give it (e.g. the extracted pages of `web-de`):

* every metric is computed per document exactly as datatrove's GopherRepetition / GopherQuality filters
  compute it (same helper functions, same word splitter);
* an upper-bound rule (`dup_line_frac`, top and duplicated n-gram fractions, `max_avg_word_length`) takes
  the `1 - tail` quantile, a lower-bound rule (`min_avg_word_length`, `max_non_alpha_words_ratio`, which is
  a minimum share of words with a letter, and `min_doc_words`) the `tail` quantile; so each rule drops at
  most about `tail` of documents like the sample, whatever the language's word lengths or repetition.
  The rules drop different documents, so a clean sample loses several tails in all (tail=0.05: about a
  quarter to a third of a 30-page sample); use a smaller tail on larger samples;
* stop words are the words found in at least `stop_word_doc_share` of the sample's documents (at most
  `max_stop_words`, most widespread first; English stop words removed for other languages, as FineWeb-2
  removes English contamination), and `min_stop_words` is 2 when there are at least 2 of them, else 0;
* `language_score` comes from `derive_language_threshold` (median - std of the lid.176 scores).

Bounds keep a small or odd sample from producing a rule that drops everything or nothing (`min_doc_words`
never above Gopher's 50; ratios within [0, 1]).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
    find_top_duplicate,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET
from datatrove.utils.word_tokenizers import WordTokenizer
from mixlab.curation.filters import GOPHER_DEFAULTS, STOP_WORDS
from mixlab.curation.lid import LANGUAGE_THRESHOLD, derive_language_threshold
from mixlab.curation.text import import_spacy, offline_word_tokenizer

TOP_N_GRAMS = (2, 3, 4)
DUP_N_GRAMS = (5, 6, 7, 8, 9, 10)
DEFAULT_TAIL = 0.05  # share of sample documents each derived rule may drop (12 rules: ~25-40% in all)
MIN_SAMPLE_DOCS = 20  # fewer documents give quantiles too noisy to filter with


@dataclass
class LanguageThresholds:
    """Gopher thresholds of one language (FineWeb-2's config fields), plus how they were derived."""

    language: str
    stop_words: list[str] = field(default_factory=list)
    min_stop_words: int = 0
    min_doc_words: int = 50
    min_avg_word_length: float = 0.0
    max_avg_word_length: float = 15.0
    max_non_alpha_words_ratio: float = 0.8
    dup_line_frac: float = 0.3
    top_n_grams: list[tuple[int, float]] = field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
    language_score: float = LANGUAGE_THRESHOLD
    method: str = "defaults"  # "quantile(tail=0.1) over N docs" once derived
    sample_docs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def document_metrics(text: str, words_of: WordTokenizer) -> dict[str, float]:
    """The per-document values datatrove's Gopher filters compare with their thresholds."""
    lines = [line for line in text.split("\n") if line]  # datatrove splits on "\n+"
    line_dups, _ = find_duplicates(lines)
    words = words_of.word_tokenize(text)
    non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    n_chars = max(len(text), 1)
    metrics = {
        "n_words": float(len(non_symbol)),
        "avg_word_length": float(np.mean([len(w) for w in non_symbol])) if non_symbol else 0.0,
        "alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / len(words) if words else 0.0,
        "dup_line_frac": line_dups / len(lines) if lines else 0.0,
    }
    for n in TOP_N_GRAMS:
        grams = get_n_grams(words, n)
        metrics[f"top_{n}_gram"] = find_top_duplicate(grams) / n_chars if grams else 0.0
    for n in DUP_N_GRAMS:
        metrics[f"dup_{n}_gram"] = find_all_duplicate(words, n) / n_chars
    return metrics


def _is_latin(word: str) -> bool:
    return any(c.isalpha() and unicodedata.name(c, "").startswith("LATIN") for c in word)


def derive_stop_words(word_lists: list[list[str]], language: str, doc_share: float = 0.3,
                      max_words: int = 15) -> list[str]:
    """Words present in at least `doc_share` of the documents, most widespread first (see module doc).

    English is kept out of other languages' lists (web pages and help pages leave English untranslated):
    for a language written mostly in a non-Latin script, every word with Latin letters; for a Latin-script
    language, spaCy's English stop words (shipped with spaCy, no download)."""
    doc_freq: Counter[str] = Counter()
    letters: Counter[bool] = Counter()
    for words in word_lists:
        doc_freq.update({w for w in words if any(c.isalpha() for c in w)})
        for w in words:
            letters.update(_is_latin(c) for c in w if c.isalpha())
    latin_script = letters[True] >= letters[False]
    if language == "en":
        foreign = lambda w: False  # noqa: E731
    elif latin_script:
        import_spacy()
        from spacy.lang.en.stop_words import STOP_WORDS as SPACY_EN_STOP_WORDS

        english = set(SPACY_EN_STOP_WORDS) | set(STOP_WORDS["en"])
        foreign = lambda w: w.lower() in english  # noqa: E731
    else:
        foreign = _is_latin
    needed = doc_share * len(word_lists)
    ranked = sorted(doc_freq.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, df in ranked if df >= needed and not foreign(w)][:max_words]


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values, dtype=float), q))


def derive_thresholds(texts: list[str], language: str, words_of: WordTokenizer | None = None,
                      tail: float = DEFAULT_TAIL, lid_scores: list[float] | None = None,
                      stop_word_doc_share: float = 0.3, max_stop_words: int = 15) -> LanguageThresholds:
    """Thresholds of `language` from a sample of its documents (method in the module docstring)."""
    if not 0.0 < tail < 0.5:
        raise ValueError(f"derive_thresholds: tail={tail} must be in (0, 0.5), e.g. 0.1 to drop ~10% per rule")
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < MIN_SAMPLE_DOCS:
        raise ValueError(f"derive_thresholds({language!r}): {len(texts)} non-empty documents; give at least "
                         f"{MIN_SAMPLE_DOCS} so that the quantiles mean something")
    words_of = words_of or offline_word_tokenizer(language)
    per_doc = [document_metrics(t, words_of) for t in texts]
    column = {name: [m[name] for m in per_doc] for name in per_doc[0]}
    hi, lo = 1.0 - tail, tail
    defaults = LanguageThresholds(language)

    def upper(name: str, default: float) -> float:
        # a 0 quantile means the sample shows no repetition at all: no evidence, so keep Gopher's default
        # (a derived 0 would read as "rule off" to datatrove, or drop any page with one repeat)
        value = round(_quantile(column[name], hi), 3)
        return value if value > 0 else default
    stop_words = derive_stop_words([words_of.word_tokenize(t) for t in texts], language,
                                   stop_word_doc_share, max_stop_words)
    return LanguageThresholds(
        language=language,
        stop_words=stop_words,
        min_stop_words=2 if len(stop_words) >= 2 else 0,
        min_doc_words=int(min(GOPHER_DEFAULTS["min_doc_words"], math.floor(_quantile(column["n_words"], lo)))),
        min_avg_word_length=round(_quantile(column["avg_word_length"], lo), 3),
        max_avg_word_length=round(_quantile(column["avg_word_length"], hi), 3),
        max_non_alpha_words_ratio=round(_quantile(column["alpha_words_ratio"], lo), 3),
        dup_line_frac=upper("dup_line_frac", defaults.dup_line_frac),
        top_n_grams=[(n, upper(f"top_{n}_gram", d)) for n, d in defaults.top_n_grams],
        dup_n_grams=[(n, upper(f"dup_{n}_gram", d)) for n, d in defaults.dup_n_grams],
        language_score=derive_language_threshold(lid_scores) if lid_scores else LANGUAGE_THRESHOLD,
        method=f"quantile(tail={tail}) over {len(texts)} docs",
        sample_docs=len(texts),
    )


def multilingual_filters(thresholds: LanguageThresholds, words_of: WordTokenizer | None = None) -> list[BaseFilter]:
    """datatrove's GopherRepetition then GopherQuality with the language's thresholds. Paragraph rules are
    off, as in FineWeb-2 (trafilatura does not keep paragraphs); a 0 threshold turns a rule off."""
    words_of = words_of or offline_word_tokenizer(thresholds.language)
    return [
        GopherRepetitionFilter(
            dup_line_frac=thresholds.dup_line_frac or None,
            dup_para_frac=None,
            dup_para_char_frac=None,
            top_n_grams=tuple((n, f) for n, f in thresholds.top_n_grams if f > 0),
            dup_n_grams=tuple((n, f) for n, f in thresholds.dup_n_grams if f > 0),
            language=words_of,
        ),
        GopherQualityFilter(
            min_doc_words=thresholds.min_doc_words or None,
            max_doc_words=GOPHER_DEFAULTS["max_doc_words"],
            min_avg_word_length=thresholds.min_avg_word_length or None,
            max_avg_word_length=thresholds.max_avg_word_length or None,
            max_non_alpha_words_ratio=thresholds.max_non_alpha_words_ratio or None,
            min_stop_words=thresholds.min_stop_words or None,
            stop_words=thresholds.stop_words,
            language=words_of,
        ),
    ]


@dataclass
class LanguageStatistics:
    """Counts and means of one language's documents."""

    language: str
    docs: int = 0
    words: int = 0
    sentences: int = 0
    chars: int = 0
    word_chars: int = 0

    def add(self, text: str, words: list[str], sentences: int) -> None:
        self.docs += 1
        self.words += len(words)
        self.sentences += sentences
        self.chars += len(text)
        self.word_chars += sum(len(w) for w in words)

    def summary(self) -> dict[str, float | int | str]:
        docs = max(self.docs, 1)
        return {
            "language": self.language, "docs": self.docs, "words": self.words, "sentences": self.sentences,
            "chars": self.chars, "mean_words_per_doc": round(self.words / docs, 2),
            "mean_sentences_per_doc": round(self.sentences / docs, 2),
            "mean_chars_per_doc": round(self.chars / docs, 2),
            "mean_word_length": round(self.word_chars / max(self.words, 1), 3),
        }


def language_statistics(texts: list[str], language: str, words_of: WordTokenizer | None = None) -> LanguageStatistics:
    """Statistics of `texts` in `language`, words and sentences split as the filters split them."""
    words_of = words_of or offline_word_tokenizer(language)
    stats = LanguageStatistics(language)
    for text in texts:
        stats.add(text, words_of.word_tokenize(text), len(words_of.sent_tokenize(text)))
    return stats


LANGUAGE_COUNT_PREFIX = "lang_"  # manifest count keys: lang_<language>_<field>
LANGUAGE_COUNT_FIELDS = ("docs", "words", "sentences", "chars", "word_chars")


def language_count_key(language: str, field_name: str) -> str:
    return f"{LANGUAGE_COUNT_PREFIX}{language}_{field_name}"


def statistics_from_counts(counts: dict[str, int]) -> dict[str, LanguageStatistics]:
    """Per-language statistics back from a manifest step's `counts` (`lang_<language>_<field>` keys, summed over
    ranks), so that means are taken over the whole source, not averaged over ranks."""
    out: dict[str, LanguageStatistics] = {}
    for key, value in counts.items():
        if not key.startswith(LANGUAGE_COUNT_PREFIX):
            continue
        rest = key.removeprefix(LANGUAGE_COUNT_PREFIX)
        field_name = next((f for f in sorted(LANGUAGE_COUNT_FIELDS, key=len, reverse=True)
                           if rest.endswith(f"_{f}")), None)
        if field_name is None:
            continue
        language = rest.removesuffix(f"_{field_name}")
        stats = out.setdefault(language, LanguageStatistics(language))
        setattr(stats, field_name, int(value))
    return dict(sorted(out.items()))


class LanguageStatsStep(BaseFilter):
    """Keeps every document, counting docs, words, sentences and characters per language (the document's
    `language` metadata, else `default_language`) into its stats as `lang_<language>_<field>`; `manifest_counts`
    makes the manifest keep them in the step's `counts` (`statistics_from_counts` gives the means back).
    A filter rather than a plain step so the accounting counts it itself. `statistics` also holds them in this
    process."""

    name = "📊 Per-language statistics"
    type = "📊 - STATS"
    manifest_counts = (LANGUAGE_COUNT_PREFIX,)

    def __init__(self, default_language: str, words_of: WordTokenizer | None = None):
        super().__init__()
        self.default_language = default_language
        self.words_of = words_of
        self.statistics: dict[str, LanguageStatistics] = {}

    def _splitter(self, language: str) -> WordTokenizer:
        if self.words_of is not None and language == self.default_language:
            return self.words_of
        return offline_word_tokenizer(language)

    def filter(self, doc: Document) -> bool:
        language = doc.metadata.get("language") or self.default_language
        try:
            splitter = self._splitter(language)
        except ValueError:  # a language datatrove has no tokenizer for
            splitter = self._splitter(self.default_language)
        words = splitter.word_tokenize(doc.text)
        sentences = len(splitter.sent_tokenize(doc.text))
        self.statistics.setdefault(language, LanguageStatistics(language)).add(doc.text, words, sentences)
        values = {"docs": 1, "words": len(words), "sentences": sentences, "chars": len(doc.text),
                  "word_chars": sum(len(w) for w in words)}
        for field_name, value in values.items():
            self.stat_update(language_count_key(language, field_name), value=value)
        return True
