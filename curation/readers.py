"""Reading raw documents without ever losing one silently: bad records go to quarantine, counted by reason.

Accepted raw files (`RAW_FILE_SUFFIXES`): `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per line) and
`.parquet` (one row per document). Any other file in a source folder is quarantined as `unsupported_file`
(named, not read), never skipped without a trace.

Memory per reader stays bounded whatever the input: compressed streams are decoded in chunks of at most
`READ_CHUNK` bytes and a line is never held beyond `max_doc_bytes` (a 100 MB line costs a few MB, and
is quarantined as `too_large` with its first `QUARANTINE_HEAD` bytes, its size, file and line).
A truncated or corrupt compressed file keeps every line read before the break; one record
(`truncated_file` / `corrupt_file`) says at which line it was cut, so the funnel counts only what was seen.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson
import zstandard
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.writers import normalise_metadata

QUARANTINE_PREFIX = "quarantine_"  # drop reasons starting with this were quarantined, not discarded
RAW_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
MAX_DOC_BYTES = 4 << 20  # a raw record (JSON line / Parquet text) above this is quarantined as `too_large`
QUARANTINE_HEAD = 64 << 10  # bytes of a too-large record kept in quarantine (the raw file keeps the rest)
READ_CHUNK = 1 << 20  # decoded bytes per read
ZSTD_FEED = 8 << 10  # compressed bytes per zstd call: bounds the output of one call
PARQUET_BATCH_ROWS = 64


def raw_file_format(name: str) -> str | None:
    """The suffix of an accepted raw file (one of `RAW_FILE_SUFFIXES`), or None."""
    return next((suffix for suffix in RAW_FILE_SUFFIXES if name.endswith(suffix)), None)


def quarantine_writer(folder: DataFolderLike, step: str) -> JsonlWriter:
    """One JSONL file per step and rank under `curated/quarantine/<source>/`."""
    return JsonlWriter(folder, output_filename=f"{step}_${{rank}}.jsonl.gz", compression="gzip")


def quarantine_document(doc_id: str, text: str, reason: str, step: str, **details: Any) -> Document:
    return Document(text=text, id=doc_id, metadata={"quarantine_reason": reason, "quarantine_step": step, **details})


class StreamBroken(Exception):
    """A compressed stream ended early (`truncated_file`) or holds undecodable data (`corrupt_file`)."""

    def __init__(self, reason: str, error: str):
        super().__init__(error)
        self.reason = reason


def decoded_chunks(handle: IO[bytes], suffix: str) -> Iterator[bytes]:
    """The decompressed bytes of a raw JSONL file in bounded chunks; raises `StreamBroken` at a break, after
    yielding everything decodable before it. Concatenated gzip members / zstd frames are all read."""
    if suffix == ".jsonl":
        while chunk := handle.read(READ_CHUNK):
            yield chunk
        return
    gz = suffix == ".jsonl.gz"
    new = (lambda: zlib.decompressobj(wbits=31)) if gz else (lambda: zstandard.ZstdDecompressor().decompressobj())
    decoder, started = new(), False
    pending = b""
    while True:
        if not pending:
            pending = handle.read(READ_CHUNK if gz else ZSTD_FEED)
            if not pending:
                break
        started = True
        try:
            if gz:
                out = decoder.decompress(pending, READ_CHUNK)
                pending = decoder.unconsumed_tail
            else:
                out, pending = decoder.decompress(pending), b""
        except (zlib.error, zstandard.ZstdError) as err:
            raise StreamBroken("corrupt_file", repr(err)) from err
        if out:
            yield out
        if decoder.eof:  # the next gzip member / zstd frame, if any, starts in what is left
            pending = decoder.unused_data
            decoder, started = new(), False
    if gz:
        tail = decoder.flush()
        if tail:
            yield tail
    if started and not decoder.eof:
        raise StreamBroken("truncated_file", "the compressed stream ends before its end marker (a truncated file)")


def arrow_rows(batch: Any) -> Iterator[tuple[dict[str, Any], str | None]]:
    """The rows of an Arrow record batch as dicts, each with None or, for a row holding a string that is not
    valid UTF-8 (Arrow checks none when reading Parquet or IPC files, and `to_pylist` then raises), the
    problem: that row's bad columns are given decoded with U+FFFD replacements (None if nested), so the
    caller can quarantine it as `undecodable_bytes` and go on with the next row."""
    try:
        rows = batch.to_pylist()
    except UnicodeDecodeError:
        rows = None
    if rows is not None:
        for row in rows:
            yield row, None
        return
    for index in range(batch.num_rows):
        one = batch.slice(index, 1)
        try:
            (row,) = one.to_pylist()
            yield row, None
            continue
        except UnicodeDecodeError as err:
            first_error = err
        row, bad = {}, []
        for name, column in zip(one.schema.names, one.columns, strict=True):
            try:
                (row[name],) = column.to_pylist()
            except UnicodeDecodeError:
                bad.append(name)
                row[name] = _replaced_text(column)
        yield row, f"column(s) {', '.join(bad)} not valid UTF-8 ({first_error}); re-encode them as UTF-8"


def _replaced_text(column: Any) -> str | None:
    """A one-row string column that is not valid UTF-8, decoded with replacements (None for nested types)."""
    import pyarrow as pa

    try:
        (data,) = column.cast(pa.large_binary()).to_pylist()
    except (pa.ArrowException, UnicodeDecodeError):
        return None
    return data.decode("utf-8", "replace") if data is not None else None


@dataclass
class RawLine:
    """One line of a raw file: its bytes (only the head when larger than the limit), its size and number."""

    number: int  # 1-based
    data: bytes
    size: int
    complete: bool  # False: longer than the limit, `data` is its head
    broken: StreamBroken | None = None  # set on the last, partial line of a file that broke


def split_lines(chunks: Iterator[bytes], max_bytes: int) -> Iterator[RawLine]:
    """Lines of a chunked byte stream, never holding more than `max_bytes` (+ one chunk) of one line."""
    buf, size, number, whole = bytearray(), 0, 0, True
    try:
        for chunk in chunks:
            start = 0
            while True:
                newline = chunk.find(b"\n", start)
                piece = chunk[start:] if newline < 0 else chunk[start:newline]
                size += len(piece)
                if whole:
                    buf += piece
                    if len(buf) > max_bytes:
                        whole = False
                        del buf[QUARANTINE_HEAD:]
                if newline < 0:
                    break
                number += 1
                yield RawLine(number, bytes(buf), size, whole)
                buf, size, whole = bytearray(), 0, True
                start = newline + 1
    except StreamBroken as broken:
        yield RawLine(number + 1, bytes(buf), size, whole, broken)
        return
    if size:
        yield RawLine(number + 1, bytes(buf), size, whole)


class QuarantiningReader(BaseDiskReader):
    """A disk reader that never loses a record silently: each unreadable one is written to the quarantine
    folder (with its reason, file and position) and counted as `dropped_quarantine_<reason>`.

    Every reader of raw sources derives from it (`RawJsonlReader`, and the WARC / HTML tree / code tree /
    saved-dataset readers of `curation.source_readers`), so the manifest names them all `read`.
    Subclasses call `_reject` / `_reject_file` for a bad record and `_accept` for each document they yield.
    """

    def __init__(self, data_folder: DataFolderLike, quarantine_folder: DataFolderLike,
                 max_doc_bytes: int = MAX_DOC_BYTES, **kwargs: Any):
        kwargs.setdefault("add_file_path", False)
        kwargs.setdefault("glob_pattern", None)  # every file: the ones not accepted are quarantined, not ignored
        super().__init__(data_folder, **kwargs)
        self.max_doc_bytes = max_doc_bytes
        self.quarantine = quarantine_writer(quarantine_folder, "read")
        self._rank = 0

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._rank = rank
        with self.quarantine:
            yield from super().run(data, rank, world_size)

    def _reject(self, reason: str, doc_id: str, text: str, **details: Any) -> None:
        self.stat_update(StatHints.total)
        self.stat_update(StatHints.dropped, f"dropped_{QUARANTINE_PREFIX}{reason}")
        self.quarantine.write(quarantine_document(doc_id, text, reason, "read", **details), self._rank)

    def _reject_file(self, reason: str, filepath: str, line: int, error: str) -> None:
        logger.warning(f"{filepath}: quarantined as {reason} ({error})")
        self._reject(reason, f"{filepath}#{reason}", "", file=filepath, line=line, error=error)

    def _accept(self, doc: Document | None) -> tuple[Document | None, int]:
        if doc is not None:
            self.stat_update(StatHints.total)
            self.stat_update(StatHints.forwarded)
        return doc, 1

    def _reject_undecodable_row(self, data: dict[str, Any], error: str, filepath: str,
                                where: dict[str, Any]) -> None:
        """Quarantines an Arrow row (Parquet / saved dataset) that holds bytes that are not UTF-8."""
        doc_id = data.get(self.id_key)
        doc_id = doc_id if isinstance(doc_id, str) and doc_id.strip() else f"{filepath}#{where['line']}"
        text = data.get(self.text_key)
        self._reject("undecodable_bytes", doc_id, text[:QUARANTINE_HEAD] if isinstance(text, str) else "",
                     **where, error=error)

    def _document(self, data: Any, text: str | None, where: dict[str, Any]) -> Document | None:
        """A Document from one decoded record, or None after quarantining it (`text`: its raw line)."""
        fallback_id = f"{where['file']}#{where['line']}"

        def raw() -> str:
            return text if text is not None else orjson.dumps(data, default=str).decode()

        if not isinstance(data, dict):
            self._reject("not_an_object", fallback_id, raw(), **where)
            return None
        doc_id, body = data.get(self.id_key), data.get(self.text_key)
        if isinstance(doc_id, int) and not isinstance(doc_id, bool):
            doc_id = str(doc_id)
        if not isinstance(doc_id, str) or not doc_id.strip():
            self._reject("missing_id", fallback_id, raw(), **where)
            return None
        if not isinstance(body, str) or not body.strip():
            self._reject("invalid_text", doc_id, raw(), **where)
            return None
        if "\x00" in body or "\x00" in doc_id:
            self._reject("nul_character", doc_id.replace("\x00", ""), raw(), **where,
                         error="an escaped NUL (\\u0000) in the id or text")
            return None
        metadata = data.get("metadata")
        if metadata is None:
            metadata = {}
        elif isinstance(metadata, str):  # metadata kept as a JSON string (common in Parquet)
            try:
                metadata = orjson.loads(metadata)
            except orjson.JSONDecodeError:
                pass
        if not isinstance(metadata, dict):
            self._reject("invalid_metadata", doc_id, raw(), **where,
                         error=f"metadata is a {type(metadata).__name__}, not an object")
            return None
        extra = {k: v for k, v in data.items() if k not in (self.id_key, self.text_key, "metadata")}
        metadata, problems = normalise_metadata(metadata | extra)
        if problems:
            self._reject("invalid_metadata", doc_id, raw(), **where, error="; ".join(problems))
            return None
        doc = Document(text=body, id=doc_id, metadata=metadata)
        if self.default_metadata:
            doc.metadata = self.default_metadata | doc.metadata
        return doc


class RawJsonlReader(QuarantiningReader):
    """Reads every file of a raw source folder and turns each record into a document or a quarantine entry.

    Each line / row is decoded on its own, so one bad record costs one document, which is kept (with the
    reason, its file and line) in the quarantine folder and counted as `dropped_quarantine_<reason>`.
    Record reasons: undecodable_bytes (a line, or a string of a Parquet row, that is not UTF-8), nul_byte
    (raw NUL), malformed_json, not_an_object, missing_id, invalid_text, nul_character (an escaped `\\u0000`
    in id or text), invalid_metadata (a field that cannot be cast to the curated schema, see
    `writers.normalise_metadata`), too_large. File reasons (one entry per file): unsupported_file,
    empty_file, truncated_file, corrupt_file.
    """

    name = "🐿 Raw Jsonl/Parquet (validating)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        suffix = raw_file_format(filepath)
        if suffix is None:
            self._reject_file("unsupported_file", filepath, 0, f"not a raw file this reader accepts "
                              f"({', '.join(RAW_FILE_SUFFIXES)}); convert it or move it out of the source folder")
            return
        if self.data_folder.size(filepath) == 0:
            self._reject_file("empty_file", filepath, 0, "a zero-byte file")
            return
        reader = self._read_parquet if suffix == ".parquet" else self._read_jsonl
        records = 0
        for doc, counted in reader(filepath, suffix):
            records += counted
            if doc is not None:
                yield doc
        if records == 0:
            self._reject_file("empty_file", filepath, 0, "the file holds no record")

    def _read_jsonl(self, filepath: str, suffix: str) -> Iterator[tuple[Document | None, int]]:
        with self.data_folder.open(filepath, "rb", compression=None) as handle:
            for line in split_lines(decoded_chunks(handle, suffix), self.max_doc_bytes):
                if line.broken is not None:  # one entry for the break, holding the partial last line if any
                    self._reject(line.broken.reason, f"{filepath}#{line.number}",
                                 line.data[:QUARANTINE_HEAD].decode("utf-8", "replace"), file=filepath,
                                 line=line.number, error=f"{line.broken}; the file was cut at line {line.number}, "
                                 f"lines 1-{line.number - 1} were read")
                    yield None, 1
                    return
                if not line.data.strip() and line.complete:
                    continue
                where = {"file": filepath, "line": line.number}
                if not line.complete:
                    self._reject("too_large", f"{filepath}#{line.number}", line.data.decode("utf-8", "replace"),
                                 **where, bytes=line.size, limit=self.max_doc_bytes,
                                 error=f"{line.size} bytes > max_doc_bytes={self.max_doc_bytes}; only the first "
                                 f"{QUARANTINE_HEAD} bytes are kept here")
                    yield None, 1
                    continue
                with self.track_time():
                    doc = self._parse_line(line.data, where)
                yield self._accept(doc)

    def _parse_line(self, line: bytes, where: dict[str, Any]) -> Document | None:
        fallback_id = f"{where['file']}#{where['line']}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            self._reject("undecodable_bytes", fallback_id, line.decode("utf-8", "replace"), **where, error=str(err))
            return None
        if "\x00" in text:
            self._reject("nul_byte", fallback_id, text.replace("\x00", "\\u0000"), **where,
                         error="a raw NUL byte in the line")
            return None
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self._reject("malformed_json", fallback_id, text, **where, error=str(err))
            return None
        return self._document(data, text, where)

    def _read_parquet(self, filepath: str, suffix: str) -> Iterator[tuple[Document | None, int]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            with self.data_folder.open(filepath, "rb", compression=None) as handle:
                parquet = pq.ParquetFile(handle)
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                    for data, undecodable in arrow_rows(batch):
                        row += 1
                        where = {"file": filepath, "line": row}
                        if undecodable is not None:
                            self._reject_undecodable_row(data, undecodable, filepath, where)
                            yield None, 1
                            continue
                        text = data.get(self.text_key)
                        size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
                        if size > self.max_doc_bytes:
                            self._reject("too_large", str(data.get(self.id_key) or f"{filepath}#{row}"),
                                         text[:QUARANTINE_HEAD], **where, bytes=size, limit=self.max_doc_bytes)
                            yield None, 1
                            continue
                        with self.track_time():
                            doc = self._document(data, None, where)
                        yield self._accept(doc)
        except (pa.ArrowException, OSError) as err:
            self._reject("corrupt_file", f"{filepath}#{row + 1}", "", file=filepath, line=row + 1,
                         error=f"{err!r}; rows 1-{row} were read")
            yield None, 1
