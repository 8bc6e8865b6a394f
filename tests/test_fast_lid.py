"""CompiledTopLabel gives fastText's own top label and score, bit for bit, on real pages in five languages and on
texts that exercise the tokenizer's corners (fastText's whitespace set, label tokens, unknown words, UTF-8)."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import re
import sys
from pathlib import Path

import fasttext
import numpy as np
import pytest
from mixlab.curation.fast_lid import CompiledTopLabel, FastTextFile, fnv1a, huffman_tree
from mixlab.curation.lid import BundledFT176LID, bundled_lid_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import web_chain_bench  # noqa: E402

CORNERS = [
    "", " ", "x", "__label__en", "__label__en hello world", "hello __label__xx world", "a\x00b\tc\vd\fe\rf",
    "non\u00a0breaking\u3000spaces and\u2003em", "Ünïcödé wörds, ελληνικά, русский, 中文字符, 😀 emoji",
    "</s> inside the text", "word " * 3000, "x" * 5000, "ß" * 7, "!!! ??? ...", "1234 5678 90",
]


@pytest.fixture(scope="module")
def model():
    return fasttext.load_model(str(bundled_lid_model_path()))


@pytest.fixture(scope="module")
def compiled(model):
    return CompiledTopLabel(model, bundled_lid_model_path())


@pytest.fixture(scope="module")
def lines(raw_corpus: Path) -> list[str]:
    texts = [text for _, _, text, _ in web_chain_bench.web_documents(raw_corpus)]
    return [t.replace("\n", " ") for t in texts] + CORNERS


def _fasttext_top(model, line: str):
    labels, scores = model.predict(line, k=1)
    return (labels[0], scores[0].item()) if len(labels) else None


def test_same_label_and_score_bit_for_bit(model, compiled, lines):
    assert len(lines) > 300
    differ = [(line[:60], _fasttext_top(model, line), compiled.predict(line)) for line in lines
              if _fasttext_top(model, line) != compiled.predict(line)]
    assert not differ, differ[:5]
    assert len({compiled.predict(line)[0] for line in lines if compiled.predict(line)}) >= 5  # the languages


def test_input_ids_are_fasttexts_subwords(model, compiled, lines):
    for line in lines[::3]:
        tokens = [t for t in re.split(r"[ \n\r\t\v\f\x00]+", line) if t] + ["</s>"]
        tokens = tokens[:tokens.index("</s>") + 1]  # fastText reads a line up to its first end-of-line token
        expected = [i for t in tokens if not t.startswith("__label__") for i in model.get_subwords(t)[1].tolist()]
        assert compiled.input_ids(line).tolist() == expected, line[:60]


def test_model_file_facts_match_fasttexts(model):
    spec = FastTextFile.read(bundled_lid_model_path())
    labels, counts = model.get_labels(include_freq=True)
    assert [w.decode() for w in spec.words[spec.nwords:]] == list(labels)
    assert spec.counts[spec.nwords:] == [int(c) for c in counts]
    assert (spec.dim, spec.minn, spec.maxn) == (model.get_dimension(), 2, 4) and not spec.quantized_output
    left, right = huffman_tree(spec.counts[spec.nwords:])
    n = len(labels)
    assert (left[:n] == -1).all() and (left[n:] >= 0).all() and sorted([*left[n:], *right[n:]]) == list(range(2 * n - 2))


def test_fnv1a_sign_extends_bytes_as_fasttext_does():
    assert fnv1a(b"") == 2166136261
    assert fnv1a(b"a") == 0xE40C292C  # the published FNV-1a test vector (ASCII: no sign extension)
    assert fnv1a("é".encode()) != fnv1a(bytes([0xC3 & 0x7F, 0xA9 & 0x7F]))


def test_compiled_exp_and_log_are_the_c_librarys():
    from mixlab.curation.fast_lid import numba

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]

    @numba.njit
    def exp32(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = math.exp(x[i])
        return out

    x = np.random.default_rng(0).normal(0, 6, 20_000).astype(np.float32)
    expected = np.array([libm.expf(float(v)) for v in x], dtype=np.float32)
    assert (exp32(x).view(np.uint32) == expected.view(np.uint32)).all()


def test_bundled_lid_top_falls_back_on_text_fasttext_cannot_encode():
    from datatrove.data import Document

    lid = BundledFT176LID()
    lang, score = lid.top(Document(text="Ceci est une phrase en français, assez longue pour le modèle.", id="a"))
    assert lang == "fr" and 0.5 < score <= 1.0
    bad = Document(text="bad \ud800 text", id="b")
    with pytest.raises(Exception) as stock:  # fastText's binding refuses a lone surrogate
        lid.predict(bad)
    with pytest.raises(stock.type):  # and so does top(), the same way
        lid.top(bad)
