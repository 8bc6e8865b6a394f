"""Curation: datatrove pipelines from raw sources to Parquet shards with a manifest, then token shards."""

from curation.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ManifestError,
    ShardFile,
    ShardManifest,
    SourceEntry,
    StepStats,
    TokenizerInfo,
    sha256_file,
)

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ManifestError",
    "ShardFile",
    "ShardManifest",
    "SourceEntry",
    "StepStats",
    "TokenizerInfo",
    "sha256_file",
]
