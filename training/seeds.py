"""Per-rank seeds: which random streams must agree across ranks and which must differ.

SmolLM3 lost a run to identical tensor-parallel seeds: every TP shard of a weight started as the same slice. The
rules, for a world of data-parallel (dp) x tensor-parallel (tp) ranks:
- `init` (weight initialisation): equal across dp ranks (replicas start identical), distinct across tp ranks (each
  holds a different slice of the same matrix);
- `data` (the sampler's order): equal on every rank (one global order; each dp rank reads its own rows of it);
- `local` (anything drawn per rank: dropout, sampling noise): distinct on every rank.
The embedded backend has tp = 1; nanotron's uses the same function.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch


def _derive(seed: int, stream: str, *coords: int) -> int:
    """A 63-bit seed from the run seed, a stream name and coordinates: distinct inputs give distinct seeds (to
    hash-collision odds), the same inputs the same seed on any machine."""
    key = ":".join([str(int(seed)), stream, *map(str, coords)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class RankSeeds:
    rank: int  # global rank = dp_rank * tp_size + tp_rank
    dp_rank: int
    tp_rank: int
    init: int
    data: int
    local: int


def rank_seeds(seed: int, dp_rank: int = 0, dp_size: int = 1, tp_rank: int = 0, tp_size: int = 1) -> RankSeeds:
    """The seeds of one rank. With one process (dp = tp = 1) `init` and `data` are the run seed itself, so a
    single-process run is seeded as it always was."""
    if not (0 <= dp_rank < dp_size and 0 <= tp_rank < tp_size):
        raise ValueError(f"rank (dp {dp_rank}, tp {tp_rank}) outside a world of dp={dp_size} x tp={tp_size}")
    init = int(seed) if tp_size == 1 else _derive(seed, "init", tp_rank)
    local = int(seed) if dp_size * tp_size == 1 else _derive(seed, "local", dp_rank, tp_rank)
    return RankSeeds(rank=dp_rank * tp_size + tp_rank, dp_rank=dp_rank, tp_rank=tp_rank, init=init,
                     data=int(seed), local=local)


def world_seeds(seed: int, dp_size: int = 1, tp_size: int = 1) -> list[RankSeeds]:
    """Every rank's seeds, in global rank order (what `mixlab preflight` checks)."""
    return [rank_seeds(seed, d, dp_size, t, tp_size) for d in range(dp_size) for t in range(tp_size)]


def seed_violations(seeds: list[RankSeeds]) -> list[str]:
    """What breaks the rules above, one sentence each (empty: the seeds are right)."""
    problems = []
    by_tp: dict[int, set[int]] = {}
    for s in seeds:
        by_tp.setdefault(s.tp_rank, set()).add(s.init)
    for tp, inits in sorted(by_tp.items()):
        if len(inits) > 1:
            problems.append(f"tp rank {tp}: data-parallel replicas get different init seeds {sorted(inits)}; "
                            "replicas must start identical")
    inits_per_tp = [next(iter(v)) for _, v in sorted(by_tp.items())]
    if len(set(inits_per_tp)) < len(inits_per_tp):
        problems.append("tensor-parallel ranks share an init seed, so every shard of a weight starts as the same "
                        "slice (the SmolLM3 failure): derive the init seed from the tp rank")
    if len({s.data for s in seeds}) > 1:
        problems.append(f"ranks disagree on the data seed {sorted({s.data for s in seeds})}: the global batch "
                        "order must be one")
    if len({s.local for s in seeds}) < len(seeds):
        problems.append("two ranks share a local seed (dropout and sampling noise would repeat across ranks)")
    return problems


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global generators from one seed (numpy's legacy seeding takes 32 bits; the
    per-rank seeds above have 63)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
