"""MinHash near-dedup as datatrove's four stages, wired for one source.

Stage 1 (signatures) and stage 4 (filter) must read the same files with the same number of tasks: the
signature files are named by rank and hold document indices within that rank's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, _mersenne_prime
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer

SIGNATURE_CHUNK = 8192  # shingles hashed at once: ~8192 x 112 hashes x 8 bytes x a few arrays, ~20 MB


class BoundedMinhashDedupSignature(MinhashDedupSignature):
    """datatrove's signature step, hashing a document's shingles in chunks of `SIGNATURE_CHUNK`.

    The stock step builds one (shingles x hashes) uint64 matrix per document: ~2.7 KB per word, so a
    100 MB document grew one worker past 15 GB. A running minimum over chunks gives the same signature
    with memory bounded whatever the document's length.
    """

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters
        minimum = None
        for start in range(0, max(len(shingles), 1), SIGNATURE_CHUNK):
            phv = (shingles[start:start + SIGNATURE_CHUNK] * a + b) % _mersenne_prime
            if self.config.hash_config.precision == 32:
                phv = np.bitwise_and(phv, self.config.hash_config.max)
            chunk_min = np.min(phv, axis=0)
            minimum = chunk_min if minimum is None else np.minimum(minimum, chunk_min)
        return [x.tolist() for x in np.split(minimum.astype(self.config.hash_config.np_dtype), self.config.num_buckets)]


class CountingMinhashDedupFilter(MinhashDedupFilter):
    """MinhashDedupFilter whose drops carry a reason (`dropped_minhash_duplicate`) like every filter's."""

    name = "🎯 MinHash stage 4 (filter)"

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        yield from super().run(data, rank, world_size)
        if (dropped := int(self.stats["dropped"].total)) > 0:
            self.stat_update("dropped_minhash_duplicate", value=dropped)


@dataclass
class MinhashSettings:
    """14 buckets x 8 hashes over 5-grams: pairs above ~0.75 Jaccard similarity are caught (FineWeb's)."""

    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1

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


def minhash_stages(work_dir: Path, settings: MinhashSettings, words: str | WordTokenizer) -> MinhashStages:
    """Stage steps writing under `work_dir/{signatures,buckets,clusters}`; readers are added by the recipe."""
    config = settings.config()
    sigs, buckets, clusters = work_dir / "signatures", work_dir / "buckets", work_dir / "clusters"
    return MinhashStages(
        signatures=[BoundedMinhashDedupSignature(output_folder=str(sigs), config=config, language=words)],
        buckets=[MinhashDedupBuckets(input_folder=str(sigs), output_folder=str(buckets), config=config)],
        clusters=[
            MinhashDedupCluster(input_folder=str(buckets), output_folder=str(clusters), config=config,
                                save_cluster_size=True)
        ],
        filter=CountingMinhashDedupFilter(input_folder=str(clusters), load_cluster_sizes=True),
        buckets_tasks=config.num_buckets,
    )
