"""Acceptance of issue 10, part one: every reader x every kind of bad record.

For each reader `reader_for` picks (JSONL, .jsonl.gz, .jsonl.zst, Parquet, WARC, HTML tree, code tree, saved
Hugging Face dataset) and each bad kind that applies to its format (invalid UTF-8, NUL bytes, empty, huge,
wrong schema), bad records are planted between real documents, in two files so that both tasks of a real
`LocalPipelineExecutor` run read some. The run must finish, every good document must come out unchanged,
every bad one must be in the quarantine folder with its reason and file, and the `dropped_quarantine_<reason>`
counts must equal what was planted.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import shutil
import struct
import sysconfig
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.manifest import DATA_DIR, MANIFEST_NAME, ShardManifest, SourceEntry
from mixlab.curation.readers import QUARANTINE_HEAD, QUARANTINE_PREFIX
from mixlab.curation.source_readers import detect_reader_kind, reader_for
from mixlab.pipelines.corpus import Downloads, SourceUnavailable, default_cache_dir, iter_raw_documents

MAX_DOC_BYTES = 256 << 10  # small, so that a "huge" record is a real document a few times over
STDLIB = Path(sysconfig.get_paths()["stdlib"])
STDLIB_FILES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py", "glob.py"]
DOC_PAGES = ["about.html", "bugs.html", "copyright.html", "download.html", "howto/pyporting.html",
             "howto/ipaddress.html"]
HUGE_PAGE = "contents.html"  # 2.5 MB: the whole documentation's table of contents
KINDS = ("invalid_utf8", "nul", "empty", "huge", "wrong_schema")
BAD_UTF8 = b"\xff\xfe"


@dataclass
class PlantedSource:
    """A raw folder of good documents with bad records between them, and what a reader must make of it."""

    raw: Path
    reader_kind: str  # what `detect_reader_kind` must pick
    good: dict[str, str]  # key (id, or URL for WARC) -> text, as the reader must give it
    bad: Counter = field(default_factory=Counter)  # (file, reason) -> planted records
    key: Callable[[dict], str] = lambda doc: doc["id"]


@dataclass
class RunResult:
    docs: list[dict]
    quarantine: list[dict]
    stats: dict[str, float]


def run_pipeline(planted: PlantedSource, work: Path) -> RunResult:
    """The reader `reader_for` picks, then a JSONL writer, through datatrove's executor (2 tasks)."""
    reader = reader_for(planted.raw, str(work / "quarantine"), max_doc_bytes=MAX_DOC_BYTES)
    writer = JsonlWriter(str(work / "out"), output_filename="${rank}.jsonl.gz")
    merged = LocalPipelineExecutor([reader, writer], tasks=2, workers=1, logging_dir=str(work / "logs")).run()
    stats = {name: metric.total for name, metric in merged.stats[0].stats.items()}

    def records(folder: Path) -> list[dict]:
        return [json.loads(line) for path in sorted(folder.glob("*.jsonl.gz"))
                for line in gzip.decompress(path.read_bytes()).splitlines()]

    return RunResult(records(work / "out"), records(work / "quarantine"), stats)


# --- real documents -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_docs(raw_corpus: Path) -> list[dict]:
    """Real raw records (id, text, metadata) of the test corpus."""
    return list(itertools.islice(iter_raw_documents(raw_corpus / "math"), 8))


@pytest.fixture(scope="module")
def python_docs() -> Path:
    try:
        root = Downloads(default_cache_dir()).deb("python3.11-doc")
    except SourceUnavailable as err:  # pragma: no cover - the package cache is part of the test corpus
        pytest.skip(str(err))
    return root / "usr/share/doc/python3.11/html"


def _spliced(data: bytes, insert: bytes) -> bytes:
    """`insert` in the middle of `data`, at a line start (never inside a multi-byte character)."""
    middle = data.index(b"\n", len(data) // 2) + 1
    return data[:middle] + insert + data[middle:]


def _repeated(text: str, size: int = MAX_DOC_BYTES + 4096) -> str:
    return (text + "\n") * (size // len(text.encode()) + 1)


# --- JSONL: plain, gzip, zstandard ----------------------------------------------------------------------


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".jsonl.gz":
        return gzip.compress(data)
    if suffix == ".jsonl.zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _json_line(doc_id: str, raw_text: bytes) -> bytes:
    """A JSON line whose text holds `raw_text` as is (e.g. bytes that are not UTF-8, a raw NUL)."""
    return b'{"id": "' + doc_id.encode() + b'", "text": "' + raw_text + b'", "metadata": {}}'


def _escaped(text: str) -> bytes:
    return json.dumps(text)[1:-1].encode()


def jsonl_source(raw: Path, suffix: str, kind: str, docs: list[dict]) -> PlantedSource:
    """Two files of real records, bad lines of `kind` between them; `empty` also plants empty files."""
    sample = docs[0]["text"]
    bad_lines: dict[str, list[bytes]] = {
        "invalid_utf8": [_json_line("bad-utf8", _escaped(sample[:40]) + BAD_UTF8)],
        "nul": [_json_line("raw-nul", _escaped(sample[:40]) + b"\x00"),
                json.dumps({"id": "escaped-nul", "text": sample[:40] + "\u0000", "metadata": {}}).encode()],
        "empty": [json.dumps({"id": "empty-text", "text": ""}).encode(),
                  json.dumps({"id": "blank-text", "text": " \n\t "}).encode()],
        "huge": [json.dumps({"id": "huge", "text": _repeated(sample), "metadata": docs[0]["metadata"]}).encode()],
        "wrong_schema": [json.dumps({"id": "no-text", "metadata": docs[0]["metadata"]}).encode(),
                         json.dumps({"id": "text-number", "text": 12345}).encode(),
                         json.dumps({"id": "text-list", "text": [sample]}).encode(),
                         json.dumps([sample]).encode()],
    }
    reasons = {"invalid_utf8": ["undecodable_bytes"], "nul": ["nul_byte", "nul_character"],
               "empty": ["invalid_text"] * 2, "huge": ["too_large"],
               "wrong_schema": ["invalid_text"] * 3 + ["not_an_object"]}
    raw.mkdir(parents=True)
    planted = PlantedSource(raw, "jsonl", {d["id"]: d["text"] for d in docs})
    half = len(docs) // 2
    for number, part in enumerate((docs[:half], docs[half:])):
        name = f"{number:05d}{suffix}"
        lines = [json.dumps(doc, ensure_ascii=False).encode() for doc in part]
        lines[1:1] = bad_lines[kind]  # after the first good record, before the others
        (raw / name).write_bytes(_compress(b"\n".join(lines) + b"\n", suffix))
        planted.bad.update((name, reason) for reason in reasons[kind])
    if kind == "empty":
        (raw / f"00002{suffix}").write_bytes(b"")
        (raw / f"00003{suffix}").write_bytes(_compress(b"\n\n", suffix))  # records: none
        planted.bad.update({(f"00002{suffix}", "empty_file"): 1, (f"00003{suffix}", "empty_file"): 1})
    return planted


# --- Parquet ----------------------------------------------------------------------------------------------


def unchecked_strings(values: list[bytes | None]) -> pa.Array:
    """A string array built from raw bytes without UTF-8 validation (what a broken writer leaves on disk)."""
    offsets, data = [0], b""
    for value in values:
        data += value or b""
        offsets.append(len(data))
    validity = pa.array([v is not None for v in values]).buffers()[1] if None in values else None
    return pa.Array.from_buffers(pa.string(), len(values), [validity, pa.py_buffer(struct.pack(
        f"<{len(offsets)}i", *offsets)), pa.py_buffer(data)])


def parquet_source(raw: Path, kind: str, docs: list[dict]) -> PlantedSource:
    """Two Parquet files of real records with bad rows among them; `empty` and `wrong_schema` add files."""
    sample = docs[0]["text"]
    raw.mkdir(parents=True)
    planted = PlantedSource(raw, "jsonl", {d["id"]: d["text"] for d in docs})
    bad_rows: dict[str, list[tuple[str, bytes | None, str]]] = {  # (id, text bytes, reason)
        "invalid_utf8": [("bad-utf8", sample[:40].encode() + BAD_UTF8, "undecodable_bytes")],
        "nul": [("nul", sample[:40].encode() + b"\x00", "nul_character")],
        "empty": [("empty-text", b"", "invalid_text"), ("null-text", None, "invalid_text")],
        "huge": [("huge", _repeated(sample).encode(), "too_large")],
        "wrong_schema": [],
    }
    half = len(docs) // 2
    for number, part in enumerate((docs[:half], docs[half:])):
        name = f"{number:05d}.parquet"
        rows = [(d["id"], d["text"].encode(), None) for d in part]
        rows[1:1] = bad_rows[kind]
        table = pa.table({"id": [r[0] for r in rows], "text": unchecked_strings([r[1] for r in rows]),
                          "metadata": [json.dumps(d["metadata"]) for d in part[:1]] + [None] * (len(rows) - 1)})
        pq.write_table(table, raw / name)
        planted.bad.update((name, reason) for _, _, reason in bad_rows[kind])
    if kind == "empty":
        (raw / "00002.parquet").write_bytes(b"")
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                       raw / "00003.parquet")
        planted.bad.update({("00002.parquet", "empty_file"): 1, ("00003.parquet", "empty_file"): 1})
    if kind == "wrong_schema":  # no text column; a text column of numbers: each row is quarantined
        pq.write_table(pa.table({"id": ["body-1", "body-2"], "body": [sample, sample]}), raw / "00002.parquet")
        pq.write_table(pa.table({"id": ["int-1", "int-2", "int-3"], "text": [1, 2, 3]}), raw / "00003.parquet")
        planted.bad.update({("00002.parquet", "invalid_text"): 2, ("00003.parquet", "invalid_text"): 3})
    return planted


# --- saved Hugging Face dataset ---------------------------------------------------------------------------


def saved_dataset_source(raw: Path, kind: str, docs: list[dict]) -> PlantedSource:
    """A `DatasetDict.save_to_disk` folder: splits `train` and `test` of real records with bad rows; `empty`
    adds an empty split, `wrong_schema` splits without a string text column."""
    datasets = pytest.importorskip("datasets")
    from datasets.table import InMemoryTable
    sample = docs[0]["text"]
    planted = PlantedSource(raw, "hf_saved", {d["id"]: d["text"] for d in docs})
    bad_rows = {
        "invalid_utf8": [("bad-utf8", sample[:40].encode() + BAD_UTF8, "undecodable_bytes")],
        "nul": [("nul", sample[:40].encode() + b"\x00", "nul_character")],
        "empty": [("empty-text", b"", "invalid_text"), ("null-text", None, "invalid_text")],
        "huge": [("huge", _repeated(sample).encode(), "too_large")],
        "wrong_schema": [],
    }[kind]
    splits = {}
    half = len(docs) // 2
    for split, part in (("train", docs[:half]), ("test", docs[half:])):
        rows = [(d["id"], d["text"].encode(), None) for d in part]
        rows[1:1] = bad_rows
        table = pa.table({"id": [r[0] for r in rows], "text": unchecked_strings([r[1] for r in rows]),
                          "source": [d["metadata"]["source"] for d in part[:1]] * len(rows)})
        splits[split] = datasets.Dataset(InMemoryTable(table))
        planted.bad.update((f"{split}/data-00000-of-00001.arrow", reason) for _, _, reason in bad_rows)
    if kind == "empty":  # an empty split: `save_to_disk` writes no data file for it, only its state.json
        splits["validation"] = datasets.Dataset(InMemoryTable(pa.table({"id": pa.array([], pa.string()),
                                                                         "text": pa.array([], pa.string())})))
        planted.bad[("validation/state.json", "empty_file")] = 1
    if kind == "wrong_schema":
        splits["other"] = datasets.Dataset.from_dict({"id": ["c-1"], "content": [sample]})
        splits["numbers"] = datasets.Dataset.from_dict({"id": ["n-1", "n-2"], "text": [1, 2]})
        planted.bad.update({("other/data-00000-of-00001.arrow", "wrong_schema"): 1,
                            ("numbers/data-00000-of-00001.arrow", "wrong_schema"): 1})
    datasets.DatasetDict(splits).save_to_disk(str(raw))
    if kind == "empty":  # and a data file cut to zero bytes
        (raw / "test" / "data-00000-of-00001.arrow").write_bytes(b"")
        planted.bad[("test/data-00000-of-00001.arrow", "empty_file")] = 1
        planted.good = {d["id"]: d["text"] for d in docs[:half]}
        planted.bad -= Counter({("test/data-00000-of-00001.arrow", "invalid_text"): 2})
    if kind == "wrong_schema":  # a split whose state.json is not one
        (raw / "broken").mkdir()
        (raw / "broken" / "state.json").write_text('["not", "a", "state"]')
        planted.bad[("broken/state.json", "corrupt_file")] = 1
    return planted


# --- WARC -------------------------------------------------------------------------------------------------


def warc_record(url: str, body: bytes, content_type: str, gzipped: bool) -> bytes:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    out = io.BytesIO()
    writer = WARCWriter(out, gzip=gzipped)
    headers = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
    writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers))
    return out.getvalue()


def warc_source(raw: Path, kind: str, html: Path) -> PlantedSource:
    """Two WARC files (gzip members, and plain) of Python documentation pages with bad records between."""
    base = "https://docs.python.org/3.11/"
    page = (html / DOC_PAGES[0]).read_bytes()
    bad: dict[str, list[tuple[str, bytes, str]]] = {  # (url, body, reason)
        "invalid_utf8": [("bad-utf8.html", _spliced(page, BAD_UTF8), "undecodable_bytes")],
        "nul": [("nul.html", _spliced(page, b"\x00"), "nul_byte")],
        "empty": [("empty.html", b"", "empty_record"), ("blank.html", b" \r\n ", "empty_record")],
        "huge": [(HUGE_PAGE, (html / HUGE_PAGE).read_bytes(), "too_large")],
        "wrong_schema": [],  # a record that is not a WARC record at all, below
    }
    raw.mkdir(parents=True)
    planted = PlantedSource(raw, "warc", {}, key=lambda doc: doc["metadata"]["url"])
    for number, (gzipped, pages) in enumerate(((True, DOC_PAGES[:3]), (False, DOC_PAGES[3:]))):
        name = f"crawl-{number}.warc" + (".gz" if gzipped else "")
        records = [warc_record(base + p, (html / p).read_bytes(), "text/html", gzipped) for p in pages]
        planted.good.update({base + p: (html / p).read_text("utf-8") for p in pages})
        planted_records = [warc_record(base + url, body, "text/html", gzipped) for url, body, _ in bad[kind]]
        if kind == "wrong_schema":  # an HTTP response where a WARC record should start
            not_warc = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n" + page + b"\r\n\r\n"
            planted_records.append(gzip.compress(not_warc) if gzipped else not_warc)
            planted.bad[(name, "corrupt_record")] += 1
        records[1:1] = planted_records
        (raw / name).write_bytes(b"".join(records))
        planted.bad.update((name, reason) for _, _, reason in bad[kind])
    if kind == "empty":
        (raw / "crawl-2.warc.gz").write_bytes(b"")
        planted.bad[("crawl-2.warc.gz", "empty_file")] = 1
    return planted


# --- HTML tree --------------------------------------------------------------------------------------------


def html_source(raw: Path, kind: str, html: Path) -> PlantedSource:
    """A tree of Python documentation pages (two folders) with bad pages among them."""
    page = (html / DOC_PAGES[0]).read_bytes()
    bad: dict[str, list[tuple[str, bytes, str]]] = {  # (path, bytes, reason)
        "invalid_utf8": [("docs/bad-utf8.html", _spliced(page, BAD_UTF8), "undecodable_bytes")],
        "nul": [("howto/nul.html", _spliced(page, b"\x00"), "nul_byte")],
        "empty": [("docs/empty.html", b"", "empty_file"), ("howto/blank.htm", b" \n\t\n", "empty_file")],
        "huge": [(f"docs/{HUGE_PAGE}", (html / HUGE_PAGE).read_bytes(), "too_large")],
    }[kind]
    planted = PlantedSource(raw, "html", {})
    for name in DOC_PAGES:
        target = raw / ("docs/" + name if "/" not in name else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(html / name, target)
        planted.good[target.relative_to(raw).as_posix()] = (html / name).read_text("utf-8")
    for path, data, reason in bad:
        (raw / path).write_bytes(data)
        planted.bad[(path, reason)] += 1
    return planted


# --- code tree --------------------------------------------------------------------------------------------


def code_source(raw: Path, kind: str) -> PlantedSource:
    """One repository (CPython's licence at its root) of stdlib modules with bad files among them."""
    source = (STDLIB / STDLIB_FILES[0]).read_bytes()
    bad: dict[str, list[tuple[str, bytes, str]]] = {  # (path, bytes, reason)
        "invalid_utf8": [("Lib/bad_utf8.py", _spliced(source, b"# " + BAD_UTF8 + b"\n"), "undecodable_bytes")],
        "nul": [("Lib/nul.py", _spliced(source, b"\x00"), "binary_file")],
        "empty": [("Lib/empty.py", b"", "empty_file"), ("Tools/blank.py", b"\n\n   \n", "empty_file")],
        "huge": [("Lib/huge_generated.py", _repeated(source.decode()).encode(), "too_large")],
        "wrong_schema": [("Lib/data.unknownext", b"a file of no known language\n", "unknown_language")],
    }[kind]
    planted = PlantedSource(raw, "code", {})
    (raw / "Lib").mkdir(parents=True)
    (raw / "Tools").mkdir()
    shutil.copy(STDLIB / "LICENSE.txt", raw / "LICENSE")
    for number, name in enumerate(STDLIB_FILES):
        path = f"{'Lib' if number % 2 else 'Tools'}/{name}"
        shutil.copy(STDLIB / name, raw / path)
        planted.good[f"{raw.name}/{path}"] = (STDLIB / name).read_text("utf-8")
    for path, data, reason in bad:
        (raw / path).write_bytes(data)
        planted.bad[(path, reason)] += 1
    return planted


# --- the matrix -------------------------------------------------------------------------------------------

READERS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "warc", "html", "code", "hf_saved")
NOT_APPLICABLE = {("html", "wrong_schema")}  # a page has no schema; other files are not pages (counted skips)
MATRIX = [(reader, kind) for reader in READERS for kind in KINDS if (reader, kind) not in NOT_APPLICABLE]


@pytest.mark.parametrize(("reader", "kind"), MATRIX, ids=[f"{r}-{k}" for r, k in MATRIX])
def test_bad_records_are_quarantined_by_every_reader(reader: str, kind: str, tmp_path: Path, request):
    raw = tmp_path / "raw"
    if reader.startswith("jsonl"):
        planted = jsonl_source(raw, f".{reader}", kind, request.getfixturevalue("math_docs"))
    elif reader == "parquet":
        planted = parquet_source(raw, kind, request.getfixturevalue("math_docs"))
    elif reader == "hf_saved":
        planted = saved_dataset_source(raw, kind, request.getfixturevalue("math_docs"))
    elif reader == "warc":
        planted = warc_source(raw, kind, request.getfixturevalue("python_docs"))
    elif reader == "html":
        planted = html_source(raw, kind, request.getfixturevalue("python_docs"))
    else:
        planted = code_source(raw, kind)
    assert planted.bad, "every case plants at least one bad record"
    assert detect_reader_kind(raw) == planted.reader_kind

    result = run_pipeline(planted, tmp_path / "run")

    # every good document came out, unchanged, and nothing else did
    assert {planted.key(doc): doc["text"] for doc in result.docs} == planted.good
    assert len(result.docs) == len(planted.good)
    # every bad record is in quarantine with its reason and the file it came from
    found = Counter((r["metadata"]["file"], r["metadata"]["quarantine_reason"]) for r in result.quarantine)
    assert found == planted.bad
    assert all(r["metadata"]["quarantine_step"] == "read" and len(r.get("text", "")) <= QUARANTINE_HEAD
               for r in result.quarantine)
    # and the counts say the same: per reason, and in total
    per_reason = Counter()
    for (_, reason), n in planted.bad.items():
        per_reason[f"dropped_{QUARANTINE_PREFIX}{reason}"] += n
    dropped = {k: v for k, v in result.stats.items() if k.startswith("dropped_")}
    assert dropped == dict(per_reason)
    assert result.stats[StatHints.forwarded] == len(planted.good)
    assert result.stats[StatHints.total] == len(planted.good) + sum(planted.bad.values())


# --- part two: every drop reason is counted, and the counts add up --------------------------------------

RECIPE_SOURCES = {"web-en": "web", "code-python": "code", "math": "math", "chat": "chat"}


def parquet_rows(curated: Path, source: str) -> int:
    """Documents the curated Parquet shards of `source` hold, read from the files themselves."""
    shards = sorted((curated / DATA_DIR / source).glob("*.parquet"))
    assert shards, f"{source}: no curated shard under {curated / DATA_DIR / source}"
    return sum(pq.ParquetFile(path).metadata.num_rows for path in shards)


def assert_counts_add_up(entry: SourceEntry, curated: Path, raw_docs: int) -> None:
    """The funnel of one source, checked from its numbers, not with `check_accounting`."""
    steps = entry.steps
    assert steps and steps[0].name == "read"
    assert steps[0].docs_in == raw_docs  # every raw record entered the funnel
    for prev, step in itertools.pairwise(steps):
        assert step.docs_in == prev.kept, f"{entry.name}: {step.name} got {step.docs_in}, {prev.name} kept {prev.kept}"
    for step in steps:
        assert all(isinstance(n, int) and n > 0 for n in step.dropped.values()), (entry.name, step)
        assert step.docs_in - step.kept == sum(step.dropped.values()), (entry.name, step)
    assert steps[-1].kept == entry.docs == parquet_rows(curated, entry.name)
    assert sum(shard.docs for shard in entry.shards) == entry.docs
    quarantine_drops = sum(n for step in steps for r, n in step.dropped.items() if r.startswith(QUARANTINE_PREFIX))
    assert entry.quarantined == quarantine_drops
    assert entry.check_accounting() == []


@pytest.mark.parametrize("source", sorted(RECIPE_SOURCES))
def test_every_drop_is_counted_and_the_counts_add_up(source: str, curated_dir: Path, raw_corpus: Path):
    entry = ShardManifest.load(curated_dir).source(source)
    assert entry.kind == RECIPE_SOURCES[source]
    assert_counts_add_up(entry, curated_dir, sum(1 for _ in iter_raw_documents(raw_corpus / source)))
    assert any(step.dropped for step in entry.steps), f"{source}: the test corpus drops something"


def test_the_multilingual_recipe_adds_up(raw_corpus: Path, tmp_path: Path):
    from mixlab.pipelines.curate import curate
    from mixlab.pipelines.multilingual import multilingual_pipeline

    curated = tmp_path / "curated"
    recipe = {"web-en": lambda raw, cur, tasks: multilingual_pipeline(raw, cur, "en", source="web-en", tasks=tasks)}
    manifest = curate(raw_corpus, curated, sources=["web-en"], tasks=2, workers=1, recipes=recipe,
                      console=io.StringIO())
    entry = manifest.source("web-en")
    names = [step.name for step in entry.steps]
    # the recipe's own steps ran (its docstring's order), not the web recipe's
    assert names[:2] == ["read", "extract"] and "language_stats_step" in names and "url_filter" not in names
    assert any(step.dropped for step in entry.steps)
    assert_counts_add_up(entry, curated, sum(1 for _ in iter_raw_documents(raw_corpus / "web-en")))


def _tampered(curated_dir: Path, tmp_path: Path, change: Callable[[dict], None]) -> SourceEntry:
    """The math entry of a copy of the fixture's manifest, with `change` applied to its JSON."""
    data = json.loads((curated_dir / MANIFEST_NAME).read_text())
    change(data["sources"]["math"])
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(data))
    return ShardManifest.load(tmp_path).source("math")


def test_check_accounting_catches_a_broken_count(curated_dir: Path, tmp_path: Path):
    assert _tampered(curated_dir, tmp_path, lambda entry: None).check_accounting() == []
    filter_step = next(i for i, step in enumerate(ShardManifest.load(curated_dir).source("math").steps)
                       if step.dropped)

    def more_dropped(entry: dict) -> None:  # a drop reason over-counted
        dropped = entry["steps"][filter_step]["dropped"]
        dropped[next(iter(dropped))] += 1

    def lost_between_steps(entry: dict) -> None:  # a step keeps one less, its drops unchanged
        entry["steps"][filter_step]["kept"] -= 1

    def shards_disagree(entry: dict) -> None:
        entry["docs"] += 1

    for change, step_name in ((more_dropped, True), (lost_between_steps, True), (shards_disagree, False)):
        problems = _tampered(curated_dir, tmp_path, change).check_accounting()
        assert problems, change.__name__
        assert all(p.startswith("math:") for p in problems)
        if step_name:
            name = ShardManifest.load(curated_dir).source("math").steps[filter_step].name
            assert any(repr(name) in p for p in problems), problems
    broken_chain = _tampered(curated_dir, tmp_path, lost_between_steps).check_accounting()
    assert len(broken_chain) == 2  # its own in != kept + dropped, and the next step's input
