"""Curation: datatrove pipelines from raw sources to Parquet shards with a manifest, then token shards.

What other packages use comes from here, never from the modules: the manifest (the contract with every later
stage), the tokenizer and token shards, the train/val split, and the recipe-building API that
`pipelines/{web,code,math,chat,curate}.py` assemble sources from (steps, their settings, stage layout,
accounting, console hygiene).
"""

from mixlab.curation.accounting import build_source_entry
from mixlab.curation.console import quiet_datatrove_console
from mixlab.curation.dedup import MinhashSettings
from mixlab.curation.extract import EXTRACT_TIMEOUT_S, QuarantiningTrafilatura
from mixlab.curation.filters import (
    ChatFormatFilter,
    ChatFormatSettings,
    CodeQualityFilter,
    CodeQualitySettings,
    GopherSettings,
    MathQualityFilter,
    MathQualitySettings,
    gopher_filters,
)
from mixlab.curation.leakage import LeakageConfig, LeakageReport, held_out_leakage, record_leakage
from mixlab.curation.lid import LANGUAGE_THRESHOLD, BundledLanguageFilter
from mixlab.curation.manifest import (
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
from mixlab.curation.splits import SourceSplit, TokenizeConfig, split_source
from mixlab.curation.stages import SourceLayout, SourcePipelines, Stage, assemble_stages
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer
from mixlab.curation.token_shards import (
    TokenShard,
    TokenShardError,
    TokenSource,
    open_token_sources,
    tokenize_manifest,
)
from mixlab.curation.tokenizer import (
    TokenizerConfig,
    TokenizerError,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_path,
    train_tokenizer,
)

__all__ = [
    "LeakageConfig",
    "LeakageReport",
    "held_out_leakage",
    "record_leakage",
    # the manifest
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ManifestError",
    "ShardFile",
    "ShardManifest",
    "SourceEntry",
    "StepStats",
    "TokenizerInfo",
    "sha256_file",
    # tokenizer, train/val split, token shards
    "SourceSplit",
    "TokenShard",
    "TokenShardError",
    "TokenSource",
    "TokenizeConfig",
    "TokenizerConfig",
    "TokenizerError",
    "load_tokenizer",
    "open_token_sources",
    "split_source",
    "token_byte_lengths",
    "tokenize_manifest",
    "tokenizer_path",
    "train_tokenizer",
    # building curation recipes
    "EXTRACT_TIMEOUT_S",
    "LANGUAGE_THRESHOLD",
    "BundledLanguageFilter",
    "ChatFormatFilter",
    "ChatFormatSettings",
    "CodeQualityFilter",
    "CodeQualitySettings",
    "GopherSettings",
    "MathQualityFilter",
    "MathQualitySettings",
    "MinhashSettings",
    "QuarantiningTrafilatura",
    "RegexWordTokenizer",
    "SourceLayout",
    "SourcePipelines",
    "Stage",
    "WarmSpacyTokenizer",
    "assemble_stages",
    "build_source_entry",
    "gopher_filters",
    "quiet_datatrove_console",
]
