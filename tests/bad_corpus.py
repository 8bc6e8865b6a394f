"""A raw corpus of bad input mixed with real good documents, and the same good documents alone.

`write_clean` writes the good documents in the corpus format; `write_bad` writes the same good documents,
in the same order, into files of every accepted format, with every kind of bad record and file between them.
What is readable before a truncation is computed here with zlib / zstandard directly, so the test knows
which good documents the reader can see without asking the reader.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

HUGE_DOC_BYTES = 100 << 20
DEEP_DIVS = 100_000


def jsonl(docs: list[dict]) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode() + b"\n" for d in docs)


def readable_lines(decoded: bytes) -> int:
    """Complete lines in what could be decoded before a break."""
    return decoded.count(b"\n")


@dataclass
class MathParts:
    """The good math documents, cut into the files they go to (in file order)."""

    plain: list[dict]  # 00000.jsonl.gz, bad lines between them
    gz_cut: list[dict]  # 00001.jsonl.gz, truncated: only the first `readable_gz` are readable
    zst: list[dict]  # 00002.jsonl.zst: a complete frame, then a truncated one
    zst_cut: list[dict]
    parquet: list[dict]  # 00003.parquet
    after_huge: list[dict]  # 00008.jsonl, after the 100 MB line
    readable_gz: int = 0
    readable_zst_cut: int = 0

    @classmethod
    def of(cls, docs: list[dict]) -> MathParts:
        n = len(docs) // 6
        return cls(docs[:n], docs[n:2 * n], docs[2 * n:3 * n], docs[3 * n:4 * n], docs[4 * n:5 * n], docs[5 * n:])

    def readable(self) -> list[dict]:
        """The good documents a reader can see, in reading order."""
        return [*self.plain, *self.gz_cut[: self.readable_gz], *self.zst, *self.zst_cut[: self.readable_zst_cut],
                *self.parquet, *self.after_huge]


@dataclass
class BadCase:
    """Which quarantine reasons (and how many of each) the bad corpus must produce, per source."""

    reasons: dict[str, dict[str, int]] = field(default_factory=dict)


def write_clean(raw: Path, math: list[dict], web: list[dict]) -> None:
    """The good documents alone, one plain gzip file per source."""
    for source, docs in (("math", math), ("web-en", web)):
        (raw / source).mkdir(parents=True, exist_ok=True)
        (raw / source / "00000.jsonl.gz").write_bytes(gzip.compress(jsonl(docs)))


def _cut_gzip(data: bytes) -> tuple[bytes, int]:
    whole = gzip.compress(data)
    cut = whole[: len(whole) * 2 // 3]
    return cut, readable_lines(zlib.decompressobj(wbits=31).decompress(cut))


def _cut_zstd(first: bytes, second: bytes) -> tuple[bytes, int]:
    """A complete zstd frame, then a second one cut half-way (the lines decodable from it are counted)."""
    frame = zstandard.ZstdCompressor(level=3).compress(second)
    cut = frame[: len(frame) // 2]
    decoded = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    return zstandard.ZstdCompressor(level=3).compress(first) + cut, readable_lines(decoded)


def _huge_line(path: Path, template: dict) -> None:
    """One ~100 MB document (real math text repeated, lines and all, so it would pass the math filters)."""
    sentence = (template["text"] + "\n").encode()
    meta = json.dumps(template["metadata"]).encode()
    with open(path, "wb") as handle:
        handle.write(b'{"id": "huge-document", "metadata": ' + meta + b', "text": "')
        block = json.dumps(sentence.decode())[1:-1].encode() * max(1, (1 << 20) // len(sentence))
        written = 0
        while written < HUGE_DOC_BYTES:
            handle.write(block)
            written += len(block)
        handle.write(b'"}\n')


def deep_html(page: str, depth: int = DEEP_DIVS) -> str:
    """A real page with its body wrapped in `depth` nested divs."""
    head, sep, body = page.partition("<body")
    if not sep:
        return "<div>" * depth + page + "</div>" * depth
    start = body.index(">") + 1
    end = body.rfind("</body>")
    end = end if end >= 0 else len(body)
    return head + sep + body[:start] + "<div>" * depth + body[start:end] + "</div>" * depth + body[end:]


def write_deep_web(raw: Path, web: list[dict], deep: int) -> None:
    """The web pages with page `deep` wrapped in 100,000 nested divs."""
    pages = [dict(p) for p in web]
    pages[deep]["text"] = deep_html(pages[deep]["text"])
    (raw / "web-en").mkdir(parents=True, exist_ok=True)
    (raw / "web-en" / "00000.jsonl.gz").write_bytes(gzip.compress(jsonl(pages)))


def write_bad(raw: Path, good_math: list[dict], *, metadata_cast: int,
              duplicate: tuple[int, int]) -> tuple[MathParts, list[dict], BadCase]:
    """The good documents with bad input between them; returns where they went, the good math documents the
    reader can see (as they were given, for the clean run) and the quarantine counts to expect.

    `metadata_cast`: index of a good math document whose metadata.path becomes the number 42 (cast, kept);
    `duplicate` (i, j): math document j takes the id of document i (kept, renamed). Web pages: `write_deep_web`."""
    math = [dict(d, metadata=dict(d["metadata"])) for d in good_math]
    math[metadata_cast]["metadata"]["path"] = 42
    math[duplicate[1]]["id"] = math[duplicate[0]]["id"]
    parts = MathParts.of(math)
    folder = raw / "math"
    folder.mkdir(parents=True, exist_ok=True)

    meta = math[0]["metadata"]
    bad_lines = [
        b'{"id": "latin-1", "text": "caf\xe9 au lait", "metadata": {}}',  # invalid UTF-8
        b'{"id": "raw-nul", "text": "a raw \x00 byte", "metadata": {}}',  # a raw NUL byte
        json.dumps({"id": "escaped-nul", "text": "an escaped \u0000 NUL " * 10, "metadata": meta}).encode(),
        b'["a", "json", "array"]',
        json.dumps({"id": "no-text", "metadata": meta}).encode(),
        json.dumps({"id": "text-number", "text": 12345, "metadata": meta}).encode(),
        json.dumps({"id": "chars-word", "text": "x " * 40, "metadata": {**meta, "chars": "many"}}).encode(),
        json.dumps({"id": "metadata-list", "text": "y " * 40, "metadata": [1, 2]}).encode(),
        b'{"id": "broken", "text": "an unterminated string}',
    ]
    lines = []
    for i, doc in enumerate(parts.plain):
        lines.append(json.dumps(doc, ensure_ascii=False).encode())
        if i < len(bad_lines):
            lines.append(bad_lines[i])
    lines += bad_lines[len(parts.plain):]
    (folder / "00000.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))

    cut, parts.readable_gz = _cut_gzip(jsonl(parts.gz_cut))
    (folder / "00001.jsonl.gz").write_bytes(cut)
    data, parts.readable_zst_cut = _cut_zstd(jsonl(parts.zst), jsonl(parts.zst_cut))
    (folder / "00002.jsonl.zst").write_bytes(data)

    table = pa.Table.from_pylist([{"id": d["id"], "text": d["text"], "metadata": d["metadata"]}
                                  for d in parts.parquet])
    pq.write_table(table, folder / "00003.parquet")
    good_parquet = io.BytesIO()
    pq.write_table(table, good_parquet)
    (folder / "00004.parquet").write_bytes(good_parquet.getvalue()[:-100])  # corrupt: the footer is gone
    pq.write_table(pa.Table.from_pylist([{"id": "body-1", "body": "no text column"},
                                         {"id": "body-2", "body": "still none"}]), folder / "00005.parquet")
    (folder / "00006.jsonl.gz").write_bytes(gzip.compress(b""))  # an empty (but valid) gzip
    (folder / "00007.jsonl").write_bytes(b"")  # zero bytes
    _huge_line(folder / "00008.jsonl", math[0])
    with open(folder / "00008.jsonl", "ab") as handle:
        handle.write(jsonl(parts.after_huge))
    (folder / "notes.txt").write_text("not a raw file\n")

    expected = BadCase({"math": {
        "quarantine_undecodable_bytes": 1, "quarantine_nul_byte": 1, "quarantine_nul_character": 1,
        "quarantine_not_an_object": 1, "quarantine_invalid_text": 4,  # no text, a number, 2 Parquet rows
        "quarantine_invalid_metadata": 2, "quarantine_malformed_json": 1, "quarantine_truncated_file": 2,
        "quarantine_corrupt_file": 1, "quarantine_empty_file": 2, "quarantine_too_large": 1,
        "quarantine_unsupported_file": 1,
    }})
    clean = MathParts.of(list(good_math))
    clean.readable_gz, clean.readable_zst_cut = parts.readable_gz, parts.readable_zst_cut
    return parts, clean.readable(), expected
