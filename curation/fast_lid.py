"""fastText's top-label prediction recomputed bit for bit in one compiled pass per document.

fastText's `predict` spends most of its time outside the model: for every token it builds each character n-gram
as a `std::string` (2 to 4 characters with lid.176, one allocation each), hashes it and looks it up in a hash
map. The model itself is a sum of a few rows and a walk down a Huffman tree. Here the whole of it (splitting
the line, the vocabulary lookup, the n-gram hashes, the pruned-bucket map, the row sum and the walk) runs
compiled (numba) over the line's UTF-8 bytes, with no allocation per token, in the exact operation order of
fastText 0.9.2: FNV-1a over sign-extended bytes, sequential float32 sums, its float/double conversions, and the
C library's `expf` and `log` (numba calls them; numpy's own exp/log differ in the last bit). The labels and the
scores are fastText's, bit for bit; `tests/test_fast_lid.py` checks them on real documents.

Scope: supervised models with hierarchical softmax, word n-grams of 1 and a dense output matrix (the shipped
lid.176 models), k=1. Anything else is refused at load (ValueError), so callers keep fastText's own `predict`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

_MAGIC = 793712314
_EOS = b"</s>"
_LOSS_HS, _MODEL_SUPERVISED = 1, 3  # fastText's enum values of loss_name::hs and model_name::sup


@dataclass
class FastTextFile:
    """What the prediction needs of a .bin/.ftz model file, read from the file itself."""

    dim: int
    word_ngrams: int
    loss: int
    model: int
    bucket: int
    minn: int
    maxn: int
    nwords: int
    words: list[bytes]  # the dictionary, words then labels
    counts: list[int]
    pruneidx_size: int
    pruneidx: np.ndarray  # (pairs, 2) int32: n-gram bucket -> row after the words
    input_rows: int
    quantized_output: bool
    output: np.ndarray | None  # (labels, dim) float32 when dense

    @classmethod
    def read(cls, path: str | Path) -> FastTextFile:
        raw = Path(path).read_bytes()
        magic, version = struct.unpack_from("<ii", raw, 0)
        if magic != _MAGIC or version < 12:
            raise ValueError(f"{path}: not a fastText (version >= 12) model file")
        dim, _ws, _epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn, _lr_update = \
            struct.unpack_from("<12i", raw, 8)
        pos = 8 + 48 + 8
        size, nwords, nlabels = struct.unpack_from("<iii", raw, pos)
        _ntokens, pruneidx_size = struct.unpack_from("<qq", raw, pos + 12)
        pos += 28
        words, counts = [], []
        for _ in range(size):
            end = raw.index(b"\x00", pos)
            words.append(raw[pos:end])
            counts.append(struct.unpack_from("<q", raw, end + 1)[0])
            pos = end + 1 + 8 + 1
        pairs = max(pruneidx_size, 0)
        pruneidx = np.frombuffer(raw, dtype="<i4", count=2 * pairs, offset=pos).reshape(pairs, 2).astype(np.int32)
        pos += 8 * pairs
        quantized_input = raw[pos] == 1
        pos += 1 + (1 if quantized_input else 0)
        input_rows, input_cols = struct.unpack_from("<qq", raw, pos)
        if input_cols != dim or nwords + nlabels != size:
            raise ValueError(f"{path}: inconsistent header ({input_rows}x{input_cols} input, dim {dim})")
        tail = dim * nlabels * 4
        quantized_output = quantized_input and struct.unpack_from("<qq", raw, len(raw) - tail - 16) != (nlabels, dim)
        output = None if quantized_output else np.frombuffer(raw[len(raw) - tail:], dtype="<f4").reshape(
            nlabels, dim).astype(np.float32)
        return cls(dim, word_ngrams, loss, model, bucket, minn, maxn, nwords, words, counts, pruneidx_size,
                   pruneidx, input_rows, quantized_output, output)


def fnv1a(data: bytes) -> int:
    """fastText's Dictionary::hash: FNV-1a 32-bit over the bytes taken as signed chars (the compiled `_fnv`)."""
    return int(_fnv(np.frombuffer(data, dtype=np.uint8), 0, len(data)))


def word_table(words: list[bytes]) -> np.ndarray:
    """fastText's word2int open-addressing table (size ceil(n / 0.7), linear probing from hash % size)."""
    table = np.full(math.ceil(len(words) / 0.7), -1, dtype=np.int32)
    for i, word in enumerate(words):
        slot = fnv1a(word) % len(table)
        while table[slot] != -1 and words[table[slot]] != word:
            slot = (slot + 1) % len(table)
        table[slot] = i
    return table


def huffman_tree(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """fastText's hierarchical-softmax tree over the labels (counts in label order, descending): the left and
    right child of each of the 2n-1 nodes (-1 for the n leaves), built as its `buildTree` builds it."""
    n = len(counts)
    count = np.full(2 * n - 1, 10**15, dtype=np.int64)
    count[:n] = counts
    left = np.full(2 * n - 1, -1, dtype=np.int32)
    right = np.full(2 * n - 1, -1, dtype=np.int32)
    leaf, node = n - 1, n
    for i in range(n, 2 * n - 1):
        pick = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                pick.append(leaf)
                leaf -= 1
            else:
                pick.append(node)
                node += 1
        left[i], right[i] = pick
        count[i] = count[pick[0]] + count[pick[1]]
    return left, right


@numba.njit(cache=True, nogil=True, inline="always")
def _fnv_step(h, byte):  # pragma: no cover - compiled
    """One FNV-1a step over a byte taken as a signed char, in int64 (numba widens uint32 arithmetic, so the
    32-bit wrap is a mask)."""
    b = np.int64(byte)
    if b >= 0x80:
        b |= 0xFFFFFF00
    return ((h ^ b) * 16777619) & 0xFFFFFFFF


@numba.njit(cache=True, nogil=True)
def _fnv(buf, start, end):  # pragma: no cover - compiled
    """fnv1a of buf[start:end]."""
    h = np.int64(2166136261)
    for k in range(start, end):
        h = _fnv_step(h, buf[k])
    return h


@numba.njit(cache=True, nogil=True, inline="always")
def equal_slices(x, i, y, j, n):  # pragma: no cover - compiled
    """x[i:i + n] == y[j:j + n], element by element, without slicing (compiled code's array compare)."""
    for k in range(n):
        if x[i + k] != y[j + k]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _word_id(buf, start, end, table, vocab, offsets):  # pragma: no cover - compiled
    """Dictionary::getId of buf[start:end]: the entry index, or -1."""
    size = table.size
    slot = _fnv(buf, start, end) % size
    n = end - start
    while table[slot] != -1:
        entry = table[slot]
        a, b = offsets[entry], offsets[entry + 1]
        if b - a == n and equal_slices(vocab, a, buf, start, n):
            return entry
        slot = (slot + 1) % size
    return -1


@numba.njit(cache=True, nogil=True)
def _line_ids(line, table, vocab, offsets, nwords, minn, maxn, bucket, prune_mode, pruneidx, present, eos_id):
    """Dictionary::getLine's input ids of one line (UTF-8 bytes, no newline): per token its word id when known,
    then its character n-grams' rows; label tokens (`__label__...`) are left out; the end-of-line token last."""
    # pragma: no cover - compiled
    k_lengths = max(maxn - minn + 1, 0)
    out = np.empty((3 * k_lengths + 1) * line.size + 2, dtype=np.int64)
    word = np.empty(line.size + 2, dtype=np.uint8)
    count = 0
    i = 0
    n = line.size
    while i < n:
        c = line[i]
        if c == 32 or c == 10 or c == 13 or c == 9 or c == 11 or c == 12 or c == 0:
            i += 1
            continue
        start = i
        while i < n:
            c = line[i]
            if c == 32 or c == 10 or c == 13 or c == 9 or c == 11 or c == 12 or c == 0:
                break
            i += 1
        end = i
        if end - start == 4 and line[start] == 60 and line[start + 1] == 47 and line[start + 2] == 115 \
                and line[start + 3] == 62:
            break  # "</s>" in the text ends the line there (getLine stops at its first end-of-line token)
        wid = _word_id(line, start, end, table, vocab, offsets)
        if wid >= nwords:  # a label of the model
            continue
        if wid < 0 and end - start >= 9 and line[start] == 95 and line[start + 1] == 95 and line[start + 2] == 108 \
                and line[start + 3] == 97 and line[start + 4] == 98 and line[start + 5] == 101 \
                and line[start + 6] == 108 and line[start + 7] == 95 and line[start + 8] == 95:
            continue  # "__label__..." not in the dictionary: typed a label all the same
        if wid >= 0:
            out[count] = wid
            count += 1
        if maxn <= 0:
            continue
        size = end - start + 2
        word[0] = 60  # "<"
        word[1:size - 1] = line[start:end]
        word[size - 1] = 62  # ">"
        for a in range(size):
            if (word[a] & 0xC0) == 0x80:
                continue
            j = a
            chars = 1
            state = np.int64(2166136261)  # FNV-1a of word[a:j], extended byte by byte (each n-gram extends the last)
            while j < size and chars <= maxn:
                state = _fnv_step(state, word[j])
                j += 1
                while j < size and (word[j] & 0xC0) == 0x80:
                    state = _fnv_step(state, word[j])
                    j += 1
                if chars >= minn and not (chars == 1 and (a == 0 or j == size)):
                    h = state % bucket
                    if prune_mode < 0:
                        out[count] = nwords + h
                        count += 1
                    elif prune_mode > 0 and (present[h >> 3] >> (h & 7)) & 1 and pruneidx[h] >= 0:
                        out[count] = nwords + pruneidx[h]
                        count += 1
                chars += 1
    if eos_id >= 0:
        out[count] = eos_id
        count += 1
    return out[:count]


@numba.njit(cache=True, nogil=True)
def _top_label(ids, table, output, left, right, log_threshold):  # pragma: no cover - compiled
    """(leaf, probability, tie) of fastText's k=1 prediction: averageRowsToVector, HS dfs, then expf of the
    score; `tie` when another leaf has the same score (k=1 and k=-1 may then pick different ones)."""
    dim = table.shape[1]
    hidden = np.zeros(dim, dtype=np.float32)
    for i in ids:
        for j in range(dim):
            hidden[j] += table[i, j]
    scale = np.float32(1.0 / ids.size)
    for j in range(dim):
        hidden[j] *= scale
    n_labels = output.shape[0]
    stack_node = np.empty(2 * n_labels, dtype=np.int32)
    stack_score = np.empty(2 * n_labels, dtype=np.float32)
    stack_node[0], stack_score[0], top = 2 * n_labels - 2, np.float32(0.0), 1
    best_node, best_score, tie = -1, np.float32(0.0), False
    while top:
        top -= 1
        node, score = stack_node[top], stack_score[top]
        if score < log_threshold or (best_node >= 0 and score < best_score):
            continue
        if left[node] == -1 and right[node] == -1:  # a leaf that passed: the heap of one keeps the newer one
            tie = best_node >= 0 and score == best_score
            best_node, best_score = node, score
            continue
        dot = np.float32(0.0)
        for j in range(dim):
            dot += output[node - n_labels, j] * hidden[j]
        f = np.float32(1.0 / np.float64(np.float32(1.0) + math.exp(-dot)))
        left_score = score + np.float32(math.log(np.float64(np.float32(1.0 - np.float64(f))) + 1e-5))
        right_score = score + np.float32(math.log(np.float64(f) + 1e-5))
        stack_node[top], stack_score[top] = right[node], right_score  # the right subtree after the left one
        stack_node[top + 1], stack_score[top + 1] = left[node], left_score
        top += 2
    return best_node, np.float32(math.exp(best_score)), tie


class CompiledTopLabel:
    """`model.predict(line, k=1)` of a loaded fastText model: the same label and score, several times faster.

    `predict(line)` takes one line (no "\\n") and returns (label, score), or None where fastText returns no
    label (no known token) or where two labels tie (then k=1 and k=-1 may differ: ask fastText). Raises
    ValueError at construction for a model outside the scope (module docstring)."""

    def __init__(self, model, path: str | Path, threshold: float = 0.0):
        spec = FastTextFile.read(path)
        if spec.loss != _LOSS_HS or spec.model != _MODEL_SUPERVISED or spec.word_ngrams != 1 \
                or spec.output is None:
            raise ValueError(f"{path}: only supervised hierarchical-softmax models with wordNgrams=1 and a dense "
                             "output matrix are recomputed; use fastText's predict")
        self.table = np.stack([model.get_input_vector(i) for i in range(spec.input_rows)]).astype(np.float32)
        self.labels = [w.decode("utf-8", "replace") for w in spec.words[spec.nwords:]]
        self.output = spec.output
        self.left, self.right = huffman_tree(spec.counts[spec.nwords:])
        self.log_threshold = np.float32(math.log(float(np.float32(threshold)) + 1e-5))
        self.words = word_table(spec.words)
        self.vocab = np.frombuffer(b"".join(spec.words), dtype=np.uint8)
        self.offsets = np.concatenate(([0], np.cumsum([len(w) for w in spec.words]))).astype(np.int64)
        self.nwords, self.minn, self.maxn, self.bucket = spec.nwords, spec.minn, spec.maxn, spec.bucket
        self.prune_mode = -1 if spec.pruneidx_size < 0 else (1 if spec.pruneidx_size > 0 else 0)
        self.pruneidx = np.full(spec.bucket if self.prune_mode > 0 else 1, -1, dtype=np.int32)
        if self.prune_mode > 0:
            self.pruneidx[spec.pruneidx[:, 0]] = spec.pruneidx[:, 1]
        # a bit per bucket (256 KB, cache-resident) in front of the 8 MB map: most n-grams were pruned away
        self.present = np.packbits(self.pruneidx >= 0, bitorder="little")
        eos = spec.words.index(_EOS) if _EOS in spec.words else -1
        self.eos_id = eos if eos < spec.nwords else -1

    def input_ids(self, line: str) -> np.ndarray:
        """The input ids fastText's getLine gives the line (raises UnicodeEncodeError as fastText's binding does)."""
        data = np.frombuffer(line.encode("utf-8"), dtype=np.uint8)
        return _line_ids(data, self.words, self.vocab, self.offsets, self.nwords, self.minn, self.maxn,
                         self.bucket, self.prune_mode, self.pruneidx, self.present, self.eos_id)

    def predict(self, line: str) -> tuple[str, float] | None:
        if "\n" in line:
            raise ValueError("predict processes one line at a time (remove '\\n')")
        ids = self.input_ids(line)
        if ids.size == 0:
            return None
        node, prob, tie = _top_label(ids, self.table, self.output, self.left, self.right, self.log_threshold)
        return (self.labels[node], float(prob)) if node >= 0 and not tie else None
