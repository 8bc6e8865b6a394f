"""Quality classifiers (DCLM / FineWeb-Edu style): a fastText model trained on documents the user names as
positive and negative, a step that writes its score into each document's metadata, and a threshold filter.

Examples are named by `ExampleSpec` strings:
    source:math            every document of a curated source (a glob such as `source:web-*` works)
    selection:sel.json     a mixture selection's JSON (object, or a list / {"selections": [...]} with `#name`
                           to pick one): its `where` (`metadata_filter.MetadataQuery`, the semantics
                           `mixtures.selection.Selection` shares) applied to the curated shards' metadata columns
    selection:{"name": "en", "source": "web-*", "where": {"language": "en"}}     the same, inline
    file:docs.jsonl        JSONL (.jsonl, .jsonl.gz) or Parquet with a `text` field

Text is normalised the way it is for fastText quality models: lowercased, whitespace (newlines included)
collapsed to single spaces, cut to the first `max_words` words. A stratified held-out split is scored after
training; precision, recall, F1 and AUC (from the positive-class probabilities, computed here) go into the
model's card. The model directory holds `model.bin`, `card.json` and `held_out.jsonl` (id, label, score
of each held-out document, so that the card's numbers can be checked).

Scores go into `metadata[<name>_score]` (`score_field`). The curated Parquet has a fixed metadata schema
(`writers.CURATED_SCHEMA`), so scores are kept either by rewriting the curated shards with the score as an
extra metadata column (`annotate_curated`, what `mixlab classify annotate` does, for every source at once so
that the sources of `data/` keep one schema) or, inside a curation pipeline, by a writer whose schema has the
score fields (`scored_parquet_writer`).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers import ParquetWriter
from mixlab.curation.errors import CurationConfigError
from mixlab.curation.manifest import ManifestError, ShardManifest, sha256_file
from mixlab.curation.metadata_filter import MetadataFilterError, MetadataQuery, matching_sources
from mixlab.curation.paths import name_problem
from mixlab.curation.writers import CURATED_SCHEMA, curated_record

POSITIVE_LABEL = "__label__positive"
NEGATIVE_LABEL = "__label__negative"
MODEL_FILE = "model.bin"
CARD_FILE = "card.json"
HELD_OUT_FILE = "held_out.jsonl"
CARD_VERSION = 1
SPEC_KINDS = ("source", "selection", "file")
HISTOGRAM_BINS = 10  # score histograms in the manifest: ten equal bins over [0, 1]
_WHITESPACE = re.compile(r"\s+")


def score_field(name: str) -> str:
    """The metadata key a classifier's score is written to."""
    return f"{name}_score"


def normalise_text(text: str, max_words: int) -> str:
    """What the model sees: lowercase, single spaces (fastText reads one example per line), `max_words` words."""
    return " ".join(_WHITESPACE.split(text.lower().strip())[:max_words])


# ---- naming examples ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleSpec:
    """Documents that are all positive or all negative examples: a curated source (or glob), a selection, a file."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str, option: str = "--positive/--negative") -> ExampleSpec:
        kind, sep, value = text.partition(":")
        if not sep or kind not in SPEC_KINDS or not value.strip():
            raise CurationConfigError(
                f"{option} {text!r}: name examples as source:NAME (a curated source or glob), "
                "selection:FILE.json[#name] or selection:{json}, or file:PATH (JSONL/Parquet with a `text` field)",
                [option])
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"


@dataclass
class Example:
    id: str  # "<spec>/<document id>": unique across the examples of one training run
    text: str  # normalised
    positive: bool


def _curated_shards(manifest: ShardManifest, source: str) -> list[Path]:
    paths = [manifest.resolve(shard.path) for shard in manifest.source(source).shards]
    if missing := [p for p in paths if not p.is_file()]:
        raise ManifestError(f"source {source!r}: shard {missing[0]} is missing; re-run `mixlab curate`",
                            source=source, field="shards")
    return paths


def _matching_sources(manifest: ShardManifest, pattern: str, spec: ExampleSpec) -> list[str]:
    names = matching_sources(pattern, manifest.sources)
    if not names:
        raise CurationConfigError(f"{spec}: no curated source matches {pattern!r} in {manifest.root}; known: "
                          f"{sorted(manifest.sources)}", ["--positive/--negative"])
    return names


def _flat_metadata(table: pa.Table) -> pa.Table:
    """The shard's metadata struct as one column per field (what a selection's `where` filters on)."""
    if "metadata" not in table.column_names or not pa.types.is_struct(table.column("metadata").type):
        return pa.table({"id": table.column("id")})
    metadata = table.column("metadata").combine_chunks()
    return pa.table({f.name: values for f, values in zip(metadata.type, metadata.flatten(), strict=True)})


class SelectionQuery(MetadataQuery):
    """The documents a `selection:` spec names (a mixture selection's name, source and where; messages call it
    a selection). Only the metadata query matters here, so this needs nothing from the mixtures layer."""

    kind = "selection"


def _load_selection(value: str, spec: ExampleSpec) -> MetadataQuery:
    """The selection a `selection:` spec names, as the query it makes over metadata columns (its `long_docs`,
    a mixture's upsampling, does not change which documents are examples and is ignored)."""
    where = "--positive/--negative"
    try:
        if value.lstrip().startswith("{"):
            raw: Any = json.loads(value)
            wanted = None
        else:
            path_text, _, wanted = value.partition("#")
            path = Path(path_text)
            if not path.is_file():
                raise CurationConfigError(f"{spec}: selection file {path} does not exist", [where])
            raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CurationConfigError(f"{spec}: the selection is not JSON ({err})", [where]) from err
    if isinstance(raw, dict) and "selections" in raw:
        raw = raw["selections"]
    candidates = raw if isinstance(raw, list) else [raw]
    try:
        selections = [SelectionQuery.from_dict(item, ignored=("long_docs",)) for item in candidates]
    except MetadataFilterError as err:
        raise CurationConfigError(f"{spec}: {err}", [where]) from err
    if wanted:
        selections = [s for s in selections if s.name == wanted]
    if len(selections) != 1:
        names = [s.name for s in (SelectionQuery.from_dict(item, ignored=("long_docs",)) for item in candidates)]
        raise CurationConfigError(f"{spec}: name one selection with #NAME (found {names})", [where])
    return selections[0]


def _file_texts(path: Path, spec: ExampleSpec) -> Iterator[tuple[str, str]]:
    if not path.is_file():
        raise CurationConfigError(f"{spec}: file {path} does not exist", ["--positive/--negative"])
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CurationConfigError(f"{spec}: {path} has no `text` column (columns: {table.column_names})",
                              ["--positive/--negative"])
        ids = table.column("id").to_pylist() if "id" in table.column_names else range(table.num_rows)
        yield from zip((str(i) for i in ids), table.column("text").to_pylist(), strict=True)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CurationConfigError(f"{spec}: {path} line {line_no} is not JSON ({err})", ["--positive/--negative"]) from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CurationConfigError(f"{spec}: {path} line {line_no} has no string `text` field",
                                  ["--positive/--negative"])
            yield str(record.get("id", line_no)), record["text"]


def spec_texts(spec: ExampleSpec, manifest: ShardManifest | None) -> Iterator[tuple[str, str]]:
    """(document id, raw text) of every document a spec names."""
    if spec.kind == "file":
        yield from _file_texts(Path(spec.value), spec)
        return
    if manifest is None:
        raise CurationConfigError(f"{spec}: examples from curated data need --curated DIR (the folder with manifest.json)",
                          ["--curated"])
    if spec.kind == "source":
        for source in _matching_sources(manifest, spec.value, spec):
            for path in _curated_shards(manifest, source):
                table = pq.read_table(path, columns=["id", "text"])
                for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True):
                    yield f"{source}/{doc_id}", text
        return
    selection = _load_selection(spec.value, spec)
    for source in _matching_sources(manifest, selection.source, spec):
        for path in _curated_shards(manifest, source):
            table = pq.read_table(path)
            try:
                keep = selection.mask(_flat_metadata(table), source)
            except MetadataFilterError as err:
                raise CurationConfigError(f"{spec}: {err} (in {path})", ["--positive/--negative"]) from err
            ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
            for i in np.flatnonzero(keep).tolist():
                yield f"{source}/{ids[i]}", texts[i]


# ---- metrics --------------------------------------------------------------------------------------
def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties
    count half), from the ranks of the scores (Mann-Whitney U)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    start = 0
    while start < len(s):  # average rank for each run of tied scores
        end = start
        while end + 1 < len(s) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class BinaryMetrics:
    """Held-out quality of a classifier at `threshold` on the positive-class probability."""

    threshold: float
    positives: int
    negatives: int
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    auc: float

    def line(self) -> str:
        return (f"precision {self.precision:.4f}  recall {self.recall:.4f}  f1 {self.f1:.4f}  "
                f"accuracy {self.accuracy:.4f}  auc {self.auc:.4f}  (threshold {self.threshold:g}; "
                f"{self.positives} positive / {self.negatives} negative held out)")


def binary_metrics(labels: Sequence[bool], scores: Sequence[float], threshold: float = 0.5) -> BinaryMetrics:
    y = np.asarray(labels, dtype=bool)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    tp, fp = int((predicted & y).sum()), int((predicted & ~y).sum())
    fn, tn = int((~predicted & y).sum()), int((~predicted & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return BinaryMetrics(threshold, int(y.sum()), int((~y).sum()), tp, fp, fn, tn, precision, recall, f1,
                         (tp + tn) / len(y) if len(y) else 0.0, roc_auc(y, scores))


# ---- training --------------------------------------------------------------------------------------
@dataclass
class ClassifierTrainConfig:
    """What `train_classifier` does; the fastText settings are small (a model of a few MB that trains in seconds)."""

    name: str
    held_out_fraction: float = 0.2
    max_words: int = 1000  # words of each document the model sees
    balance: bool = True  # subsample the larger class to the size of the smaller one (DCLM trains balanced)
    max_per_class: int | None = None  # cap on examples per class (None: all)
    seed: int = 0
    threshold: float = 0.5  # for precision / recall
    epoch: int = 40  # small data sets need many passes
    lr: float = 0.2  # 0.5 and above can diverge (NaN) on a few hundred documents
    dim: int = 32
    word_ngrams: int = 2
    min_count: int = 1
    bucket: int = 100_000
    threads: int = 1  # 1: the same data and seed give the same model

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or name_problem(self.name) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise CurationConfigError(f"classifier name {self.name!r} must be lowercase letters, digits and _ (it becomes the "
                              f"metadata field `{self.name}_score`), e.g. math", ["--name"])
        if not 0 < self.held_out_fraction < 1:
            raise CurationConfigError(f"held_out_fraction={self.held_out_fraction!r} must be between 0 and 1, e.g. 0.2",
                              ["--held-out"])
        for name in ("max_words", "epoch", "dim", "word_ngrams", "min_count", "bucket", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CurationConfigError(f"{name}={value!r} must be a whole number >= 1", [f"--{name.replace('_', '-')}"])
        if self.max_per_class is not None and (not isinstance(self.max_per_class, int) or self.max_per_class < 2):
            raise CurationConfigError(f"max_per_class={self.max_per_class!r} must be >= 2 or None", ["--max-per-class"])
        if not 0 < self.threshold < 1 or not 0 < self.lr:
            raise CurationConfigError(f"threshold={self.threshold!r} must be in (0, 1) and lr={self.lr!r} > 0",
                              ["--threshold", "--lr"])


@dataclass
class TrainedClassifier:
    """The result of `train_classifier`: where the model is, its card, and the held-out predictions."""

    directory: Path
    card: dict[str, Any]
    metrics: BinaryMetrics
    held_out: list[tuple[Example, float]] = field(repr=False, default_factory=list)

    def summary_lines(self) -> list[str]:
        sizes = self.card["sizes"]
        return [
            f"classifier {self.card['name']}: trained on {sizes['train']['positive']} positive / "
            f"{sizes['train']['negative']} negative, held out {sizes['held_out']['positive']} / "
            f"{sizes['held_out']['negative']}",
            f"held-out {self.metrics.line()}",
            f"model: {self.directory / MODEL_FILE}  card: {self.directory / CARD_FILE}",
        ]


def collect_examples(positives: Sequence[ExampleSpec], negatives: Sequence[ExampleSpec],
                     manifest: ShardManifest | None, max_words: int) -> tuple[list[Example], dict[str, int]]:
    """Normalised examples of both classes, with empty texts and repeats dropped; a text named as both positive
    and negative is dropped from both (it can only teach noise). Returns the examples and what was dropped."""
    by_text: dict[str, Example] = {}
    conflicting: set[str] = set()
    dropped = {"empty": 0, "repeated": 0, "both_classes": 0}
    for positive, specs in ((True, positives), (False, negatives)):
        for spec in specs:
            for doc_id, raw in spec_texts(spec, manifest):
                text = normalise_text(raw or "", max_words)
                if not text:
                    dropped["empty"] += 1
                elif text in by_text:
                    if by_text[text].positive != positive:
                        conflicting.add(text)
                    else:
                        dropped["repeated"] += 1
                else:
                    by_text[text] = Example(f"{spec}/{doc_id}", text, positive)
    dropped["both_classes"] = len(conflicting)
    return [e for t, e in by_text.items() if t not in conflicting], dropped


def _split(examples: list[Example], config: ClassifierTrainConfig) -> tuple[list[Example], list[Example]]:
    """Stratified, seeded train / held-out split, after balancing and capping each class."""
    rng = random.Random(config.seed)
    classes = [[e for e in examples if e.positive], [e for e in examples if not e.positive]]
    for name, members in zip(("positive", "negative"), classes, strict=True):
        if len(members) < 2:
            raise CurationConfigError(f"only {len(members)} distinct {name} example(s): a classifier needs at least 2 per "
                              "class (one to train on, one held out); name more documents", [f"--{name}"])
    for members in classes:
        rng.shuffle(members)
    size = min(len(c) for c in classes) if config.balance else None
    if config.max_per_class is not None:
        size = min(size or config.max_per_class, config.max_per_class)
    train, held_out = [], []
    for members in classes:
        members = members[:size] if size else members
        n_held = min(len(members) - 1, max(1, round(len(members) * config.held_out_fraction)))
        held_out += members[:n_held]
        train += members[n_held:]
    rng.shuffle(train)
    return train, held_out


def positive_probability(model: Any, texts: Sequence[str]) -> list[float]:
    """P(positive) of each normalised text (the two labels' probabilities sum to 1 under softmax)."""
    labels, probs = model.predict(list(texts), k=-1)
    return [float(dict(zip(lab, prob, strict=True)).get(POSITIVE_LABEL, 0.0)) for lab, prob in zip(labels, probs,
                                                                                                   strict=True)]


NAN_RETRIES = 3
# fastText trains in a fresh interpreter: in one process, the fourth and later `train_supervised` calls on the
# same file and seed gave other weights than the first three, then diverged to NaN (fasttext-numpy2-wheel
# 0.9.2), while each fresh process gives the same model every time.
_FIT_SCRIPT = """
import json, sys
import fasttext
args = json.loads(sys.argv[1])
lr = args["lr"]
for attempt in range(args["retries"] + 1):
    try:
        model = fasttext.train_supervised(input=args["input"], lr=lr, **args["settings"])
    except RuntimeError as err:
        if attempt == args["retries"]:
            print(json.dumps({"error": str(err), "lr": lr}))
            sys.exit(0)
        lr /= 2
        continue
    model.save_model(args["output"])
    print(json.dumps({"lr": lr}))
    break
"""


def _fit(train_file: Path, model_path: Path, config: ClassifierTrainConfig) -> float:
    """fastText supervised training into `model_path`, in a child interpreter (see _FIT_SCRIPT). When training
    diverges ("Encountered NaN") it is retried with half the learning rate, up to NAN_RETRIES times. Returns the
    learning rate that worked (the card records it)."""
    settings = {"epoch": config.epoch, "dim": config.dim, "wordNgrams": config.word_ngrams,
                "minCount": config.min_count, "bucket": config.bucket, "thread": config.threads,
                "seed": config.seed, "loss": "softmax", "verbose": 0}
    request = {"input": str(train_file), "output": str(model_path), "lr": config.lr, "retries": NAN_RETRIES,
               "settings": settings}
    child = subprocess.run([sys.executable, "-c", _FIT_SCRIPT, json.dumps(request)], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"classifier {config.name!r}: fastText training failed:\n{child.stderr[-2000:]}")
    answer = json.loads(child.stdout.strip().splitlines()[-1])
    if "error" in answer:
        raise CurationConfigError(f"classifier {config.name!r}: fastText training diverged ({answer['error']}) down to "
                          f"lr={answer['lr']:g}; lower --lr or --epoch, or give more examples", ["--lr", "--epoch"])
    return float(answer["lr"])


def train_classifier(positives: Sequence[ExampleSpec], negatives: Sequence[ExampleSpec], out_dir: str | Path,
                     config: ClassifierTrainConfig, curated: str | Path | None = None) -> TrainedClassifier:
    """Train, score the held-out split, and write `model.bin`, `card.json` and `held_out.jsonl` to `out_dir`."""
    from fasttext.FastText import _FastText

    if not positives or not negatives:
        raise CurationConfigError("a classifier needs positive and negative examples: give --positive and --negative "
                          "(or --preset)", ["--positive", "--negative"])
    manifest = ShardManifest.load(curated) if curated is not None else None
    examples, dropped = collect_examples(positives, negatives, manifest, config.max_words)
    train, held_out = _split(examples, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / MODEL_FILE
    tmp_model = out / f".{MODEL_FILE}.tmp"
    with tempfile.TemporaryDirectory(prefix="mixlab-classify-") as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("".join(f"{POSITIVE_LABEL if e.positive else NEGATIVE_LABEL} {e.text}\n" for e in train),
                              encoding="utf-8")
        lr_used = _fit(train_file, tmp_model, config)
    os.replace(tmp_model, model_path)
    model = _FastText(str(model_path))
    scores = positive_probability(model, [e.text for e in held_out])
    metrics = binary_metrics([e.positive for e in held_out], scores, config.threshold)
    with open(out / HELD_OUT_FILE, "w", encoding="utf-8") as handle:
        for example, score in zip(held_out, scores, strict=True):
            handle.write(json.dumps({"id": example.id, "positive": example.positive, "score": score}) + "\n")
    count = lambda items, positive: sum(1 for e in items if e.positive == positive)  # noqa: E731
    card = {
        "card_version": CARD_VERSION,
        "name": config.name,
        "score_field": score_field(config.name),
        "labels": {"positive": POSITIVE_LABEL, "negative": NEGATIVE_LABEL},
        "score": f"fastText probability of {POSITIVE_LABEL} on normalise_text(text, max_words)",
        "positives": [str(s) for s in positives],
        "negatives": [str(s) for s in negatives],
        "curated": str(curated) if curated is not None else None,
        "sizes": {"distinct_examples": {"positive": count(examples, True), "negative": count(examples, False)},
                  "dropped": dropped,
                  "train": {"positive": count(train, True), "negative": count(train, False)},
                  "held_out": {"positive": count(held_out, True), "negative": count(held_out, False)}},
        "metrics": asdict(metrics),
        "config": asdict(config),
        "lr_used": lr_used,  # config.lr, or less where training diverged and was retried
        "model_sha256": sha256_file(model_path),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return TrainedClassifier(out, card, metrics, list(zip(held_out, scores, strict=True)))


def math_vs_not_specs(manifest: ShardManifest) -> tuple[list[ExampleSpec], list[ExampleSpec]]:
    """The "math vs not" preset: sources of kind math are positive, web and code sources negative."""
    kinds = {name: entry.kind for name, entry in sorted(manifest.sources.items())}
    positives = [ExampleSpec("source", n) for n, k in kinds.items() if k == "math"]
    negatives = [ExampleSpec("source", n) for n, k in kinds.items() if k in ("web", "code")]
    if not positives or not negatives:
        raise CurationConfigError(f"preset math-vs-not needs a math source and a web or code source in {manifest.root}; "
                          f"sources there: {kinds}", ["--curated"])
    return positives, negatives


PRESETS = {"math-vs-not": ("math", math_vs_not_specs)}


def train_preset(preset: str, curated: str | Path, out_dir: str | Path, **overrides: Any) -> TrainedClassifier:
    """A named classifier trained on a curated directory, e.g. "math-vs-not" on the demo data (seconds)."""
    if preset not in PRESETS:
        raise CurationConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}", ["--preset"])
    name, specs = PRESETS[preset]
    positives, negatives = specs(ShardManifest.load(curated))
    config = ClassifierTrainConfig(**{"name": name, **overrides})
    return train_classifier(positives, negatives, out_dir, config, curated)


# ---- using a model ----------------------------------------------------------------------------------
@dataclass
class QualityClassifier:
    """A trained model and its card, scoring raw text the way it was trained."""

    directory: Path
    card: dict[str, Any]
    model: Any = field(repr=False)

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def field(self) -> str:
        return self.card["score_field"]

    def score(self, texts: Sequence[str]) -> list[float]:
        max_words = self.card["config"]["max_words"]
        return positive_probability(self.model, [normalise_text(t or "", max_words) for t in texts])


def load_classifier(directory: str | Path) -> QualityClassifier:
    """A model directory written by `train_classifier`, refused with what to do when its files do not match."""
    from fasttext.FastText import _FastText

    folder = Path(directory)
    card_path, model_path = folder / CARD_FILE, folder / MODEL_FILE
    if not card_path.is_file() or not model_path.is_file():
        raise CurationConfigError(f"{folder}: not a classifier directory (needs {CARD_FILE} and {MODEL_FILE}); train one "
                          "with `mixlab classify train`", ["--model"])
    card = json.loads(card_path.read_text())
    if card.get("card_version") != CARD_VERSION:
        raise CurationConfigError(f"{card_path}: card_version {card.get('card_version')!r} is not {CARD_VERSION}; retrain",
                          ["--model"])
    if sha256_file(model_path) != card["model_sha256"]:
        raise CurationConfigError(f"{model_path} is not the model its card describes (checksum differs); retrain", ["--model"])
    model = _FastText(str(model_path))
    if sorted(model.labels) != sorted([POSITIVE_LABEL, NEGATIVE_LABEL]):
        raise CurationConfigError(f"{model_path}: labels {model.labels} are not {POSITIVE_LABEL}/{NEGATIVE_LABEL}", ["--model"])
    return QualityClassifier(folder, card, model)


class ClassifierScorer(PipelineStep):
    """Writes the classifier's score into `metadata[<name>_score]`; keeps every document. The model is loaded
    on first use, so the step pickles as a path and each worker loads its own copy."""

    name = "🤖 quality score"
    type = "🏷 - ANNOTATOR"

    def __init__(self, model_dir: str | Path, batch_size: int = 256):
        super().__init__()
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        self._classifier: QualityClassifier | None = None

    @property
    def classifier(self) -> QualityClassifier:
        if self._classifier is None:
            self._classifier = load_classifier(self.model_dir)
        return self._classifier

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_classifier": None}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        batch: list[Document] = []
        for doc in data or ():
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._scored(batch)
                batch = []
        yield from self._scored(batch)

    def _scored(self, batch: list[Document]) -> Iterator[Document]:
        if not batch:
            return
        with self.track_time():
            scores = self.classifier.score([d.text for d in batch])
        for doc, score in zip(batch, scores, strict=True):
            doc.metadata[self.classifier.field] = score
            self.stat_update("scored")
            yield doc


class ScoreThresholdFilter(BaseFilter):
    """Keeps documents whose `field` (a classifier's `<name>_score`) is at least `min_score` (and at most
    `max_score` when given). Drop reasons: `<field>_below`, `<field>_above`, `<field>_missing`."""

    name = "🎚 score threshold"

    def __init__(self, field: str, min_score: float | None = None, max_score: float | None = None):
        super().__init__()
        if min_score is None and max_score is None:
            raise CurationConfigError(f"a threshold on {field!r} needs min_score and/or max_score", ["--min-score"])
        for bound in (min_score, max_score):
            if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int | float) or math.isnan(bound)):
                raise CurationConfigError(f"threshold on {field!r}: {bound!r} is not a number", ["--min-score"])
        self.field, self.min_score, self.max_score = field, min_score, max_score

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        value = doc.metadata.get(self.field)
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            return False, f"{self.field}_missing"
        if self.min_score is not None and value < self.min_score:
            return False, f"{self.field}_below"
        if self.max_score is not None and value > self.max_score:
            return False, f"{self.field}_above"
        return True


# ---- keeping scores in the curated Parquet and the manifest --------------------------------------------
def scored_schema(fields: Iterable[str]) -> pa.Schema:
    """CURATED_SCHEMA with one float64 metadata column per score field (after the fixed ones, sorted)."""
    metadata = CURATED_SCHEMA.field("metadata").type
    known = {f.name for f in metadata}
    extra = [pa.field(f, pa.float64()) for f in sorted(set(fields)) if f not in known]
    struct = pa.struct([*metadata, *extra])
    return pa.schema([CURATED_SCHEMA.field("text"), CURATED_SCHEMA.field("id"), pa.field("metadata", struct)])


class _ScoredRecord:
    """ParquetWriter adapter: `curated_record` plus the score fields (None where a document has no score)."""

    def __init__(self, fields: Sequence[str]):
        self.fields = list(fields)

    def __call__(self, writer: Any, document: Document) -> dict:
        record = curated_record(writer, document)
        for name in self.fields:
            value = document.metadata.get(name)
            record["metadata"][name] = float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
                else None
        return record


def scored_parquet_writer(output_folder: DataFolderLike, fields: Sequence[str]) -> ParquetWriter:
    """`writers.curated_parquet_writer` whose schema keeps the given score fields (for a recipe that scores)."""
    fields = sorted(set(fields))
    return ParquetWriter(output_folder, output_filename="${rank}.parquet", adapter=_ScoredRecord(fields),
                         schema=scored_schema(fields), compression="zstd")


def score_summary(values: Iterable[float | None]) -> dict[str, Any]:
    """A score's manifest summary: documents scored / missing, mean, quantiles and a ten-bin histogram on [0, 1]."""
    values = list(values)
    present = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    missing = len(values) - int(present.size)
    counts, edges = np.histogram(np.clip(present, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    summary: dict[str, Any] = {"docs": int(present.size), "missing": missing,
                               "histogram": {f"{lo:.1f}-{hi:.1f}": int(c)
                                             for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)}}
    if present.size:
        quantiles = np.quantile(present, [0.1, 0.5, 0.9])
        summary.update(mean=round(float(present.mean()), 4), min=round(float(present.min()), 4),
                       p10=round(float(quantiles[0]), 4), p50=round(float(quantiles[1]), 4),
                       p90=round(float(quantiles[2]), 4), max=round(float(present.max()), 4))
    return summary


def shard_score_summaries(paths: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """`score_summary` of every `*_score` metadata column found in the given curated shards."""
    values: dict[str, list[float | None]] = {}
    for path in paths:
        metadata = _flat_metadata(pq.read_table(path, columns=["id", "metadata"]))
        for name in metadata.column_names:
            if name.endswith("_score") and name != "language_score":
                values.setdefault(name, []).extend(metadata.column(name).to_pylist())
    return {name: score_summary(v) for name, v in sorted(values.items())}


def _rewrite_with_scores(path: Path, classifier: QualityClassifier) -> None:
    """One curated shard again, with the classifier's score as a metadata column (replacing an older one)."""
    table = pq.read_table(path)
    metadata = table.column("metadata").combine_chunks()
    columns = {f.name: values for f, values in zip(metadata.type, metadata.flatten(), strict=True)}
    columns[classifier.field] = pa.array(classifier.score(table.column("text").to_pylist()), pa.float64())
    struct = pa.StructArray.from_arrays(list(columns.values()), names=list(columns))
    out = table.set_column(table.schema.get_field_index("metadata"), "metadata", struct)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(out, tmp, compression="zstd")
    os.replace(tmp, path)


def annotate_curated(curated: str | Path, model_dir: str | Path,
                     sources: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Score every document of the curated sources (default: all, so that `data/` keeps one schema), rewrite
    their shards with the `<name>_score` metadata column, and record in each source's manifest entry the new
    checksums and `metadata_summary["scores"][<name>_score]` (`score_summary` plus the model's checksum).
    Returns the summaries by source. Re-running `mixlab tokenize` carries the score into the token sidecars,
    where a selection can filter on it (`{"math_score": {"min": 0.8}}`)."""
    classifier = load_classifier(model_dir)
    manifest = ShardManifest.load(curated)
    names = list(sources) if sources else sorted(manifest.sources)
    for name in names:
        manifest.source(name)  # unknown names refused before anything is rewritten
    summaries = {}
    for name in names:
        entry = manifest.sources[name]
        for shard in entry.shards:
            path = manifest.resolve(shard.path)
            _rewrite_with_scores(path, classifier)
            shard.bytes, shard.sha256 = path.stat().st_size, sha256_file(path)
        summary = shard_score_summaries(manifest.resolve(s.path) for s in entry.shards)[classifier.field]
        summary["model_sha256"] = classifier.card["model_sha256"]
        entry.metadata_summary.setdefault("scores", {})[classifier.field] = summary
        summaries[name] = summary
    manifest.save()
    return summaries

