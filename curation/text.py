"""Word tokenizers for datatrove's filters and MinHash, chosen per source kind.

datatrove maps a language code to a spaCy blank tokenizer and runs it inside `nlp.memory_zone()`, which
makes spaCy relearn every word for every document (about 10x slower than a warm tokenizer). For prose
we keep spaCy's rules but a warm pipeline, built once per process.
For code, math notation and short multilingual chat, a regex tokenizer is both faster and more apt.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WordTokenizer, simple_span_tokenize, strip_strings

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+|\n+")


_BLANK_NLP: dict[str, object] = {}


def blank_nlp(language: str):
    """One spaCy blank pipeline per language and process. Built in the parent before workers fork, it is
    inherited for free: `spacy.blank("fr")` alone takes ~3.5 s (its tokenizer exceptions)."""
    if language not in _BLANK_NLP:
        import spacy

        _BLANK_NLP[language] = spacy.blank(language)
    return _BLANK_NLP[language]


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
