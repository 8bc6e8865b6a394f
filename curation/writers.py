"""The curated Parquet layout: `text`, `id`, and a `metadata` struct with a fixed set of fields.

`language` is a natural language (lid.176's two-letter code, or the corpus's `lang_hint`); the language
source code is written in is `programming_language`.

A fixed schema matters because datatrove's ParquetWriter otherwise infers it from the first document of
each file, and a later document with a field more or less (e.g. no `minhash_cluster_size` in a rank
without duplicates) breaks the file or a reader that concatenates shards.
"""

from __future__ import annotations

import pyarrow as pa
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
    ("path", pa.string()),
    ("url", pa.string()),
    ("origin", pa.string()),
    ("minhash_cluster_size", pa.int64()),
    ("chars", pa.int64()),
    ("turns", pa.int64()),
]
CURATED_SCHEMA = pa.schema(
    [("text", pa.string()), ("id", pa.string()), ("metadata", pa.struct([pa.field(n, t) for n, t in METADATA_FIELDS]))]
)


def curated_record(self, document: Document) -> dict:
    """ParquetWriter adapter: the fixed metadata fields, with defaults where a step did not set one."""
    meta = document.metadata
    record = {name: meta.get(name) for name, _ in METADATA_FIELDS}
    record["language"] = meta.get("language") or meta.get("lang_hint")
    record["minhash_cluster_size"] = int(meta.get("minhash_cluster_size") or 1)
    record["chars"] = len(document.text)
    if record["language_score"] is not None:
        record["language_score"] = float(record["language_score"])
    return {"text": document.text, "id": document.id, "metadata": record}


def curated_parquet_writer(output_folder: DataFolderLike) -> ParquetWriter:
    return ParquetWriter(output_folder, output_filename="${rank}.parquet", adapter=curated_record,
                         schema=CURATED_SCHEMA, compression="zstd")
