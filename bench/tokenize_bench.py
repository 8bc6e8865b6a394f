"""Tokenization bench: `tokenize_manifest` (read curated Parquet, train/val routing, `.ds` + index + metadata,
sidecars, checksums, manifest) against its anchor, a bare `tokenizers` `encode_batch` over the same texts,
measured in the same run, alternating, best of `--repeats` each. Prints both rates and the ratio, and also a
bare `encode_batch_fast` (the ids-only call tokenize_manifest makes), so the share of the gain that comes from
that call rather than from the pipeline is visible.

    .venv/bin/python bench/tokenize_bench.py [CURATED_DIR] [--repeats 3]

CURATED_DIR must hold a tokenizer (`mixlab tokenize` or `train_tokenizer`); without it, the cached bench corpus
of bench/run_all.py is prepared and used. The curated dir is copied to a temporary folder, never written.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from mixlab.curation.manifest import ShardManifest
from mixlab.curation.splits import TokenizeConfig
from mixlab.curation.token_shards import tokenize_manifest
from mixlab.curation.tokenizer import load_tokenizer


def manifest_texts(curated: Path) -> list[str]:
    """Every document text `tokenize_manifest` encodes: all sources, all shards, empty texts skipped."""
    manifest = ShardManifest.load(curated)
    return [
        text
        for entry in manifest.sources.values()
        for shard in entry.shards
        for text in pq.read_table(manifest.resolve(shard.path), columns=["text"]).column(0).to_pylist()
        if text
    ]


def run(curated: Path, repeats: int = 3, workers: int = 1) -> dict:
    """Best seconds of each side over `repeats` alternating rounds; tokens counted with one EOS per document."""
    manifest = ShardManifest.load(curated)
    if manifest.tokenizer is None:
        raise SystemExit(f"{curated}: no tokenizer in the manifest; train one first (`mixlab tokenize`)")
    tokenizer = load_tokenizer(manifest.resolve(manifest.tokenizer.path))
    texts = manifest_texts(curated)
    config = TokenizeConfig(**(manifest.tokenizer.held_out or {}), workers=workers)  # the split it was trained for
    anchor_s, fast_s, mixlab_s, anchor_cpu, mixlab_cpu, tokens, written = [], [], [], [], [], 0, 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "curated"
        shutil.copytree(curated, copy, ignore=shutil.ignore_patterns("tokens", "logs", "work"))
        tokenize_manifest(copy, config=config, show_progress=False)  # warm: imports, cache
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts))
            anchor_s.append(time.perf_counter() - start)
            anchor_cpu.append(time.process_time() - cpu)
            start = time.perf_counter()
            tokenizer.encode_batch_fast(texts)  # ids only, what tokenize_manifest calls: shows its own overhead
            fast_s.append(time.perf_counter() - start)
            start, cpu = time.perf_counter(), time.process_time()
            result = tokenize_manifest(copy, config=config, show_progress=False)
            mixlab_s.append(time.perf_counter() - start)
            mixlab_cpu.append(time.process_time() - cpu)
            written = sum(sum(s.tokens.values()) for s in result.sources.values())
    if written != tokens:
        raise SystemExit(f"tokenize_manifest wrote {written} tokens, the bare encode_batch made {tokens}")
    return {
        "docs": len(texts),
        "tokens": tokens,
        "anchor_tok_s": tokens / min(anchor_s),
        "mixlab_tok_s": written / min(mixlab_s),
        "fast_tok_s": tokens / min(fast_s),
        # CPU seconds of this process, all threads: steadier than wall time on a shared machine
        "anchor_tok_cpu_s": tokens / min(anchor_cpu),
        "mixlab_tok_cpu_s": written / min(mixlab_cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curated", nargs="?", type=Path, help="a tokenized curated dir (default: the bench corpus)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.curated is None:
        import run_all

        args.curated = run_all.prepare(max_mb=4.0)
    r = run(args.curated, args.repeats, args.workers)
    print(f"{r['docs']:,d} documents, {r['tokens']:,d} tokens (EOS included), best of {args.repeats}")
    print(f"bare tokenizers encode_batch : {r['anchor_tok_s']:12,.0f} tokens/s")
    print(f"mixlab tokenize_manifest     : {r['mixlab_tok_s']:12,.0f} tokens/s")
    print(f"ratio (mixlab / anchor)      : {r['mixlab_tok_s'] / r['anchor_tok_s']:6.2f}x")
    print(f"bare encode_batch_fast (ids) : {r['fast_tok_s']:12,.0f} tokens/s (mixlab / it: "
          f"{r['mixlab_tok_s'] / r['fast_tok_s']:.2f}x)")
    print(f"per CPU second (all threads) : anchor {r['anchor_tok_cpu_s']:,.0f}, mixlab {r['mixlab_tok_cpu_s']:,.0f}, "
          f"ratio {r['mixlab_tok_cpu_s'] / r['anchor_tok_cpu_s']:.2f}x")


if __name__ == "__main__":
    main()
