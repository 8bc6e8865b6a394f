"""Word tokenizers for datatrove's filters and MinHash, chosen per source kind.

datatrove maps a language code to a spaCy blank tokenizer and runs it inside `nlp.memory_zone()`, which
makes spaCy relearn every word for every document (about 10x slower than a warm tokenizer). For prose
we keep spaCy's rules but a warm pipeline, built once per process.
For code, math notation and short multilingual chat, a regex tokenizer is both faster and more apt.
"""

from __future__ import annotations

import re
import sys

from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize, strip_strings

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


_BLANK_NLP: dict[str, object] = {}


def blank_nlp(language: str):
    """One spaCy blank pipeline per language and process. Built in the parent before workers fork, it is
    inherited for free: `spacy.blank("fr")` alone takes ~3.5 s (its tokenizer exceptions)."""
    if language not in _BLANK_NLP:
        _BLANK_NLP[language] = import_spacy().blank(language)
    return _BLANK_NLP[language]


def import_spacy():
    """spaCy, imported without torch. Its blank tokenizers never use torch, but thinc (under spaCy) imports it
    whenever it is installed: 2.3 s of a 3.5 s import, paid by every curation process, Slurm task and Ray
    worker. Unless torch is loaded already, it is hidden from this one import (thinc then records
    `has_torch = False`, which only its torch-backed layers read); a later `import torch` works as usual."""
    if "spacy" in sys.modules or "torch" in sys.modules:
        import spacy

        return spacy
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import spacy
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return spacy


class WarmSpacyTokenizer(WordTokenizer):
    """spaCy blank-language word splitting without per-document memory zones.

    The vocabulary grows with the distinct words seen (tens of MB for millions of words) and is held for
    the life of the process: a datatrove worker pool lives for one stage.
    """

    def __init__(self, language: str, warm: bool = True):
        super().__init__(language)
        if warm:
            blank_nlp(language)

    @property
    def nlp(self):
        return blank_nlp(self.language)

    def word_tokenize(self, text: str) -> list[str]:
        nlp = self.nlp
        nlp.max_length = len(text) + 10
        return strip_strings([token.text for token in nlp.tokenizer(text)])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(_SENTENCE_END.split(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


class RegexWordTokenizer(WordTokenizer):
    """Words are runs of letters/digits/underscore; every other non-space character is its own token."""

    _word = re.compile(r"\w+|[^\w\s]", re.UNICODE)

    def __init__(self, language: str = "code"):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(text.splitlines())

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


# ---- per-language splitting as datatrove assigns it ------------------------------------------------------
_SENTENCIZER_NLP: dict[str, object] = {}
_JA_MAX_CHUNK_BYTES = 40000  # datatrove chunks Japanese text on bytes (Sudachi's input limit)


def sentencizer_nlp(spacy_code: str):
    """spaCy blank pipeline plus the rule-based `sentencizer`, as datatrove's SpaCyTokenizer builds it; one
    per process, kept apart from `blank_nlp` so that adding a pipe never changes WarmSpacyTokenizer."""
    if spacy_code not in _SENTENCIZER_NLP:
        nlp = import_spacy().blank(spacy_code)
        nlp.add_pipe("sentencizer")
        _SENTENCIZER_NLP[spacy_code] = nlp
    return _SENTENCIZER_NLP[spacy_code]


class SpacySentencizerTokenizer(WordTokenizer):
    """The words, sentences and sentence spans of datatrove's `SpaCyTokenizer(spacy_code)`, without its
    per-call memory zone (which makes spaCy relearn every word of every document).

    `language` is the document language (e.g. "zh"); `spacy_code` the blank model datatrove assigns to it
    (e.g. "xx"), so that thresholds tuned on datatrove's word counts transfer unchanged.
    """

    def __init__(self, language: str, spacy_code: str | None = None, warm: bool = True):
        super().__init__(language)
        self.spacy_code = spacy_code or language
        if warm:
            sentencizer_nlp(self.spacy_code)

    @property
    def nlp(self):
        return sentencizer_nlp(self.spacy_code)

    def _docs(self, text: str) -> list:
        nlp = self.nlp
        nlp.max_length = len(text) + 10
        try:
            return [nlp(text)]
        except Exception:
            if "IS_ALPHA" in text:  # datatrove's workaround: this string breaks spaCy's attribute parsing
                return [nlp(text.replace("IS_ALPHA", ""))]
            raise

    def word_tokenize(self, text: str) -> list[str]:
        nlp = self.nlp
        nlp.max_length = len(text) + 10
        try:
            tokens = nlp.tokenizer(text)
        except Exception:
            if "IS_ALPHA" not in text:
                raise
            tokens = nlp.tokenizer(text.replace("IS_ALPHA", ""))
        return strip_strings([token.text for token in tokens])

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([sent.text for doc in self._docs(text) for sent in doc.sents])

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(sent.start_char, sent.end_char) for doc in self._docs(text) for sent in doc.sents]


class ScriptRunTokenizer(WordTokenizer):
    """Regex splitting for a language whose datatrove tokenizer needs a download (Japanese: SudachiPy and
    its dictionary). A word is a run of one script (kanji, hiragana, katakana with its long-vowel mark,
    letters/digits of other scripts); every other non-space character is its own token. Sentences end at
    。！？!? (plus closing quotes/brackets) or a line break."""

    _word = re.compile(
        r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff々〆]+"  # kanji
        r"|[\u3041-\u309f]+"  # hiragana
        r"|[\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9fー]+"  # katakana (full and half width)
        r"|[^\W\u3000-\u30ff\u3400-\u9fff\uf900-\ufaff\uff66-\uff9f]+"  # other letters, digits, underscore
        r"|[^\w\s]",
        re.UNICODE,
    )
    _sentence = re.compile(r".+?(?:[。！？!?]+[」』）)\"'”]*|\n|$)", re.DOTALL)

    def __init__(self, language: str = "ja"):
        super().__init__(language)

    def word_tokenize(self, text: str) -> list[str]:
        return self._word.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings(self._sentence.findall(text))

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(simple_span_tokenize(text, self.sent_tokenize(text)))


def datatrove_assignment(language: str) -> tuple[str, str | None]:
    """(tokenizer class name, spaCy/tool code) that datatrove's `tokenizer_assignment.csv` gives `language`
    (e.g. ("SpaCyTokenizer", "xx") for "zh"); raises ValueError for a language without one."""
    from datatrove.utils.word_tokenizers import load_tokenizer_assignments

    factories = load_tokenizer_assignments()
    if language not in factories:
        raise ValueError(f"language {language!r} has no tokenizer in datatrove's tokenizer_assignment.csv; "
                         "pass a WordTokenizer or a language code such as 'de' or 'zh'")
    class_name, code = factories[language].args
    return class_name, code or None


def _spacy_blank_works(spacy_code: str) -> bool:
    """True when `spacy.blank(spacy_code)` can be built and used here (ja needs SudachiPy, th pythainlp...)."""
    try:
        sentencizer_nlp(spacy_code).tokenizer("a")
    except Exception:  # ImportError, or the model's own error for a missing dependency
        _SENTENCIZER_NLP.pop(spacy_code, None)
        return False
    return True


def offline_word_tokenizer(language: str) -> WordTokenizer:
    """The splitter for `language` that needs no download: datatrove's own spaCy assignment (same words and
    sentences, warm) where it works offline, else `ScriptRunTokenizer`."""
    class_name, code = datatrove_assignment(language)
    if class_name == "SpaCyTokenizer" and code and language != "vi" and _spacy_blank_works(code):
        return SpacySentencizerTokenizer(language, code)
    return ScriptRunTokenizer(language)
