"""Curation: datatrove pipelines from raw sources to Parquet shards with a manifest, then token shards.

What other packages use comes from here, never from the modules: the manifest (the contract with every later
stage), the tokenizer and token shards, the train/val split, and the recipe-building API that
`pipelines/{web,code,math,chat,curate}.py` assemble sources from (steps, their settings, stage layout,
accounting, console hygiene).
"""

from mixlab.curation.accounting import (
    CountedStep,
    build_source_entry,
    count_plain_steps,
    stage_output_docs,
    stage_read_docs,
)
from mixlab.curation.console import CurationError, DocumentProgress, failed_task_log, quiet_datatrove_console
from mixlab.curation.datacard import read_front_matter, write_dataset_card
from mixlab.curation.dedup import MinhashSettings
from mixlab.curation.extract import EXTRACT_TIMEOUT_S, QuarantiningTrafilatura, flatten_deep_html
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
from mixlab.curation.lid import LANGUAGE_THRESHOLD, BundledLanguageFilter, CodeLanguageTagger
from mixlab.curation.manifest import (
    DATA_DIR,
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
from mixlab.curation.paths import PLAIN_NAME_RULE, name_problem, outside_problem, relative_path_problem
from mixlab.curation.readers import MAX_DOC_BYTES, RAW_FILE_SUFFIXES
from mixlab.curation.splits import SourceSplit, TokenizeConfig, split_source
from mixlab.curation.stages import SourceLayout, SourcePipelines, Stage, assemble_stages
from mixlab.curation.text import RegexWordTokenizer, WarmSpacyTokenizer
from mixlab.curation.token_shards import (
    DOCS_SUFFIX,
    DocColumnError,
    TokenShard,
    TokenShardError,
    TokenSource,
    TokenStream,
    open_token_sources,
    read_doc_metadata,
    tokenize_manifest,
)
from mixlab.curation.tokenizer import (
    MODEL_MAX_LENGTH,
    TokenizerConfig,
    TokenizerError,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_path,
    train_tokenizer,
    write_transformers_config,
)
from mixlab.curation.writers import DUPLICATE_ID, normalise_metadata, unique_shard_ids

__all__ = [
    "LeakageConfig",
    "LeakageReport",
    "held_out_leakage",
    "record_leakage",
    # the manifest and its dataset card
    "DATA_DIR",
    "read_front_matter",
    "write_dataset_card",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ManifestError",
    "ShardFile",
    "ShardManifest",
    "SourceEntry",
    "StepStats",
    "TokenizerInfo",
    "sha256_file",
    # names and paths read from data files stay inside their folder
    "PLAIN_NAME_RULE",
    "name_problem",
    "outside_problem",
    "relative_path_problem",
    # tokenizer, train/val split, token shards
    "SourceSplit",
    "DOCS_SUFFIX",
    "DocColumnError",
    "TokenShard",
    "TokenShardError",
    "TokenSource",
    "TokenStream",
    "read_doc_metadata",
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
    "MODEL_MAX_LENGTH",
    "write_transformers_config",
    # building curation recipes
    "DUPLICATE_ID",
    "MAX_DOC_BYTES",
    "RAW_FILE_SUFFIXES",
    "flatten_deep_html",
    "normalise_metadata",
    "unique_shard_ids",
    "EXTRACT_TIMEOUT_S",
    "LANGUAGE_THRESHOLD",
    "BundledLanguageFilter",
    "ChatFormatFilter",
    "ChatFormatSettings",
    "CodeLanguageTagger",
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
    # running recipes: plain steps counted, progress, a quiet console, errors that name the log
    "CountedStep",
    "CurationError",
    "DocumentProgress",
    "count_plain_steps",
    "failed_task_log",
    "quiet_datatrove_console",
    "stage_output_docs",
    "stage_read_docs",
]
