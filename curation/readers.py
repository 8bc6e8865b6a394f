"""Reading raw JSONL without ever losing a line: bad lines go to quarantine, counted by reason."""

from __future__ import annotations

import gzip
import zlib
from typing import Any

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.typeshelper import StatHints

QUARANTINE_PREFIX = "quarantine_"  # drop reasons starting with this were quarantined, not discarded


def quarantine_writer(folder: DataFolderLike, step: str) -> JsonlWriter:
    """One JSONL file per step and rank under `curated/quarantine/<source>/`."""
    return JsonlWriter(folder, output_filename=f"{step}_${{rank}}.jsonl.gz", compression="gzip")


def quarantine_document(doc_id: str, text: str, reason: str, step: str, **details: Any) -> Document:
    return Document(text=text, id=doc_id, metadata={"quarantine_reason": reason, "quarantine_step": step, **details})


class RawJsonlReader(JsonlReader):
    """JsonlReader that validates every line and quarantines the ones it cannot turn into a document.

    datatrove's reader logs and skips malformed lines and stops a file at the first undecodable byte;
    here each line is decoded on its own, so one bad line costs one document, and it is kept (with the
    reason) in the quarantine folder and counted as `dropped_quarantine_<reason>`.
    """

    name = "🐿 Raw Jsonl (validating)"

    def __init__(self, data_folder: DataFolderLike, quarantine_folder: DataFolderLike, **kwargs: Any):
        kwargs.setdefault("add_file_path", False)
        kwargs.setdefault("glob_pattern", "*.jsonl.gz")
        super().__init__(data_folder, **kwargs)
        self.quarantine = quarantine_writer(quarantine_folder, "read")
        self._rank = 0

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._rank = rank
        with self.quarantine:
            yield from super().run(data, rank, world_size)

    def _reject(self, reason: str, doc_id: str, text: str, **details: Any) -> None:
        self.stat_update(StatHints.dropped, f"dropped_{QUARANTINE_PREFIX}{reason}")
        self.quarantine.write(quarantine_document(doc_id, text, reason, "read", **details), self._rank)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        line_no = -1
        try:
            with self.data_folder.open(filepath, "rb", compression=self.compression) as handle:
                for line_no, line in enumerate(handle):
                    if not line.strip():
                        continue
                    self.stat_update(StatHints.total)
                    with self.track_time():
                        doc = self._parse(line, filepath, line_no)
                    if doc is not None:
                        self.stat_update(StatHints.forwarded)
                        yield doc
        except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as err:
            # a truncated or corrupt compressed file: what was read is kept, the unreadable rest is one entry
            self.stat_update(StatHints.total)
            self._reject("unreadable_file", f"{filepath}#{line_no + 1}", "", file=filepath, line=line_no + 1,
                         error=repr(err))

    def _parse(self, line: bytes, filepath: str, line_no: int) -> Document | None:
        where = {"file": filepath, "line": line_no}
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            self._reject("undecodable_bytes", f"{filepath}#{line_no}", line.decode("utf-8", "replace"), **where,
                         error=str(err))
            return None
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as err:
            self._reject("malformed_json", f"{filepath}#{line_no}", line.decode("utf-8", "replace"), **where,
                         error=str(err))
            return None
        if not isinstance(data, dict):
            self._reject("not_an_object", f"{filepath}#{line_no}", line.decode("utf-8"), **where)
            return None
        doc_id, text = data.get(self.id_key), data.get(self.text_key)
        if not isinstance(doc_id, str) or not doc_id:
            self._reject("missing_id", f"{filepath}#{line_no}", line.decode("utf-8"), **where)
            return None
        if not isinstance(text, str) or not text.strip():
            self._reject("invalid_text", doc_id, line.decode("utf-8"), **where)
            return None
        if not isinstance(data.get("metadata", {}), dict):
            self._reject("invalid_metadata", doc_id, line.decode("utf-8"), **where)
            return None
        doc = self.get_document_from_dict(data, filepath, line_no)
        if doc is None:  # the adapter found no text
            self._reject("invalid_text", doc_id, line.decode("utf-8"), **where)
        return doc
