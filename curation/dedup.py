"""Dedup: exact (normalised content hash), MinHash near-dedup (datatrove's four stages), datatrove's
sentence dedup, and an in-memory datasketch index for checking a small new source.

Stage 1 (signatures) and stage 4 (filter) must read the same files with the same number of tasks: the
signature files are named by rank and hold document indices within that rank's input.
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import json
import re
import struct
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.dedup.minhash import (
    SENTINEL,
    HashSig,
    MinhashConfig,
    MinhashDedupBuckets,
    read_sigs,
)
from datatrove.pipeline.dedup.sentence_dedup import (
    SentDedupConfig,
    SentenceDedupFilter,
    SentenceDedupSignature,
    SentenceFindDedups,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.binaryio import read_tuples_from_file
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer
from mixlab.curation.errors import CurationConfigError

if TYPE_CHECKING:  # datasketch is imported where it is used: it imports scipy.integrate (1 s)
    from datasketch import MinHash


class CountingMinhashDedupFilter(MinhashDedupFilter):
    """MinhashDedupFilter whose drops carry a reason like every filter's: `minhash_duplicate` (a near duplicate
    of a document kept in this source) or `minhash_duplicate_of_<source>` (of one kept in an earlier-curated
    source, when the cluster stage wrote `<rank>.earlier_source`, see `IndexedMinhashDedupBuckets`).

    Each kept document records `dup_cluster_size`: its MinHash cluster's size plus the exact copies of it
    that exact dedup (when it ran before) dropped. Exact copies of the cluster's *other* members were
    dropped before MinHash saw them and are not counted, so with both dedups it is a lower bound."""

    name = "🎯 MinHash stage 4 (filter)"

    def _earlier_sources(self, rank: int) -> dict[int, str]:
        """doc index -> the earlier source it duplicates, for this rank's documents (empty within one source)."""
        rank_file = f"{rank:06d}{EARLIER_SOURCE}"
        if not self.data_folder.exists(EARLIER_SOURCES_JSON) or not self.data_folder.exists(rank_file):
            return {}
        with self.data_folder.open(EARLIER_SOURCES_JSON, "rt") as handle:
            names = json.load(handle)
        with self.data_folder.open(f"{rank:06d}{EARLIER_SOURCE}", "rb") as handle:
            return {doc: names[pos] for doc, pos in read_tuples_from_file(handle, "2I")}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        earlier = self._earlier_sources(rank)
        reasons: dict[str, int] = {}
        pulled: list[int] = []  # indices read since the last kept document

        def reason_of(index: int) -> str:
            source = earlier.get(index)
            return f"minhash_duplicate_of_{source}" if source is not None else "minhash_duplicate"

        def indexed() -> DocumentsPipeline:
            for index, doc in enumerate(data or ()):
                pulled.append(index)
                doc.metadata["filter_reason"] = reason_of(index)  # for the exclusion writer; kept ones lose it
                yield doc

        def count_dropped(indices: list[int]) -> None:
            for index in indices:
                reasons[reason_of(index)] = reasons.get(reason_of(index), 0) + 1

        for doc in super().run(indexed(), rank, world_size):
            count_dropped(pulled[:-1])
            pulled.clear()
            doc.metadata.pop("filter_reason", None)
            minhash_size = int(doc.metadata.get("minhash_cluster_size") or 1)
            doc.metadata["dup_cluster_size"] = minhash_size + int(doc.metadata.get("exact_cluster_size") or 1) - 1
            yield doc
        count_dropped(pulled)
        for reason, value in sorted(reasons.items()):
            self.stat_update(f"dropped_{reason}", value=value)


@dataclass
class MinhashSettings:
    """14 buckets x 8 hashes over 5-grams: pairs above ~0.75 Jaccard similarity are caught (FineWeb's).

    `across_sources`: also drop near duplicates of documents kept in earlier-curated sources (through the
    curated directory's MinHash index, `IndexedMinhashDedupBuckets`). On by default like exact dedup's: a
    document repeated across sources is weighted twice by any mixture. Translations are not near duplicates:
    on the demo corpus's web-<lang> help pages the highest estimated Jaccard between two languages' pages is
    0.29 (5-gram shingles share only code and product names), far under the ~0.75 the 14x8 bands catch."""

    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1
    across_sources: bool = True

    def config(self) -> MinhashConfig:
        return MinhashConfig(
            n_grams=self.n_grams,
            num_buckets=self.num_buckets,
            hashes_per_bucket=self.hashes_per_bucket,
            seed=self.seed,
            hash_config=HashConfig(precision=64),
        )


@dataclass
class MinhashStages:
    """The four stage pipelines; `filter` is completed by the caller with the reader and the writer."""

    signatures: list[PipelineStep]
    buckets: list[PipelineStep]
    clusters: list[PipelineStep]
    filter: CountingMinhashDedupFilter
    buckets_tasks: int


MINHASH_INDEX = ".minhash.index"  # index/minhash/<config>/bucket_NNN/<source>_<worker>.minhash.index
INDEX_MATCHES = ".index_matches"  # buckets stage: (file, doc, earlier-source position) of each index match
EARLIER_SOURCE = ".earlier_source"  # cluster stage, per rank: (doc, earlier-source position), sorted by doc
EARLIER_SOURCES_JSON = "earlier_sources.json"  # the earlier sources' names, by position
INDEX_ORDER = "order.json"
_MATCH_FORMAT = "<3I"


def register_source(index_folder: Path, source: str) -> list[str]:
    """The sources of a cross-source index in the order they first registered, `source` appended if new.

    Earlier sources keep what they share with later ones, so the order (not the order of a run) decides who
    keeps a copy: re-curating a source never makes it drop copies of a source registered after it. A file
    lock makes concurrent tasks (the 14 MinHash bucket tasks) agree on one order."""
    index_folder.mkdir(parents=True, exist_ok=True)
    order_path = index_folder / INDEX_ORDER
    with open(index_folder / f".{INDEX_ORDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        order: list[str] = json.loads(order_path.read_text()) if order_path.exists() else []
        if source not in order:
            order.append(source)
            tmp = order_path.with_name(f".{order_path.name}.{source}.tmp")
            tmp.write_text(json.dumps(order, indent=1))
            tmp.replace(order_path)
    return order


def source_index_entries(index_folder: Path, source: str) -> list[Path]:
    """The files one source holds in a cross-source index: `<source>.exact_hashes` (exact dedup) or
    `<config>/bucket_NNN/<source>_<worker>.minhash.index` (MinHash)."""
    index_folder = Path(index_folder)
    exact = index_folder / f"{source}{EXACT_HASHES}"
    minhash = [p for p in index_folder.glob(f"*/bucket_*/*{MINHASH_INDEX}")
               if _index_file_worker(p, source) is not None]
    return sorted([exact, *minhash] if exact.is_file() else minhash)


def earlier_sources_digest(index_folder: Path, source: str) -> str | None:
    """A hash of the entries of every source registered in the index before `source` (all registered ones when
    it is not yet): what its cross-source dedup decisions depend on, so that a source whose earlier sources
    changed is curated again. None when no source comes before it."""
    order_path = Path(index_folder) / INDEX_ORDER
    if not order_path.is_file():
        return None
    order: list[str] = json.loads(order_path.read_text())
    earlier_sources = order[:order.index(source)] if source in order else order
    if not earlier_sources:
        return None  # the first source depends on no other, whether or not the order exists yet
    digest = hashlib.sha256()
    for earlier in earlier_sources:
        for path in source_index_entries(index_folder, earlier):
            digest.update(path.relative_to(index_folder).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def remove_source_entries(index_folder: Path, source: str) -> None:
    """Remove what a source holds in a cross-source index (it is curated again, or empty now); its place in the
    order stays, so the sources after it keep their priority."""
    for path in source_index_entries(index_folder, source):
        path.unlink(missing_ok=True)


def minhash_index_name(config: MinhashConfig) -> str:
    """The index subfolder of one MinHash configuration: signatures of other settings are not comparable."""
    return (f"{config.n_grams}ng_{config.num_buckets}bs_{config.hashes_per_bucket}hs_"
            f"{config.hash_config.precision}bit_seed{config.seed}")


def _index_file_worker(path: Path, source: str) -> int | None:
    """The bucket worker of `<source>_<worker>.minhash.index`, or None for another source's file."""
    match = re.fullmatch(rf"{re.escape(source)}_(\d{{2}}){re.escape(MINHASH_INDEX)}", path.name)
    return int(match.group(1)) if match else None


class IndexedMinhashDedupBuckets(MinhashDedupBuckets):
    """MinHash stage 2 across sources: duplicate pairs within this source, plus matches with the bucket
    signatures of the sources registered before it (`register_source`) in `index_folder`.

    datatrove's stage 2 reads every index file of the folder; this one reads only earlier sources' (so that
    re-curating a source never drops copies a later source holds), records which source each match is with
    (`<bucket>_<worker>.index_matches`), and saves this source's signatures as its index entry
    (`<config>/bucket_NNN/<source>_<worker>.minhash.index`, replaced atomically on every run). Like
    datatrove's, the entry holds the signatures of every document MinHash saw, dropped ones too: a later
    document near one of them is in the same cluster as the copy that was kept, as one joint run would have
    it. Index matches are written as datatrove's (SENTINEL, SENTINEL) pairs, so stage 3 is datatrove's."""

    name = "🎯 MinHash stage 2 (across sources)"

    def __init__(self, input_folder: str | Path, output_folder: str | Path, index_folder: str | Path, source: str,
                 config: MinhashConfig, lines_to_buffer: int = 5):
        super().__init__(str(input_folder), str(output_folder), index_folder=None, config=config,
                         only_dedup_in_index=False, create_index_name=source, lines_to_buffer=lines_to_buffer)
        self.source_index = Path(index_folder)
        self.source = source

    @property
    def config_folder(self) -> Path:
        return self.source_index / minhash_index_name(self.config)

    def _clear_stale_entries(self, bucket_dir: Path, rank: int, workers_per_bucket: int) -> None:
        """This source's index files no run of these settings writes: other workers' counts, other settings."""
        for path in bucket_dir.glob(f"*{MINHASH_INDEX}"):
            worker = _index_file_worker(path, self.source)
            if worker is not None and worker >= workers_per_bucket:
                path.unlink(missing_ok=True)
        if rank == 0:
            for path in self.source_index.glob(f"*/bucket_*/*{MINHASH_INDEX}"):
                if path.parents[1] != self.config_folder and _index_file_worker(path, self.source) is not None:
                    path.unlink(missing_ok=True)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is not None:
            raise ValueError("IndexedMinhashDedupBuckets reads signature files, not documents")
        if world_size % self.config.num_buckets:
            raise ValueError(f"MinHash stage 2 runs a multiple of num_buckets={self.config.num_buckets} tasks, "
                             f"not {world_size}")
        workers_per_bucket = world_size // self.config.num_buckets
        bucket, bucket_worker = divmod(rank, workers_per_bucket)
        order = register_source(self.source_index, self.source)
        earlier = order[:order.index(self.source)]
        bucket_dir = self.config_folder / f"bucket_{bucket:03d}"
        bucket_dir.mkdir(parents=True, exist_ok=True)
        self._clear_stale_entries(bucket_dir, rank, workers_per_bucket)
        if rank == 0:  # every task reads the same order: one of them names the earlier sources for stage 3
            with self.output_folder.open(EARLIER_SOURCES_JSON, "wt") as handle:
                json.dump(earlier, handle)
        with self.track_time():
            sig_files = self.input_folder.list_files(subdirectory=f"bucket_{bucket:03d}")
            hash_min, hash_max = self.get_worker_hash_range(sig_files, rank, world_size)
            line_size = struct.calcsize(f"{self.config.hashes_per_bucket}{self.config.hash_config.struct_format}I")
            block = self.lines_to_buffer * line_size if self.lines_to_buffer != -1 else None
            readers = [read_sigs(file, i, self.config, min_hash=hash_min, max_hash=hash_max,
                                 lines_to_buffer=self.lines_to_buffer)
                       for i, file in enumerate(self.input_folder.open_files(sig_files, mode="rb", block_size=block))]
            index_position: dict[int, int] = {}  # reader id of an index file -> position of its source in `earlier`
            index_folder = get_datafolder(str(self.config_folder))
            for position, other in enumerate(earlier):
                for path in sorted(bucket_dir.glob(f"*{MINHASH_INDEX}")):
                    if _index_file_worker(path, other) is None:
                        continue
                    index_position[len(readers)] = position
                    readers.append(read_sigs(index_folder.open(f"{bucket_dir.name}/{path.name}", mode="rb"),
                                             len(readers), self.config, index_file=True, min_hash=hash_min,
                                             max_hash=hash_max, lines_to_buffer=self.lines_to_buffer))
            queue = [sig for sig in (next(reader, None) for reader in readers) if sig is not None]
            heapq.heapify(queue)
            own_index = bucket_dir / f"{self.source}_{bucket_worker:02d}{MINHASH_INDEX}"
            own_tmp = own_index.with_name(f".{own_index.name}.tmp")
            sig_format = f"<%d{self.config.hash_config.struct_format}" % self.config.hashes_per_bucket
            with (self.output_folder.open(f"{bucket:05d}_{bucket_worker:02d}.dups", mode="wb") as dups,
                  self.output_folder.open(f"{bucket:05d}_{bucket_worker:02d}{INDEX_MATCHES}", mode="wb") as matches,
                  open(own_tmp, "wb") as index_out):
                last: HashSig | None = None
                matched: int | None = None  # earliest earlier source holding the current signature
                while queue:
                    sig: HashSig = heapq.heappop(queue)
                    same = last is not None and last.sig == sig.sig
                    if sig.is_from_index():  # index signatures sort before documents with the same signature
                        position = index_position[sig.reader_id]
                        matched = min(matched, position) if same and matched is not None else position
                    else:
                        if not same:
                            matched = None
                            index_out.write(struct.pack(sig_format, *sig.sig))
                        elif last.is_from_index():
                            dups.write(struct.pack("<4I", SENTINEL, SENTINEL, int(sig.file_stem), sig.doc_id))
                            self.stat_update("index_match", "total_matches")
                        else:
                            dups.write(struct.pack("<4I", int(last.file_stem), last.doc_id, int(sig.file_stem),
                                                   sig.doc_id))
                            self.stat_update("total_matches")
                        if same and matched is not None:
                            matches.write(struct.pack(_MATCH_FORMAT, int(sig.file_stem), sig.doc_id, matched))
                    last = sig
                    following = next(readers[sig.reader_id], None)
                    if following is not None:
                        heapq.heappush(queue, following)
            own_tmp.replace(own_index)
        yield from ()


class SourceAwareMinhashDedupCluster(MinhashDedupCluster):
    """datatrove's MinHash stage 3, plus which earlier source each dropped document duplicates.

    datatrove joins every document that matched an index into one cluster rooted at the index, so which
    source it was is lost; here each within-source cluster takes the earliest source any member matched,
    written as `<rank>.earlier_source` (doc, source position) for stage 4's drop reasons."""

    name = "🎯 MinHash stage 3 (clusters, across sources)"

    def run(self, data: DocumentsPipeline = None, _: int = 0, world_size: int = 1) -> DocumentsPipeline:
        yield from super().run(data, _, world_size) or ()
        if not self.input_folder.exists(EARLIER_SOURCES_JSON):
            return
        with self.input_folder.open(EARLIER_SOURCES_JSON, "rt") as handle:
            names = json.load(handle)
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def root(node: tuple[int, int]) -> tuple[int, int]:
            path = []
            while parent.get(node, node) != node:
                path.append(node)
                node = parent[node]
            for step in path:
                parent[step] = node
            return node

        for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
            with self.input_folder.open(dup_file, "rb") as handle:
                for f1, d1, f2, d2 in read_tuples_from_file(handle, "4I", lines_to_buffer=self.lines_to_buffer):
                    if f1 != SENTINEL:
                        a, b = root((f1, d1)), root((f2, d2))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
        direct: dict[tuple[int, int], int] = {}
        for match_file in self.input_folder.list_files(glob_pattern=f"*{INDEX_MATCHES}"):
            with self.input_folder.open(match_file, "rb") as handle:
                for file, doc, position in read_tuples_from_file(handle, "3I", lines_to_buffer=self.lines_to_buffer):
                    direct[(file, doc)] = min(direct.get((file, doc), position), position)
        by_root: dict[tuple[int, int], int] = {}
        for node, position in direct.items():
            top = root(node)
            by_root[top] = min(by_root.get(top, position), position)
        per_file: dict[int, list[tuple[int, int]]] = {}
        for node in set(parent) | set(direct):
            position = by_root.get(root(node))
            if position is not None:
                per_file.setdefault(node[0], []).append((node[1], position))
        with self.output_folder.open(EARLIER_SOURCES_JSON, "wt") as handle:
            json.dump(names, handle)
        for file, records in sorted(per_file.items()):
            with self.output_folder.open(f"{file:06d}{EARLIER_SOURCE}", "wb") as handle:
                for doc, position in sorted(records):
                    handle.write(struct.pack("<2I", doc, position))
            for position in {p for _, p in records}:
                self.stat_update(f"duplicate_of_{names[position]}", value=sum(p == position for _, p in records))


def minhash_stages(work_dir: Path, settings: MinhashSettings, words: str | WordTokenizer,
                   save_cluster_ids: bool = False, index_folder: Path | None = None,
                   source: str | None = None) -> MinhashStages:
    """Stage steps writing under `work_dir/{signatures,buckets,clusters}`; readers are added by the recipe.

    `save_cluster_ids`: kept documents also record `minhash_cluster_id` (-1 when unique), and the cluster
    stage writes `<rank>.clusters` (doc index, cluster id) for every clustered document, dropped ones too.
    `index_folder` and `source` (together; used when `settings.across_sources`): also drop near duplicates of
    documents of sources registered in that index before this one, and save this source's entry there."""
    if (index_folder is None) != (source is None):
        raise ValueError(f"minhash_stages: index_folder={index_folder!r} and source={source!r} go together: "
                         "give both to dedup across sources, or neither")
    # datatrove's signature files byte for byte (tests/test_fast_minhash.py), several times faster
    from mixlab.curation.fast_minhash import FastMinhashDedupSignature

    config = settings.config()
    sigs, buckets, clusters = work_dir / "signatures", work_dir / "buckets", work_dir / "clusters"
    across = settings.across_sources and index_folder is not None and source is not None
    if across:
        bucket_step: PipelineStep = IndexedMinhashDedupBuckets(sigs, buckets, index_folder, source, config)
        cluster_class: type[MinhashDedupCluster] = SourceAwareMinhashDedupCluster
    else:
        bucket_step, cluster_class = MinhashDedupBuckets(input_folder=str(sigs), output_folder=str(buckets),
                                                         config=config), MinhashDedupCluster
    return MinhashStages(
        signatures=[FastMinhashDedupSignature(output_folder=str(sigs), config=config, language=words)],
        buckets=[bucket_step],
        clusters=[
            cluster_class(input_folder=str(buckets), output_folder=str(clusters), config=config,
                          save_cluster_size=True, save_cluster_id=save_cluster_ids)
        ],
        filter=CountingMinhashDedupFilter(input_folder=str(clusters), load_cluster_sizes=True,
                                          load_cluster_ids=save_cluster_ids),
        buckets_tasks=config.num_buckets,
    )


# ---- exact dedup ------------------------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w\s]|_")
_WHITESPACE = re.compile(r"\s+")
EXACT_HASHES = ".exact_hashes"  # stage 1: one file per rank, (hash, doc index) records
EXACT_DECISIONS = ".exact_decisions"  # stage 2: one file per rank, (doc index, cluster size; 0 = drop) records
HASH_DTYPE = np.dtype([("hash", "<u8"), ("doc", "<u4")])
DECISION_DTYPE = np.dtype([("doc", "<u4"), ("size", "<u4")])


def normalised_content(text: str) -> str:
    """The text exact dedup compares: NFKC, lowercased, punctuation removed, whitespace runs collapsed.

    Two documents that differ only in case, quotes, punctuation or spacing (a re-crawl with other
    typography, a copy with trailing spaces) are the same content for training."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _WHITESPACE.sub(" ", _PUNCTUATION.sub(" ", text)).strip()


def content_hash(text: str) -> int:
    """64-bit hash of `normalised_content(text)`: a collision among 2^32 documents has probability ~1e-10."""
    digest = hashlib.blake2b(normalised_content(text).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _rank_of(path: Path) -> int:
    return int(path.name.split(".", 1)[0])


class ExactDedupSignature(PipelineStep):
    """Exact dedup stage 1: the content hash of every document, saved as `<rank>.exact_hashes`.

    Like MinHash stage 1, documents are named by their index within the rank's input, so stage 3 must
    read the same files with the same number of tasks. A rank with no document writes an empty file, so
    stage 2 can tell it from a rank that never ran."""

    type = "🫂 - DEDUP"
    name = "🎯 exact dedup stage 1 (hashes)"

    def __init__(self, output_folder: str | Path):
        super().__init__()
        self.output_folder = Path(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        records = []
        for index, doc in enumerate(data or ()):
            self.stat_update(StatHints.total)
            records.append((content_hash(doc.text), index))
        self.output_folder.mkdir(parents=True, exist_ok=True)
        path = self.output_folder / f"{rank:06d}{EXACT_HASHES}"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(np.array(records, dtype=HASH_DTYPE).tobytes())
        tmp.replace(path)
        yield from ()


class ExactDedupCluster(PipelineStep):
    """Exact dedup stage 2 (one task): groups equal hashes over all ranks; the first document of a group
    (lowest rank, then lowest index) is kept and records the group's size, the others are dropped.

    With `index_folder` and `source`, documents whose hash is in the index of a source registered there
    before this one are dropped too (the first-curated source keeps the copy), and this source's hashes
    are saved to the index for the sources after it. `index_folder/order.json` lists sources in the
    order they first registered, so re-curating a source never makes it drop copies of a later one."""

    type = "🫂 - DEDUP"
    name = "🎯 exact dedup stage 2 (clusters)"

    def __init__(self, input_folder: str | Path, output_folder: str | Path, index_folder: str | Path | None = None,
                 source: str | None = None):
        super().__init__()
        if (index_folder is None) != (source is None):
            raise ValueError(f"ExactDedupCluster: index_folder={index_folder!r} and source={source!r} go together: "
                             "give both to dedup across sources, or neither")
        self.input_folder, self.output_folder = Path(input_folder), Path(output_folder)
        self.index_folder = Path(index_folder) if index_folder is not None else None
        self.source = source

    def _earlier_hashes(self) -> np.ndarray:
        """Sorted hashes of the sources registered in the index before this one (registering it if new)."""
        assert self.index_folder is not None and self.source is not None
        order = register_source(self.index_folder, self.source)
        earlier = [self.index_folder / f"{s}{EXACT_HASHES}" for s in order[:order.index(self.source)]]
        arrays = [np.fromfile(p, dtype="<u8") for p in earlier if p.exists()]
        return np.unique(np.concatenate(arrays)) if arrays else np.array([], dtype="<u8")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if world_size != 1:
            raise ValueError(f"ExactDedupCluster runs as one task, not {world_size}")
        files = sorted(self.input_folder.glob(f"*{EXACT_HASHES}"))
        per_rank = [np.fromfile(f, dtype=HASH_DTYPE) for f in files]
        ranks = np.concatenate([np.full(len(a), _rank_of(f), dtype="<u4") for f, a in zip(files, per_rank,
                                                                                            strict=True)] or [[]])
        records = np.concatenate(per_rank) if per_rank else np.array([], dtype=HASH_DTYPE)
        hashes, docs = records["hash"], records["doc"]
        order = np.lexsort((docs, ranks, hashes))
        hashes, docs, ranks = hashes[order], docs[order], ranks[order].astype("<u4")
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        group = np.cumsum(first) - 1
        sizes = np.bincount(group)[group] if len(group) else np.array([], dtype=np.int64)
        keep = first.copy()
        if self.index_folder is not None:
            seen_before = np.isin(hashes, self._earlier_hashes())
            keep &= ~seen_before
            self.stat_update("exact_duplicate_of_earlier_source", value=int((first & seen_before).sum()))
        self.stat_update("documents", value=len(hashes))
        self.stat_update("duplicate_groups", value=int((first & (sizes > 1)).sum()))
        self.stat_update("to_remove", value=int(len(hashes) - keep.sum()))
        self.output_folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            mine = ranks == _rank_of(f)
            decisions = np.empty(int(mine.sum()), dtype=DECISION_DTYPE)
            decisions["doc"] = docs[mine]
            decisions["size"] = np.where(keep[mine], sizes[mine], 0)
            decisions.sort(order="doc")
            path = self.output_folder / f"{_rank_of(f):06d}{EXACT_DECISIONS}"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(decisions.tobytes())
            tmp.replace(path)
        if self.index_folder is not None:
            path = self.index_folder / f"{self.source}{EXACT_HASHES}"
            tmp = path.with_name(f".{path.name}.tmp")
            np.unique(hashes).astype("<u8").tofile(tmp)
            tmp.replace(path)
        yield from ()


class ExactDedupFilter(BaseFilter):
    """Exact dedup stage 3: drops the documents stage 2 marked (`exact_duplicate`); each kept one records
    `exact_cluster_size` and `dup_cluster_size` (1 = unique) in its metadata."""

    name = "🎯 exact dedup stage 3 (filter)"

    def __init__(self, input_folder: str | Path):
        super().__init__()
        self.input_folder = Path(input_folder)
        self._sizes: np.ndarray = np.array([], dtype="<u4")
        self._index = 0

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        path = self.input_folder / f"{rank:06d}{EXACT_DECISIONS}"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no exact-dedup decisions for rank {rank}; run exact dedup stages 1 "
                                    "and 2 first, reading the same files with the same number of tasks")
        decisions = np.fromfile(path, dtype=DECISION_DTYPE)
        sizes = np.ones(0, dtype="<u4")
        if len(decisions):
            sizes = np.ones(int(decisions["doc"].max()) + 1, dtype="<u4")
            sizes[decisions["doc"]] = decisions["size"]
        self._sizes, self._index = sizes, 0
        yield from super().run(data, rank, world_size)
        if self._index < len(sizes):
            raise RuntimeError(f"{path}: decisions for {len(sizes)} documents but rank {rank} read {self._index}: "
                               "stage 3 must read the same files with the same number of tasks as stage 1")

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        index, self._index = self._index, self._index + 1
        size = int(self._sizes[index]) if index < len(self._sizes) else 1
        if size == 0:
            return False, "exact_duplicate"
        doc.metadata["exact_cluster_size"] = size
        doc.metadata["dup_cluster_size"] = size
        return True


@dataclass
class ExactDedupSettings:
    """Exact dedup on `normalised_content`; `across_sources`: also drop copies of earlier-curated sources
    (through the shared index folder, `SourceLayout.exact_index`)."""

    across_sources: bool = True


@dataclass
class ExactDedupStages:
    signatures: list[PipelineStep]
    clusters: list[PipelineStep]
    filter: ExactDedupFilter


def exact_dedup_stages(work_dir: Path, index_folder: Path | None = None, source: str | None = None) -> ExactDedupStages:
    """Stage steps writing under `work_dir/{hashes,decisions}`; readers (the same for stages 1 and 3) are
    added by the caller."""
    hashes, decisions = work_dir / "hashes", work_dir / "decisions"
    return ExactDedupStages(
        signatures=[ExactDedupSignature(hashes)],
        clusters=[ExactDedupCluster(hashes, decisions, index_folder=index_folder, source=source)],
        filter=ExactDedupFilter(decisions),
    )


# ---- sentence dedup ---------------------------------------------------------------------------------------


class CountingSentenceDedupFilter(SentenceDedupFilter):
    """datatrove's sentence-dedup stage 3, counting what it keeps and drops: a document left too short
    after its repeated sentences are cut is dropped as `sentence_dedup_too_short` (the stock step drops it
    without a count, which would break the manifest's accounting)."""

    name = "💥 sentence dedup stage 3 (filter)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        seen = out = 0

        def counted() -> DocumentsPipeline:
            nonlocal seen
            for doc in data or ():
                seen += 1
                yield doc

        for doc in super().run(counted(), rank, world_size):
            out += 1
            self.stat_update(StatHints.forwarded)
            yield doc
        if seen > out:
            self.stat_update(StatHints.dropped, value=seen - out)
            self.stat_update("dropped_sentence_dedup_too_short", value=seen - out)


@dataclass
class SentenceDedupSettings:
    """datatrove's sentence dedup (C4's three-sentence spans): spans of `n_sentences` sentences seen in an
    earlier document are cut; a document left with fewer than `min_doc_words` words or `min_num_sentences`
    sentences is dropped. `language` picks datatrove's sentence splitter (spaCy's sentencizer for "en")."""

    n_sentences: int = 3
    min_doc_words: int = 50
    min_num_sentences: int = 3
    split_sentences: bool = True
    language: str = "en"

    def config(self) -> SentDedupConfig:

        for name in ("n_sentences", "min_doc_words", "min_num_sentences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "n_sentences" else 0):
                raise CurationConfigError(f"sentence_dedup.{name}={value!r} must be a whole number "
                                  f"(>= {1 if name == 'n_sentences' else 0})", [f"sentence_dedup.{name}"])
        return SentDedupConfig(n_sentences=self.n_sentences, min_doc_words=self.min_doc_words,
                               min_num_sentences=self.min_num_sentences, split_sentences=self.split_sentences,
                               hash_config=HashConfig(precision=64))


@dataclass
class SentenceDedupStages:
    signatures: list[PipelineStep]
    find: list[PipelineStep]
    filter: CountingSentenceDedupFilter


def sentence_dedup_stages(work_dir: Path, settings: SentenceDedupSettings) -> SentenceDedupStages:
    """datatrove's three sentence-dedup stages under `work_dir/{signatures,duplicates}` (finder: one task)."""
    config = settings.config()
    sigs, dups = work_dir / "signatures", work_dir / "duplicates"
    return SentenceDedupStages(
        signatures=[SentenceDedupSignature(output_folder=str(sigs), config=config, language=settings.language)],
        find=[SentenceFindDedups(data_folder=str(sigs), output_folder=str(dups), config=config)],
        filter=CountingSentenceDedupFilter(data_folder=str(dups), config=config, language=settings.language),
    )


# ---- in-memory near-duplicate index (datasketch) ----------------------------------------------------------


@dataclass(frozen=True)
class NearDuplicatePair:
    """A document of the new source and the indexed one it nearly duplicates (`jaccard`: MinHash estimate)."""

    new_id: str
    indexed_id: str
    jaccard: float


class MinHashIndex:
    """datasketch MinHashLSH over the documents of an existing (curated) source, in memory.

    For a small new source, checking it against what is already curated is one query per document,
    without re-running the four datatrove stages over everything. Shingles and banding are the datatrove
    stages' (`MinhashSettings`: word n-grams after datatrove's text simplification, `num_buckets` bands of
    `hashes_per_bucket` rows), so the two agree on what a near duplicate is, up to hash functions."""

    def __init__(self, settings: MinhashSettings | None = None, words: str | WordTokenizer = "en"):
        self.settings = settings or MinhashSettings()
        self.num_perm = self.settings.num_buckets * self.settings.hashes_per_bucket
        self.tokenizer = load_word_tokenizer(words)
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(num_perm=self.num_perm,
                              params=(self.settings.num_buckets, self.settings.hashes_per_bucket))
        self.signatures: dict[str, MinHash] = {}

    def signature(self, text: str) -> MinHash:
        words = self.tokenizer.word_tokenize(simplify_text(text, TextNormConfig()))
        n = self.settings.n_grams
        shingles = {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass")
                    for i in range(max(1, len(words) - n + 1))}
        from datasketch import MinHash

        sig = MinHash(num_perm=self.num_perm, seed=self.settings.seed)
        sig.update_batch(list(shingles))
        return sig

    def add(self, doc_id: str, text: str) -> None:
        if doc_id in self.signatures:
            raise ValueError(f"MinHashIndex: document id {doc_id!r} is indexed already; ids must be unique")
        sig = self.signature(text)
        self.lsh.insert(doc_id, sig)
        self.signatures[doc_id] = sig

    def add_documents(self, docs: Iterable[Document | dict]) -> int:
        count = 0
        for doc in docs:
            doc_id, text = (doc.id, doc.text) if isinstance(doc, Document) else (doc["id"], doc["text"])
            self.add(str(doc_id), text)
            count += 1
        return count

    @classmethod
    def from_parquet(cls, folder: str | Path, settings: MinhashSettings | None = None,
                     words: str | WordTokenizer = "en") -> MinHashIndex:
        """The index of a curated source (`curated/data/<source>/*.parquet`, columns `id` and `text`)."""
        files = sorted(Path(folder).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{folder}: no Parquet shards to index; curate the source first")
        index = cls(settings, words)
        for path in files:
            table = pq.read_table(path, columns=["id", "text"])
            for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True):
                index.add(str(doc_id), text)
        return index

    def query(self, text: str) -> list[tuple[str, float]]:
        """Indexed documents sharing an LSH band with `text`, with their estimated Jaccard, best first."""
        sig = self.signature(text)
        found = [(key, float(sig.jaccard(self.signatures[key]))) for key in self.lsh.query(sig)]
        return sorted(found, key=lambda kv: (-kv[1], kv[0]))

    def near_duplicates(self, docs: Iterable[Document | dict], min_jaccard: float = 0.0) -> list[NearDuplicatePair]:
        """Every (new document, indexed document) candidate pair whose estimated Jaccard is >= `min_jaccard`."""
        pairs = []
        for doc in docs:
            doc_id, text = (doc.id, doc.text) if isinstance(doc, Document) else (doc["id"], doc["text"])
            pairs += [NearDuplicatePair(str(doc_id), key, j) for key, j in self.query(text) if j >= min_jaccard]
        return pairs
