"""The web quality chain (Gopher repetition, Gopher quality, C4 quality, FineWeb quality) fused into one datatrove
step that gives stock datatrove's decisions and drop reasons, at a fraction of the cost.

Why it is faster: the stock filters split the text into words three times per document (and C4 sentence-splits each
kept line), each time with a spaCy pipeline inside a memory zone, which relearns every word. Here the text is split
on whitespace once and each whitespace-free chunk is tokenized by the same spaCy pipeline once per process (spaCy
tokenizes whitespace-separated spans independently), with what every filter needs of it cached per chunk: its
tokens, their symbol/alpha flags and what the sentencizer does across it. n-gram repetition is counted on tuples
(Gopher's top n-grams) and on concatenated slices with a walk over repeated positions only (duplicate n-grams).

Same answers: every rule is the stock rule in the stock order on the same values; a text the shared split cannot
treat identically (spaCy's `IS_ALPHA` failure path) runs through the stock filters themselves.
The URL filter keeps datatrove's rules but reads mixlab's shared, hashed domain list (36 MB mapped, not 600 MB per
worker); language ID is datatrove's LanguageFilter decision over the bundled lid.176.ftz, computed by mixlab.curation.fast_lid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from typing import Any

import numba
import numpy as np
from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    URLFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter, get_filter_result
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import find_duplicates
from datatrove.utils.text import PUNCTUATION_SET
from datatrove.utils.word_tokenizers import WordTokenizer
from mixlab.curation.fast_lid import equal_slices
from mixlab.curation.filters import GopherSettings
from mixlab.curation.lid import LANGUAGE_THRESHOLD, BundledFT176LID
from mixlab.curation.text import (
    SpacySentencizerTokenizer,
    WarmSpacyTokenizer,
    datatrove_assignment,
    sentencizer_nlp,
)
from mixlab.curation.web_quality import DATATROVE_BLOCKLIST, DomainBlocklist, _suffix_extractor

_WS_RUNS = re.compile(r"(\s+)")
_TOKENS, _TOKEN_IDS = attrgetter("tokens"), attrgetter("token_ids")
_N_NON_SYMBOL, _NON_SYMBOL_CHARS, _N_ALPHA = attrgetter("n_non_symbol"), attrgetter("non_symbol_chars"), attrgetter("n_alpha")
MAX_CACHED_CHUNKS = 2_000_000  # per language and process; cleared (not evicted) beyond, to bound memory

# spaCy's attribute ids, read when a spaCy pipeline is first built: importing spaCy costs ~3 s (it imports
# torch), which every datatrove task that unpickles a mixlab step would pay, spaCy or not (Slurm and Ray tasks)
IS_PUNCT: int = -1
ORTH: int = -1


def _load_spacy_attributes() -> None:
    global IS_PUNCT, ORTH
    from spacy import attrs

    IS_PUNCT, ORTH = attrs.IS_PUNCT, attrs.ORTH


def spacy_code_of(language: str | WordTokenizer) -> tuple[str, str]:
    """(language, spaCy blank code) of what a stock filter was given: a language code (datatrove's assignment)
    or one of mixlab's spaCy splitters (same words as that blank pipeline); ValueError for anything else."""
    if isinstance(language, WarmSpacyTokenizer):
        return language.language, language.language
    if isinstance(language, SpacySentencizerTokenizer):
        return language.language, language.spacy_code
    if isinstance(language, WordTokenizer):
        raise ValueError(f"FusedWebQuality: {type(language).__name__} is not a spaCy splitter; use the stock filters")
    class_name, code = datatrove_assignment(language)
    if class_name != "SpaCyTokenizer" or not code:
        raise ValueError(f"FusedWebQuality: datatrove splits {language!r} with {class_name}, not spaCy; the fused "
                         "chain supports spaCy languages (en, de, fr, es, ru, ...): use the stock filters")
    return language, code


@dataclass(frozen=True, slots=True)
class ChunkFacts:
    """What the four filters need of one whitespace-free chunk, computed once per process."""

    tokens: tuple[str, ...]
    n_non_symbol: int  # tokens with a character outside datatrove's PUNCTUATION_SET
    non_symbol_chars: int  # their total length
    n_alpha: int  # tokens with an alphabetic character
    fires: tuple[int, int]  # sentencizer sentence starts inside the chunk, entering it without / with a seen period
    seen_after: tuple[bool, bool]  # the sentencizer's `seen_period` leaving the chunk, for each entry state
    token_ids: tuple[int, ...]  # the tokens' ids in the SharedWordSplit (one id per distinct token)


class SharedWordSplit:
    """datatrove's spaCy words (and sentence counts) for one language, from a per-chunk cache.

    The pipeline is datatrove's assignment for the language (spaCy blank + sentencizer, as its SpaCyTokenizer
    builds it). New chunks are tokenized inside a memory zone, so spaCy's vocabulary does not grow."""

    def __init__(self, language: str | WordTokenizer):
        self.language, self.spacy_code = spacy_code_of(language)
        self.cache: dict[str, ChunkFacts] = {}
        self.token_ids: dict[str, int] = {}  # cleared with the cache, so one document's ids are always consistent
        self._punct_chars: frozenset[str] | None = None
        self._nlp = None
        self._spanning: Any = None  # an automaton of the whitespace-spanning special cases, or False

    @property
    def nlp(self):
        """A private spaCy blank pipeline for the language (datatrove's tokenizer, the same rules) whose new
        lexemes get only the IS_PUNCT flag, the one lexical attribute read here (computing the other twenty,
        shapes, norms and like_num among them, was half the cost of learning a chunk)."""
        if self._nlp is None:
            from mixlab.curation.text import import_spacy

            spacy = import_spacy()
            _load_spacy_attributes()
            nlp = spacy.blank(self.spacy_code)
            nlp.vocab.lex_attr_getters = {IS_PUNCT: nlp.vocab.lex_attr_getters[IS_PUNCT]}
            self._nlp = nlp
        return self._nlp

    def covers(self, text: str) -> bool:
        """False for a text whose stock words are not the per-chunk words: one holding "IS_ALPHA" (spaCy fails
        on it and datatrove then tokenizes a changed text) or a special case of the tokenizer that spans
        whitespace (Spanish "EE. UU.", Russian "т.е." forms: spaCy matches those across chunks)."""
        if "IS_ALPHA" in text:
            return False
        if self._spanning is None:
            keys = [k for k in self.nlp.tokenizer.rules if k.strip() and any(c.isspace() for c in k.strip())]
            self._spanning = False
            if keys:
                import ahocorasick

                self._spanning = ahocorasick.Automaton()
                for key in keys:
                    self._spanning.add_word(key, key)
                self._spanning.make_automaton()
        return not (self._spanning and next(self._spanning.iter(text), None) is not None)

    def _learn(self, chunks: list[str]) -> None:
        nlp = self.nlp
        if self._punct_chars is None:
            self._punct_chars = frozenset(sentencizer_nlp(self.spacy_code).get_pipe("sentencizer").punct_chars)
            self._is_punct = nlp.vocab.lex_attr_getters[IS_PUNCT]
        rest = []
        is_punct, punct_chars = self._is_punct, self._punct_chars
        for chunk in chunks:
            tokens = self._affix_tokens(chunk)
            if tokens is None:
                rest.append(chunk)
            else:  # each token's IS_PUNCT flag is the vocabulary's getter on its text: no Doc, no lexeme
                self._remember(chunk, tokens, [(bool(is_punct(t)), t in punct_chars) for t in tokens])
        if not rest:
            return
        # one Doc for all of them: spaCy tokenizes each whitespace-free span alone, and a newline between two
        # chunks is a token of its own that no special case spans (the spanning ones hold a space)
        joined = "\n".join(rest)
        ends = np.cumsum([len(c) + 1 for c in rest]).tolist()
        with nlp.memory_zone():
            nlp.max_length = max(nlp.max_length, len(joined) + 10)
            per_chunk: list[list] = [[] for _ in rest]
            k = 0
            for token in nlp.tokenizer(joined):
                if token.text == "\n":  # the separator (the chunks hold no whitespace)
                    continue
                while token.idx >= ends[k]:
                    k += 1
                per_chunk[k].append((token.text, token.is_punct))
            for chunk, tokens in zip(rest, per_chunk, strict=True):
                self._remember(chunk, tuple(text for text, _ in tokens),
                               [(is_punct, text in self._punct_chars) for text, is_punct in tokens])

    def _affix_tokens(self, chunk: str) -> tuple[str, ...] | None:
        """spaCy's tokens of one whitespace-free chunk by its own rules (Tokenizer._split_affixes, then
        _attach_tokens: token_match, special cases, prefixes, suffixes, url_match, infixes) run from Python
        over its compiled searches; None when the tokens might hold a special case that spaCy's matcher pass
        would retokenize (an affix that is one, or tokens that join into one): spaCy decides those."""
        rules = self.nlp.tokenizer
        specials, token_match = rules.rules, rules.token_match
        prefixes: list[str] = []
        suffixes: list[str] = []
        string, last_size = chunk, 0
        while string and len(string) != last_size:
            if (token_match and token_match(string)) or string in specials:
                break
            last_size = len(string)
            pre_len = rules.find_prefix(string)
            if pre_len:
                prefix, minus_pre = string[:pre_len], string[pre_len:]
                if minus_pre and minus_pre in specials:
                    string = minus_pre
                    prefixes.append(prefix)
                    break
            suf_len = rules.find_suffix(string[pre_len:])
            if suf_len:
                suffix, minus_suf = string[-suf_len:], string[:-suf_len]
                if minus_suf and minus_suf in specials:
                    string = minus_suf
                    suffixes.append(suffix)
                    break
            if pre_len and suf_len and pre_len + suf_len <= len(string):
                string = string[pre_len:-suf_len]
                prefixes.append(prefix)
                suffixes.append(suffix)
            elif pre_len:
                string = minus_pre
                prefixes.append(prefix)
            elif suf_len:
                string = minus_suf
                suffixes.append(suffix)
        tokens, n_prefixes = prefixes, len(prefixes)
        if string:
            if string in specials:
                tokens.extend(attrs.get(ORTH, attrs.get("ORTH")) for attrs in specials[string])
            elif (token_match and token_match(string)) or (rules.url_match and rules.url_match(string)):
                tokens.append(string)
            else:
                start = 0
                for match in rules.find_infix(string):
                    infix_start, infix_end = match.start(), match.end()
                    if infix_start == 0:
                        continue
                    if infix_start != start:
                        tokens.append(string[start:infix_start])
                    if infix_start != infix_end:
                        tokens.append(string[infix_start:infix_end])
                    start = infix_end
                if string[start:]:
                    tokens.append(string[start:])
        for piece in (*prefixes[:n_prefixes], *suffixes):  # an affix that is a special case of other tokens
            if piece in specials and [attrs.get(ORTH, attrs.get("ORTH")) for attrs in specials[piece]] != [piece]:
                return None
        tokens.extend(reversed(suffixes))
        if len(tokens) > 1:
            for i in range(len(tokens) - 1):
                joined = tokens[i]
                for j in range(i + 1, len(tokens)):
                    joined += tokens[j]
                    if joined in specials:
                        return None
        return tuple(tokens)

    def _remember(self, chunk: str, tokens: tuple[str, ...], flags: list[tuple[bool, bool]]) -> None:
        """The facts of one chunk from its tokens and their (is_punct, is a sentencizer punct char) flags."""
        non_symbol = [w for w in tokens if any(ch not in PUNCTUATION_SET for ch in w)]
        fires, seen_after = [], []
        for seen in (False, True):
            count = 0
            for is_punct, in_punct_chars in flags:
                if seen and not is_punct and not in_punct_chars:
                    count += 1
                    seen = False
                elif in_punct_chars:
                    seen = True
            fires.append(count)
            seen_after.append(seen)
        ids = self.token_ids
        self.cache[chunk] = ChunkFacts(
            tokens, len(non_symbol), sum(map(len, non_symbol)), sum(any(c.isalpha() for c in w) for w in tokens),
            (fires[0], fires[1]), (seen_after[0], seen_after[1]), tuple(ids.setdefault(t, len(ids)) for t in tokens))

    def facts(self, chunks: list[str]) -> list[ChunkFacts]:
        cache = self.cache
        try:
            return list(map(cache.__getitem__, chunks))  # the common case: every chunk seen before
        except KeyError:
            pass
        missing = [c for c in dict.fromkeys(chunks) if c not in cache]
        if missing:
            if len(cache) + len(missing) > MAX_CACHED_CHUNKS:  # start afresh, this document's chunks first
                cache.clear()
                self.token_ids.clear()
                missing = list(dict.fromkeys(chunks))
            self._learn(missing)
        return [cache[c] for c in chunks]

    def words(self, text: str) -> tuple[list[str], list[ChunkFacts]]:
        """The stock `split_into_words(text, language)` and the facts of each chunk."""
        facts = self.facts(text.split())
        return list(chain.from_iterable(map(_TOKENS, facts))), facts

    @staticmethod
    def word_ids(facts: list[ChunkFacts]) -> np.ndarray:
        """The ids of `words(...)`'s words, from the same facts (equal words, equal ids)."""
        return np.fromiter(chain.from_iterable(map(_TOKEN_IDS, facts)), dtype=np.int64)

    def count_sentences(self, line: str, chunks: list[str] | None = None) -> int:
        """len(datatrove's `split_into_sentences(line)`): spaCy's sentencizer over the line's tokens. A run of
        whitespace other than one " " between chunks (and any leading run) is a token of its own there.
        `chunks`: `line.split()` when the caller has it (a line of chunks joined by single spaces is counted
        from their facts alone)."""
        if not line:
            return 0
        if chunks is not None and " ".join(chunks) == line:  # no whitespace token: the chunks in a row
            seen, starts = False, 0
            for f in self.facts(chunks):
                starts += f.fires[seen]
                seen = f.seen_after[seen]
            return 1 + starts
        parts = _WS_RUNS.split(line)
        chunk_facts = iter(self.facts([p for p in parts[::2] if p]))
        seen, starts = False, 0
        for i, part in enumerate(parts):
            if i % 2 == 0:
                if part:
                    f = next(chunk_facts)
                    starts += f.fires[seen]
                    seen = f.seen_after[seen]
            elif part != " " or i == 1 and not parts[0]:  # a whitespace token: starts a sentence after a period
                if seen:
                    starts += 1
                    seen = False
        return 1 + starts


_HASH_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_HASH_INVERSE = pow(_HASH_BASE, -1, 2**64)
_powers: dict[str, np.ndarray] = {"up": np.ones(1, np.uint64), "down": np.ones(1, np.uint64)}


def _power_tables(size: int) -> tuple[np.ndarray, np.ndarray]:
    """B**k and B**-k modulo 2**64 for k < size (grown on demand, shared by every call)."""
    if _powers["up"].size < size:
        size = max(size, 2 * _powers["up"].size)
        for key, base in (("up", _HASH_BASE), ("down", _HASH_INVERSE)):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _powers[key] = np.cumprod(table, dtype=np.uint64)  # wraps modulo 2**64
    return _powers["up"], _powers["down"]


@numba.njit(cache=True, nogil=True)
def _slot(key, bits):  # pragma: no cover - compiled
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(64 - bits))


@numba.njit(cache=True, nogil=True)
def _top_ngram(ids, n):  # pragma: no cover - compiled
    """(count, first position) of the most frequent n-gram of word ids, the first-occurring one among equals,
    counted in one pass over an open-addressing table of first positions (n-grams compared id by id)."""
    m = ids.size - n + 1
    bits = 1
    while (1 << bits) < 2 * m:
        bits += 1
    mask = (1 << bits) - 1
    first = np.full(1 << bits, -1, dtype=np.int64)
    counts = np.zeros(1 << bits, dtype=np.int64)
    best_count, best_first = 0, 0
    for i in range(m):
        key = np.uint64(0)
        for k in range(n):
            key = (key ^ np.uint64(ids[i + k])) * np.uint64(0x100000001B3)
        slot = _slot(key, bits)
        while first[slot] != -1 and not equal_slices(ids, first[slot], ids, i, n):
            slot = (slot + 1) & mask
        if first[slot] == -1:
            first[slot] = i
        counts[slot] += 1
        c = counts[slot]
        if c > best_count or (c == best_count and first[slot] < best_first):
            best_count, best_first = c, first[slot]
    return best_count, best_first


@numba.njit(cache=True, nogil=True)
def _repeated_hash_positions(prefix, up, offsets, n):  # pragma: no cover - compiled
    """The positions (ascending) whose concatenated n-gram's polynomial hash occurs at two or more positions."""
    m = offsets.size - n
    if m <= 0:
        return np.empty(0, dtype=np.int64)
    hashes = np.empty(m, dtype=np.uint64)
    for i in range(m):
        hashes[i] = (prefix[offsets[i + n]] - prefix[offsets[i]]) * up[offsets[i]]
    bits = 1
    while (1 << bits) < 2 * m:
        bits += 1
    mask = (1 << bits) - 1
    keys = np.zeros(1 << bits, dtype=np.uint64)
    used = np.zeros(1 << bits, dtype=np.bool_)
    counts = np.zeros(1 << bits, dtype=np.int64)
    where = np.empty(m, dtype=np.int64)
    repeats = 0
    for i in range(m):
        slot = _slot(hashes[i], bits)
        while used[slot] and keys[slot] != hashes[i]:
            slot = (slot + 1) & mask
        if not used[slot]:
            used[slot] = True
            keys[slot] = hashes[i]
        counts[slot] += 1
        if counts[slot] == 2:
            repeats += 1
        where[i] = slot
    out = np.empty(m if repeats else 0, dtype=np.int64)
    k = 0
    if repeats:
        for i in range(m):
            if counts[where[i]] >= 2:
                out[k] = i
                k += 1
    return out[:k]


class NgramIndex:
    """One document's words for Gopher's n-gram rules: word ids (for the top n-grams) and a polynomial hash of the
    concatenated words (for the duplicate n-grams). Hashes only nominate candidates: equal strings always hash
    equal, so no repeated hash means no repeated n-gram, and repeats are confirmed on the strings themselves."""

    def __init__(self, words: list[str], word_ids: np.ndarray | None = None):
        """`word_ids`: any ids of the words, equal words with equal ids (SharedWordSplit.word_ids)."""
        self.words = words
        if word_ids is None:
            ids: dict[str, int] = {}
            word_ids = np.fromiter((ids.setdefault(w, len(ids)) for w in words), dtype=np.int64, count=len(words))
        self.ids = word_ids
        self.lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self.offsets = np.concatenate(([0], np.cumsum(self.lengths)))
        self.joined = "".join(words)
        codes = np.frombuffer(self.joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        up, down = _power_tables(codes.size + 1)
        with np.errstate(over="ignore"):
            self.prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(codes * down[:codes.size], dtype=np.uint64)))
        self.up = up

    def top_ngram_chars(self, n: int) -> int | None:
        """`find_top_duplicate(get_n_grams(words, n))`: the count of the most frequent n-gram times its length,
        the first-occurring one among equals (Counter.most_common's pick). Words hold no spaces, so word-id
        n-grams are equal exactly when the space-joined ones are."""
        m = len(self.words) - n + 1
        if m <= 0:
            return None
        top, start = _top_ngram(self.ids, n)
        return (int(self.lengths[start:start + n].sum()) + n - 1) * int(top)

    def duplicate_ngram_chars(self, n: int) -> int:
        """`find_all_duplicate(words, n)`: its left-to-right walk (a repeat counts its characters and skips n
        words), visiting only positions whose concatenated n-gram may occur twice; the others, whenever the walk
        visits them, are new and matter to no other position."""
        m = len(self.words) - n + 1
        if m <= 0:
            return 0
        repeated = _repeated_hash_positions(self.prefix, self.up, self.offsets, n)
        if not repeated.size:
            return 0
        joined, offsets = self.joined, self.offsets.tolist()
        seen: set[str] = set()
        repeated_chars, skip_until = 0, 0
        for i in repeated.tolist():
            if i < skip_until:
                continue
            gram = joined[offsets[i]:offsets[i + n]]
            if gram in seen:
                repeated_chars += len(gram)
                skip_until = i + n
            else:
                seen.add(gram)
        return repeated_chars


class FusedWebQuality(BaseFilter):
    """GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter -> FineWebQualityFilter in one step, with
    their settings, decisions, drop reasons and C4's line stats (`line-total`, `line-filter-*`, `line-kept`).

    Build it from the stock filters (`from_stock`) so the settings cannot drift; any of the four may be None."""

    name = "⚡ Web quality (fused Gopher + C4 + FineWeb)"

    def __init__(self, language: str | WordTokenizer, repetition: GopherRepetitionFilter | None,
                 quality: GopherQualityFilter | None, c4: C4QualityFilter | None, fineweb: FineWebQualityFilter | None,
                 split: SharedWordSplit | None = None):
        parts = [label for label, step in (("Gopher repetition", repetition), ("Gopher quality", quality),
                                           ("C4", c4), ("FineWeb", fineweb)) if step is not None]
        self.name = f"⚡ Fused {' + '.join(parts)}"  # before PipelineStep names its stats after it
        super().__init__()
        splitter = spacy_code_of(language)
        for step in (repetition, quality, c4, fineweb):
            if step is not None and spacy_code_of(step.language) != splitter:
                raise ValueError(f"FusedWebQuality(language={language!r}): {step.name} splits words as "
                                 f"{step.language!r}; build every filter with the same language")
        if c4 is not None and not c4.split_paragraph:
            raise ValueError("FusedWebQuality: C4QualityFilter(split_paragraph=False) is not fused; use the stock step")
        self.language = language
        self.repetition, self.quality, self.c4, self.fineweb = repetition, quality, c4, fineweb
        self.split = split or SharedWordSplit(language)

    @classmethod
    def from_stock(cls, steps: list[BaseFilter]) -> FusedWebQuality:
        kinds = (GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter, FineWebQualityFilter)
        found: list[Any] = [next((s for s in steps if type(s) is kind), None) for kind in kinds]
        if not any(found) or len([s for s in steps if s is not None]) != len([s for s in found if s is not None]):
            raise ValueError("FusedWebQuality.from_stock: give stock Gopher repetition/quality, C4 and FineWeb "
                             f"filters, at most one of each (got {[type(s).__name__ for s in steps]})")
        return cls(next(s.language for s in found if s is not None), *found)


    def _stock(self, doc: Document) -> bool | tuple[bool, str]:
        """The stock filters, in order: for texts the shared split does not cover."""
        for step in (self.repetition, self.quality, self.c4, self.fineweb):
            if step is not None:
                result = step.filter(doc)
                if not get_filter_result(result)[0]:
                    return result
        return True

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.split.covers(doc.text):
            self.stat_update("stock_fallback")
            return self._stock(doc)
        text = doc.text
        words: list[str] | None = None
        facts: list[ChunkFacts] = []
        if self.repetition is not None:
            verdict, words, facts = self._repetition(text)
            if verdict is not True:
                return verdict
        if self.quality is not None:
            if words is None:
                words, facts = self.split.words(text)
            verdict = self._quality(text, words, facts)
            if verdict is not True:
                return verdict
        if self.c4 is not None:
            verdict = self._c4(doc)
            if verdict is not True:
                return verdict
        if self.fineweb is not None:
            return self._fineweb(doc.text)
        return True

    def _repetition(self, text: str) -> tuple[bool | tuple[bool, str], list[str] | None, list[ChunkFacts]]:
        f = self.repetition
        if not text:
            return (False, "empty"), None, []
        paragraphs = f.paragraph_exp.split(text.strip())
        duplicates, chars = find_duplicates(paragraphs)
        if f.dup_para_frac and duplicates / len(paragraphs) > f.dup_para_frac:
            return (False, "dup_para_frac"), None, []
        if f.dup_para_char_frac and chars / len(text) > f.dup_para_char_frac:
            return (False, "dup_para_char_frac"), None, []
        lines = f._line_splitter.split(text)
        duplicates, chars = find_duplicates(lines)
        if f.dup_line_frac and duplicates / len(lines) > f.dup_line_frac:
            return (False, "dup_line_frac"), None, []
        if f.dup_line_char_frac and chars / len(text) > f.dup_line_char_frac:
            return (False, "dup_line_char_frac"), None, []
        words, facts = self.split.words(text)
        grams = NgramIndex(words, self.split.word_ids(facts))
        for n, n_frac in f.top_n_grams:
            top = grams.top_ngram_chars(n)
            if top is not None and top / len(text) > n_frac:
                return (False, f"top_{n}_gram"), words, facts
        for n, n_frac in f.dup_n_grams:
            if grams.duplicate_ngram_chars(n) / len(text) > n_frac:
                return (False, f"duplicated_{n}_n_grams"), words, facts
        return True, words, facts

    def _quality(self, text: str, words: list[str], facts: list[ChunkFacts]) -> bool | tuple[bool, str]:
        f = self.quality
        n_words = len(words)
        n_non_symbol = sum(map(_N_NON_SYMBOL, facts))
        if f.min_doc_words and n_non_symbol < f.min_doc_words:
            return False, "gopher_short_doc"
        if f.max_doc_words and n_non_symbol > f.max_doc_words:
            return False, "gopher_long_doc"
        # np.mean of integer lengths: an exact float64 sum over the count, as here; nan when there are none
        avg = sum(map(_NON_SYMBOL_CHARS, facts)) / n_non_symbol if n_non_symbol else float("nan")
        if f.min_avg_word_length and avg < f.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if f.max_avg_word_length and avg > f.max_avg_word_length:
            return False, "gopher_above_avg_threshold"
        if f.max_symbol_word_ratio and text.count("#") / n_words > f.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if f.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > f.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"
        lines = text.splitlines()
        if f.max_bullet_lines_ratio and sum(
                s.lstrip().startswith(("•", "-")) for s in lines) / len(lines) > f.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        if f.max_ellipsis_lines_ratio and sum(
                s.rstrip().endswith(("...", "…")) for s in lines) / len(lines) > f.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        if f.max_non_alpha_words_ratio and sum(map(_N_ALPHA, facts)) / n_words < f.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"
        if f.min_stop_words and len(f.stop_words.intersection(words)) < f.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True

    def _c4(self, doc: Document) -> bool | tuple[bool, str]:
        """C4's line loop; its line stats are added once per document (same totals as the stock per-line calls)."""
        f = self.c4
        stats = dict.fromkeys(("line-total", "line-filter-too_long_word", "line-filter-no_terminal_punc",
                               "line-filter-too_few_words", "line-filter-javascript", "line-filter-policy",
                               "line-kept"), 0)
        sentences, kept = 0, []
        verdict: bool | tuple[bool, str] = True
        for line in doc.text.splitlines():
            line = line.strip()
            words = line.split()
            stats["line-total"] += 1
            if f.max_word_length != -1 and max(map(len, words), default=0) > f.max_word_length:
                stats["line-filter-too_long_word"] += 1
                continue
            if f.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if f.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                stats["line-filter-no_terminal_punc"] += 1
                continue
            if len(words) < f.min_words_per_line:
                stats["line-filter-too_few_words"] += 1
                continue
            lower = line.lower()
            if f.filter_lorem_ipsum and "lorem ipsum" in lower:
                verdict = (False, "lorem_ipsum")
                break
            if f.filter_javascript and "javascript" in lower:
                stats["line-filter-javascript"] += 1
                continue
            if f.filter_curly_bracket and "{" in line:
                verdict = (False, "curly_bracket")
                break
            if f.filter_policy and any(p in lower for p in POLICY_SUBSTRINGS):
                stats["line-filter-policy"] += 1
                continue
            if f.min_num_sentences != -1:
                sentences += self.split.count_sentences(line, words)
            kept.append(line)
            stats["line-kept"] += 1
        for key, value in stats.items():
            if value:
                self.stat_update(key, value=value)
        if verdict is not True:
            return verdict
        if sentences < f.min_num_sentences:
            return False, "too_few_sentences"
        doc.text = "\n".join(kept).strip()
        return True

    def _fineweb(self, text: str) -> bool | tuple[bool, str]:
        f = self.fineweb
        lines = [line for line in text.split("\n") if line.strip() != ""]
        if not lines:
            return False, "empty"
        ratio = sum(1 for line in lines if line.endswith(f.stop_chars)) / len(lines)
        if ratio < f.line_punct_thr and not (ratio == 0 and f.line_punct_exclude_zero):
            return False, "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= f.short_line_length) / len(lines) > f.short_line_threshold:
            return False, "short_line_ratio"
        if find_duplicates(lines)[1] / len(text.replace("\n", "")) > f.char_duplicates_ratio:
            return False, "char_dup_ratio"
        n_words = sum(len(c.tokens) for c in self.split.facts(text.split()))
        if text.count("\n") / n_words > f.new_line_ratio:
            return False, "list_ratio"
        return True



def fused_or_stock(steps: list[BaseFilter]) -> list[BaseFilter]:
    """[FusedWebQuality] in place of stock Gopher/C4/FineWeb filters when their word splitter is a spaCy one the
    fused step reproduces; else the steps unchanged (same decisions either way, the stock ones slower)."""
    try:
        return [FusedWebQuality.from_stock(steps)]
    except ValueError:
        return steps


class _FastStockStep:
    """A stock filter's settings copied from an instance (all but its stats), answered by a shared fused step."""

    def _adopt(self, stock: BaseFilter, fused: FusedWebQuality) -> None:
        for key, value in vars(stock).items():
            if key != "stats":
                setattr(self, key, value)
        self.fused = fused


class FastGopherRepetition(_FastStockStep, GopherRepetitionFilter):
    """GopherRepetitionFilter (its settings, reasons, manifest name `gopher_repetition`) on the shared word split
    and the compiled n-gram counts of FusedWebQuality. For a recipe that counts the Gopher pair as two steps."""

    name = "👯 Gopher Repetition (fast)"

    def __init__(self, stock: GopherRepetitionFilter, fused: FusedWebQuality):
        super().__init__(language=stock.language)
        self._adopt(stock, fused)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.fused.split.covers(doc.text):
            return GopherRepetitionFilter.filter(self, doc)
        return self.fused._repetition(doc.text)[0]


class FastGopherQuality(_FastStockStep, GopherQualityFilter):
    """GopherQualityFilter (settings, reasons, manifest name `gopher_quality`) on the shared word split: the
    words the repetition step split are cached chunk by chunk, so splitting again is a few dict lookups."""

    name = "🥇 Gopher Quality (fast)"

    def __init__(self, stock: GopherQualityFilter, fused: FusedWebQuality):
        super().__init__(language=stock.language)
        self._adopt(stock, fused)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.fused.split.covers(doc.text):
            return GopherQualityFilter.filter(self, doc)
        words, facts = self.fused.split.words(doc.text)
        return self.fused._quality(doc.text, words, facts)


def fast_gopher_pair(steps: list[BaseFilter]) -> list[BaseFilter]:
    """[FastGopherRepetition, FastGopherQuality] for stock [GopherRepetitionFilter, GopherQualityFilter] (as
    `gopher_filters` builds them): same answers and the same two manifest steps; the steps unchanged when their
    word splitter is not one the shared split reproduces."""
    if len(steps) != 2 or type(steps[0]) is not GopherRepetitionFilter or type(steps[1]) is not GopherQualityFilter:
        return steps
    try:
        fused = FusedWebQuality(steps[0].language, steps[0], steps[1], None, None)
    except ValueError:
        return steps
    return [FastGopherRepetition(steps[0], fused), FastGopherQuality(steps[1], fused)]


# ---- URL and language steps with datatrove's rules, offline -----------------------------------------------


class _LowercaseBlocklist:
    """A domain set answering exactly as datatrove's Python set of the (all lower-case) shipped list."""

    def __init__(self, hashed: DomainBlocklist, extra: set[str]):
        self.hashed, self.extra = hashed, extra

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self.extra or (name == name.lower() and name in self.hashed))


class SharedBlocklistUrlFilter(URLFilter):
    """datatrove's URLFilter (same rules, same reasons) over mixlab's hashed, memory-mapped domain list, with the
    public-suffix snapshot of the tldextract wheel (no fetch). The shipped list is all lower case (checked at load
    when it is hashed), so a hashed lookup of a lower-case name answers as datatrove's set does."""

    name = "😈 Url-filter (shared blocklist)"

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.tldextractor = _suffix_extractor()

    def download_data(self):
        if self._downloaded or not self.use_integrated_lists:
            return
        import tarfile

        from datatrove.pipeline.filters.url_filter import get_list
        from datatrove.utils._import_utils import ASSETS_PATH

        self.block_listed_domains = _LowercaseBlocklist(DomainBlocklist.datatrove_shipped(), self.block_listed_domains)
        with tarfile.open(DATATROVE_BLOCKLIST) as tar:  # whole URLs (20k), case kept as datatrove keeps it
            member = tar.extractfile("urls")
            assert member is not None, f"{DATATROVE_BLOCKLIST} has no 'urls' file"
            lines = member.read().decode("utf-8", "replace").splitlines()
        self.block_listed_url = {x.strip() for x in lines if x and x[0] != "#"} | self.block_listed_url
        self.banned_words = get_list(ASSETS_PATH, "banned_words.txt", self.banned_words)
        self.banned_subwords = get_list(ASSETS_PATH, "banned_subwords.txt", self.banned_subwords)
        self.soft_banned_words = get_list(ASSETS_PATH, "soft_banned_words.txt", self.soft_banned_words)
        for word in self.banned_subwords:
            self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
        self.banned_subwords_automaton.make_automaton()
        self._downloaded = True


class OfflineLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter (its decision: any expected language above the threshold) on the bundled
    lid.176.ftz instead of a run-time download of lid.176.bin."""

    name = "🌍 Language ID (lid.176.ftz)"

    def __init__(self, languages: list[str] | str, language_threshold: float = LANGUAGE_THRESHOLD, **kwargs: Any):
        super().__init__(languages=languages, language_threshold=language_threshold, **kwargs)
        self.model = BundledFT176LID(self.languages)


class TopLanguageFilter(OfflineLanguageFilter):
    """OfflineLanguageFilter's decision and metadata from the top label alone, computed by `CompiledTopLabel`.

    Exact for a threshold above 0.5: the scores sum to one, so a language other than the top one scores at most
    0.5 and can never pass; the top label and its score are the ones the full prediction ranks first (a tie
    between two labels goes to fastText's own prediction)."""

    name = "🌍 Language ID (lid.176.ftz, top label)"

    def filter(self, doc: Document) -> bool:
        if self.label_only or not self.languages or self.language_threshold <= 0.5 + 1e-6 \
                or self.keep_top_pairs_threshold != -1 or self.backend != "ft176":
            return super().filter(doc)
        lang, score = self.model.top(doc)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = score
        return lang in self.languages and score > self.language_threshold


# ---- the two chains, for the recipe, the tests and the bench -----------------------------------------------


@dataclass
class WebChainSettings:
    """One language's web chain: FineWeb's order and thresholds; Gopher's from mixlab's GopherSettings."""

    language: str = "en"
    url: bool = True
    language_threshold: float = LANGUAGE_THRESHOLD
    c4_filter_no_terminal_punct: bool = False  # FineWeb's use of C4 (the recipe's default)


def stock_quality_filters(settings: WebChainSettings, gopher: GopherSettings | None = None) -> list[BaseFilter]:
    """The four stock datatrove text filters, each with datatrove's own word tokenizer for the language."""
    g = gopher or GopherSettings(language=settings.language)
    lang = settings.language
    return [
        GopherRepetitionFilter(language=lang),
        GopherQualityFilter(min_doc_words=g.min_doc_words, max_doc_words=g.max_doc_words,
                            min_avg_word_length=g.min_avg_word_length, max_avg_word_length=g.max_avg_word_length,
                            max_symbol_word_ratio=g.max_symbol_word_ratio,
                            max_non_alpha_words_ratio=g.max_non_alpha_words_ratio, min_stop_words=g.min_stop_words,
                            stop_words=g.stop_words, language=lang),
        C4QualityFilter(filter_no_terminal_punct=settings.c4_filter_no_terminal_punct, language=lang),
        FineWebQualityFilter(language=lang),
    ]


def stock_web_chain(settings: WebChainSettings, gopher: GopherSettings | None = None) -> list[BaseFilter]:
    """The anchor: datatrove's URLFilter, LanguageFilter, Gopher pair, C4 and FineWeb, as shipped."""
    steps: list[BaseFilter] = []
    if settings.url:
        url = URLFilter()
        url.tldextractor = _suffix_extractor()  # the wheel's snapshot: what an offline TLDExtract() falls back to
        steps.append(url)
    steps.append(OfflineLanguageFilter([settings.language], settings.language_threshold))
    return [*steps, *stock_quality_filters(settings, gopher)]


def fast_web_chain(settings: WebChainSettings, gopher: GopherSettings | None = None) -> list[BaseFilter]:
    """The same decisions: shared-blocklist URL filter, the same language filter, one fused quality step."""
    steps: list[BaseFilter] = []
    if settings.url:
        steps.append(SharedBlocklistUrlFilter())
    steps.append(TopLanguageFilter([settings.language], settings.language_threshold))
    return [*steps, FusedWebQuality.from_stock(stock_quality_filters(settings, gopher))]


def chain_verdict(steps: list[PipelineStep], doc: Document) -> tuple[bool, str | None, Any, Any, str | None]:
    """(kept, reason, language, language_score, kept text) of a document through filters in order; the reason is
    `<family>:<reason>` of the dropping step, so a fused step and the stock steps it replaces read the same."""
    for step in steps:
        kept, reason = get_filter_result(step.filter(doc))
        if not kept:
            family = _FAMILY.get(type(step), type(step).__name__)
            return False, f"{family}:{reason}", doc.metadata.get("language"), doc.metadata.get("language_score"), None
    return True, None, doc.metadata.get("language"), doc.metadata.get("language_score"), doc.text


_FAMILY: dict[type, str] = {URLFilter: "url", SharedBlocklistUrlFilter: "url", LanguageFilter: "lid",
                            OfflineLanguageFilter: "lid", TopLanguageFilter: "lid", GopherRepetitionFilter: "quality",
                            GopherQualityFilter: "quality", C4QualityFilter: "quality",
                            FineWebQualityFilter: "quality", FusedWebQuality: "quality"}
