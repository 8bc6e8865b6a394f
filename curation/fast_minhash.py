"""MinHash stage 1 writing datatrove's signature files byte for byte, several times faster.

datatrove's `MinhashDedupSignature` spends its time on per-document Python: spaCy re-tokenizing every word
inside a memory zone, one `" ".join` and hash call per shingle through a generator, a `%` (integer division)
over the (shingles x hashes) matrix, and writing, re-reading, sorting and re-reading each bucket file.
This step keeps every input of the signature the same (simplified text, words, n-grams, hash function,
permutation parameters from the seed) and changes only how it is computed:

- simplifying: datatrove's steps, punctuation by a byte table / codepoint mask instead of `str.translate`,
  diacritics by one regex instead of a generator over characters (`FastSimplify`);
- words: the word tokenizers we use split each whitespace-separated run on its own (spaCy's rule-based
  tokenizer, the regex ones), so a document is `str.split` plus set lookups, and a new run is one word when
  spaCy's affix and special-case rules leave it whole, without building a Doc (`RunCachedWords`);
- shingles: with 64-bit xxhash (the default), XXH64 compiled (numba) over slices of the words joined once
  (an n-gram joined by spaces is a slice of all the words joined by spaces); else `map` of `" ".join` and of
  datatrove's hash function over zipped word lists;
- permutations: one compiled loop (numba) per batch of documents, `x mod (2^61 - 1)` by the Mersenne
  identity (no division), each document's minima kept as it goes (no shingles x hashes matrix);
- files: each bucket's records are held in memory (up to a bound, then appended to the file), sorted as
  datatrove sorts them and written in its record format: 14 file opens per rank instead of 56.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Callable
from functools import cache
from itertools import chain

import numba
import numpy as np
import regex
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.text import (
    MONTHS_PATTERN,
    NUMBERS_PATTERN,
    PUNCTUATION_TRANS,
    WEEKDAYS_PATTERN,
    WHITESPACE_PATTERN,
    TextNormConfig,
)
from datatrove.utils.typeshelper import Languages, StatHints
from datatrove.utils.word_tokenizers import SpaCyTokenizer, WordTokenizer
from mixlab.curation.text import (
    RegexWordTokenizer,
    ScriptRunTokenizer,
    SpacySentencizerTokenizer,
    WarmSpacyTokenizer,
)

BATCH_SHINGLES = 2048  # shingles of the documents permuted in one compiled call
SPILL_BYTES = 64 << 20  # records held in memory (all buckets; ~70k docs) before they go to the bucket files
WORD_CACHE_LIMIT = 2_000_000  # distinct whitespace runs remembered per process before starting afresh
_MASK61 = np.uint64((1 << 61) - 1)
_SHIFT61 = np.uint64(61)


_P1, _P2, _P3 = np.uint64(11400714785074694791), np.uint64(14029467366897019727), np.uint64(1609587929392839161)
_P4, _P5 = np.uint64(9650029242287828579), np.uint64(2870177450012600261)


@numba.njit(cache=True, nogil=True, inline="always")
def _rotl(x, r):  # pragma: no cover - compiled
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(cache=True, nogil=True, inline="always")
def _read64(buf, i):  # pragma: no cover - compiled
    v = np.uint64(0)
    for k in range(8):
        v |= np.uint64(buf[i + k]) << np.uint64(8 * k)
    return v


@numba.njit(cache=True, nogil=True, inline="always")
def _xxh64_round(acc, lane):  # pragma: no cover - compiled
    return _rotl(acc + lane * _P2, 31) * _P1


@numba.njit(cache=True, nogil=True)
def _xxh64(buf, start, end):  # pragma: no cover - compiled
    """XXH64 (seed 0) of buf[start:end], the function behind `xxhash.xxh64_intdigest`."""
    length = end - start
    i = start
    if length >= 32:
        v1, v2, v3, v4 = _P1 + _P2, _P2, np.uint64(0), np.uint64(0) - _P1
        while i + 32 <= end:
            v1 = _xxh64_round(v1, _read64(buf, i))
            v2 = _xxh64_round(v2, _read64(buf, i + 8))
            v3 = _xxh64_round(v3, _read64(buf, i + 16))
            v4 = _xxh64_round(v4, _read64(buf, i + 24))
            i += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        for v in (v1, v2, v3, v4):
            h = (h ^ _xxh64_round(np.uint64(0), v)) * _P1 + _P4
    else:
        h = _P5
    h += np.uint64(length)
    while i + 8 <= end:
        h = _rotl(h ^ _xxh64_round(np.uint64(0), _read64(buf, i)), 27) * _P1 + _P4
        i += 8
    if i + 4 <= end:
        lane = np.uint64(0)
        for k in range(4):
            lane |= np.uint64(buf[i + k]) << np.uint64(8 * k)
        h = _rotl(h ^ (lane * _P1), 23) * _P2 + _P3
        i += 4
    while i < end:
        h = _rotl(h ^ (np.uint64(buf[i]) * _P5), 11) * _P1
        i += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@numba.njit(cache=True, nogil=True)
def _ngram_xxh64(buf, starts, n):  # pragma: no cover - compiled
    """XXH64 of each word n-gram of `buf` (the words joined by single spaces, UTF-8; `starts`: each word's
    byte offset, then len(buf) + 1): the n-gram at i is buf[starts[i]:starts[i + n] - 1]."""
    count = starts.size - n
    out = np.empty(count, dtype=np.uint64)
    for i in range(count):
        out[i] = _xxh64(buf, starts[i], starts[i + n] - 1)
    return out


@numba.njit(cache=True, nogil=True)
def _permuted_minima(shingles, ends, a, b, mask):  # pragma: no cover - compiled
    """Per document (shingles[ends[d-1]:ends[d]]) and hash: the minimum of datatrove's permuted hashes.

    datatrove computes `(h * a + b) % p` in uint64 (the product wraps mod 2^64). With p = 2^61 - 1,
    y = (x & p) + (x >> 61) is congruent to x and at most p + 7, so x % p is y, or y - p when y >= p: no
    division, and no (shingles x hashes) matrix in memory."""
    out = np.empty((ends.size, a.size), dtype=np.uint64)
    start = 0
    for d in range(ends.size):
        row = out[d]
        row[:] = np.uint64(0xFFFFFFFFFFFFFFFF)
        for s in range(start, ends[d]):
            h = shingles[s]
            for k in range(a.size):
                x = h * a[k] + b[k]
                y = (x & _MASK61) + (x >> _SHIFT61)
                if y >= _MASK61:
                    y -= _MASK61
                y &= mask
                if y < row[k]:
                    row[k] = y
        start = ends[d]
    return out


def _direct_hash(hash_func: Callable[[str], int]) -> Callable[[str], int]:
    """datatrove's xxhash wrappers are one Python frame around xxhash's C function: call that directly."""
    from datatrove.utils.hashes import xxhash as dt_xxhash

    return {dt_xxhash.xxhash64: xxhash.xxh64_intdigest, dt_xxhash.xxhash32: xxhash.xxh32_intdigest}.get(
        hash_func, hash_func)


@cache
def _nonspacing_marks() -> regex.Pattern:
    """Runs of the characters `unicodedata.category` calls "Mn" (the ones datatrove's diacritics step drops).

    `regex`'s \\p{Mn} is fast but follows a newer Unicode than `unicodedata` may: the codepoints on which the two
    disagree are taken out of it or added to it (so it matches exactly `unicodedata`'s set, checked on the
    codepoints either side counts as marks); built once per process (~0.3 s), before the workers fork."""
    codepoints = "".join(map(chr, [*range(0xD800), *range(0xE000, sys.maxunicode + 1)]))
    wanted = {c for c in codepoints if unicodedata.category(c) == "Mn"}
    found = set("".join(regex.findall(r"\p{Mn}+", codepoints)))
    extra, missing = "".join(sorted(found - wanted)), "".join(sorted(wanted - found))
    parts = [rf"[\p{{Mn}}--[{regex.escape(extra)}]]" if extra else r"\p{Mn}"]
    if missing:
        parts.append(f"[{regex.escape(missing)}]")
    pattern = regex.compile(f"(?:{'|'.join(parts)})+", regex.V1)
    if {c for c in wanted | found if pattern.fullmatch(c)} != wanted:
        raise AssertionError("FastSimplify: the mark pattern does not match unicodedata's Mn characters")
    return pattern


def _literal_alternatives(pattern: re.Pattern) -> tuple[str, ...] | None:
    """The words of a pattern that is a plain `a|b|c` of lowercase letters (then a text holding none of them
    has no match and its substitution is skipped), else None."""
    words = tuple(pattern.pattern.split("|"))
    return words if pattern.flags & ~re.UNICODE == 0 and all(w.isalpha() and w.islower() for w in words) else None


# datatrove's number pattern restricted to ASCII text (its digits and separators that are ASCII), or None if the
# pattern is not the one this was written for
_ASCII_NUMBERS = regex.compile(rb"[0-9]+(?:[.,][0-9]+)?") \
    if NUMBERS_PATTERN.pattern == "\\p{Nd}+([.,،٫⎖⎗⎘]{1}\\p{Nd}+)?" else None
_WEEKDAY_NAMES = _literal_alternatives(WEEKDAYS_PATTERN)
_MONTH_NAMES = _literal_alternatives(MONTHS_PATTERN)


@cache
def _punctuation_table() -> tuple[np.ndarray, bytes] | None:
    """datatrove's punctuation table (every mark to a space) as a codepoint mask and an ASCII byte table, or
    None if it ever maps a character to anything but one space (then `str.translate` it is)."""
    if set(PUNCTUATION_TRANS.values()) != {ord(" ")}:
        return None
    mask = np.zeros(sys.maxunicode + 1, dtype=bool)
    mask[list(PUNCTUATION_TRANS)] = True
    return mask, bytes(32 if mask[i] else i for i in range(256))


class FastSimplify:
    """datatrove's `simplify_text(text, config)`, step for step (lowercase, numbers, weekdays, month names,
    punctuation, whitespace, diacritics), two of them computed faster:
    - punctuation to spaces: a byte table for ASCII text, else a codepoint mask over the text's UTF-32 array
      (`str.translate` looks every character up in a dict: 8x slower on non-ASCII text);
    - diacritics (NFD, then dropping "Mn" characters one generator step per character): one regex
      substitution, skipped for ASCII text (which NFD leaves as is and which holds no mark).

    `for_runs`: the text is only split into whitespace runs afterwards (`RunCachedWords`), so whitespace is
    left as it is: collapsing it (a third of simplifying code) changes no run. (Neither NFD nor dropping marks
    turns whitespace into anything else or the reverse, so the runs are those of datatrove's text.)"""

    def __init__(self, config: TextNormConfig, for_runs: bool = False):
        self.config = config
        self.for_runs = for_runs
        if config.remove_punctuation:
            _punctuation_table()  # built now; looked up per call so that a pickled step stays small
        if config.norm_unicode_diacritics:
            _nonspacing_marks()  # built now (0.5 s), in the process that forks the workers, not per worker

    def _punctuation_to_spaces(self, text: str) -> str:
        table = _punctuation_table()
        if table is None:
            return text.translate(PUNCTUATION_TRANS)
        mask, ascii_table = table
        if text.isascii():
            return text.encode("ascii").translate(ascii_table).decode("ascii")
        try:
            codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).copy()
        except UnicodeEncodeError:  # a lone surrogate
            return text.translate(PUNCTUATION_TRANS)
        codepoints[mask[codepoints]] = 32
        return codepoints.tobytes().decode("utf-32-le")

    def __call__(self, text: str) -> str:
        config = self.config
        if config.lowercase:
            text = text.lower()
        if config.norm_numbers:
            if text.isascii() and _ASCII_NUMBERS is not None:  # ASCII: \p{Nd} is [0-9]; bytes match faster
                text = _ASCII_NUMBERS.sub(b"0", text.encode("ascii")).decode("ascii")
            else:
                text = NUMBERS_PATTERN.sub("0", text)
        if config.norm_weekdays and (_WEEKDAY_NAMES is None or any(d in text for d in _WEEKDAY_NAMES)):
            text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
        if config.norm_monthnames and (_MONTH_NAMES is None or any(m in text for m in _MONTH_NAMES)):
            text = MONTHS_PATTERN.sub("MONTH", text)
        if config.remove_punctuation:
            text = self._punctuation_to_spaces(text)
        if config.norm_whitespace and not self.for_runs:
            text = WHITESPACE_PATTERN.sub(" ", text.strip())
        if config.norm_unicode_diacritics and not text.isascii():
            text = _nonspacing_marks().sub("", unicodedata.normalize("NFD", text))
        return text if self.for_runs else text.strip()


def _spacy_nlp(tokenizer: WordTokenizer):
    """The spaCy pipeline behind one of the spaCy word tokenizers, or None for any other tokenizer."""
    if isinstance(tokenizer, WarmSpacyTokenizer | SpacySentencizerTokenizer):
        return tokenizer.nlp
    if type(tokenizer) is SpaCyTokenizer:  # datatrove's own (what `language="en"` loads)
        return tokenizer.tokenizer
    return None


def splits_per_whitespace_run(tokenizer: WordTokenizer, simplify: Callable[[str], str]) -> bool:
    """True when `tokenizer`'s words of a simplified text are the concatenated words of its whitespace runs.

    Holds for the regex tokenizers (no pattern matches whitespace) and for spaCy's rule-based tokenizer,
    which splits on whitespace first and tokenizes each run alone (its cache is keyed by the run), except
    for special cases whose text holds whitespace (Spanish "EE. UU."): those are matched across runs, so
    the tokenizer qualifies only when none of them can occur in simplified text (all hold punctuation).
    Custom spaCy tokenizers (Chinese, Japanese, Vietnamese, Thai) and unknown tokenizers do not qualify."""
    if isinstance(tokenizer, RegexWordTokenizer | ScriptRunTokenizer):
        return True
    nlp = _spacy_nlp(tokenizer)
    if nlp is None:
        return False
    from spacy.tokenizer import Tokenizer

    rule_tokenizer = nlp.tokenizer
    if type(rule_tokenizer) is not Tokenizer:
        return False
    spanning = [key for key in rule_tokenizer.rules if key.strip() and any(c.isspace() for c in key.strip())]
    return all(simplify(key) != key for key in spanning)


class RunCachedWords:
    """A tokenizer's words of simplified text, computed once per distinct whitespace run (see
    `splits_per_whitespace_run`); falls back to the tokenizer on the whole text when that does not hold."""

    def __init__(self, tokenizer: WordTokenizer, simplify: Callable[[str], str]):
        self.tokenizer = tokenizer
        self.per_run = splits_per_whitespace_run(tokenizer, simplify)
        nlp = _spacy_nlp(tokenizer) if self.per_run else None
        self._rule_tokenizer = nlp.tokenizer if nlp is not None else None
        self._single: set[str] = set()  # runs that are one word, themselves
        self._split: dict[str, tuple[str, ...]] = {}  # the other runs' words

    def _run_words(self, run: str) -> tuple[str, ...]:
        rules = self._rule_tokenizer
        if rules is not None and not (rules.find_prefix(run) or rules.find_suffix(run) or rules.find_infix(run)
                                      or run in rules.rules):
            # spaCy keeps a run with no prefix, suffix, infix or special case as one token (its _split_affixes and
            # _attach_tokens); deciding it here skips building a Doc and a lexeme for each new word
            return (run,)
        if rules is not None:  # spaCy: no memory zone, no pipes; same tokens as the Doc's
            return tuple(t.text.strip() for t in rules(run) if t.text.strip())
        return tuple(self.tokenizer.word_tokenize(run))

    def __call__(self, text: str) -> list[str]:
        if not self.per_run:
            return self.tokenizer.word_tokenize(text)
        runs = text.split()
        distinct = set(runs)
        new = distinct - self._single
        if new:
            new.difference_update(self._split)
        if new:
            if len(self._single) + len(self._split) + len(new) > WORD_CACHE_LIMIT:
                self._single.clear()
                self._split.clear()
            for run in new:
                words = self._run_words(run)
                if words == (run,):
                    self._single.add(run)
                else:
                    self._split[run] = words
        if not self._split or distinct.isdisjoint(self._split):  # the common case: every run is a word
            return runs
        split = self._split
        words_of = {run: split.get(run, (run,)) for run in distinct}
        return list(chain.from_iterable(map(words_of.__getitem__, runs)))


def sort_records(records: np.ndarray) -> np.ndarray:
    """The records in the order of datatrove's `records.sort(order=all fields)`, sorted on the first hash alone
    when no two records share it (nearly always: a structured sort compares field by field, 10x slower)."""
    first = records[records.dtype.names[0]]
    order = np.argsort(first, kind="stable")
    ordered_first = first[order]
    if len(records) > 1 and bool(np.any(ordered_first[1:] == ordered_first[:-1])):  # ties: copies of a document
        # field by field, the first the primary key: the order of a structured sort on all fields (records equal
        # in every field are equal bytes, so their order among themselves does not show)
        return records[np.lexsort([records[name] for name in reversed(records.dtype.names)])]
    return records[order]


class FastMinhashDedupSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 (same settings, same `bucket_NNN/<rank>.minhash.sig` files, byte for byte),
    computed in batches; see the module docstring. Memory: a batch's shingle hashes (`batch_shingles`, or one
    longer document's), the records (68 bytes per document and bucket with the default settings) up to
    `spill_bytes` before they are appended to the bucket files, and one bucket's records while it is sorted."""

    name = "🎯 MinHash stage 1 (fast)"

    def __init__(self, output_folder: DataFolderLike, config: MinhashConfig | None = None,
                 language: str | WordTokenizer = Languages.english, skip_existing_sigs: bool = False,
                 batch_shingles: int = BATCH_SHINGLES, spill_bytes: int = SPILL_BYTES):
        super().__init__(output_folder, config=config, language=language, skip_existing_sigs=skip_existing_sigs)
        if batch_shingles < 1:
            raise ValueError(f"FastMinhashDedupSignature: batch_shingles={batch_shingles} must be >= 1")
        self.batch_shingles = batch_shingles
        self.spill_bytes = spill_bytes
        self._words: RunCachedWords | None = None
        self._simplify = FastSimplify(self.config.norm_config)  # replaced by one for runs once words are known
        self._hash_func = _direct_hash(self._hash_func)

    @property
    def words(self) -> RunCachedWords:
        if self._words is None:
            self._words = RunCachedWords(self.word_tokenizer, self._simplify)
            if self._words.per_run:
                self._simplify = FastSimplify(self.config.norm_config, for_runs=True)
        return self._words

    def get_shingles(self, text: str) -> np.ndarray:
        """Same shingles as datatrove's (uint64, shape (N, 1))."""
        return self.shingle_hashes(text).reshape((-1, 1))

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The hashes of the word n-grams of the simplified text, in order (uint64, shape (N,))."""
        split_words = self.words  # first: it picks the simplifier
        words = split_words(self._simplify(text))
        n = self.config.n_grams
        count = len(words) - n + 1
        if count <= 0:
            return np.empty(0, dtype=np.uint64)
        if self._hash_func is xxhash.xxh64_intdigest:  # compiled: each n-gram is a slice of the joined words
            try:
                data = np.frombuffer(" ".join(words).encode("utf-8"), dtype=np.uint8)
            except UnicodeEncodeError:  # a lone surrogate: xxhash raises on it, as datatrove's step does
                data = None
            if data is not None:
                spaces = np.flatnonzero(data == 32)  # the joining spaces, unless a word holds one
                if spaces.size != len(words) - 1:
                    byte_lengths = np.fromiter(map(len, map(str.encode, words)), dtype=np.int64, count=len(words))
                    spaces = np.cumsum(byte_lengths + 1)[:-1] - 1
                starts = np.empty(len(words) + 1, dtype=np.int64)
                starts[0], starts[-1] = 0, data.size + 1
                starts[1:-1] = spaces + 1
                return _ngram_xxh64(data, starts, n)
        grams = map(" ".join, zip(*(words[i:] for i in range(n)), strict=False)) if n > 1 else iter(words)
        return np.fromiter(map(self._hash_func, grams), dtype=np.uint64, count=count)

    def _signatures(self, batch: list[np.ndarray]) -> np.ndarray:
        """The signatures of a batch of non-empty shingle arrays, (len(batch), num_hashes) uint64: datatrove's
        `min over shingles of ((h * a + b) % (2^61 - 1))` (& max_hash at 32-bit precision), compiled."""
        a, b = self.parameters
        lengths = np.fromiter((len(s) for s in batch), dtype=np.int64, count=len(batch))
        ends = np.cumsum(lengths)
        mask = np.uint64(self.config.hash_config.max if self.config.hash_config.precision == 32 else (1 << 64) - 1)
        return _permuted_minima(np.concatenate(batch), ends, np.ascontiguousarray(a.reshape(-1)),
                                np.ascontiguousarray(b.reshape(-1)), mask)

    def _record_dtype(self) -> np.dtype:
        fmt = self.config.hash_config.struct_format
        return np.dtype([(f"field{i + 1}", f"<{fmt}") for i in range(self.config.hashes_per_bucket)]
                        + [(f"field{self.config.hashes_per_bucket + 1}", "<I")])

    def _bucket_path(self, bucket: int, rank: int) -> str:
        return f"bucket_{bucket:03d}/{rank:05d}.minhash.sig"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        can_skip, _ = self.check_can_skip_sig_writing(rank)
        if can_skip:  # datatrove's files of this rank are complete (and sorted by the run that wrote them)
            return
        with self.track_time():
            dtype, per_bucket = self._record_dtype(), self.config.hashes_per_bucket
            held: list[list[bytes]] = [[] for _ in range(self.config.num_buckets)]  # records not yet on disk
            files: list = []  # the bucket files, opened once the held records pass `spill_bytes`
            batch: list[np.ndarray] = []
            batch_docs: list[int] = []
            pending = written = held_bytes = 0

            def flush() -> None:
                """The batch's records, unsorted, held per bucket (appended to the bucket files past a bound)."""
                nonlocal pending, written, held_bytes
                if batch:
                    sigs = self._signatures(batch).astype(self.config.hash_config.np_dtype)
                    records = np.empty(len(batch_docs), dtype=dtype)
                    records[dtype.names[-1]] = batch_docs
                    for bi in range(self.config.num_buckets):
                        for i in range(per_bucket):
                            records[dtype.names[i]] = sigs[:, bi * per_bucket + i]
                        held[bi].append(records.tobytes())
                    written += len(batch_docs)
                    held_bytes += records.nbytes * self.config.num_buckets
                    batch.clear()
                    batch_docs.clear()
                    pending = 0
                if held_bytes > self.spill_bytes:
                    if not files:
                        files.extend(self.output_folder.open(self._bucket_path(bi, rank), mode="wb")
                                     for bi in range(self.config.num_buckets))
                    for handle, chunks in zip(files, held, strict=True):
                        handle.write(b"".join(chunks))
                        chunks.clear()
                    held_bytes = 0

            try:
                for doc_idx, doc in enumerate(data):
                    self.stat_update(StatHints.total)
                    shingles = self.shingle_hashes(doc.text)
                    if shingles.size == 0:
                        continue
                    if pending + shingles.size > self.batch_shingles:
                        flush()
                    batch.append(shingles)
                    batch_docs.append(doc_idx)
                    pending += shingles.size
                flush()
            finally:
                for handle in files:
                    handle.close()
            self._write_sorted(rank, written, held, spilled=bool(files))

    def _write_sorted(self, rank: int, docs: int, held: list[list[bytes]], spilled: bool) -> None:
        """Each bucket's records sorted as datatrove sorts them (all fields, in order), written once more."""
        dtype = self._record_dtype()
        for bi in range(self.config.num_buckets):
            path = self._bucket_path(bi, rank)
            raw = b""
            if spilled:
                with self.output_folder.open(path, mode="rb") as handle:
                    raw = handle.read()
            raw += b"".join(held[bi])
            held[bi].clear()
            if len(raw) != docs * dtype.itemsize:
                raise OSError(f"MinHash signatures {self.output_folder.path}/{path}: {len(raw)} bytes for {docs} "
                              f"documents of {dtype.itemsize} bytes; the disk may be full: re-run the signature stage")
            records = sort_records(np.frombuffer(raw, dtype=dtype))
            del raw
            with self.output_folder.open(path, mode="wb") as handle:
                handle.write(records.tobytes())
