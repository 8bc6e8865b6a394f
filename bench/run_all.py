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
  ~0.97+ LightGBM on their 1M-parameter runs) against mixlab's regressors on the same split (bench/regmix_bench.py);
- issue 11 (one table: figure, anchor, mixlab, ratio, check): the web filter chain and MinHash signatures against
  stock datatrove with their decision/cluster equality checks (bench/web_chain_bench.py on its own 14k-document
  web corpus in five languages, bench/minhash_bench.py on the demo's corpus), tokenization of the demo's corpus
  against bare `tokenizers` (bench/tokenize_bench.py, else the tokenization bench above), and
  `curate()` at 1 and 2 workers: docs/s, parallel efficiency, peak memory per worker against the 2 GB bound
  (bench/curation_scaling_bench.py); a bench module that is missing is printed as MISSING;
- nanotron backend: the embedded backend at world size 1, versus the nanotron backend at world size 1 (goal:
  within 5%), and tokens/s with the communication share at 2 and 4 processes (bench/nanotron_bench.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from mixlab.curation import ShardManifest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".cache" / "mixlab-bench"


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def prepare(max_mb: float, sources: tuple[str, ...] | None = ("web-en", "code-python", "math"),
            work: Path = WORK) -> Path:
    """A real corpus, curated and tokenized once (cached between benchmark runs): by default a small one of
    three sources; `sources=None` is every default source (the demo's corpus at `max_mb=20`)."""
    from mixlab.curation import TokenizerConfig, tokenize_manifest, train_tokenizer
    from mixlab.pipelines.corpus import fetch_corpus
    from mixlab.pipelines.curate import curate

    fetch_corpus(work, max_mb=max_mb, sources=list(sources) if sources else None)
    curated = work / "curated"
    manifest = curate(work / "raw", curated)
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


def bench_nanotron(quick: bool) -> None:
    """The nanotron backend at world size 1 against the embedded one, and 2- and 4-process layouts with their
    communication share (bench/nanotron_bench.py prints its table)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nanotron_bench

    nanotron_bench.main(["--skip-multi"] if quick else [])


def bench_regmix() -> dict | None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import regmix_bench

    return regmix_bench.run()


# ---- issue 11: curation at 10x datatrove -----------------------------------------------------------------------
# Each figure comes from its own bench module; one that is not there (yet) or fails is printed as missing, never
# fails the run. A module's `run(...)` (given `quick`/`curated` where it takes them) returns a dict: the first number
# under a key starting with "anchor" or "stock" is the stock datatrove (or bare tokenizers) rate, the first starting
# with "mixlab" or "fast" is ours (or "seconds": {"stock": s, "fast": s} with "docs"), an optional "ratio" overrides
# mixlab / anchor, and the check is its "check" string or derived from its equality keys (see `_check_text`).
# Without `run`: the module's entry in ISSUE11_FALLBACKS, else its `main` runs and prints its own lines.
ISSUE11_TARGETS = {  # figure -> (bench module, the issue's ratio target)
    "web filter chain (docs/s)": ("web_chain_bench", 10.0),
    "MinHash signatures (docs/s)": ("minhash_bench", 10.0),
    "tokenization + .ds shards (tok/s)": ("tokenize_bench", 0.9),
}


@dataclass
class Issue11Row:
    """One line of the issue-11 table; `anchor`/`mixlab` None when the figure is missing."""

    figure: str
    anchor: float | None = None
    mixlab: float | None = None
    ratio: float | None = None
    check: str = ""
    anchor_text: str | None = None  # overrides the formatted numbers (memory: GiB)
    mixlab_text: str | None = None


def _web_chain_fallback(module, quick: bool, curated: Path) -> dict:
    """bench/web_chain_bench.py before it has `run`: both chains on its own documents."""
    return module.run_chains(module.web_documents())


def _minhash_fallback(module, quick: bool, curated: Path) -> dict:
    """bench/minhash_bench.py before it has `run`: its `main` on the bench corpus, the summary from its --json."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minhash.json"
        module.main(["--curated", str(curated), "--json", str(out)])
        return json.loads(out.read_text())["all"]


ISSUE11_FALLBACKS = {"web_chain_bench": _web_chain_fallback, "minhash_bench": _minhash_fallback}


def _rates(result: dict) -> tuple[float | None, float | None]:
    """(anchor, mixlab) rates of a bench result, by the key names above."""
    anchor, ours = _first_number(result, ("anchor", "stock")), _first_number(result, ("mixlab", "fast"))
    seconds, docs = result.get("seconds"), result.get("docs")
    if (anchor is None or ours is None) and isinstance(seconds, dict) and isinstance(docs, int | float):
        anchor_s = seconds.get("anchor", seconds.get("stock"))
        ours_s = seconds.get("mixlab", seconds.get("fast"))
        anchor = anchor if anchor is not None else (_rate(docs, anchor_s) if anchor_s is not None else None)
        ours = ours if ours is not None else (_rate(docs, ours_s) if ours_s is not None else None)
    return anchor, ours


def _run_main(module) -> None:
    """A bench module's `main` with its defaults (no arguments), for its own printed lines."""
    import inspect
    import sys

    main = module.main
    saved = sys.argv
    try:
        if inspect.signature(main).parameters:
            main([])
        else:
            sys.argv = [module.__file__]  # its argparse must not see this run's --quick
            main()
    except SystemExit as done:
        if done.code not in (None, 0):
            raise RuntimeError(f"{module.__name__}.main exited {done.code}") from None
    finally:
        sys.argv = saved


def _first_number(result: dict, prefixes: tuple[str, ...]) -> float | None:
    for key, value in result.items():
        if key.startswith(prefixes) and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _check_text(result: dict) -> str:
    """The equality check a bench reports: a "check" string, or disagreement counts / equality flags by name."""
    if isinstance(result.get("check"), str):
        return result["check"]
    parts = []
    for key, value in result.items():
        name = key.replace("_", " ")
        if "disagree" in key:
            count = len(value) if isinstance(value, list | dict) else value
            parts.append(f"{count} {name}")
        elif isinstance(value, bool) and any(w in key for w in ("equal", "identical", "same", "match")):
            parts.append(f"{name}: {'yes' if value else 'NO'}")
    return "; ".join(parts)


def _call_run(module, quick: bool, curated: Path) -> dict | None:
    """`module.run` with the arguments it takes among quick/curated; None when it has no usable `run`."""
    import inspect

    run = getattr(module, "run", None)
    if run is None:
        return None
    offered = {"quick": quick, "curated": curated}
    params = inspect.signature(run).parameters
    required = [p for p in params.values() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                    p.KEYWORD_ONLY)]
    if any(p.name not in offered for p in required):
        return None
    result = run(**{k: v for k, v in offered.items() if k in params})
    return result if isinstance(result, dict) else None


def _import_bench(name: str):
    import importlib
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        return None


def issue11_row(figure: str, module_name: str, target: float, quick: bool, curated: Path) -> Issue11Row:
    """One issue-11 figure from its bench module; a missing module or a failing bench is a row that says so."""
    try:
        module = _import_bench(module_name)
        if module is None:
            return Issue11Row(figure, check=f"MISSING: bench/{module_name}.py not found")
        result = _call_run(module, quick, curated)
        if result is None and module_name in ISSUE11_FALLBACKS and getattr(module, "run", None) is None:
            result = ISSUE11_FALLBACKS[module_name](module, quick, curated)
        if result is None:
            if getattr(module, "main", None) is None:
                return Issue11Row(figure, check=f"MISSING: bench/{module_name}.py has no run() or main()")
            _run_main(module)
            return Issue11Row(figure, check=f"see bench/{module_name}.py output above")
    except (Exception, SystemExit) as err:  # a failing bench (or its sys.exit) is reported, the others still run
        return Issue11Row(figure, check=f"FAILED: {type(err).__name__}: {err}"[:200])
    anchor, ours = _rates(result)
    ratio = result.get("ratio") if isinstance(result.get("ratio"), int | float) else (
        ours / anchor if anchor and ours is not None else None)
    check = _check_text(result)
    if ratio is not None:
        check = f"{check}; " if check else ""
        check += f">= {target:g}x: {'PASS' if ratio >= target else 'FAIL'}"
    return Issue11Row(figure, anchor, ours, ratio, check)


def tokenization_row(existing: dict, target: float) -> Issue11Row:
    """The tokenization figure from this run's `bench_tokenization` (when bench/tokenize_bench.py is missing)."""
    anchor, ours = existing["anchor_tok_s"], existing["mixlab_tok_s"]
    ratio = ours / anchor
    return Issue11Row("tokenization + .ds shards (tok/s)", anchor, ours, ratio,
                      f"bench_tokenization above; >= {target:g}x: {'PASS' if ratio >= target else 'FAIL'}")


def scaling_rows(quick: bool) -> tuple[list[Issue11Row], list[str]]:
    """Scaling (1 -> 2 workers) and peak memory per worker from bench/curation_scaling_bench.py, and its lines."""
    try:
        module = _import_bench("curation_scaling_bench")
        if module is None:
            return [Issue11Row("scaling 1 -> 2 workers (docs/s)", check="MISSING: bench/curation_scaling_bench.py")], []
        result = module.run(module.ScalingConfig(max_mb=1.0 if quick else 3.0))
    except (Exception, SystemExit) as err:
        return [Issue11Row("scaling 1 -> 2 workers (docs/s)", check=f"FAILED: {type(err).__name__}: {err}"[:200])], []
    key = "overall (sum of sources)"
    low, high = min(result["docs_per_s"]), max(result["docs_per_s"])
    gib = 1024**3
    peak, bound = result["peak_worker_bytes"], result["memory_bound_bytes"]
    rows = [
        Issue11Row("scaling 1 -> 2 workers (docs/s)", result["docs_per_s"][low][key], result["docs_per_s"][high][key],
                   result["speedup"], f"efficiency {result['efficiency']:.0%}, CPU s ratio "
                   f"{result['cpu_ratio']:.2f}; load avg "
                   f"{result['load_start'][0]:.1f} -> {result['load_end'][0]:.1f} on {result['cpus']} CPUs"),
        Issue11Row("peak memory per worker (GiB)", bound / gib, peak / gib, None,
                   f"<= 2 GB: {'PASS' if result['memory_ok'] else 'FAIL'} (VmHWM of each worker)",
                   anchor_text=f"bound {bound / gib:.2f}", mixlab_text=f"{peak / gib:.2f}"),
    ]
    return rows, module.report_lines(result)


def print_issue11_table(rows: list[Issue11Row]) -> None:
    print("\nissue 11 (curation at 10x datatrove; anchor = stock datatrove / bare tokenizers, same run, same docs)")
    print(f"{'figure':36s} {'anchor':>12s} {'mixlab':>12s} {'ratio':>7s}  check")
    for row in rows:
        anchor = row.anchor_text or ("-" if row.anchor is None else f"{row.anchor:,.0f}")
        ours = row.mixlab_text or ("-" if row.mixlab is None else f"{row.mixlab:,.0f}")
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        print(f"{row.figure:36s} {anchor:>12s} {ours:>12s} {ratio:>7s}  {row.check}")


def bench_issue11(curated: Path, quick: bool, tokenization: dict) -> None:
    """Every issue-11 figure, then one table (figure, anchor, mixlab, ratio, check). MinHash and tokenization
    run on the demo's corpus (all sources, 20 MB each; --quick: 2 MB), curated here once."""
    curated = prepare(max_mb=2.0 if quick else 20.0, sources=None,
                      work=WORK / ("demo_corpus_quick" if quick else "demo_corpus"))
    rows = []
    for figure, (module_name, target) in ISSUE11_TARGETS.items():
        row = issue11_row(figure, module_name, target, quick, curated)
        if module_name == "tokenize_bench" and row.check.startswith("MISSING"):
            row = tokenization_row(tokenization, target)
        rows.append(row)
    scaling, lines = scaling_rows(quick)
    rows += scaling
    if lines:
        print("\n" + "\n".join(lines))
    print_issue11_table(rows)


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
    bench_issue11(curated, args.quick, results["tokenization (tokens/s)"])
    print("\nproxies per hour (bench/proxy_bench.py):")
    print("\n".join(bench_proxies(args.quick)))
    print("\nnanotron backend (bench/nanotron_bench.py):")
    bench_nanotron(args.quick)
    regmix = bench_regmix()
    if regmix is None:
        print("mixture search (RegMix): reference data not found in ../shared/reference/regmix, skipped")
    else:
        figures = ", ".join(f"{k} {r['spearman']:.3f}" for k, r in regmix.items() if not k.startswith("_"))
        print(f"mixture search (RegMix 1M, Pile-CC loss), held-out Spearman: {figures}")
    print(f"\ntorch {torch.__version__}, numpy {np.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
