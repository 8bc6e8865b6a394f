"""A test stand-in for mixtures.MixtureSampler over byte-level sources (vocab 256), shared by the trainer and
checkpoint tests (`from byte_sampler import ByteSampler`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SampledBatch:
    tokens: np.ndarray
    sources: list[str]
    stage: str
    step: int


class ByteSampler:
    """Random windows of `seq_len + 1` bytes from each source, one stage ("stable"), no token count of its own.

    Its whole position is (seed, draws): batch k is drawn from default_rng([seed, k]), so restoring the two
    numbers restores the data order exactly. `crash_at_draw=k` raises in the k-th draw, as a dying node would."""

    def __init__(self, corpora: dict[str, np.ndarray], batch_size: int, seq_len: int, seed: int = 0,
                 crash_at_draw: int | None = None):
        self.corpora, self.batch_size, self.seq_len, self.seed = dict(sorted(corpora.items())), batch_size, seq_len, seed
        self.draws, self.crash_at_draw = 0, crash_at_draw

    def next_batch(self) -> SampledBatch:
        if self.draws == self.crash_at_draw:
            raise RuntimeError("simulated node failure")
        rng = np.random.default_rng([self.seed, self.draws])
        names = list(self.corpora)
        sources = [names[i] for i in rng.integers(len(names), size=self.batch_size)]
        rows = []
        for name in sources:
            start = int(rng.integers(0, len(self.corpora[name]) - self.seq_len - 1))
            rows.append(self.corpora[name][start:start + self.seq_len + 1])
        self.draws += 1
        return SampledBatch(np.stack(rows), sources, "stable", self.draws - 1)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.draws = state["seed"], state["draws"]
