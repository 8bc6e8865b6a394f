"""mixlab benchmarks: each measures a mixlab stage and its anchor in the same run, on the same data,
and prints the ratio (mixlab / anchor; > 1 means mixlab is faster). Record results in BENCHMARKS.md.

    .venv/bin/python bench/run_all.py [--quick]

Anchors:
- curation filters: datatrove's stock Gopher repetition + quality filters with datatrove's own spaCy word
  tokenizer, versus mixlab's web filter chain (same datatrove filters, warm word tokenizer);
- tokenization: the bare `tokenizers` encode_batch over the same texts, versus `tokenize_manifest`
  (datatrove DocumentTokenizer, .ds shards, checksums, manifest);
- training: a bare torch loop (forward, backward, AdamW) on the same model and batches, versus mixlab's
  `train()` (sampler, LR schedule, logging, no eval/checkpoint in the window);
- sampler: a plain numpy memmap read of the same windows, versus `MixtureSampler.next_batch()` at batch 8 x 256
  in window and document packing, and the process RSS over 10**6 steps (bench/sampler_bench.py);
- proxies per hour: the bare loop above on the proxy model, versus `pretrain()` of a proxy document, then a swarm
  of proxies launched as `mixlab ablate run` launches them (bench/proxy_bench.py; here 2 proxies, extrapolated
  to the goal's 16; run it alone for the measured 16);
- mixture search: no speed anchor but a quality one, RegMix's published figures (Spearman rho ~0.90 linear,
  ~0.97+ LightGBM on their 1M-parameter runs) against mixlab's regressors on the same split (bench/regmix_bench.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from mixlab.curation import ShardManifest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mixlab-bench"


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def prepare(max_mb: float) -> Path:
    """A small real corpus, curated and tokenized once (cached between benchmark runs)."""
    from mixlab.curation import TokenizerConfig, tokenize_manifest, train_tokenizer
    from mixlab.pipelines.corpus import fetch_corpus
    from mixlab.pipelines.curate import curate

    fetch_corpus(WORK, max_mb=max_mb, sources=["web-en", "code-python", "math"])
    curated = WORK / "curated"
    manifest = curate(WORK / "raw", curated)
    if manifest.tokenizer is None:
        train_tokenizer(curated, TokenizerConfig(vocab_size=4096), show_progress=False)
        tokenize_manifest(curated, show_progress=False)
    return curated


def curated_texts(curated: Path, source: str) -> list[str]:
    manifest = ShardManifest.load(curated)
    return [t for shard in manifest.source(source).shards
            for t in pq.read_table(manifest.resolve(shard.path), columns=["text"])["text"].to_pylist()]


def bench_curation_filters(curated: Path, repeats: int) -> dict:
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from mixlab.curation.filters import GopherSettings, gopher_filters
    from mixlab.curation.text import WarmSpacyTokenizer

    texts = curated_texts(curated, "web-en") * repeats
    docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]

    def run_chain(filters, items=docs) -> float:
        start = time.perf_counter()
        for doc in items:
            for f in filters:
                verdict = f.filter(doc)
                if verdict is False or (isinstance(verdict, tuple) and not verdict[0]):
                    break
        return time.perf_counter() - start

    stock = [GopherRepetitionFilter(), GopherQualityFilter()]
    ours = gopher_filters(GopherSettings(language="en"), WarmSpacyTokenizer("en"))
    run_chain(stock, docs[:50])  # warm-up: imports and spaCy pipelines for both chains
    run_chain(ours, docs[:50])
    anchor_s = run_chain(stock)
    mixlab_s = run_chain(ours)
    return {"docs": len(docs), "anchor_docs_s": _rate(len(docs), anchor_s), "mixlab_docs_s": _rate(len(docs), mixlab_s)}


def bench_tokenization(curated: Path) -> dict:
    from mixlab.curation import ShardManifest, load_tokenizer, tokenize_manifest

    manifest = ShardManifest.load(curated)
    tokenizer = load_tokenizer(manifest.resolve(manifest.tokenizer.path))
    texts = [t for s in ("web-en", "code-python", "math") for t in curated_texts(curated, s)]
    start = time.perf_counter()
    tokens = sum(len(e.ids) + 1 for e in tokenizer.encode_batch(texts))
    anchor_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "curated"
        shutil.copytree(curated, copy, ignore=shutil.ignore_patterns("tokens", "logs", "work"))
        start = time.perf_counter()
        result = tokenize_manifest(copy, show_progress=False)
        mixlab_s = time.perf_counter() - start
        written = sum(sum(s.tokens.values()) for s in result.sources.values())
    return {"tokens": tokens, "anchor_tok_s": _rate(tokens, anchor_s), "mixlab_tok_s": _rate(written, mixlab_s)}


def bare_loop_seconds(model_config, batches: list[torch.Tensor], lr: float, weight_decay: float) -> float:
    """The training anchor: forward, backward and AdamW over `batches` ([B, T+1] tokens), and the model's own
    after-step update (an MoE's expert-bias step; nothing for a dense model), nothing else (no sampler, clipping,
    logging, eval or checkpoint); seconds, at the caller's torch threads."""
    from mixlab.training import Transformer

    torch.manual_seed(0)
    model = Transformer(model_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    for batch in batches:
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_optimizer_step()
    return time.perf_counter() - start


def bench_training(curated: Path, steps: int) -> dict:
    from mixlab.curation import ShardManifest
    from mixlab.mixtures import MixtureSchedule
    from mixlab.pipelines.pretrain import build_sampler
    from mixlab.training import ModelConfig, RunStore, TrainConfig, train

    manifest = ShardManifest.load(curated)
    schedule = MixtureSchedule.constant({"web-en": 0.3, "code-python": 0.4, "math": 0.3})
    config = TrainConfig.preset("demo", total_steps=steps, warmup_steps=5, eval_every=10**6,
                                checkpoint_every=10**6, progress_bar=False, threads=2)
    model_config = ModelConfig.preset("demo", vocab_size=manifest.tokenizer.vocab_size, max_seq_len=config.seq_len)
    torch.set_num_threads(2)

    # anchor: the same model and batches in a bare loop
    sampler = build_sampler(manifest, schedule, config)
    batches = [torch.from_numpy(sampler.next_batch().tokens) for _ in range(steps)]
    anchor_s = bare_loop_seconds(model_config, batches, config.lr, config.weight_decay)
    tokens = steps * config.tokens_per_step

    with tempfile.TemporaryDirectory() as tmp:
        run = RunStore(tmp).create("bench", {})
        start = time.perf_counter()
        train(run, model_config, config, build_sampler(manifest, schedule, config))
        mixlab_s = time.perf_counter() - start
    return {"tokens": tokens, "anchor_tok_s": _rate(tokens, anchor_s), "mixlab_tok_s": _rate(tokens, mixlab_s)}


def bench_sampler(curated: Path, quick: bool) -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import sampler_bench

    return sampler_bench.run(curated, steps=2_000 if quick else 20_000, memory_steps=100_000 if quick else 1_000_000)


def bench_proxies(quick: bool) -> list[str]:
    """The proxy swarm (bench/proxy_bench.py) at 2 proxies, extrapolated to 16; its report lines."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import proxy_bench

    config = proxy_bench.BenchConfig(workdir=WORK, proxies=2, ratio_steps=32 if quick else 128)
    if quick:
        config.train.update(total_steps=32, warmup_steps=4, log_every=8, eval_every=32, checkpoint_every=32)
    return proxy_bench.report_lines(proxy_bench.run(config))


def bench_regmix() -> dict | None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import regmix_bench

    return regmix_bench.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run, noisier ratios)")
    args = parser.parse_args()
    curated = prepare(max_mb=2.0 if args.quick else 4.0)
    results = {
        "curation filters (docs/s)": bench_curation_filters(curated, repeats=1 if args.quick else 3),
        "tokenization (tokens/s)": bench_tokenization(curated),
        "training, demo model (tokens/s)": bench_training(curated, steps=10 if args.quick else 40),
    }
    sampler = bench_sampler(curated, args.quick)
    results["sampler, window packing (tokens/s)"] = sampler
    results["sampler, document packing (tokens/s)"] = {"anchor_tok_s": sampler["anchor_tok_s"],
                                                       "mixlab_tok_s": sampler["documents_tok_s"]}
    print(f"\n{'benchmark':34s} {'anchor':>12s} {'mixlab':>12s} {'ratio':>7s}")
    for name, r in results.items():
        anchor = next(v for k, v in r.items() if k.startswith("anchor"))
        ours = next(v for k, v in r.items() if k.startswith("mixlab"))
        print(f"{name:34s} {anchor:12,.0f} {ours:12,.0f} {ours / anchor:6.2f}x")
    marks = sampler["rss_mib"]
    print(f"sampler RSS over {marks[-1][0]:,d} steps: {marks[1][1]:.1f} MiB after 10%, {marks[-1][1]:.1f} MiB at the end")
    print("\nproxies per hour (bench/proxy_bench.py):")
    print("\n".join(bench_proxies(args.quick)))
    regmix = bench_regmix()
    if regmix is None:
        print("mixture search (RegMix): reference data not found in ../shared/reference/regmix, skipped")
    else:
        figures = ", ".join(f"{k} {r['spearman']:.3f}" for k, r in regmix.items() if not k.startswith("_"))
        print(f"mixture search (RegMix 1M, Pile-CC loss), held-out Spearman: {figures}")
    print(f"\ntorch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
