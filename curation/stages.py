"""How a source's curation is laid out on disk and cut into executor stages.

A recipe (pipelines/web.py, code.py, ...) chooses the filter steps; `assemble_stages` adds what every
source shares: the validating reader with quarantine, n-gram decontamination after the recipe's filters, the
intermediate JSONL, the dedup stages (exact and sentence dedup when asked for, then the four MinHash stages), and
the Parquet writer. The result is a list of `Stage`s that any datatrove executor can run in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.word_tokenizers import WordTokenizer
from mixlab.curation.classify import scored_parquet_writer, scored_schema
from mixlab.curation.decontam import DecontaminationFilter, DecontamSettings, decontam_index
from mixlab.curation.dedup import (
    ExactDedupSettings,
    MinhashSettings,
    SentenceDedupSettings,
    exact_dedup_stages,
    minhash_stages,
    sentence_dedup_stages,
)
from mixlab.curation.manifest import DATA_DIR, ManifestError
from mixlab.curation.paths import name_problem, outside_problem
from mixlab.curation.source_readers import reader_for
from mixlab.curation.writers import CURATED_SCHEMA, curated_parquet_writer


@dataclass(frozen=True)
class SourceLayout:
    """Every path curation uses for one source.

    The final Parquet goes to `curated/data/<source>/`, a folder that holds nothing but what a user loads
    (`datasets.load_dataset("curated/data")`, DuckDB's `read_parquet('curated/data/*/*.parquet')`); logs,
    work files, quarantine, tokens and the tokenizer live beside `data/`, never inside it.
    """

    source: str
    raw_dir: Path  # raw/<source>
    curated_dir: Path  # curated/

    def __post_init__(self) -> None:
        """Refuse a source name that is not a plain folder name, or a folder of this layout that resolves (through
        a symlink) outside the curated directory: curation clears and writes these folders."""
        if problem := name_problem(self.source):
            raise ManifestError(
                f"{self.raw_dir}: source name {self.source!r} {problem}; rename the raw folder (the name becomes "
                "folder names under the curated directory)", source=str(self.source), field="name", value=self.source)
        for folder in (self.output, self.curated_dir / self.source, self.quarantine, self.logs, self.work,
                       self.exact_index, self.minhash_index):
            if problem := outside_problem(self.curated_dir, folder):
                raise ManifestError(
                    f"{folder}: {problem}; curation writes and clears it, so it must be a real folder inside "
                    f"{self.curated_dir}: replace the symlink", source=self.source, field="path", value=str(folder))

    @property
    def output(self) -> Path:
        return self.curated_dir / DATA_DIR / self.source

    @property
    def legacy_output(self) -> Path | None:
        """`curated/<source>/` of the layout before `data/` (manifest schema 2) when it still holds that
        layout's Parquet and nothing else, so that re-curating can remove it; None otherwise."""
        folder = self.curated_dir / self.source
        if not folder.is_dir() or folder.resolve() == self.output.resolve():
            return None
        files = list(folder.iterdir())
        return folder if files and all(f.is_file() and f.suffix == ".parquet" for f in files) else None

    @property
    def quarantine(self) -> Path:
        return self.curated_dir / "quarantine" / self.source

    @property
    def logs(self) -> Path:
        return self.curated_dir / "logs" / self.source

    @property
    def work(self) -> Path:
        return self.curated_dir / "work" / self.source

    @property
    def filtered(self) -> Path:
        return self.work / "filtered"

    @property
    def minhash(self) -> Path:
        return self.work / "minhash"

    @property
    def exact(self) -> Path:
        return self.work / "exact"

    @property
    def sentence(self) -> Path:
        return self.work / "sentence"

    @property
    def exact_index(self) -> Path:
        """The exact-dedup index shared by all sources of this curated directory (content hashes per source
        and the order they registered in), so that a document already in one source is dropped from later ones."""
        return self.curated_dir / "index" / "exact"

    @property
    def minhash_index(self) -> Path:
        """The MinHash bucket index shared by all sources (one entry per source and MinHash configuration), so
        that a near-duplicate of a document kept in an earlier source is dropped from later ones. Never a stage
        output: clearing a stage must not clear the other sources' entries."""
        return self.curated_dir / "index" / "minhash"

    @property
    def decontam_report(self) -> Path:
        """The documents decontamination removed (`<rank>.jsonl`: id, eval set, eval item, n-gram); beside the
        source's datatrove logs, where the manifest's `metadata_summary.decontamination.report` points."""
        return self.logs / "decontamination"


@dataclass
class Stage:
    """One executor run: a pipeline, its task count, and the folders it writes (cleared when stale)."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int
    outputs: list[Path]
    max_workers: int | None = None  # e.g. 1 for the single-task cluster stage


@dataclass
class SourcePipelines:
    """The stages of one source, in order (which steps count documents is decided by
    `curation.accounting.step_name`)."""

    source: str
    kind: str
    stages: list[Stage]
    config: dict  # the recipe's settings, fingerprinted so that a changed recipe re-runs


def assemble_stages(layout: SourceLayout, kind: str, filters: list[PipelineStep], tasks: int,
                    minhash: MinhashSettings | None, words: str | WordTokenizer, config: dict,
                    max_doc_bytes: int | None = None, exact: ExactDedupSettings | None = None,
                    sentence: SentenceDedupSettings | None = None,
                    decontam: DecontamSettings | None = None, score_fields: Sequence[str] = ()) -> SourcePipelines:
    """raw JSONL -> [validating reader, *filters, decontamination] -> intermediate JSONL -> [exact dedup]
    -> [sentence dedup] -> [MinHash] -> Parquet.

    `max_doc_bytes`: raw records larger than this are quarantined as `too_large` before any expensive step
    (None: the reader's default, `MAX_DOC_BYTES`). `exact` / `sentence` (off when None) add those dedups;
    a dedup whose output a later dedup reads writes its kept documents to `work/<source>/<dedup>/kept`, since
    each dedup names documents by their index in the files it reads.

    `decontam` (off when None) appends a `DecontaminationFilter` after the recipe's filters (after PII redaction
    too): it checks the text as it will be trained on, on the fewest documents, and before dedup, so that the
    cross-source exact index and the MinHash clusters only hold clean documents. Its matches are listed in
    `layout.decontam_report`. `score_fields` (a recipe's classifier scores, e.g. `math_score`) are kept as
    metadata columns of the Parquet (`scored_parquet_writer`)."""
    if max_doc_bytes is not None and (isinstance(max_doc_bytes, bool) or not isinstance(max_doc_bytes, int)
                                      or max_doc_bytes <= 0):
        raise ValueError(f"{layout.source}: max_doc_bytes={max_doc_bytes!r} must be a positive number of bytes "
                         "(e.g. 4194304 for 4 MiB)")
    limit = {} if max_doc_bytes is None else {"max_doc_bytes": max_doc_bytes}
    # JSONL/Parquet, WARC, an HTML tree, a code tree or a saved HF dataset: whatever raw/<source> holds
    reader = reader_for(layout.raw_dir, str(layout.quarantine), **limit)
    filtered_writer = JsonlWriter(str(layout.filtered), output_filename="${rank}.jsonl.gz", compression="gzip")
    decontam_index_path = decontam_index(layout.curated_dir, decontam) if decontam is not None else None
    if decontam_index_path is not None:
        filters = [*filters, DecontaminationFilter(decontam_index_path, report_folder=layout.decontam_report)]
    stages = [Stage("filter", [reader, *filters, filtered_writer], tasks,
                    [layout.filtered, layout.quarantine, layout.decontam_report])]
    current = layout.filtered  # the folder the next stage reads
    pending: list[PipelineStep] = []  # a dedup's filter step, run where the next stage reads `current`

    def current_reader() -> JsonlReader:
        return JsonlReader(str(current), glob_pattern="*.jsonl.gz", add_file_path=False)

    def materialise(name: str, folder: Path) -> None:
        """Run the pending filter into `folder` so that the next dedup reads (and indexes) its output."""
        nonlocal current, pending
        if pending:
            writer = JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", compression="gzip")
            stages.append(Stage(name, [current_reader(), *pending, writer], tasks, [folder]))
            current, pending = folder, []

    if exact is not None:
        index = (layout.exact_index, layout.source) if exact.across_sources else (None, None)
        ex = exact_dedup_stages(layout.exact, *index)
        stages += [
            Stage("exact_hashes", [current_reader(), *ex.signatures], tasks, [layout.exact / "hashes"]),
            Stage("exact_clusters", ex.clusters, 1, [layout.exact / "decisions"], max_workers=1),
        ]
        pending = [ex.filter]
    if sentence is not None:
        materialise("exact_filter", layout.exact / "kept")
        sd = sentence_dedup_stages(layout.sentence, sentence)
        stages += [
            Stage("sentence_signatures", [current_reader(), *sd.signatures], tasks, [layout.sentence / "signatures"]),
            Stage("sentence_duplicates", sd.find, 1, [layout.sentence / "duplicates"], max_workers=1),
        ]
        pending = [sd.filter]
    schema = scored_schema(score_fields) if score_fields else CURATED_SCHEMA
    writer = (scored_parquet_writer(str(layout.output), list(score_fields)) if score_fields
              else curated_parquet_writer(str(layout.output)))
    if minhash is None:
        stages.append(Stage("write", [current_reader(), *pending, writer], tasks, [layout.output]))
    else:
        materialise("sentence_filter" if sentence is not None else "exact_filter",
                    (layout.sentence if sentence is not None else layout.exact) / "kept")
        mh = minhash_stages(layout.minhash, minhash, words, index_folder=layout.minhash_index, source=layout.source)
        stages += [
            Stage("minhash_signatures", [current_reader(), *mh.signatures], tasks, [layout.minhash / "signatures"]),
            Stage("minhash_buckets", mh.buckets, mh.buckets_tasks, [layout.minhash / "buckets"]),
            Stage("minhash_clusters", mh.clusters, 1, [layout.minhash / "clusters"], max_workers=1),
            Stage("write", [current_reader(), mh.filter, writer], tasks, [layout.output]),
        ]
    # only when on, so that the fingerprints of sources curated before these options existed still match
    if exact is not None:
        config = {**config, "exact_dedup": asdict(exact)}
    if sentence is not None:
        config = {**config, "sentence_dedup": asdict(sentence)}
    if decontam is not None:  # the index file's name is its content hash: a changed eval set re-curates
        config = {**config, "decontam": {**decontam.to_dict(), "index": None if decontam_index_path is None
                                         else decontam_index_path.relative_to(layout.curated_dir).as_posix()}}
    # the output folder and the Parquet schema are part of the fingerprint: a source curated into another
    # layout or schema is curated again, so that every source of data/ keeps one schema and load_dataset /
    # DuckDB can concatenate them (a schema change re-curates all sources, not only the edited recipe's)
    config = {**config, "output": layout.output.relative_to(layout.curated_dir).as_posix(),
              "parquet_schema": hashlib.sha256(schema.to_string().encode()).hexdigest()[:16]}
    return SourcePipelines(layout.source, kind, stages, config)
