"""`mixlab tokenizer compare` and the tokenizer options of `mixlab tokenize` (several vocabulary sizes, existing
tokenizers), kept apart from pipelines/cli.py so that the tokenizer axis has one home.

Wiring into pipelines/cli.py's `COMMANDS`: `tokenizer_options(group)` adds the `compare` action to the `tokenizer`
command; `add_tokenize_options(tok)` adds `--tokenizer` (repeatable), `--vocab-sizes` and `--eos-token` to the
`tokenize` parser and makes `cmd_tokenize` below its handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _vocab_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vocab-sizes {text!r}: give whole numbers separated by commas, "
                                         "e.g. 512,1024,2048") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--vocab-sizes: give at least one size, e.g. 512,1024,2048")
    return sizes


def add_tokenize_options(tok: argparse.ArgumentParser) -> None:
    """`--tokenizer PATH` (repeatable, `NAME=PATH` allowed), `--vocab-sizes A,B,C` and `--eos-token` on the
    `tokenize` parser (which already has --curated, --vocab-size and --val-fraction)."""
    tok.add_argument("--tokenizer", action="append", metavar="[NAME=]PATH",
                     help="tokenize with this existing tokenizer.json (or sentencepiece .model) instead of training "
                          "one; repeat it, or add --vocab-sizes, to tokenize the same data with each candidate into "
                          "<curated>/tokenized/<name>/")
    tok.add_argument("--vocab-sizes", type=_vocab_sizes, metavar="A,B,C",
                     help="train one BPE per vocabulary size, each into its own token dataset "
                          "<curated>/tokenized/bpe-<size>/ (the tokenizer as an ablation axis)")
    tok.add_argument("--eos-token", help="end-of-document token of an existing tokenizer (default: detected)")
    tok.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> int:
    """One tokenizer into the curated directory itself (as before), or several candidates each into
    `<curated>/tokenized/<name>/`."""
    from mixlab.curation import TokenizeConfig
    from mixlab.pipelines.summary import leakage_lines, token_lines
    from mixlab.pipelines.tokenize import candidates_from_args, tokenize_candidates, tokenize_curated

    held_out = TokenizeConfig(**({"val_fraction": args.val_fraction} if args.val_fraction is not None else {}))
    tokenizers = args.tokenizer or []
    vocab_size = getattr(args, "vocab_size", None)
    if args.vocab_sizes is None and len(tokenizers) <= 1:
        manifest, leakage = tokenize_curated(args.curated, held_out, vocab_size,
                                             tokenizers[0] if tokenizers else None, args.eos_token)
        print(f"tokenizer: {manifest.tokenizer.path} (vocab {manifest.tokenizer.vocab_size}, "
              f"{manifest.tokenizer.kind}, sha256 {manifest.tokenizer.sha256[:12]})")
        print("\n".join(token_lines(manifest)))
        print("\n".join(leakage_lines(leakage)))
        return 0
    if vocab_size is not None:
        from mixlab.training.errors import ConfigError

        raise ConfigError("--vocab-size trains one tokenizer into the curated directory; with several candidates "
                          "put it in --vocab-sizes instead", ["vocab_size", "vocab_sizes"])
    candidates = candidates_from_args(args.vocab_sizes, tokenizers)
    results = tokenize_candidates(args.curated, held_out, candidates, args.eos_token)
    for name, (manifest, leakage) in results.items():
        info = manifest.tokenizer
        print(f"[{name}] {manifest.root}: tokenizer vocab {info.vocab_size} ({info.kind}, sha256 {info.sha256[:12]})")
        print("\n".join(f"  {line}" for line in token_lines(manifest)))
        print("\n".join(f"  {line}" for line in leakage_lines(leakage)))
    return 0


def tokenizer_options(group: argparse.ArgumentParser) -> None:
    """The actions of the `mixlab tokenizer` command (`compare`) on its parser."""
    actions = group.add_subparsers(dest="tokenizer_action", required=True, metavar="ACTION")
    cmp = actions.add_parser(
        "compare", help="fertility, bytes per token, unknown/byte-fallback share per language and domain",
        description="For each candidate tokenizer, on the first N documents per language (metadata language) and "
                    "per domain (source kind) of the curated shards: tokens per word (words from curation's word "
                    "splitter), UTF-8 bytes per token, and the share of unknown and byte-fallback tokens. Writes "
                    "tokenizer_compare.md, .json and .png into the dataset card folder (<curated>/data/).")
    cmp.add_argument("--curated", required=True, help="curated directory (with manifest.json)")
    cmp.add_argument("--tokenizer", action="append", metavar="[NAME=]PATH",
                     help="a candidate: tokenizer.json, a folder holding one, or a sentencepiece .model (repeat); "
                          "default: the curated directory's tokenizer and those of <curated>/tokenized/*/")
    cmp.add_argument("--docs-per-group", type=int, default=50,
                     help="documents per language and per domain, the first ones in manifest order (default 50)")
    cmp.add_argument("--json", action="store_true", help="print the table as JSON instead of markdown")
    cmp.set_defaults(func=cmd_tokenizer_compare)


def default_candidates(curated_dir: str | Path) -> list[str]:
    """`NAME=PATH` of the curated directory's own tokenizer (named after the directory) and of every token
    dataset `mixlab tokenize` wrote under `<curated>/tokenized/<name>/`."""
    from mixlab.curation.manifest import ShardManifest
    from mixlab.pipelines.tokenize import CANDIDATES_DIR

    manifest = ShardManifest.load(curated_dir)
    found = []
    if manifest.tokenizer is not None:
        found.append(f"{Path(manifest.root).resolve().name}={manifest.resolve(manifest.tokenizer.path)}")
    folder = manifest.resolve(CANDIDATES_DIR)
    for candidate in sorted(folder.iterdir()) if folder.is_dir() else []:
        if (candidate / "manifest.json").is_file():
            sub = ShardManifest.load(candidate)
            if sub.tokenizer is not None:
                found.append(f"{candidate.name}={sub.resolve(sub.tokenizer.path)}")
    return found


def cmd_tokenizer_compare(args: argparse.Namespace) -> int:
    import json

    from mixlab.curation.tokenizer_compare import compare_tokenizers, comparison_markdown, write_comparison
    from mixlab.training.errors import ConfigError

    if args.docs_per_group <= 0:
        raise ConfigError(f"--docs-per-group {args.docs_per_group} must be positive", ["docs_per_group"])
    candidates = args.tokenizer or default_candidates(args.curated)
    if not candidates:
        raise ConfigError(f"{args.curated}: no tokenizer trained here nor under tokenized/; give --tokenizer PATH "
                          "(or run `mixlab tokenize --vocab-sizes ...` first)", ["tokenizer"])
    comparison = compare_tokenizers(args.curated, candidates, docs_per_group=args.docs_per_group)
    paths = write_comparison(args.curated, comparison)
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison_markdown(comparison))
    for kind, path in paths.items():
        print(f"{kind}: {Path(path)}")
    return 0
