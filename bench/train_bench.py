"""Training throughput and MFU of the dense, MoE and hybrid models at demo size (mixlab issue 9), each against a
bare loop of the same model on the same batches, measured in the same run.

    .venv/bin/python bench/train_bench.py [--steps 30] [--threads 2] [--archs dense,moe,hybrid]

For each architecture: (a) the anchor, bench/run_all.py's bare torch loop (forward, backward, AdamW, and the MoE
bias step that belongs to the model; no sampler, clipping, logging, eval or checkpoint), (b) mixlab's `train()` on the same
model config and batches from the same sampler, (c) the anchor again; the anchor's figure is the mean of (a) and
(c), so a machine that slows down during the run shows as a gap between them rather than as a trainer cost.
MFU is model FLOPs per token (Transformer.estimate_flops_per_token: 6 x active matmul params + attention scores
+ the SSM scan) x tokens/s over the fp32 matmul peak that training.throughput measures at the start of this run.

Demo size: d_model 256, 4 layers, seq 256, batch 8 (ModelConfig/TrainConfig preset "demo"), vocab 4096.
- moe: 8 experts, top-2 of width ffn_hidden / 2 (active FFN params = the dense model's), aux-loss-free bias;
- hybrid: attention_every=2 (layers 0 and 2 are gated linear recurrences, 1 and 3 attention).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARCHITECTURES: dict[str, dict] = {
    "dense": {},
    "moe": dict(n_experts=8, moe_top_k=2, moe_balance="bias"),
    "hybrid": dict(attention_every=2),
}


def measure(curated: Path, name: str, switches: dict, steps: int, threads: int, peak: float) -> dict:
    from mixlab.curation import ShardManifest
    from mixlab.mixtures import MixtureSchedule
    from mixlab.pipelines.pretrain import build_sampler
    from mixlab.training import ModelConfig, RunStore, TrainConfig, Transformer, train
    from mixlab.training.throughput import mfu
    from run_all import bare_loop_seconds

    manifest = ShardManifest.load(curated)
    schedule = MixtureSchedule.constant({"web-en": 0.3, "code-python": 0.4, "math": 0.3})
    config = TrainConfig.preset("demo", total_steps=steps, warmup_steps=2, log_every=max(steps // 3, 1),
                                eval_every=10**6, checkpoint_every=10**6, progress_bar=False, threads=threads)
    model_config = ModelConfig.preset("demo", vocab_size=manifest.tokenizer.vocab_size, max_seq_len=config.seq_len,
                                      **switches)
    sampler = build_sampler(manifest, schedule, config)
    batches = [torch.from_numpy(sampler.next_batch().tokens.copy()) for _ in range(steps)]
    tokens = steps * config.tokens_per_step
    bare_loop_seconds(model_config, batches[:2], config.lr, config.weight_decay)  # warm-up: allocator, kernels
    before = bare_loop_seconds(model_config, batches, config.lr, config.weight_decay)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunStore(tmp).create(f"bench-{name}", {})
        start = time.perf_counter()
        train(run, model_config, config, build_sampler(manifest, schedule, config))
        trainer_s = time.perf_counter() - start
    after = bare_loop_seconds(model_config, batches, config.lr, config.weight_decay)
    anchor_s = (before + after) / 2
    with torch.device("meta"):
        model = Transformer(model_config)
    flops = model.estimate_flops_per_token(config.seq_len)
    anchor_tok_s, trainer_tok_s = tokens / anchor_s, tokens / trainer_s
    return {"arch": name, "params": model.num_params(), "active_params": model.active_params(),
            "flops_per_token": flops, "tokens": tokens, "anchor_before_s": before, "anchor_after_s": after,
            "anchor_tok_s": anchor_tok_s, "trainer_tok_s": trainer_tok_s, "ratio": trainer_tok_s / anchor_tok_s,
            "anchor_mfu": mfu(flops, anchor_tok_s, peak), "trainer_mfu": mfu(flops, trainer_tok_s, peak)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per measurement (default 30)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma-separated: " + ", ".join(ARCHITECTURES))
    args = parser.parse_args(argv)
    from mixlab.training.throughput import measure_matmul_peak
    from run_all import prepare

    names = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(names) - set(ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architectures {unknown}; choose from {list(ARCHITECTURES)}")
    curated = prepare(max_mb=2.0)
    torch.set_num_threads(args.threads)
    peak = measure_matmul_peak("cpu", torch.float32, seconds=1.0, cached=False)
    rows = [measure(curated, name, ARCHITECTURES[name], args.steps, args.threads, peak) for name in names]
    peak_after = measure_matmul_peak("cpu", torch.float32, seconds=1.0, cached=False)
    print(f"\nfp32 matmul peak (512^2, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s at the start, "
          f"{peak_after / 1e9:.1f} at the end; {args.steps} steps x 8 x 256 tokens per measurement")
    print(f"{'model':8s} {'params':>8s} {'active':>8s} {'MFLOP/tok':>10s} {'bare tok/s':>11s} {'bare MFU':>9s} "
          f"{'mixlab tok/s':>13s} {'mixlab MFU':>11s} {'ratio':>6s}  bare before/after")
    for r in rows:
        print(f"{r['arch']:8s} {r['params'] / 1e6:7.2f}M {r['active_params'] / 1e6:7.2f}M "
              f"{r['flops_per_token'] / 1e6:10.1f} {r['anchor_tok_s']:11,.0f} {r['anchor_mfu']:9.1%} "
              f"{r['trainer_tok_s']:13,.0f} {r['trainer_mfu']:11.1%} {r['ratio']:5.2f}x  "
              f"{r['anchor_before_s']:.1f}s / {r['anchor_after_s']:.1f}s")
    dense = next((r for r in rows if r["arch"] == "dense"), None)
    if dense is not None:
        for r in rows:
            if r is not dense:
                print(f"{r['arch']} / dense tokens/s (mixlab): {r['trainer_tok_s'] / dense['trainer_tok_s']:.2f}x")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
