"""Sampler throughput against a plain numpy memmap read of the same windows, and memory over 10**6 steps.

    .venv/bin/python bench/sampler_bench.py [--curated DIR] [--steps N] [--memory-steps N] [--quick]

Data: a tokenized curated directory (`--curated`, else the benchmark corpus that `bench/run_all.py` builds
under .cache/mixlab-bench, else the demo's `demo-output/curated`); without one, real text is written as
byte-level token shards (`.ds`, `.ds.index`, `.ds.metadata`, one document per CPython stdlib file), so the
benchmark never downloads anything. Both sides read the same windows from the same memory-mapped shards:
- anchor: for every step, `np.stack([memmap[start:start + T + 1] for each row]).astype(int64)`, the windows
  taken from a sampler run beforehand (choosing them is not charged to the anchor);
- mixlab: `MixtureSampler.next_batch()` (leaf choice, cursors, permutations, reads), packing "window" and
  "documents" (position ids and cu_seqlens per row).
Memory: resident set size of this process every 10% of `--memory-steps` calls of `next_batch` (window mode).
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from mixlab.curation.token_shards import ShardMetadata, TokenShard, TokenSource, open_token_sources
from mixlab.mixtures.sampler import MixtureSampler
from mixlab.mixtures.schedule import MixtureSchedule

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = (REPO / ".cache" / "mixlab-bench" / "curated", REPO / "demo-output" / "curated")
SEQ_LEN, BATCH = 256, 8


def rss_mib() -> float:
    """Current resident set size (not the peak) from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def byte_level_sources(root: Path) -> dict[str, TokenSource]:
    """Real text as byte tokens: one shard per source, a document per file, 0 as the end-of-document token."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    groups = {"code": sorted(stdlib.glob("*.py")), "docs": sorted(stdlib.glob("**/*.txt")) + sorted(stdlib.glob("**/*.rst"))}
    sources = {}
    for name, files in groups.items():
        docs = [np.frombuffer(f.read_bytes(), dtype=np.uint8).astype(np.uint16) + 1 for f in files if f.stat().st_size]
        docs = [np.append(d, np.uint16(0)) for d in docs]
        tokens = np.concatenate(docs)
        path = root / f"{name}.ds"
        tokens.tofile(path)
        np.cumsum([len(d) for d in docs], dtype=np.uint64).tofile(f"{path}.index")
        ShardMetadata("bytes", 2, len(tokens)).write(path)
        sources[name] = TokenSource(name, "train", [TokenShard(path)])
    return sources


def load_sources(curated: Path | None, tmp: Path) -> tuple[dict[str, TokenSource], str]:
    for candidate in ([curated] if curated else [c for c in CANDIDATES if (c / "tokens").is_dir()]):
        return open_token_sources(candidate), str(candidate)
    return byte_level_sources(tmp), "byte-level stdlib shards (no tokenized corpus found)"


def schedule_for(names: list[str]) -> MixtureSchedule:
    """A stable mix and a decay mix that favours the last source: the demo's shape."""
    stable = {n: 1.0 / len(names) for n in names}
    decay = {n: (0.5 if n == names[-1] else 0.5 / max(1, len(names) - 1)) for n in names}
    if len(names) == 1:
        decay = {names[0]: 1.0}
    return MixtureSchedule.stable_decay(stable, decay, decay_fraction=0.2)


def make(sources, steps: int, packing: str = "window") -> MixtureSampler:
    return MixtureSampler(schedule_for(list(sources)), sources, SEQ_LEN, BATCH, total_steps=steps, seed=0,
                          packing=packing)


def anchor_rate(sources: dict[str, TokenSource], plan: list[list[tuple[str, int]]]) -> float:
    """Tokens/s of a bare memmap read of the planned windows (one np.memmap per shard)."""
    maps = {name: [np.memmap(s.path, dtype=s.tokens.dtype, mode="r") for s in src.shards]
            for name, src in sources.items()}
    bounds = {name: np.cumsum([0] + [len(s) for s in src.shards]) for name, src in sources.items()}
    located = []
    for rows in plan:
        step = []
        for name, start in rows:
            shard = int(np.searchsorted(bounds[name], start, side="right")) - 1
            offset = start - int(bounds[name][shard])
            if offset + SEQ_LEN + 1 > len(maps[name][shard]):  # crosses a shard: read via the source
                shard, offset = -1, start
            step.append((name, shard, offset))
        located.append(step)
    begin = time.perf_counter()
    for step in located:
        batch = np.stack([
            maps[name][shard][offset : offset + SEQ_LEN + 1] if shard >= 0 else sources[name].read(offset, SEQ_LEN + 1)
            for name, shard, offset in step
        ]).astype(np.int64)
    elapsed = time.perf_counter() - begin
    assert batch.shape == (BATCH, SEQ_LEN + 1)
    return len(plan) * BATCH * SEQ_LEN / elapsed


def sampler_rate(sources, steps: int, packing: str) -> float:
    sampler = make(sources, steps, packing)
    for _ in range(min(steps, 200)):  # warm-up: first permutations and blocks
        sampler.next_batch()
    sampler = make(sources, steps, packing)
    begin = time.perf_counter()
    for _ in range(steps):
        sampler.next_batch()
    return steps * BATCH * SEQ_LEN / (time.perf_counter() - begin)


def memory_profile(sources, steps: int) -> list[tuple[int, float]]:
    sampler = make(sources, steps)
    marks, every = [], max(1, steps // 10)
    for step in range(steps):
        if step % every == 0:
            marks.append((step, rss_mib()))
        sampler.next_batch()
    marks.append((steps, rss_mib()))
    return marks


def run(curated: Path | None = None, steps: int = 20_000, memory_steps: int = 1_000_000) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sources, where = load_sources(curated, Path(tmp))
        planner = make(sources, steps)
        plan = []
        for _ in range(steps):
            batch = planner.next_batch()
            plan.append(list(zip(batch.sources, batch.starts.tolist(), strict=True)))
        anchor = anchor_rate(sources, plan)
        window = sampler_rate(sources, steps, "window")
        documents = sampler_rate(sources, steps, "documents")
        marks = memory_profile(sources, memory_steps)
    return {"data": where, "sources": {n: len(s) for n, s in sources.items()}, "steps": steps,
            "anchor_tok_s": anchor, "mixlab_tok_s": window, "documents_tok_s": documents, "rss_mib": marks}


def report(result: dict) -> None:
    print(f"data: {result['data']}; tokens per source {result['sources']}")
    print(f"batch {BATCH} x {SEQ_LEN}, {result['steps']:,d} steps")
    anchor = result["anchor_tok_s"]
    print(f"{'read':28s} {'tokens/s':>14s} {'vs anchor':>10s}")
    for label, key in (("anchor: numpy memmap", "anchor_tok_s"), ("sampler, window packing", "mixlab_tok_s"),
                       ("sampler, document packing", "documents_tok_s")):
        print(f"{label:28s} {result[key]:14,.0f} {result[key] / anchor:9.2f}x")
    marks = result["rss_mib"]
    print("RSS (MiB) by step: " + ", ".join(f"{step:,d}: {mib:.1f}" for step, mib in marks))
    print(f"RSS growth from the first 10% to the end: {marks[-1][1] - marks[1][1]:+.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--curated", type=Path, help="a tokenized curated directory")
    parser.add_argument("--steps", type=int, default=20_000, help="steps timed per side")
    parser.add_argument("--memory-steps", type=int, default=1_000_000, help="steps of the memory profile")
    parser.add_argument("--quick", action="store_true", help="2,000 timed steps and 100,000 memory steps")
    args = parser.parse_args()
    steps, memory_steps = (2_000, 100_000) if args.quick else (args.steps, args.memory_steps)
    report(run(args.curated, steps, memory_steps))


if __name__ == "__main__":
    main()
