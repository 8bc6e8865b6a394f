"""Readers for raw sources that are not JSONL/Parquet: WARC archives, local HTML trees, code repository trees
and Hugging Face datasets saved with `Dataset.save_to_disk`, plus `reader_for`, which picks one by looking at
what a raw folder holds.

Like `RawJsonlReader` (whose quarantine helpers they share through `QuarantiningReader`), they turn every
unreadable record into a quarantine entry with its reason, file and position, counted as
`dropped_quarantine_<reason>`; nothing is dropped silently. What is not a record at all (WARC request /
metadata records, a tree's CSS and images, a repository's `.git` or `node_modules`) is skipped and counted
in its own stat (`skipped_*`, `warc_<type>_records`, `licence_files`), never as a document.

HTML (from WARC or a tree) is kept as the document text: the recipe's Trafilatura step extracts it, so one
extractor (and its counts) serves every web source.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.readers import (
    MAX_DOC_BYTES,
    PARQUET_BATCH_ROWS,
    QUARANTINE_HEAD,
    QuarantiningReader,
    RawJsonlReader,
    arrow_rows,
    raw_file_format,
)
from mixlab.curation.writers import normalise_metadata

WARC_SUFFIXES = (".warc", ".warc.gz")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")
HTML_MIME_TYPES = frozenset({"text/html", "application/xhtml+xml"})
WARC_DOCUMENT_RECORDS = frozenset({"response", "resource"})  # records that carry a page (the rest are skipped)
CODE_MAX_FILE_BYTES = 1 << 20  # The Stack's limit: larger source files are mostly generated or data
CHARSET_SNIFF_BYTES = 4 << 10  # where an HTML <meta charset> declaration is looked for
RESYNC_CHUNK = 1 << 16

# Folders that hold version-control data, dependencies or build output, not a repository's own code.
VENDORED_DIRS = frozenset({
    ".git", ".hg", ".svn", "node_modules", "bower_components", "vendor", "__pycache__", ".venv", "venv",
    ".tox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".idea", "dist", "build", ".eggs", "site-packages",
})
LICENCE_FILE = re.compile(r"^(licen[cs]e|copying|unlicense)([.\-_].*)?$", re.IGNORECASE)

# Programming language from the file extension (lower case) or, for files without one, the whole name.
LANGUAGE_BY_EXTENSION: dict[str, str] = {
    ".py": "Python", ".pyi": "Python", ".pyx": "Cython", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++",
    ".cxx": "C++", ".hpp": "C++", ".hh": "C++", ".hxx": "C++", ".cs": "C#", ".java": "Java", ".kt": "Kotlin",
    ".kts": "Kotlin", ".scala": "Scala", ".go": "Go", ".rs": "Rust", ".swift": "Swift", ".m": "Objective-C",
    ".mm": "Objective-C++", ".js": "JavaScript", ".mjs": "JavaScript", ".cjs": "JavaScript", ".jsx": "JavaScript",
    ".ts": "TypeScript", ".tsx": "TypeScript", ".rb": "Ruby", ".php": "PHP", ".pl": "Perl", ".pm": "Perl",
    ".lua": "Lua", ".r": "R", ".jl": "Julia", ".hs": "Haskell", ".ml": "OCaml", ".mli": "OCaml",
    ".ex": "Elixir", ".exs": "Elixir", ".erl": "Erlang", ".clj": "Clojure", ".dart": "Dart", ".f90": "Fortran",
    ".f": "Fortran", ".s": "Assembly", ".asm": "Assembly", ".sh": "Shell", ".bash": "Shell", ".zsh": "Shell",
    ".ps1": "PowerShell", ".bat": "Batchfile", ".cmd": "Batchfile", ".sql": "SQL", ".vim": "Vim Script",
    ".el": "Emacs Lisp", ".lisp": "Common Lisp", ".scm": "Scheme", ".tex": "TeX", ".html": "HTML",
    ".htm": "HTML", ".css": "CSS", ".scss": "SCSS", ".md": "Markdown", ".rst": "reStructuredText",
    ".txt": "Text", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML", ".toml": "TOML", ".xml": "XML",
    ".ini": "INI", ".cfg": "INI", ".cmake": "CMake", ".ipynb": "Jupyter Notebook", ".proto": "Protocol Buffer",
    ".csv": "CSV", ".tsv": "TSV",
}
LANGUAGE_BY_NAME: dict[str, str] = {
    "makefile": "Makefile", "gnumakefile": "Makefile", "dockerfile": "Dockerfile", "cmakelists.txt": "CMake",
    "rakefile": "Ruby", "gemfile": "Ruby", "readme": "Text", "setup.cfg": "INI",
}

# Licence kind from the licence text: the first rule whose every pattern is found wins (most specific first).
LICENCE_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("PSF-2.0", ("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",)),  # CPython's text also names the GPL
    ("AGPL-3.0", ("GNU AFFERO GENERAL PUBLIC LICENSE",)),
    ("LGPL-3.0", ("GNU LESSER GENERAL PUBLIC LICENSE Version 3",)),
    ("LGPL-2.1", ("GNU LESSER GENERAL PUBLIC LICENSE Version 2.1",)),
    ("GPL-3.0", ("GNU GENERAL PUBLIC LICENSE Version 3",)),
    ("GPL-2.0", ("GNU GENERAL PUBLIC LICENSE Version 2",)),
    ("Apache-2.0", ("Apache License", "Version 2.0")),
    ("MPL-2.0", ("Mozilla Public License Version 2.0",)),
    ("MIT", ("Permission is hereby granted, free of charge",)),
    ("ISC", ("Permission to use, copy, modify, and/or distribute this software for any purpose",)),
    ("BSD-3-Clause", ("Redistribution and use in source and binary forms", "Neither the name")),
    ("BSD-2-Clause", ("Redistribution and use in source and binary forms",)),
    ("Unlicense", ("This is free and unencumbered software released into the public domain",)),
    ("CC0-1.0", ("CC0 1.0 Universal",)),
]
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:\-]+)""", re.IGNORECASE)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_.:\-]+)", re.IGNORECASE)


def guess_licence(text: str) -> str:
    """The SPDX-style id of a licence text (`LICENCE_RULES`), or "unknown". Whitespace is normalised first, so
    that re-wrapped licence texts match."""
    flat = " ".join(text.split())
    folded = flat.casefold()
    for kind, patterns in LICENCE_RULES:
        if all(pattern.casefold() in folded for pattern in patterns):
            return kind
    return "unknown"


def programming_language(path: str) -> str | None:
    """The language of a file from its name (`LANGUAGE_BY_NAME`) or extension (`LANGUAGE_BY_EXTENSION`)."""
    name = PurePosixPath(path).name.lower()
    if name in LANGUAGE_BY_NAME:
        return LANGUAGE_BY_NAME[name]
    return LANGUAGE_BY_EXTENSION.get(PurePosixPath(name).suffix)


def is_vendored(path: str) -> bool:
    return any(part in VENDORED_DIRS for part in PurePosixPath(path).parts[:-1])


def decode_html(data: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """(text, encoding) of an HTML page: a byte-order mark, else UTF-8, else the charset the HTTP header
    (`declared`) or a <meta> tag names. None when none of them decodes it (the caller quarantines it)."""
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                return None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    meta = _META_CHARSET.search(data[:CHARSET_SNIFF_BYTES])
    for name in (declared, meta.group(1).decode("ascii") if meta else None):
        if not name or name.lower().replace("_", "-") in ("utf-8", "utf8"):
            continue
        try:
            return data.decode(name), name.lower()
        except (UnicodeDecodeError, LookupError):
            continue
    return None


class _ListingReader(QuarantiningReader):
    """A quarantining reader that chooses its own files (`list_files`), then shards them like datatrove does
    (`files[rank::world_size]`)."""

    def list_files(self, rank: int) -> list[str]:
        return self.data_folder.list_files(recursive=self.recursive)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self._rank = rank
        if data:
            yield from data
        with self.quarantine:
            for doc in self.read_files_shard(sorted(self.list_files(rank))[rank::world_size]):
                self.update_doc_stats(doc)
                yield doc

    def _emit(self, doc_id: str, text: str, metadata: dict[str, Any]) -> Document:
        self.stat_update(StatHints.total)
        self.stat_update(StatHints.forwarded)
        metadata, _ = normalise_metadata(metadata)  # every field here is set by the reader: it always casts
        doc = Document(text=text, id=doc_id, metadata=metadata)
        if self.default_metadata:
            doc.metadata = self.default_metadata | doc.metadata
        return doc

    def _drop(self, reason: str) -> None:
        """A readable record that is not a document of this source (e.g. a PDF response): counted, not kept."""
        self.stat_update(StatHints.total)
        self.stat_update(StatHints.dropped, f"dropped_{reason}")

    def _read_bounded(self, filepath: str) -> tuple[bytes, int] | None:
        """(bytes, size) of a file, or None after quarantining it as `empty_file` / `too_large` (only its
        first `QUARANTINE_HEAD` bytes are read then)."""
        size = self.data_folder.size(filepath)
        if size == 0:
            self._reject_file("empty_file", filepath, 0, "a zero-byte file")
            return None
        with self.data_folder.open(filepath, "rb", compression=None) as handle:
            if size > self.max_doc_bytes:
                head = handle.read(QUARANTINE_HEAD)
                self._reject("too_large", filepath, head.decode("utf-8", "replace"), file=filepath, line=0,
                             bytes=size, limit=self.max_doc_bytes,
                             error=f"{size} bytes > max_doc_bytes={self.max_doc_bytes}; only the first "
                             f"{QUARANTINE_HEAD} bytes are kept here")
                return None
            return handle.read(), size


class WarcRecordReader(_ListingReader):
    """WARC files (`.warc`, `.warc.gz`, read with warcio): one document per HTML response, its raw HTML as
    text. Metadata: url (WARC-Target-URI), date (WARC-Date), content_type, encoding, origin (`warc:<file>`).

    Unlike datatrove's `WarcReader` (which stops at the first broken record and needs cchardet and libmagic),
    a corrupt record is quarantined as `corrupt_record` and reading resumes at the next record (the next gzip
    member or `WARC/1.x` line), so one bad record costs one document. Record reasons: corrupt_record,
    empty_record, too_large, undecodable_bytes, nul_byte; a response that is not HTML is dropped as `not_html`
    (counted, not quarantined). Non-page records (warcinfo, request, metadata...) count as
    `warc_<type>_records`. Files that are not WARC are quarantined as `unsupported_file`.
    """

    name = "🕷 WARC (validating)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        from warcio.archiveiterator import ArchiveIterator

        if not filepath.endswith(WARC_SUFFIXES):
            self._reject_file("unsupported_file", filepath, 0, f"not a WARC file ({', '.join(WARC_SUFFIXES)});"
                              " move it out of the source folder")
            return
        if self.data_folder.size(filepath) == 0:
            self._reject_file("empty_file", filepath, 0, "a zero-byte file")
            return
        gzipped = filepath.endswith(".gz")
        size = self.data_folder.size(filepath)
        index, start = 0, 0
        with self.data_folder.open(filepath, "rb", compression=None) as handle:
            while start is not None:
                handle.seek(start)
                records = ArchiveIterator(handle)
                last_start, broken = start, False
                while True:
                    at = records.offset
                    try:
                        record = next(records)
                    except StopIteration:
                        # warcio ends quietly at a gzip error: stopping short of the end is a break
                        broken = broken or handle.tell() < size
                        error = "the stream stops before the end of the file"
                        break
                    except Exception as err:  # warcio raises many kinds on a broken record; all mean the same
                        broken, error, last_start = True, repr(err), max(records.offset, at)
                        break
                    index += 1
                    last_start = records.offset
                    with self.track_time():
                        doc, broken = self._record_document(record, filepath, index, last_start)
                    if doc is not None:
                        yield doc
                    if broken:  # its body was cut: the next records must be found again
                        error = ""
                        break
                start = None
                if broken:
                    if error:
                        index += 1
                        self._reject("corrupt_record", f"{filepath}#{index}", "", file=filepath, line=index,
                                     offset=last_start,
                                     error=f"{error} at byte {last_start}; reading resumes at the next record")
                    start = self._next_record_start(handle, last_start + 1, gzipped)

    def _record_document(self, record: Any, filepath: str, index: int,
                         offset: int) -> tuple[Document | None, bool]:
        """(the record's document or None, whether its body was cut short by a broken stream)."""
        where = {"file": filepath, "line": index, "offset": offset}
        if record.rec_type not in WARC_DOCUMENT_RECORDS:
            self.stat_update(f"warc_{record.rec_type}_records")
            return None, False
        headers = record.rec_headers
        doc_id = headers.get_header("WARC-Record-ID") or f"{filepath}#{index}"
        http_type = record.http_headers.get_header("Content-Type") if record.http_headers else None
        content_type = headers.get_header("WARC-Identified-Payload-Type") or http_type or \
            headers.get_header("Content-Type") or ""
        mime = content_type.split(";")[0].strip().lower()
        if mime not in HTML_MIME_TYPES:
            self._drop("not_html")
            return None, False
        try:
            payload = record.content_stream().read(self.max_doc_bytes + 1)
        except Exception as err:  # a broken gzip / chunked / content-encoding body
            self._reject("corrupt_record", doc_id, "", **where, error=repr(err))
            return None, False
        if len(payload) <= self.max_doc_bytes and getattr(record.raw_stream, "limit", 0) > 0:
            self._reject("corrupt_record", doc_id, payload[:QUARANTINE_HEAD].decode("utf-8", "replace"), **where,
                         error=f"the body ends {record.raw_stream.limit} bytes before its Content-Length "
                         "(a corrupt or cut stream); reading resumes at the next record")
            return None, True
        if len(payload) > self.max_doc_bytes:
            self._reject("too_large", doc_id, payload[:QUARANTINE_HEAD].decode("utf-8", "replace"), **where,
                         limit=self.max_doc_bytes, error=f"the payload is over max_doc_bytes={self.max_doc_bytes}")
            return None, False
        if not payload.strip():
            self._reject("empty_record", doc_id, "", **where, error="a response without a body")
            return None, False
        declared = _HEADER_CHARSET.search(http_type or "")
        decoded = decode_html(payload, declared.group(1) if declared else None)
        if decoded is None:
            self._reject("undecodable_bytes", doc_id, payload[:QUARANTINE_HEAD].decode("utf-8", "replace"),
                         **where, error="neither UTF-8 nor the declared charset decodes the payload")
            return None, False
        html, encoding = decoded
        if "\x00" in html:
            self._reject("nul_byte", doc_id, html[:QUARANTINE_HEAD].replace("\x00", "\\u0000"), **where,
                         error="a NUL byte in the payload")
            return None, False
        return self._emit(doc_id, html, {"url": headers.get_header("WARC-Target-URI"),
                                         "date": headers.get_header("WARC-Date"), "content_type": mime,
                                         "encoding": encoding, "origin": f"warc:{filepath}"}), False

    @staticmethod
    def _next_record_start(handle: Any, position: int, gzipped: bool) -> int | None:
        """Offset of the first record start at or after `position`: a gzip member that inflates to `WARC/`,
        or a `WARC/1.` line; None at the end of the file."""
        marker = b"\x1f\x8b\x08" if gzipped else b"\nWARC/1."
        handle.seek(position)
        carry, base = b"", position
        while chunk := handle.read(RESYNC_CHUNK):
            window = carry + chunk
            found = window.find(marker)
            while found >= 0:
                offset = base - len(carry) + found
                if not gzipped:
                    return offset + 1
                handle.seek(offset)
                try:
                    head = zlib.decompressobj(wbits=31).decompress(handle.read(4096), 16)
                except zlib.error:
                    head = b""
                if head.startswith(b"WARC/"):
                    return offset
                found = window.find(marker, found + 1)
            handle.seek(base + len(chunk))
            carry, base = window[-len(marker):], base + len(chunk)
        return None


class HtmlTreeReader(_ListingReader):
    """A local tree of HTML pages (`.html`, `.htm`, `.xhtml`): one document per page, its raw HTML as text,
    its path relative to the tree as id and `path`, the encoding it was decoded with, and origin
    `html:<tree folder name>`.

    Encodings: a byte-order mark, else UTF-8, else the charset a <meta> tag declares; a page none of them
    decodes is quarantined as `undecodable_bytes`. Other reasons: nul_byte, empty_file, too_large. Other
    files (CSS, scripts, images) are not pages: they count as `skipped_non_html_files`.
    """

    name = "🗂 HTML tree (validating)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        if not filepath.lower().endswith(HTML_SUFFIXES):
            self.stat_update("skipped_non_html_files")
            return
        read = self._read_bounded(filepath)
        if read is None:
            return
        with self.track_time():
            data, _ = read
            where = {"file": filepath, "line": 0}
            decoded = decode_html(data)
            if decoded is None:
                self._reject("undecodable_bytes", filepath, data[:QUARANTINE_HEAD].decode("utf-8", "replace"),
                             **where, error="neither UTF-8 nor a declared <meta charset> decodes the page; "
                             "re-encode it as UTF-8 or declare its charset")
                return
            html, encoding = decoded
            if "\x00" in html:
                self._reject("nul_byte", filepath, html[:QUARANTINE_HEAD].replace("\x00", "\\u0000"), **where,
                             error="a NUL byte in the page")
                return
            if not html.strip():
                self._reject("empty_file", filepath, "", **where, error="the page holds only whitespace")
                return
            doc = self._emit(filepath, html, {"path": filepath, "encoding": encoding,
                                              "origin": f"html:{Path(self.data_folder.path).name}"})
        yield doc


class CodeTreeReader(_ListingReader):
    """Code repository trees: one document per source file, with `programming_language` from its extension
    (`LANGUAGE_BY_EXTENSION`), `repository`, `path` (inside the repository), `extension`, and the licence
    files at the repository's root: `licence_files` (their paths) and `licence` (their kinds guessed from
    the text, `guess_licence`, joined with "+"; "none" when the repository has no licence file), `bytes`
    and origin `code:<repository>`.

    `repositories`: "auto" (the folder is one repository when it holds a `.git` or a licence file at its top,
    else each top-level folder is one), "single" or "per_folder". Quarantine reasons: binary_file (a NUL
    byte), undecodable_bytes (not UTF-8), too_large (over `max_doc_bytes`, 1 MiB by default), empty_file,
    unknown_language. Files under `VENDORED_DIRS` are skipped (`skipped_vendored_files`, and
    `skipped_vendored_dirs` for the folders), licence files are counted as `licence_files`, not documents.
    """

    name = "🧑‍💻 Code tree (validating)"

    def __init__(self, data_folder: DataFolderLike, quarantine_folder: DataFolderLike,
                 max_doc_bytes: int = CODE_MAX_FILE_BYTES, repositories: str = "auto", **kwargs: Any):
        if repositories not in ("auto", "single", "per_folder"):
            raise CurationConfigError(f"repositories={repositories!r} must be 'auto', 'single' or 'per_folder'",
                              ["repositories"])
        super().__init__(data_folder, quarantine_folder, max_doc_bytes=max_doc_bytes, **kwargs)
        self.repositories = repositories
        self._licences: dict[str, tuple[list[str], str]] = {}
        self._single: bool | None = None

    def list_files(self, rank: int) -> list[str]:
        files = self.data_folder.list_files(recursive=True)
        kept = [path for path in files if not is_vendored(path)]
        if rank == 0:  # counted once, not once per task
            vendored_dirs = {next(PurePosixPath(*parts[: i + 1]) for i, part in enumerate(parts)
                                  if part in VENDORED_DIRS)
                             for path in files if is_vendored(path) for parts in [PurePosixPath(path).parts]}
            self.stat_update("skipped_vendored_files", value=len(files) - len(kept))
            self.stat_update("skipped_vendored_dirs", value=len(vendored_dirs))
        return kept

    def _is_single(self) -> bool:
        if self._single is None:
            if self.repositories == "auto":
                top = [PurePosixPath(p).parts for p in self.data_folder.list_files(recursive=True)]
                self._single = (any(len(parts) > 1 and parts[0] == ".git" for parts in top)
                                or any(len(parts) == 1 and LICENCE_FILE.match(parts[0]) for parts in top)
                                or all(len(parts) == 1 for parts in top))
            else:
                self._single = self.repositories == "single"
        return self._single

    def _split(self, filepath: str) -> tuple[str, str, str]:
        """(repository, path inside it, the repository's root inside the data folder)."""
        parts = PurePosixPath(filepath).parts
        if self._is_single() or len(parts) == 1:
            return Path(self.data_folder.path).name, filepath, ""
        return parts[0], str(PurePosixPath(*parts[1:])), parts[0]

    def _repository_licences(self, root: str) -> tuple[list[str], str]:
        if root not in self._licences:
            found: list[str] = []
            kinds: list[str] = []
            listing = self.data_folder.list_files(subdirectory=root, recursive=False) if root else \
                self.data_folder.list_files(recursive=False)
            for path in sorted(listing):
                name = PurePosixPath(path).name
                if not LICENCE_FILE.match(name):
                    continue
                full = f"{root}/{path}" if root and not path.startswith(f"{root}/") else path
                with self.data_folder.open(full, "rb", compression=None) as handle:
                    text = handle.read(256 << 10).decode("utf-8", "replace")
                found.append(name)
                kind = guess_licence(text)
                if kind not in kinds:
                    kinds.append(kind)
            self._licences[root] = (found, "+".join(kinds) if kinds else "none")
        return self._licences[root]

    def read_file(self, filepath: str) -> DocumentsPipeline:
        repository, path, root = self._split(filepath)
        if LICENCE_FILE.match(PurePosixPath(filepath).name):
            self.stat_update("licence_files")
            return
        read = self._read_bounded(filepath)
        if read is None:
            return
        with self.track_time():
            data, size = read
            where = {"file": filepath, "line": 0, "repository": repository}
            if b"\x00" in data:
                self._reject("binary_file", filepath, "", **where, bytes=size,
                             error="a NUL byte: a binary file, not source code")
                return
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as err:
                self._reject("undecodable_bytes", filepath, data[:QUARANTINE_HEAD].decode("utf-8", "replace"),
                             **where, error=f"{err}; re-encode the file as UTF-8")
                return
            if not text.strip():
                self._reject("empty_file", filepath, "", **where, error="the file holds only whitespace")
                return
            language = programming_language(path)
            if language is None:
                self._reject("unknown_language", filepath, text[:QUARANTINE_HEAD], **where,
                             error=f"no language for {PurePosixPath(path).name!r}; add its extension to "
                             "LANGUAGE_BY_EXTENSION")
                return
            licence_files, licence = self._repository_licences(root)
            doc = self._emit(f"{repository}/{path}", text, {
                "repository": repository, "path": path, "programming_language": language,
                "extension": PurePosixPath(path).suffix.lower(), "licence": licence,
                "licence_files": licence_files, "bytes": size, "origin": f"code:{repository}"})
        yield doc


class SavedDatasetReader(_ListingReader):
    """Hugging Face datasets written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, read with pyarrow
    from their Arrow stream files (no `datasets` import). The data files of each split are the ones its
    `state.json` lists; `split` (the folder, "" for a lone Dataset) and origin `hf:<folder name>` (unless a
    column gives one) go into the metadata with every other column. A row without an id column gets
    `<arrow file>#<row>`.

    Row reasons are `RawJsonlReader`'s (invalid_text for a null/empty/non-string text, nul_character,
    invalid_metadata, too_large, undecodable_bytes for a string that is not UTF-8); file reasons:
    wrong_schema (no string `text_key` column), corrupt_file (also an unreadable `state.json`), empty_file
    (zero bytes, no row, or a split without data files: its `state.json` is named).
    """

    name = "🤗 Saved dataset (validating)"

    def list_files(self, rank: int) -> list[str]:
        files = self.data_folder.list_files(recursive=True)
        states = [path for path in files if PurePosixPath(path).name == "state.json"]
        if not states:
            return [path for path in files if path.endswith(".arrow")]
        listed = []
        for state in states:
            entries = self._data_files(state)
            folder = PurePosixPath(state).parent
            # a split without data files, or whose state.json cannot be read, is listed itself (and quarantined)
            listed += [str(folder / entry) for entry in entries] if entries and isinstance(entries, list) else [state]
        return listed

    def _data_files(self, state: str) -> list[str] | str:
        """The data files a split's `state.json` lists, or what is wrong with it."""
        try:
            with self.data_folder.open(state, "rb", compression=None) as handle:
                entries = orjson.loads(handle.read()).get("_data_files", [])
            return [entry["filename"] for entry in entries]
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError) as err:
            return f"not a state.json that `save_to_disk` writes ({err!r})"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import pyarrow as pa

        if PurePosixPath(filepath).name == "state.json":
            problem = self._data_files(filepath)
            if isinstance(problem, str):
                self._reject_file("corrupt_file", filepath, 0, f"{problem}; save the split again")
            else:
                self._reject_file("empty_file", filepath, 0, "the split lists no data file (an empty split)")
            return
        split = str(PurePosixPath(filepath).parent)
        split = "" if split == "." else split
        if not self.data_folder.exists(filepath):
            self._reject_file("corrupt_file", filepath, 0, "a data file its split's state.json lists is missing; "
                              "save the dataset again")
            return
        if self.data_folder.size(filepath) == 0:
            self._reject_file("empty_file", filepath, 0, "a zero-byte Arrow file")
            return
        row = 0
        try:
            with self.data_folder.open(filepath, "rb", compression=None) as handle:
                stream = pa.ipc.open_stream(handle)
                field = stream.schema.field(self.text_key) if self.text_key in stream.schema.names else None
                if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
                    self._reject_file("wrong_schema", filepath, 0, f"the dataset has no string column "
                                      f"{self.text_key!r} (its schema: {stream.schema.to_string()[:300]}); set "
                                      "text_key to the text column")
                    return
                has_id = self.id_key in stream.schema.names
                for batch in stream:
                    for offset in range(0, batch.num_rows, PARQUET_BATCH_ROWS):
                        for data, undecodable in arrow_rows(batch.slice(offset, PARQUET_BATCH_ROWS)):
                            row += 1
                            where = {"file": filepath, "line": row}
                            if not has_id:
                                data[self.id_key] = f"{filepath}#{row}"
                            data.setdefault("split", split)
                            data.setdefault("origin", f"hf:{Path(self.data_folder.path).name}")
                            if undecodable is not None:
                                self._reject_undecodable_row(data, undecodable, filepath, where)
                                continue
                            text = data.get(self.text_key)
                            size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
                            if size > self.max_doc_bytes:
                                self._reject("too_large", str(data[self.id_key]), text[:QUARANTINE_HEAD],
                                             **where, bytes=size, limit=self.max_doc_bytes)
                                continue
                            with self.track_time():
                                doc, _ = self._accept(self._document(data, None, where))
                            if doc is not None:
                                yield doc
        except (pa.ArrowException, OSError) as err:
            self._reject("corrupt_file", f"{filepath}#{row + 1}", "", file=filepath, line=row + 1,
                         error=f"{err!r}; rows 1-{row} were read")
            return
        if row == 0:
            self._reject_file("empty_file", filepath, 0, "the Arrow file holds no row")


READER_KINDS: dict[str, type[QuarantiningReader]] = {
    "jsonl": RawJsonlReader, "warc": WarcRecordReader, "html": HtmlTreeReader, "code": CodeTreeReader,
    "hf_saved": SavedDatasetReader,
}


def detect_reader_kind(raw_dir: Path) -> str:
    """Which reader a raw folder needs, from what it holds: JSONL/Parquet files win (so a stray file next to
    them is still quarantined as `unsupported_file`), then a saved dataset (`state.json` + `.arrow`), WARC
    files, a code tree (at least as many source files as HTML pages, or a `.git`), an HTML tree; an empty or
    unrecognised folder gets the JSONL reader, which quarantines each file it cannot read."""
    raw_dir = Path(raw_dir)
    files = [p for p in raw_dir.rglob("*") if p.is_file()] if raw_dir.is_dir() else []
    names = [str(p.relative_to(raw_dir)) for p in files]
    own = [n for n in names if not is_vendored(n)]
    if any(raw_file_format(n) for n in own):
        return "jsonl"
    if any(n.endswith(".arrow") for n in own) and any(Path(n).name in ("state.json", "dataset_dict.json")
                                                       for n in own):
        return "hf_saved"
    if any(n.endswith(WARC_SUFFIXES) for n in own):
        return "warc"
    pages = sum(n.lower().endswith(HTML_SUFFIXES) for n in own)
    code = sum(programming_language(n) not in (None, "HTML", "CSS", "Text", "JSON") for n in own)
    if (code and code >= pages) or (raw_dir / ".git").is_dir():
        return "code"
    if pages:
        return "html"
    return "jsonl"


def reader_for(raw_dir: str | Path, quarantine_folder: DataFolderLike, kind: str | None = None,
               max_doc_bytes: int | None = None, **kwargs: Any) -> BaseDiskReader:
    """The validating reader for a raw source folder: `kind` (one of `READER_KINDS`) or, when None, the one
    `detect_reader_kind` picks. `max_doc_bytes` None keeps each reader's default (4 MiB; 1 MiB for code)."""
    kind = kind or detect_reader_kind(Path(raw_dir))
    if kind not in READER_KINDS:
        raise CurationConfigError(f"reader kind {kind!r} is not one of {', '.join(READER_KINDS)}", ["kind"])
    if max_doc_bytes is not None:
        kwargs["max_doc_bytes"] = max_doc_bytes
    return READER_KINDS[kind](str(raw_dir), quarantine_folder=quarantine_folder, **kwargs)


__all__ = [
    "CODE_MAX_FILE_BYTES", "HTML_SUFFIXES", "LANGUAGE_BY_EXTENSION", "LICENCE_RULES", "MAX_DOC_BYTES",
    "READER_KINDS", "VENDORED_DIRS", "WARC_SUFFIXES", "CodeTreeReader", "HtmlTreeReader", "SavedDatasetReader",
    "WarcRecordReader", "decode_html", "detect_reader_kind", "guess_licence", "programming_language",
    "reader_for",
]
