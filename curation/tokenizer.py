"""Train the byte-level BPE tokenizer on curated shards, and the facts about it that later stages need.

The tokenizer is trained on the curated Parquet shards named in the manifest (never on the raw corpus: the
vocabulary should fit what the model will actually see), without the documents held out for validation (the
same `curation.splits` rule and settings that tokenization uses), with a per-source budget of UTF-8 text
bytes so that a large web source cannot crowd out code or a small language. The pre-tokenizer is the Llama-3 one SmolLM3 inherited
(letters, 1-3 digit groups, punctuation runs, whitespace) followed by a byte-level mapping, so every string
round-trips exactly and every token id has a well-defined UTF-8 byte length, which the evaluator needs for
bits-per-byte.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from mixlab.curation.manifest import ManifestError, ShardManifest, TokenizerInfo, sha256_file
from mixlab.curation.splits import SourceSplit, TokenizeConfig, split_source
from tqdm.auto import tqdm

logger = logging.getLogger("mixlab.tokenizer")

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"
TRAINING_STATS_FILE = "training.json"
# with tokenizer.json, what `transformers.AutoTokenizer.from_pretrained(<curated>/tokenizer)` reads
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
EOS_TOKEN = "<|endoftext|>"
# the longest sequence of mixlab's largest model preset (SmolLM3-3B's 4096); transformers warns past it
MODEL_MAX_LENGTH = 4096
# names a tokenizer may give its padding / beginning-of-sequence token (mixlab's own has a pad, no BOS)
PAD_TOKEN_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
BOS_TOKEN_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

# Llama-3's split pattern (also SmolLM3's tokenizer): contractions, letter runs with one leading non-letter,
# digits in groups of at most three, punctuation runs, newlines, other whitespace.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(ValueError):
    """A tokenizer that cannot be trained, read or used as asked; the message names the file and the fix."""


@dataclass
class TokenizerConfig:
    """How the BPE is trained. The defaults suit the CPU demo (small vocabulary, a few MB per source)."""

    vocab_size: int = 8192
    min_frequency: int = 2
    # UTF-8 bytes of text read per source at most: keeps every source represented and training time bounded
    max_bytes_per_source: int = 32 * 2**20
    # the validation split to leave out: give the same TokenizeConfig to `tokenize_manifest`, which refuses a
    # tokenizer trained without a different split (it would have seen validation text)
    held_out: TokenizeConfig = field(default_factory=TokenizeConfig)
    eos_token: str = EOS_TOKEN
    # EOS first so that it gets id 0; chat and reasoning markers reserved now (training.posttrain's ChatML
    # template with SmolLM3's think switch), so that later SFT does not change the vocabulary
    special_tokens: tuple[str, ...] = (EOS_TOKEN, "<|im_start|>", "<|im_end|>", "<|pad|>", "<think>", "</think>")
    sources: tuple[str, ...] | None = None  # None: every source in the manifest
    model_max_length: int = MODEL_MAX_LENGTH  # written to tokenizer_config.json for transformers
    text_column: str = "text"
    read_batch_docs: int = 256

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(self.special_tokens):
            raise TokenizerError(
                f"vocab_size {self.vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
                f"{len(self.special_tokens)} special tokens"
            )
        if self.eos_token not in self.special_tokens:
            raise TokenizerError(
                f"eos_token {self.eos_token!r} must be one of special_tokens {self.special_tokens}"
            )
        if self.max_bytes_per_source <= 0:
            raise TokenizerError("max_bytes_per_source must be positive")
        if self.model_max_length <= 0:
            raise TokenizerError("model_max_length must be positive")


@dataclass
class SourceSample:
    """What one source contributed to tokenizer training."""

    docs_read: int = 0
    docs_held_out: int = 0  # validation documents, never used
    docs_used: int = 0
    bytes_used: int = 0  # UTF-8 bytes of the documents used


@dataclass
class TokenizerTrainingStats:
    """Written next to tokenizer.json so that a report can say what the vocabulary was learned from."""

    vocab_size_requested: int
    vocab_size: int
    seconds: float
    sources: dict[str, SourceSample] = field(default_factory=dict)

    @property
    def bytes_used(self) -> int:
        return sum(s.bytes_used for s in self.sources.values())


# ---- bytes <-> byte-level symbols ---------------------------------------------------------------
def byte_symbol_table() -> dict[str, int]:
    """The printable symbol that the byte-level pre-tokenizer uses for each byte value, inverted.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, a few Latin-1
    gaps) are shifted to code points 256 and up, in byte order. This is the GPT-2 convention that
    `tokenizers`' ByteLevel follows.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            symbols[chr(256 + shifted)] = b
            shifted += 1
    return symbols


# ---- training ------------------------------------------------------------------------------------
def new_bpe_tokenizer():
    """An untrained tokenizer with mixlab's pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def iter_training_texts(
    manifest: ShardManifest,
    config: TokenizerConfig,
    stats: dict[str, SourceSample],
    splits: dict[str, SourceSplit] | None = None,
) -> Iterator[str]:
    """Stream the training texts of each source's shards, source after source, each capped at the byte budget.

    Validation documents (`splits`, by default `split_source(manifest, name, config.held_out)` on shards
    checked against the manifest) are skipped.
    A source whose training text exceeds its budget is sampled systematically (every k-th document over all
    of its shards, k from UTF-8 text bytes) instead of truncated, so that its last shards are represented as
    well as its first.
    """
    names = list(config.sources) if config.sources is not None else sorted(manifest.sources)
    for name in names:
        source = manifest.source(name)
        split = (splits or {}).get(name)
        if split is None:
            _check_shards(manifest, name)
            split = split_source(manifest, name, config.held_out)
        sample = stats.setdefault(name, SourceSample())
        keep_fraction = min(1.0, config.max_bytes_per_source / split.train_bytes) if split.train_bytes else 1.0
        credit = 1.0  # systematic sampling: a document is kept each time the credit reaches one
        for shard in source.shards:
            path = manifest.resolve(shard.path)
            parquet = pq.ParquetFile(path)
            if config.text_column not in parquet.schema_arrow.names or "id" not in parquet.schema_arrow.names:
                raise TokenizerError(
                    f"{path}: no `id` or {config.text_column!r} column (has {parquet.schema_arrow.names}); "
                    "curated shards must be written by `mixlab curate`"
                )
            for batch in parquet.iter_batches(batch_size=config.read_batch_docs, columns=["id", config.text_column]):
                for doc_id, text in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                    sample.docs_read += 1
                    if str(doc_id) in split.val_ids:
                        sample.docs_held_out += 1
                        continue
                    credit += keep_fraction
                    if not text or credit < 1.0:
                        continue
                    credit -= 1.0
                    sample.docs_used += 1
                    sample.bytes_used += len(text.encode("utf-8"))
                    yield text
                    if sample.bytes_used >= config.max_bytes_per_source:
                        break
                if sample.bytes_used >= config.max_bytes_per_source:
                    break
            if sample.bytes_used >= config.max_bytes_per_source:
                break
        if sample.docs_used == 0:
            logger.warning("source %s contributed no text to the tokenizer", name)


def _check_shards(manifest: ShardManifest, name: str) -> None:
    for shard in manifest.source(name).shards:
        if problem := manifest.check_file(shard, owner=name):
            raise TokenizerError(problem)


def train_tokenizer(
    curated_dir: str | Path,
    config: TokenizerConfig | None = None,
    *,
    show_progress: bool = True,
) -> TokenizerInfo:
    """Train a byte-level BPE on the curated shards, save it to `<curated>/tokenizer/tokenizer.json`,
    and record it in the manifest (which is saved). Returns the recorded `TokenizerInfo`.

    The validation documents of `config.held_out` are left out and the settings recorded, so that
    `tokenize_manifest` can refuse a different split (whose validation text the tokenizer would have seen).
    """
    from tokenizers import pre_tokenizers, trainers

    config = config or TokenizerConfig()
    manifest = ShardManifest.load(curated_dir)
    if not manifest.sources:
        raise ManifestError(f"{manifest.root}: the manifest lists no sources; run `mixlab curate` first")
    unknown = sorted(set(config.sources or ()) - set(manifest.sources))
    if unknown:
        raise ManifestError(
            f"sources {unknown} are not in the manifest at {manifest.root}; known: {sorted(manifest.sources)}"
        )

    out_dir = manifest.resolve(TOKENIZER_DIR)  # refused now, not after training, when it points outside
    tokenizer = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    samples: dict[str, SourceSample] = {}
    names = list(config.sources) if config.sources is not None else sorted(manifest.sources)
    splits = {}
    for name in names:
        _check_shards(manifest, name)
        splits[name] = split_source(manifest, name, config.held_out)
    budget = sum(min(config.max_bytes_per_source, split.train_bytes) for split in splits.values())
    texts = iter_training_texts(manifest, config, samples, splits)
    if show_progress:
        texts = _byte_progress(texts, budget)
    start = time.perf_counter()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    seconds = time.perf_counter() - start
    if sum(s.docs_used for s in samples.values()) == 0:
        raise TokenizerError(f"{manifest.root}: the curated shards hold no text to train a tokenizer on")

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TOKENIZER_FILE
    tokenizer.save(str(path))
    write_transformers_config(out_dir, config.eos_token, config.model_max_length)
    stats = TokenizerTrainingStats(
        vocab_size_requested=config.vocab_size,
        vocab_size=tokenizer.get_vocab_size(),
        seconds=seconds,
        sources=samples,
    )
    training_record = {"config": asdict(config), **asdict(stats), "bytes_used": stats.bytes_used}
    (out_dir / TRAINING_STATS_FILE).write_text(json.dumps(training_record, indent=2) + "\n")
    if stats.vocab_size < config.vocab_size:
        logger.warning(
            "tokenizer has %d tokens, fewer than the %d asked for: the curated text has too few distinct merges",
            stats.vocab_size,
            config.vocab_size,
        )

    info = TokenizerInfo(
        path=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        vocab_size=stats.vocab_size,
        sha256=sha256_file(path),
        eos_token=config.eos_token,
        kind="bpe-bytelevel",
        held_out=config.held_out.val_settings(),
    )
    manifest.tokenizer = info
    manifest.save()
    logger.info(
        "trained %d-token BPE on %.1f MB in %.1fs -> %s",
        info.vocab_size,
        stats.bytes_used / 1e6,
        seconds,
        path,
    )
    return info


def _byte_progress(texts: Iterator[str], total_bytes: int) -> Iterator[str]:
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizer: reading text") as bar:
        for text in texts:
            bar.update(len(text.encode("utf-8")))
            yield text


# ---- the transformers view of the tokenizer folder -----------------------------------------------
def transformers_special_tokens(tokenizer_json: str | Path, eos_token: str) -> dict:
    """special_tokens_map.json for a tokenizer.json: EOS as given (the token shards end documents with it),
    pad/BOS when the tokenizer has a special token of a known name, UNK when its model defines one, and the
    other special tokens (e.g. chat markers) as additional ones, so that decoding can skip them."""
    spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    specials = [tok["content"] for tok in spec.get("added_tokens", []) if tok.get("special")]
    if eos_token not in specials and load_tokenizer(tokenizer_json).token_to_id(eos_token) is None:
        raise TokenizerError(f"{tokenizer_json}: has no EOS token {eos_token!r}; documents could not be separated")
    pad = next((t for t in PAD_TOKEN_NAMES if t in specials), None)
    bos = next((t for t in BOS_TOKEN_NAMES if t in specials), None)
    unk = (spec.get("model") or {}).get("unk_token")
    named = {"eos_token": eos_token, "bos_token": bos, "pad_token": pad, "unk_token": unk}
    mapping: dict = {key: value for key, value in named.items() if value is not None}
    others = [t for t in specials if t not in named.values()]
    if others:
        mapping["additional_special_tokens"] = others
    return mapping


def write_transformers_config(folder: str | Path, eos_token: str, model_max_length: int = MODEL_MAX_LENGTH) -> Path:
    """Write tokenizer_config.json and special_tokens_map.json next to `folder/tokenizer.json`, so that
    `AutoTokenizer.from_pretrained(folder)` loads it offline, with the EOS id the token shards use and no
    BOS/EOS added on encode (ids equal `load_tokenizer(folder).encode(text).ids`). Returns the config path."""
    folder = Path(folder)
    special = transformers_special_tokens(folder / TOKENIZER_FILE, eos_token)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # byte-level BPE: decoding is exact, no space clean-up
        "add_bos_token": False,
        "add_eos_token": False,
        **{key: special.get(key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
    }
    if "additional_special_tokens" in special:  # the name both transformers 4 and 5 read as a list
        config["additional_special_tokens"] = special["additional_special_tokens"]
    (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    path = folder / TOKENIZER_CONFIG_FILE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _store_chat_template(folder)
    return path


def _store_chat_template(folder: Path) -> None:
    """The chat template goes with the tokenizer: the one stored there (a user's), else ChatML when the tokenizer
    holds its markers as special tokens (the default TokenizerConfig reserves them); none for a tokenizer without."""
    from mixlab.curation.chat_template import ChatFormatError, ChatTemplate

    template = ChatTemplate.load(folder)
    try:
        template.save(folder)
    except ChatFormatError:
        logger.info("%s: no chat template stored (the tokenizer lacks the markers of %r)", folder, template.name)


# ---- using a trained tokenizer -------------------------------------------------------------------
def load_tokenizer(path: str | Path):
    """Load a tokenizer.json from disk (never from the Hub: mixlab runs offline)."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{path}: no tokenizer here; run `mixlab tokenize` to train one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({err}); re-run `mixlab tokenize`") from err


def tokenizer_path(curated_dir: str | Path) -> Path:
    """Where the manifest says the tokenizer is (error if none was trained yet)."""
    manifest = ShardManifest.load(curated_dir)
    if manifest.tokenizer is None:
        raise ManifestError(
            f"{manifest.root}: no tokenizer recorded in the manifest; run `mixlab tokenize` first"
        )
    return manifest.resolve(manifest.tokenizer.path)


def tokenizer_id(info: TokenizerInfo) -> str:
    """A short name that identifies one trained tokenizer exactly (written into token-shard metadata)."""
    return f"mixlab-{info.kind}-{info.vocab_size}-{info.sha256[:12]}"


def token_byte_lengths(path: str | Path) -> np.ndarray:
    """UTF-8 byte length of every token id (int64, special tokens 0), for bits-per-byte.

    How each kind's lengths are defined, and how close their sum over a document comes to its UTF-8 size, is
    `byte_length_rule(path)`: exact for a byte-level BPE; for a SentencePiece-style tokenizer (`▁` for spaces,
    `<0xNN>` byte fallback) exact up to the dummy-prefix `▁` (at most 1 byte per document); for WordPiece,
    which drops whitespace, one byte of whitespace per word-start token. Kinds that cannot be made right
    (a lowercasing or accent-stripping normalizer, unknown tokens without byte fallback) are refused.
    """
    return _token_byte_lengths_cached(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


@dataclass(frozen=True)
class ByteLengthRule:
    """How token byte lengths are defined for one tokenizer, and what their sum over a document means.

    `prefix_bytes`: bytes per document that the tokenizer adds and its decoder strips (the dummy-prefix `▁`
    of SentencePiece), so a document's sum is its UTF-8 size plus 0..prefix_bytes. `exact`: no other gap.
    """

    kind: str  # "byte-level", "metaspace" or "wordpiece"
    exact: bool
    prefix_bytes: int = 0
    replacement: str = ""  # the Metaspace space symbol
    continuing_prefix: str = ""  # WordPiece's "##"
    byte_fallback: bool = False
    bound: str = ""


METASPACE = "▁"
LOSSY_NORMALIZERS = ("Lowercase", "NFD", "NFKC", "NFKD", "StripAccents", "Nmt", "Precompiled")


def byte_length_rule(path: str | Path) -> ByteLengthRule:
    """The rule `token_byte_lengths` applies to this tokenizer.json, or a TokenizerError saying why none holds."""
    return _byte_length_rule(json.loads(Path(path).read_text(encoding="utf-8")), str(path))


def _nodes(node: dict | None, *children: str) -> list[dict]:
    """A pipeline component and the components of its Sequence, flattened."""
    if not node:
        return []
    nested = [n for key in children for n in node.get(key) or []]
    return [node, *(leaf for child in nested for leaf in _nodes(child, *children))]


def _replace_pattern(node: dict) -> str | None:
    pattern = node.get("pattern") or {}
    return pattern.get("String") if isinstance(pattern, dict) else None


def _byte_length_rule(spec: dict, path: str) -> ByteLengthRule:
    if _is_byte_level(spec):
        return ByteLengthRule("byte-level", exact=True, bound="sum over a document == its UTF-8 size")
    model = spec.get("model") or {}
    model_type = model.get("type")
    normalizers_ = _nodes(spec.get("normalizer"), "normalizers")
    pre = _nodes(spec.get("pre_tokenizer"), "pretokenizers")
    decoders_ = _nodes(spec.get("decoder"), "decoders")
    for node in normalizers_:
        lossy = node["type"] in LOSSY_NORMALIZERS or (
            node["type"] == "BertNormalizer" and (node.get("lowercase") or node.get("strip_accents")))
        if lossy:
            raise TokenizerError(
                f"{path}: its {node['type']} normalizer changes the text before tokenizing (case, accents or "
                "compatibility forms), so a token's bytes are not the document's bytes and bits per byte is not "
                "defined; use a byte-level tokenizer or one without that normalizer")
    metaspace = next((n for n in pre + decoders_ if n["type"] == "Metaspace"), None)
    replaced = any(n["type"] == "Replace" and _replace_pattern(n) == " " for n in normalizers_)
    if metaspace is not None or replaced:
        replacement = metaspace.get("replacement", METASPACE) if metaspace else next(
            n["content"] for n in normalizers_ if n["type"] == "Replace" and _replace_pattern(n) == " ")
        if model_type not in ("BPE", "Unigram") or not model.get("byte_fallback"):
            raise TokenizerError(
                f"{path}: a {model_type} tokenizer with {replacement!r} for spaces but without byte_fallback: an "
                "unknown character becomes one unknown token whose byte length is not known, so bits per byte is "
                "not defined; use one with byte_fallback (`<0xNN>` tokens) or a byte-level tokenizer")
        prepends = any(n["type"] == "Prepend" for n in normalizers_) or any(
            n["type"] == "Metaspace" and (n.get("prepend_scheme") in ("always", "first") or n.get("add_prefix_space"))
            for n in pre)
        return ByteLengthRule(
            "metaspace", exact=not prepends, prefix_bytes=int(prepends), replacement=replacement,
            byte_fallback=True,
            bound=("sum over a document == its UTF-8 size + 1 when the tokenizer prepends the dummy-prefix "
                   f"{replacement!r} (which its decoder strips), else == its UTF-8 size"))
    if model_type == "WordPiece" and any(n["type"] == "WordPiece" for n in decoders_):
        return ByteLengthRule(
            "wordpiece", exact=False, continuing_prefix=model.get("continuing_subword_prefix", "##"),
            bound=("its pre-tokenizer drops whitespace: a word-start token counts one byte for the whitespace "
                   "before it, so sum over a document == UTF-8 size - whitespace bytes + word-start tokens"))
    raise TokenizerError(
        f"{path}: a {model_type} tokenizer that is neither byte-level, nor SentencePiece-style (`▁` for spaces with "
        "byte fallback), nor WordPiece, so token byte lengths are not defined; train one with `mixlab tokenize`")


@lru_cache(maxsize=8)
def _token_byte_lengths_cached(path: str, _mtime_ns: int) -> np.ndarray:
    tokenizer = load_tokenizer(path)
    spec = json.loads(Path(path).read_text())
    rule = _byte_length_rule(spec, path)
    symbols = byte_symbol_table()
    added = {tok["id"]: tok for tok in spec.get("added_tokens", [])}
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token_id in range(len(lengths)):
        token = tokenizer.id_to_token(token_id)
        if rule.byte_fallback and token is not None and re.fullmatch(BYTE_FALLBACK_PATTERN, token):
            lengths[token_id] = 1  # `<0xNN>` stands for one byte, even when listed as a special added token
        elif token_id in added:
            entry = added[token_id]
            lengths[token_id] = 0 if entry.get("special", False) else len(entry["content"].encode("utf-8"))
        elif token is None:
            continue  # a hole in the id space: never produced
        elif rule.kind == "byte-level":
            if any(ch not in symbols for ch in token):
                raise TokenizerError(f"{path}: token {token_id} ({token!r}) is not made of byte-level symbols")
            lengths[token_id] = len(token)
        elif rule.kind == "metaspace":
            lengths[token_id] = len(token.replace(rule.replacement, " ").encode("utf-8"))
        elif token.startswith(rule.continuing_prefix):  # WordPiece: a word's continuation
            lengths[token_id] = len(token[len(rule.continuing_prefix):].encode("utf-8"))
        else:
            lengths[token_id] = 1 + len(token.encode("utf-8"))  # the whitespace the pre-tokenizer dropped
    lengths.setflags(write=False)
    return lengths


def _is_byte_level(spec: dict) -> bool:
    def has_byte_level(node) -> bool:
        if not node:
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(
            has_byte_level(child) for child in node.get("pretokenizers", []) + node.get("decoders", [])
        )

    return has_byte_level(spec.get("pre_tokenizer")) and has_byte_level(spec.get("decoder"))


# ---- tokenizers brought from elsewhere -----------------------------------------------------------
# end-of-document tokens of the tokenizers mixlab meets (its own first); the first one a tokenizer has is used
KNOWN_EOS_TOKENS = (
    EOS_TOKEN,
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "</s>",  # Llama-2, Mistral (sentencepiece)
    "<EOT>",  # Anthropic's claude-v1 tokenizer
    "<eos>",
    "<|eot_id|>",
)
BYTE_FALLBACK_PATTERN = r"<0x[0-9A-Fa-f]{2}>"


def default_tokenizer_name(path: str | Path) -> str:
    """A candidate's display and folder name: the file's stem, or for `<name>/tokenizer.json` (also
    `<name>/tokenizer/tokenizer.json`, a curated directory's tokenizer) the folder that names it."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if path.name != TOKENIZER_FILE:
        return path.stem
    folder = path.parent
    return folder.parent.name if folder.name == TOKENIZER_DIR and folder.parent.name else folder.name


def detect_eos_token(path: str | Path) -> str:
    """The end-of-document token of a tokenizer.json: the first of KNOWN_EOS_TOKENS it has. Token shards end
    every document with it, so a tokenizer without one is refused (name it with `eos_token=`)."""
    tokenizer = load_tokenizer(path)
    for token in KNOWN_EOS_TOKENS:
        if tokenizer.token_to_id(token) is not None:
            return token
    raise TokenizerError(
        f"{path}: none of the end-of-document tokens {list(KNOWN_EOS_TOKENS)} is in this tokenizer; "
        "name its EOS token explicitly (`--eos-token`)"
    )


def tokenizer_kind(path: str | Path) -> str:
    """`bpe-bytelevel` for a byte-level tokenizer (every string round-trips, bits per byte is defined),
    else the model type, with `+bytefallback` when unknown characters become `<0xNN>` byte tokens."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if _is_byte_level(spec):
        return f"{str(model.get('type', 'bpe')).lower()}-bytelevel"
    kind = str(model.get("type", "unknown")).lower()
    return f"{kind}+bytefallback" if model.get("byte_fallback") else kind


def install_tokenizer(curated_dir: str | Path, source: str | Path, eos_token: str | None = None) -> TokenizerInfo:
    """Copy an existing tokenizer.json (or a sentencepiece `.model`, converted) into `<curated>/tokenizer/`,
    write the transformers config beside it and record it in the manifest (path, sha256, vocab size, EOS), so
    that `tokenize_manifest(curated_dir)` writes token shards with it. Returns the recorded `TokenizerInfo`.

    `eos_token=None` picks the first of KNOWN_EOS_TOKENS the tokenizer has. The vocabulary size decides the
    shard dtype (uint16 up to 65,536 ids, else uint32). A brought tokenizer records no held-out split: it may
    have seen anything.
    """
    import shutil

    manifest = ShardManifest.load(curated_dir)
    source = Path(source)
    source = source / TOKENIZER_FILE if source.is_dir() else source
    if not source.is_file():
        raise TokenizerError(f"{source}: no tokenizer file here; give a tokenizer.json (or a sentencepiece .model)")
    target = manifest.resolve(f"{TOKENIZER_DIR}/{TOKENIZER_FILE}")
    recorded = manifest.tokenizer
    if (recorded is not None and source.resolve() == manifest.resolve(recorded.path).resolve()
            and eos_token in (None, recorded.eos_token) and manifest.check_file(recorded) is None):
        return recorded  # the tokenizer trained here: keep its record (and the split it was trained without)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".json" or source.name.endswith(".json"):
        tokenizer = load_tokenizer(source)  # refuses a malformed file before anything is replaced
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    else:
        sentencepiece_to_tokenizer_json(source, target)
        tokenizer = load_tokenizer(target)
    eos = eos_token or detect_eos_token(target)
    if tokenizer.token_to_id(eos) is None:
        raise TokenizerError(f"{source}: has no EOS token {eos!r}; documents could not be separated")
    write_transformers_config(target.parent, eos)
    for stale in (TRAINING_STATS_FILE,):  # stats of a tokenizer trained here earlier would describe another one
        (target.parent / stale).unlink(missing_ok=True)
    manifest.tokenizer = TokenizerInfo(
        path=f"{TOKENIZER_DIR}/{TOKENIZER_FILE}",
        vocab_size=tokenizer.get_vocab_size(),
        sha256=sha256_file(target),
        eos_token=eos,
        kind=tokenizer_kind(target),
        held_out=None,
    )
    manifest.save()
    return manifest.tokenizer


def sentencepiece_to_tokenizer_json(model_path: str | Path, out_path: str | Path) -> Path:
    """Convert a sentencepiece BPE `.model` (e.g. Mistral's `tokenizer.model.v1` in mistral-common) into an HF
    tokenizer.json laid out the way transformers' Llama converter does it: BPE with byte fallback, `▁` for
    spaces, a dummy prefix. Merges are rebuilt from the pieces (every split of a piece into two pieces), ranked
    by the merged piece's score, as sentencepiece's BPE applies them. Needs only protobuf (the schema ships in
    transformers); sentencepiece itself is not required."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    try:
        from transformers.utils import sentencepiece_model_pb2_new as sp_pb2
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise TokenizerError(f"{model_path}: converting a sentencepiece model needs transformers ({err})") from err
    model_path = Path(model_path)
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as err:  # protobuf's DecodeError
        raise TokenizerError(f"{model_path}: not a sentencepiece model ({err}); give a tokenizer.json instead") from err
    bpe_type = sp_pb2.TrainerSpec.ModelType.Value("BPE")
    if proto.trainer_spec.model_type != bpe_type or not proto.pieces:
        raise TokenizerError(f"{model_path}: only sentencepiece BPE models can be converted (this one is "
                             f"model type {proto.trainer_spec.model_type}); give a tokenizer.json instead")
    normal = sp_pb2.ModelProto.SentencePiece.Type.Value("NORMAL")
    user = sp_pb2.ModelProto.SentencePiece.Type.Value("USER_DEFINED")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    scores = {piece.piece: piece.score for piece in proto.pieces}
    mergeable = {p.piece for p in proto.pieces if p.type in (normal, user)}
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[piece], vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else None
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                   byte_fallback=bool(proto.trainer_spec.byte_fallback))
    )
    steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    control = sp_pb2.ModelProto.SentencePiece.Type.Value("CONTROL")
    from tokenizers import AddedToken

    tokenizer.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in (control,)]
        + ([AddedToken(unk, special=True, normalized=False)] if unk else [])
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return out_path
