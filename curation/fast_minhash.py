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
- shingles: `map` of `" ".join` and of datatrove's hash function over zipped word lists (no Python loop body);
- permutations: one (shingles x hashes) matrix per batch of documents, `x mod (2^61 - 1)` by the Mersenne
  identity (no division), per-document minima by `np.minimum.reduceat`;
- files: each bucket's records are held in memory (up to a bound, then appended to the file), sorted as
  datatrove sorts them and written in its record format: 14 file opens per rank instead of 56.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Callable
from functools import cache

import numpy as np
import regex
import xxhash
from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature, _mersenne_prime
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

BATCH_SHINGLES = 2048  # shingles permuted at once: 2048 x 112 hashes x 8 bytes = 1.8 MB, cache-sized
SPILL_BYTES = 64 << 20  # records held in memory (all buckets; ~70k docs) before they go to the bucket files
WORD_CACHE_LIMIT = 2_000_000  # distinct whitespace runs remembered per process before starting afresh
_MASK61 = np.uint64((1 << 61) - 1)
_SHIFT61 = np.uint64(61)


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
            text = NUMBERS_PATTERN.sub("0", text)
        if config.norm_weekdays:
            text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
        if config.norm_monthnames:
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
        return [word for run in runs for word in split.get(run, (run,))]


def sort_records(records: np.ndarray) -> np.ndarray:
    """The records in the order of datatrove's `records.sort(order=all fields)`, sorted on the first hash alone
    when no two records share it (nearly always: a structured sort compares field by field, 10x slower)."""
    first = records[records.dtype.names[0]]
    order = np.argsort(first, kind="stable")
    ordered_first = first[order]
    if len(records) > 1 and bool(np.any(ordered_first[1:] == ordered_first[:-1])):  # ties: copies of a document
        ordered = records.copy()
        ordered.sort(order=records.dtype.names)
        return ordered
    return records[order]


class FastMinhashDedupSignature(MinhashDedupSignature):
    """datatrove's MinHash stage 1 (same settings, same `bucket_NNN/<rank>.minhash.sig` files, byte for byte),
    computed in batches; see the module docstring. Memory: the permuted `batch_shingles` x hashes matrix (a
    longer document is permuted in chunks with a running minimum), the records (68 bytes per document and
    bucket with the default settings) up to `spill_bytes` before they are appended to the bucket files, and one
    bucket's records while it is sorted."""

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
        grams = map(" ".join, zip(*(words[i:] for i in range(n)), strict=False)) if n > 1 else iter(words)
        return np.fromiter(map(self._hash_func, grams), dtype=np.uint64, count=count)

    def _permuted_min(self, shingles: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """Per segment (document) minimum of datatrove's permuted hashes: (len(starts), num_hashes) uint64.

        datatrove computes `(h * a + b) % p` in uint64 (the product wraps mod 2^64). With p = 2^61 - 1,
        y = (x & p) + (x >> 61) is congruent to x and at most p + 7, so x % p is y, or y - p in the rare case
        (about 1 in 2^58 values) that y >= p: one check over the batch replaces the division."""
        a, b = self.parameters
        x = shingles.reshape((-1, 1)) * a
        x += b
        y = x >> _SHIFT61
        np.bitwise_and(x, _MASK61, out=x)
        x += y
        if x.max() >= _mersenne_prime:
            np.subtract(x, _mersenne_prime, out=y)  # wraps to > 2^63 where x < p, so the minimum picks x there
            np.minimum(x, y, out=x)
        if self.config.hash_config.precision == 32:
            np.bitwise_and(x, np.uint64(self.config.hash_config.max), out=x)
        return np.minimum.reduceat(x, starts, axis=0)

    def _signatures(self, batch: list[np.ndarray]) -> np.ndarray:
        """The signatures of a batch of non-empty shingle arrays, (len(batch), num_hashes) uint64."""
        if len(batch) == 1 and len(batch[0]) > self.batch_shingles:  # one long document: running minimum
            shingles, step = batch[0], self.batch_shingles
            minimum = self._permuted_min(shingles[:step], np.zeros(1, dtype=np.intp))
            for start in range(step, len(shingles), step):
                np.minimum(minimum, self._permuted_min(shingles[start:start + step], np.zeros(1, dtype=np.intp)),
                           out=minimum)
            return minimum
        lengths = np.fromiter((len(s) for s in batch), dtype=np.intp, count=len(batch))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        return self._permuted_min(np.concatenate(batch), starts)

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
