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
from mixlab.curation.classify import (  # noqa: I001 - after the modules it builds on
    ClassifierScorer,
    ClassifierTrainConfig,
    ExampleSpec,
    ScoreThresholdFilter,
    annotate_curated,
    load_classifier,
    train_classifier,
)
from mixlab.curation.console import CurationError, DocumentProgress, failed_task_log, quiet_datatrove_console
from mixlab.curation.datacard import read_front_matter, write_dataset_card
from mixlab.curation.decontam import (
    DecontamConfig,
    DecontaminationFilter,
    EvalSetIndex,
    build_eval_index,
    default_eval_sets,
)
from mixlab.curation.dedup import (
    ExactDedupSettings,
    MinHashIndex,
    MinhashSettings,
    NearDuplicatePair,
    SentenceDedupSettings,
)
from mixlab.curation.errors import CurationConfigError
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
from mixlab.curation.lid import (
    LANGUAGE_THRESHOLD,
    BundledFT176LID,
    BundledLanguageFilter,
    CodeLanguageTagger,
    derive_language_threshold,
    language_scores,
)
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
from mixlab.curation.multilingual import (
    DEFAULT_TAIL,
    LanguageStatsStep,
    LanguageThresholds,
    derive_thresholds,
    language_statistics,
    multilingual_filters,
)
from mixlab.curation.paths import PLAIN_NAME_RULE, name_problem, outside_problem, relative_path_problem
from mixlab.curation.pii import PiiRedaction, PiiSettings
from mixlab.curation.readers import MAX_DOC_BYTES, RAW_FILE_SUFFIXES, QuarantiningReader, RawJsonlReader
from mixlab.curation.source_readers import (
    READER_KINDS,
    CodeTreeReader,
    HtmlTreeReader,
    SavedDatasetReader,
    WarcRecordReader,
    detect_reader_kind,
    reader_for,
)
from mixlab.curation.splits import SourceSplit, TokenizeConfig, split_source
from mixlab.curation.stages import SourceLayout, SourcePipelines, Stage, assemble_stages
from mixlab.curation.text import (
    RegexWordTokenizer,
    ScriptRunTokenizer,
    SpacySentencizerTokenizer,
    WarmSpacyTokenizer,
    offline_word_tokenizer,
)
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
    default_tokenizer_name,
    install_tokenizer,
    load_tokenizer,
    token_byte_lengths,
    tokenizer_path,
    train_tokenizer,
    write_transformers_config,
)
from mixlab.curation.tokenizer_compare import TokenizerComparison, compare_tokenizers, write_comparison
from mixlab.curation.web_quality import (
    C4BadWords,
    C4BadWordsSettings,
    C4Quality,
    C4Settings,
    DomainBlocklist,
    FinewebQuality,
    FineWebSettings,
    UrlFilter,
    UrlFilterSettings,
    bad_words,
)
from mixlab.curation.writers import DUPLICATE_ID, normalise_metadata, unique_shard_ids

__all__ = [
    "PiiRedaction",
    "PiiSettings",
    "C4BadWords",
    "C4BadWordsSettings",
    "C4Quality",
    "C4Settings",
    "DomainBlocklist",
    "FinewebQuality",
    "FineWebSettings",
    "UrlFilter",
    "UrlFilterSettings",
    "bad_words",
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
    "install_tokenizer",
    "default_tokenizer_name",
    "DEFAULT_TAIL",
    "BundledFT176LID",
    "TokenizerComparison",
    "compare_tokenizers",
    "write_comparison",
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
    "ScriptRunTokenizer",
    "SpacySentencizerTokenizer",
    "offline_word_tokenizer",
    "derive_language_threshold",
    "language_scores",
    "CurationConfigError",
    # readers: whatever a raw source folder holds, bad records quarantined and counted
    "READER_KINDS",
    "QuarantiningReader",
    "RawJsonlReader",
    "CodeTreeReader",
    "HtmlTreeReader",
    "SavedDatasetReader",
    "WarcRecordReader",
    "detect_reader_kind",
    "reader_for",
    # dedup, decontamination, classifiers, per-language settings
    "ExactDedupSettings",
    "SentenceDedupSettings",
    "MinHashIndex",
    "NearDuplicatePair",
    "DecontaminationFilter",
    "DecontamConfig",
    "EvalSetIndex",
    "build_eval_index",
    "default_eval_sets",
    "ClassifierScorer",
    "ClassifierTrainConfig",
    "ExampleSpec",
    "ScoreThresholdFilter",
    "annotate_curated",
    "load_classifier",
    "train_classifier",
    "LanguageStatsStep",
    "LanguageThresholds",
    "derive_thresholds",
    "language_statistics",
    "multilingual_filters",
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
