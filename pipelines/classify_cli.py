"""`mixlab classify …`: train a fastText quality classifier, annotate curated shards with its score, and
score a few files, each a thin layer over `mixlab.curation.classify`."""

from __future__ import annotations

import argparse
import json
from typing import Any

TRAIN_FLAGS = ["held_out_fraction", "max_words", "max_per_class", "seed", "threshold", "epoch", "lr", "dim",
               "word_ngrams", "bucket", "threads"]
SPEC_HELP = ("source:NAME (curated source or glob), selection:FILE.json[#name] or selection:{json}, or "
             "file:PATH (JSONL/Parquet with a `text` field); repeatable")


def _given(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_classify_train(args: argparse.Namespace) -> int:
    from mixlab.curation.classify import ClassifierTrainConfig, ExampleSpec, train_classifier, train_preset
    from mixlab.training.errors import ConfigError

    overrides = _given(args, TRAIN_FLAGS)
    if args.no_balance:
        overrides["balance"] = False
    if args.preset:
        if args.positive or args.negative:
            raise ConfigError("--preset names its own examples; leave out --positive/--negative", ["--preset"])
        if not args.curated:
            raise ConfigError(f"--preset {args.preset} trains on a curated directory: add --curated DIR", ["--curated"])
        if args.name:
            overrides["name"] = args.name
        result = train_preset(args.preset, args.curated, args.out, **overrides)
    else:
        if not args.name:
            raise ConfigError("name the classifier with --name (its score goes to metadata `<name>_score`), or "
                              "use --preset math-vs-not", ["--name"])
        positives = [ExampleSpec.parse(s, "--positive") for s in args.positive or []]
        negatives = [ExampleSpec.parse(s, "--negative") for s in args.negative or []]
        config = ClassifierTrainConfig(name=args.name, **overrides)
        result = train_classifier(positives, negatives, args.out, config, args.curated)
    print("\n".join(result.summary_lines()))
    return 0


def cmd_classify_annotate(args: argparse.Namespace) -> int:
    from mixlab.curation.classify import annotate_curated, load_classifier

    field = load_classifier(args.model).field
    summaries = annotate_curated(args.curated, args.model, args.sources)
    for source, summary in summaries.items():
        mean = summary.get("mean")
        print(f"{source}: {summary['docs']} docs scored, {field} mean "
              f"{'-' if mean is None else f'{mean:.4f}'}, p10 {summary.get('p10', '-')}, p90 {summary.get('p90', '-')}")
    print(f"scores in the curated shards' metadata.{field} and the manifest's metadata_summary.scores; "
          "re-run `mixlab tokenize` to select on them")
    return 0


def cmd_classify_score(args: argparse.Namespace) -> int:
    from mixlab.curation.classify import ExampleSpec, load_classifier, spec_texts

    classifier = load_classifier(args.model)
    for raw in args.files:
        spec = ExampleSpec("file", raw)
        docs = list(spec_texts(spec, None))
        scores = classifier.score([text for _, text in docs])
        for (doc_id, _), score in zip(docs, scores, strict=True):
            print(json.dumps({"file": raw, "id": doc_id, classifier.field: round(score, 6)}))
    return 0


def classify_options(cls: argparse.ArgumentParser) -> None:
    """`mixlab classify train|annotate|score` on its parser (pipelines/cli.py's COMMANDS names it)."""
    actions = cls.add_subparsers(dest="classify_command", required=True, metavar="ACTION")

    tr = actions.add_parser(
        "train", help="train on positives and negatives; prints held-out precision, recall and AUC",
        description="Writes OUT/model.bin, OUT/card.json (labels, sizes, metrics, sources) and OUT/held_out.jsonl.")
    tr.add_argument("--out", required=True, help="model directory to write")
    tr.add_argument("--name", help="classifier name; the score goes to metadata `<name>_score` (e.g. math)")
    tr.add_argument("--positive", action="append", metavar="SPEC", help=f"positive examples: {SPEC_HELP}")
    tr.add_argument("--negative", action="append", metavar="SPEC", help=f"negative examples: {SPEC_HELP}")
    tr.add_argument("--preset", choices=["math-vs-not"],
                    help="math-vs-not: math sources positive, web and code sources negative")
    tr.add_argument("--curated", help="curated directory (with manifest.json) that source: and selection: read")
    tr.add_argument("--held-out", dest="held_out_fraction", type=float, help="held-out share of each class (0.2)")
    tr.add_argument("--max-words", type=int, help="words of each document the model sees (1000)")
    tr.add_argument("--max-per-class", type=int, help="cap on examples per class (default: no cap)")
    tr.add_argument("--no-balance", action="store_true",
                    help="keep all examples (default: subsample the larger class to the smaller one's size)")
    tr.add_argument("--threshold", type=float, help="score threshold for precision / recall (0.5)")
    for flag, kind in (("seed", int), ("epoch", int), ("lr", float), ("dim", int), ("word-ngrams", int),
                       ("bucket", int), ("threads", int)):
        tr.add_argument(f"--{flag}", type=kind, help="fastText setting (see ClassifierTrainConfig)")
    tr.set_defaults(func=cmd_classify_train)

    an = actions.add_parser("annotate", help="write a model's score into every curated shard and the manifest")
    an.add_argument("--model", required=True, help="model directory from `mixlab classify train`")
    an.add_argument("--curated", required=True, help="curated directory (with manifest.json)")
    an.add_argument("--sources", nargs="*",
                    help="only these sources (default: all, so that every source of data/ has the same columns)")
    an.set_defaults(func=cmd_classify_annotate)

    sc = actions.add_parser("score", help="print the score of each document of JSONL/Parquet files")
    sc.add_argument("--model", required=True, help="model directory from `mixlab classify train`")
    sc.add_argument("files", nargs="+", help="JSONL (.jsonl, .jsonl.gz) or Parquet files with a `text` field")
    sc.set_defaults(func=cmd_classify_score)
