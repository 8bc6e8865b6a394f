"""The curated Parquet layout: `text`, `id`, and a `metadata` struct with a fixed set of fields.

`language` is a natural language (lid.176's two-letter code, or the corpus's `lang_hint`); the language
source code is written in is `programming_language`.

A fixed schema matters because datatrove's ParquetWriter otherwise infers it from the first document of
each file, and a later document with a field more or less (e.g. no `minhash_cluster_size` in a rank
without duplicates) breaks the file or a reader that concatenates shards.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document
from datatrove.io import DataFolderLike
from datatrove.pipeline.writers import ParquetWriter

METADATA_FIELDS: list[tuple[str, pa.DataType]] = [
    ("source", pa.string()),
    ("kind", pa.string()),
    ("language", pa.string()),
    ("language_score", pa.float64()),
    ("lang_hint", pa.string()),
    ("programming_language", pa.string()),  # code only; `language` is always a natural language
    ("code_kind", pa.string()),  # code only: source, data or config (CodeKindFilter)
    ("path", pa.string()),
    ("url", pa.string()),
    ("origin", pa.string()),
    ("minhash_cluster_size", pa.int64()),
    ("dup_cluster_size", pa.int64()),  # copies of this document dedup removed + 1 (FineWeb-2 rehydration)
    ("exact_cluster_size", pa.int64()),
    ("chars", pa.int64()),
    ("turns", pa.int64()),
    ("repository", pa.string()),  # code trees: the repository, its licence guess and licence files
    ("licence", pa.string()),
    ("date", pa.string()),  # WARC records
]
CURATED_SCHEMA = pa.schema(
    [("text", pa.string()), ("id", pa.string()), ("metadata", pa.struct([pa.field(n, t) for n, t in METADATA_FIELDS]))]
)


INT64_MAX = 2**63 - 1


def _cast(value: Any, kind: pa.DataType) -> Any:
    """`value` as the Python type of a schema field, or raise ValueError/TypeError when it cannot be one."""
    if kind == pa.string():
        if isinstance(value, str):
            return value
        return orjson.dumps(value).decode() if isinstance(value, bool | dict | list) else str(value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"a {type(value).__name__}")
    if kind == pa.int64():
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
        if number is None or abs(number) > INT64_MAX:
            raise ValueError(f"{value!r} is not a 64-bit whole number")
        return number
    return float(value)


def normalise_metadata(meta: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`meta` with each curated field cast to its Parquet type (`METADATA_FIELDS`: a number where a string
    goes is stringified, a numeric string where a number goes is parsed) and the problems of the fields that
    cannot be cast (they become None). Other keys are left as they are: the writer does not keep them.

    The reader quarantines a record with problems (naming its file and line); the writer casts what is left,
    so that an unexpected type set by a step never ends the run in pyarrow's ArrowTypeError.
    """
    out, problems = dict(meta), []
    for name, kind in METADATA_FIELDS:
        value = out.get(name)
        if value is None:
            continue
        try:
            out[name] = _cast(value, kind)
        except (TypeError, ValueError, OverflowError) as err:
            out[name] = None
            problems.append(f"metadata.{name} = {orjson.dumps(value, default=str).decode()[:80]} cannot be a "
                            f"{kind} ({err})")
    return out, problems


def curated_record(self, document: Document) -> dict:
    """ParquetWriter adapter: the fixed metadata fields, cast to their types, with defaults where a step did
    not set one."""
    meta, _ = normalise_metadata(document.metadata)
    record = {name: meta.get(name) for name, _ in METADATA_FIELDS}
    record["language"] = meta.get("language") or meta.get("lang_hint")
    record["minhash_cluster_size"] = meta.get("minhash_cluster_size") or 1
    record["chars"] = len(document.text)
    return {"text": document.text, "id": str(document.id), "metadata": record}


def curated_parquet_writer(output_folder: DataFolderLike) -> ParquetWriter:
    return ParquetWriter(output_folder, output_filename="${rank}.parquet", adapter=curated_record,
                         schema=CURATED_SCHEMA, compression="zstd")


DUPLICATE_ID = re.compile(r"#dup-[0-9a-f]{12}(-\d+)?$")  # what `unique_shard_ids` appends to a repeated id


def _renamed(doc_id: str, text: str, seen: set[str]) -> str:
    """A new id for a repeated one: the id, `#dup-` and the text's hash (a counter when that is taken too)."""
    base = f"{doc_id}#dup-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"
    candidate, n = base, 1
    while candidate in seen:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def unique_shard_ids(folder: Path) -> int:
    """Make the ids of a curated source unique across all its shards; returns how many ids carry a
    `#dup-<hash>` suffix (`DUPLICATE_ID`) afterwards.

    Ids are documented as unique within a source, but raw data can repeat one, and duplicates in files read
    by different ranks meet only here. The first occurrence (shards in name order, rows in order) keeps
    its id; each later one gets `#dup-<sha256 of its text>`. Only shards that change are rewritten, each
    atomically, and the decisions depend only on the shards' content in order, so a run killed half-way
    and run again ends with the same bytes. Memory: one id per document of the source.
    """
    seen: set[str] = set()
    suffixed = 0
    for path in sorted(folder.glob("*.parquet")):
        ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        repeated = [i for i, doc_id in enumerate(ids) if doc_id in seen or seen.add(doc_id)]
        if repeated:
            table = pq.read_table(path)  # its own schema: a scored shard has extra `*_score` metadata columns
            texts = table.column("text")
            new_ids = list(ids)
            for i in repeated:
                new_ids[i] = _renamed(ids[i], texts[i].as_py(), seen)
                seen.add(new_ids[i])
            table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(new_ids, pa.string()))
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
            ids = new_ids
        suffixed += sum(1 for doc_id in ids if DUPLICATE_ID.search(doc_id))
    return suffixed
