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
from curation.token_shards import (
    TokenizeConfig,
    TokenShard,
    TokenShardError,
    TokenSource,
    open_token_sources,
    tokenize_manifest,
)
from curation.tokenizer import (
    TokenizerConfig,
    TokenizerError,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_path,
    train_tokenizer,
)

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ManifestError",
    "ShardFile",
    "ShardManifest",
    "SourceEntry",
    "StepStats",
    "TokenShard",
    "TokenShardError",
    "TokenSource",
    "TokenizeConfig",
    "TokenizerConfig",
    "TokenizerError",
    "TokenizerInfo",
    "load_tokenizer",
    "open_token_sources",
    "sha256_file",
    "token_byte_lengths",
    "tokenize_manifest",
    "tokenizer_path",
    "train_tokenizer",
]
