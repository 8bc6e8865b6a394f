"""Launching an ablation's proxies and tracking them: what will run, what has run, and running the rest.

Each proxy is an ordinary mixlab run (`runs/<run_id>/`), trained by `mixlab train --config` in its own process
from the run document the spec expands to (kept in `<runs>/../ablations/<spec>/<run_id>.yaml`). So a rerun of the
spec skips what completed, resumes what was interrupted or died (from its last checkpoint, bit for bit) and starts
the rest; nothing of a finished proxy is trained twice. `LocalLauncher` runs as many proxies at once as the
machine holds and splits the CPU threads between them; a Slurm launcher implements the same `launch` call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml
from mixlab.ablations.spec import AblationSpec, AblationSpecError, AblationVariant
from mixlab.training import ModelConfig, RunRecord

DONE = "completed"


@dataclass(frozen=True)
class ProxyRun:
    """One proxy of a spec and where it stands: pending (no run yet), or its run's status."""

    variant: AblationVariant
    path: Path  # runs/<run_id>
    document_path: Path  # the run document `mixlab train --config` reads
    status: str
    step: int
    total_steps: int | None

    @property
    def run_id(self) -> str:
        return self.variant.run_id


def runs_dir(spec: AblationSpec) -> Path:
    """The spec's runs directory: the base's `runs_dir`."""
    if not spec.base.get("runs_dir"):
        raise ValueError(f"spec {spec.name!r}: the base run has no runs_dir; set base.runs_dir")
    return Path(spec.base["runs_dir"])


def base_document(spec: AblationSpec) -> dict:
    """The spec's base as a run document of its own (a protocol resolves its data, model and budget from it)."""
    runs_dir(spec)  # a clear error when the base has no runs_dir
    return {**spec.base, "run_id": spec.base.get("run_id") or f"{spec.name}-base"}


def proxy_runs(spec: AblationSpec) -> list[ProxyRun]:
    """Every proxy of the spec with its current status (from its run directory, if any)."""
    root = runs_dir(spec)
    documents = root.parent / "ablations" / spec.name
    out = []
    for variant in spec.expand():
        path = root / variant.run_id
        status, step, total = "pending", 0, None
        if (path / "run.json").exists():
            record = RunRecord.load(path)
            status, step = record.display_status(), int(record.summary.get("step", 0))
            total = record.summary.get("total_steps")
        out.append(ProxyRun(variant, path, documents / f"{variant.run_id}.yaml", status, step, total))
    return out


def write_documents(spec: AblationSpec, proxies: Sequence[ProxyRun]) -> None:
    """The run document of every proxy, as `mixlab train --config` reads it (rewritten on every launch: the
    spec is the source of truth, and a changed document is refused by the run's resume checks)."""
    for proxy in proxies:
        proxy.document_path.parent.mkdir(parents=True, exist_ok=True)
        proxy.document_path.write_text(yaml.safe_dump(proxy.variant.document(spec.base), sort_keys=False))


class Launcher(Protocol):
    """Runs proxies to completion (or failure) and returns each one's exit code by run id."""

    def launch(self, proxies: Sequence[ProxyRun]) -> dict[str, int]: ...


@dataclass
class LocalLauncher:
    """A local process pool: `parallel` proxies at once (default: one per 2 cores, at least one), each with
    an equal share of the CPU threads."""

    parallel: int | None = None
    threads: int | None = None  # per proxy; default: cores // parallel
    log_dir: Path | None = None  # each proxy's stdout+stderr; default: beside its run document

    def __post_init__(self) -> None:
        for name in ("parallel", "threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"LocalLauncher {name}={value!r} must be a whole number >= 1 (or unset: automatic)")

    def plan(self, count: int) -> tuple[int, int]:
        cores = os.cpu_count() or 1
        parallel = max(1, min(count, self.parallel or max(1, cores // 2)))
        return parallel, max(1, self.threads or cores // parallel)

    def launch(self, proxies: Sequence[ProxyRun]) -> dict[str, int]:
        parallel, threads = self.plan(len(proxies))

        def one(proxy: ProxyRun) -> tuple[str, int]:
            log = (self.log_dir or proxy.document_path.parent) / f"{proxy.run_id}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "mixlab.pipelines.cli", "train", "--config", str(proxy.document_path),
                       "--threads", str(threads)]
            with log.open("a") as out:
                out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
                out.flush()
                code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
            return proxy.run_id, code

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return dict(pool.map(one, proxies))


def prepare_curation_variants(spec: AblationSpec, proxies: Sequence[ProxyRun]) -> list[Path]:
    """Curate (or find, by fingerprint) the dataset of every curation variant among `proxies`: only the sources a
    variant changes are curated again, with the base's tokenizer; the others are the base's files."""
    from mixlab.ablations.curation_variants import curated_variant

    built: dict[str, Path] = {}
    for proxy in proxies:
        settings = proxy.variant.curation
        key = repr(sorted(settings.items()))
        if settings and key not in built:
            built[key] = curated_variant(Path(spec.base["data"]["curated"]), settings, raw_dir=spec.raw_dir)
    return list(built.values())


# what may differ between a proxy's run and its document without it being another experiment
RUNTIME_TRAIN_FIELDS = ("threads", "progress_bar", "device", "resume", "log_every", "keep_last_checkpoints")


def run_differences(proxy: ProxyRun, document: dict) -> list[str]:
    """The sections in which a proxy's existing run (its run.json) differs from the document the spec now gives
    it: mixture, policy, data, plan, eval, model or train fields (run-time fields such as threads excepted)."""
    from mixlab.mixtures import MixtureSchedule

    have = RunRecord.load(proxy.path).config
    want = resolved_config(document).to_dict()
    differ = []
    if want["mixture"] is not None and (have.get("mixture") is None or MixtureSchedule.from_dict(have["mixture"])
                                        != MixtureSchedule.from_dict(want["mixture"])):
        differ.append("mixture")
    for section in ("policy", "data", "plan", "eval", "model"):
        had = have.get(section) or None
        if section == "model" and had is not None:  # fields added since the run started are at their defaults
            had = ModelConfig.from_dict(had).to_dict()
        if had != (want.get(section) or None):
            differ.append(section)
    trained = have.get("train") or {}
    for key, value in want["train"].items():
        if key in RUNTIME_TRAIN_FIELDS or (key == "decay_start_step" and value is None):
            continue  # the run pins the WSD decay to its mixture's last stage when the document leaves it open
        if trained.get(key) != value:
            differ.append(f"train.{key}")
    return differ


def check_same_runs(spec: AblationSpec, proxies: Sequence[ProxyRun] | None = None,
                    error: type[ValueError] = ValueError) -> None:
    """Refuse a spec whose existing runs were trained from other documents (the spec, its base or the protocol's
    settings changed since): a rerun would skip or resume them and report them as the new experiment."""
    for proxy in proxies if proxies is not None else proxy_runs(spec):
        if proxy.status == "pending":
            continue
        if differ := run_differences(proxy, proxy.variant.document(spec.base)):
            raise error(f"{proxy.path}: this run was trained with another {', '.join(differ)} than spec "
                        f"{spec.name!r} now gives it; remove the run directory to train it again, or give the spec "
                        "another name to keep both")


def prepare_tasks(spec: AblationSpec, proxies: Sequence[ProxyRun]) -> list[Path]:
    """Build the cloze tasks the proxies are scored on once, before they start (a proxy would otherwise build
    them at its first step while the others wait, and on a cluster the folder lock may not hold across nodes)."""
    from mixlab.ablations.tasks import ClozeEvaluator

    built: dict[tuple, Path] = {}
    for proxy in proxies:
        config = resolved_config(proxy.variant.document(spec.base))
        if not config.eval.tasks:
            continue
        scored = Path(config.eval.curated or config.curated_dir)
        key = (scored, config.eval.task_items)
        if key not in built:
            ClozeEvaluator.for_curated(scored, max_seq_len=config.train.seq_len, max_items=config.eval.task_items)
            built[key] = scored
    return list(built.values())


def run_ablation(spec: AblationSpec, launcher: Launcher | None = None) -> list[ProxyRun]:
    """Train every proxy that has not completed (pending, interrupted, stale or failed runs are (re)started; a
    run resumes from its last checkpoint) and return the proxies' statuses afterwards. Runs trained from other
    documents than the spec now gives are refused (`check_same_runs`), never silently reused."""
    proxies = proxy_runs(spec)
    check_same_runs(spec, proxies, error=AblationSpecError)
    todo = [p for p in proxies if p.status != DONE]
    if todo:
        prepare_curation_variants(spec, todo)
        prepare_tasks(spec, todo)
        write_documents(spec, todo)
        (launcher or LocalLauncher()).launch(todo)
    return proxy_runs(spec)


def require_completed(spec: AblationSpec, proxies: Sequence[ProxyRun], error: type[ValueError] = ValueError) -> None:
    """Refuse to read results while a proxy has not completed: name each one with its status and log."""
    failed = [p for p in proxies if p.status != DONE]
    if failed:
        listed = ", ".join(f"{p.run_id} ({p.status}; log {p.document_path.with_suffix('.log')})" for p in failed)
        raise error(f"spec {spec.name!r}: {len(failed)} of {len(proxies)} runs did not complete: {listed}. "
                    "Fix the cause and rerun: finished runs are not trained again")


def status_lines(proxies: Sequence[ProxyRun]) -> list[str]:
    """One line per proxy: run id, status, steps done."""
    width = max((len(p.run_id) for p in proxies), default=10)
    lines = [f"{'run':{width}s}  {'status':11s}  step"]
    for p in proxies:
        steps = f"{p.step}/{p.total_steps}" if p.total_steps else ("0" if p.status == "pending" else str(p.step))
        lines.append(f"{p.run_id:{width}s}  {p.status:11s}  {steps}")
    done = sum(p.status == DONE for p in proxies)
    lines.append(f"{done} of {len(proxies)} completed")
    return lines


def resolved_config(document: dict):
    """The RunConfig of a proxy's document; the vocabulary comes from the curated directory's tokenizer unless
    the document sets model.vocab_size (as `mixlab train` does)."""
    from mixlab.pipelines.pretrain import tokenized_manifest
    from mixlab.pipelines.run_config import run_config_from_document

    vocab = (document.get("model") or {}).get("vocab_size")
    if vocab is None:
        vocab = tokenized_manifest((document.get("data") or {})["curated"]).tokenizer.vocab_size
    return run_config_from_document(document, vocab_size=vocab)


def measure_step_seconds(document: dict, threads: int = 1, steps: int = 3) -> float:
    """Seconds per optimizer step of a proxy on this machine: a few forward/backward/AdamW steps of its model at
    its batch shape, after one warm-up step (what `ablate plan` multiplies by the steps of each run)."""
    import torch
    from mixlab.training.model import Transformer

    config = resolved_config(document)
    cfg = config.train
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = Transformer(config.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        tokens = torch.randint(0, config.model.vocab_size, (cfg.batch_size, cfg.seq_len + 1),
                               generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            for _ in range(cfg.grad_accum):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return sorted(times[1:])[len(times[1:]) // 2]
    finally:
        torch.set_num_threads(previous)


def plan_lines(spec: AblationSpec, launcher: LocalLauncher | None = None, measure: bool = True) -> list[str]:
    """What `ablate run` would do: every proxy with its status, steps, tokens and estimated time (from a
    step time measured here with each proxy's share of the threads), and the wall time for the whole spec."""
    launcher = launcher or LocalLauncher()
    proxies = proxy_runs(spec)
    todo = [p for p in proxies if p.status != DONE]
    parallel, threads = launcher.plan(max(1, len(todo)))
    step_s: dict[tuple, float] = {}
    width = max((len(p.run_id) for p in proxies), default=10)
    lines = [f"{'run':{width}s}  {'status':11s}  {'steps':>6s}  {'tokens':>11s}  {'est. time':>9s}"]
    total_s = 0.0
    for proxy in proxies:
        document = proxy.variant.document(spec.base)
        if proxy.variant.curation and not (Path(document["data"]["curated"]) / "manifest.json").exists():
            document["data"] = dict(spec.base["data"])  # curated at launch; its steps and model are the base's
        config = resolved_config(document)
        steps = config.train.steps
        tokens = steps * config.train.tokens_per_step
        estimate = ""
        if measure and proxy.status != DONE:
            key = (repr(config.model.to_dict()), config.train.batch_size, config.train.seq_len, config.train.grad_accum)
            if key not in step_s:
                step_s[key] = measure_step_seconds(document, threads)
            seconds = step_s[key] * max(0, steps - proxy.step)
            total_s += seconds
            estimate = f"{seconds / 60:.1f} min"
        lines.append(f"{proxy.run_id:{width}s}  {proxy.status:11s}  {steps:>6d}  {tokens:>11,d}  {estimate:>9s}")
    lines.append(f"{len(todo)} of {len(proxies)} to train, {parallel} at a time with {threads} thread(s) each"
                 + (f": about {total_s / parallel / 60:.1f} min of wall time (training only)" if measure and todo else ""))
    return lines
