"""Preflight checks: everything that can sink a run, tried in minutes before the run spends its hours.

The playbook's rule is "do your preflight checklist or die": data that is not what the manifest says, a plan the
data cannot feed, an evaluator that cannot run, a checkpoint that does not resume bit for bit, a run that will
not finish in its time budget or fit in memory, and rank seeds that break data/tensor parallelism (SmolLM3's
identical-TP-seed loss). Each check is a function of plain objects (configs, factories, a manifest) returning a
`CheckResult`, so any backend can run them; `mixlab.pipelines.preflight` builds those objects from a run config.
A check never raises: an exception inside it becomes a FAIL carrying the error text.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn as nn
from mixlab.curation import ShardManifest, load_tokenizer
from mixlab.curation.token_shards import TokenShard
from mixlab.curation.tokenizer import tokenizer_id
from mixlab.training.checkpoint import load_checkpoint, optimizer_state_by_name, save_checkpoint
from mixlab.training.config import TrainConfig
from mixlab.training.lr_schedule import lr_at
from mixlab.training.model import ModelConfig, Transformer
from mixlab.training.seeds import RankSeeds, seed_everything, seed_violations, world_seeds
from mixlab.training.trainer import micro_step, precision_context

Status = Literal["PASS", "FAIL", "SKIP"]

TOKEN_SHARDS = "token shards"
PLAN = "plan"
EVAL = "eval"
CHECKPOINT = "checkpoint round trip"
THROUGHPUT = "throughput and memory"
RANK_SEEDS = "rank seeds"
PARALLEL_LAYOUT = "parallel layout"  # the nanotron backend's tp x pp x dp (checked when a run uses it)
CHECK_NAMES = (TOKEN_SHARDS, PLAN, EVAL, CHECKPOINT, THROUGHPUT, RANK_SEEDS)
CONDITIONAL_CHECKS = (PARALLEL_LAYOUT,)  # run only where the run needs them

MEMORY_HEADROOM = 0.9  # a run may use this share of the memory available: the rest is the OS's and the allocator's


@dataclass
class CheckResult:
    """One line of the checklist: `detail` says what was measured or what is wrong, `fix` what to change."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    measured: dict[str, Any] = field(default_factory=dict)  # numbers other checks (and --json) can use

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:4s}  {self.name}  {self.detail}"
        return f"{text} -> {self.fix}" if self.failed and self.fix else text

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix,
                "measured": dict(self.measured)}


# What to do when a check raises (a check's own FAIL results name their own, more precise fix). The one place
# these strings live: `never_raises` and `guarded` (used by `mixlab preflight`) both take them from here.
FIXES: dict[str, str] = {
    TOKEN_SHARDS: "re-run `mixlab tokenize` on data.curated",
    PLAN: "change what the error names (see `mixlab mix plan --config RUN.yaml`)",
    EVAL: "give every evaluated source held-out windows of train.seq_len + 1 tokens and score a dataset of the "
          "run's tokenizer (eval.curated)",
    CHECKPOINT: "the checkpoint code must save and load every piece of state (training/checkpoint.py)",
    THROUGHPUT: "a smaller train.batch_size or model, fewer train.total_steps",
    RANK_SEEDS: "derive per-rank seeds with training.seeds.rank_seeds",
    PARALLEL_LAYOUT: "change what the error names: parallel.tp / parallel.pp, or the model's sizes",
}


def guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; an exception becomes its FAIL (the error text is the detail, FIXES[name] the fix) so the
    others still run."""
    try:
        return check()
    except Exception as err:  # noqa: BLE001 - every failure of a check is reported, none stops the checklist
        return CheckResult(name, "FAIL", f"{type(err).__name__}: {err}", FIXES[name])


def never_raises(name: str) -> Callable[[Callable[..., CheckResult]], Callable[..., CheckResult]]:
    """Decorate a check so that an exception inside it is its FAIL, never the caller's problem."""
    if name not in FIXES:
        raise KeyError(f"never_raises({name!r}): add the check's fix to FIXES")

    def wrap(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> CheckResult:
            return guarded(name, lambda: check(*args, **kwargs))
        return run
    return wrap


def summary_line(results: Sequence[CheckResult]) -> str:
    counts = {status: sum(r.status == status for r in results) for status in ("PASS", "FAIL", "SKIP")}
    verdict = "preflight passed" if not counts["FAIL"] else "preflight FAILED"
    return (f"{verdict}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
            + ("" if not counts["FAIL"] else f" ({', '.join(r.name for r in results if r.failed)})"))


# ---- building a training state as the trainer does ---------------------------------------------------------
class Batch(Protocol):
    tokens: np.ndarray


class Sampler(Protocol):
    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainingSetup:
    """What the checks build fresh models, optimizers and samplers from: the run's configs, a sampler factory (a
    new sampler at step 0 each call) and the device. `model_factory` defaults to the embedded Transformer; a
    backend or a test passes its own (it must have `configure_optimizer`, like Transformer)."""

    model_config: ModelConfig
    train_config: TrainConfig
    sampler_factory: Callable[[], Sampler]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model_factory: Callable[[ModelConfig], nn.Module] = Transformer

    def new_model(self, seed: int | None = None, device: torch.device | None = None) -> nn.Module:
        seed_everything(self.train_config.seed if seed is None else seed)
        return self.model_factory(self.model_config).to(device or self.device)

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = self.train_config
        return model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    def build(self) -> tuple[nn.Module, torch.optim.Optimizer, Sampler]:
        """A fresh model (seeded with the run seed, as the trainer seeds it), its AdamW and a sampler at step 0."""
        model = self.new_model()
        return model, self.new_optimizer(model), self.sampler_factory()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler, cfg: TrainConfig,
               step: int, device: torch.device) -> tuple[float, int]:
    """One optimizer step as the embedded trainer takes it (its micro_step for each of grad_accum micro-batches,
    the LR of `step`, clipping, AdamW, the model's after-step update); returns the loss and the tokens trained."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    _, autocast = precision_context(cfg, device)
    loss_sum, tokens_trained = torch.zeros((), device=device), 0
    for _ in range(cfg.grad_accum):
        tokens, _, loss, _ = micro_step(model, sampler.next_batch(), cfg, model.config, device, autocast)
        loss_sum += loss
        tokens_trained += tokens.shape[0] * (tokens.shape[1] - 1)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if callable(after := getattr(model, "after_optimizer_step", None)):
        after()
    return loss_sum.item() / cfg.grad_accum, tokens_trained


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- 1. token shards --------------------------------------------------------------------------------------
@never_raises(TOKEN_SHARDS)
def check_token_shards(manifest: ShardManifest, sources: Sequence[str], model_vocab_size: int,
                       run_tokenizer_sha256: str | None = None, run_path: str | Path | None = None) -> CheckResult:
    """Every token shard of `sources` (train and val) exists, matches the manifest's size and sha256, opens
    (metadata, index, made by the manifest's tokenizer) and holds only ids below the vocabulary; the tokenizer
    file matches the manifest, the model's vocab_size equals the tokenizer's, and an existing run was trained
    with this same tokenizer."""
    retokenize = f"re-run `mixlab tokenize --curated {manifest.root}`"
    info = manifest.tokenizer
    if info is None:
        return CheckResult(TOKEN_SHARDS, "FAIL", f"{manifest.root}: no tokenizer in the manifest", retokenize)
    problems: list[str] = []
    fixes: list[str] = []
    if problem := manifest.check_file(info):
        problems.append(problem)
    else:
        actual = load_tokenizer(manifest.resolve(info.path)).get_vocab_size()
        if actual != info.vocab_size:
            problems.append(f"the tokenizer file has {actual} tokens, the manifest says {info.vocab_size}")
    if model_vocab_size != info.vocab_size:
        problems.append(f"model.vocab_size={model_vocab_size} but the tokenizer has {info.vocab_size} tokens")
        fixes.append("leave model.vocab_size out of the run config (it comes from the tokenizer)")
    if run_tokenizer_sha256 and run_tokenizer_sha256 != info.sha256:
        problems.append(f"the run {run_path or ''} was trained with tokenizer {run_tokenizer_sha256[:12]}, the data "
                        f"now holds {info.sha256[:12]}")
        fixes.append("re-tokenize with the run's tokenizer (`mixlab tokenize --tokenizer ...`) or use a new run_id")
    expected_id = tokenizer_id(info)
    shards = tokens = 0
    max_id = -1
    unknown = [name for name in sources if name not in manifest.sources]
    if unknown:
        problems.append(f"sources {unknown} are not in the manifest")
    for name in sources:
        entry = manifest.sources.get(name)
        if entry is None:
            continue
        if not entry.token_shards:
            problems.append(f"source {name!r} has no token shards")
            continue
        for record in entry.token_shards:
            if problem := manifest.check_file(record, owner=name):
                problems.append(problem)
                continue
            path = manifest.resolve(record.path)
            if path.stat().st_size != record.bytes:
                problems.append(f"{path}: {path.stat().st_size} bytes, the manifest lists {record.bytes}")
                continue
            try:
                shard = TokenShard(path, vocab_size=info.vocab_size, tokenizer=expected_id, sha256=record.sha256)
            except ValueError as err:
                problems.append(str(err))
                continue
            if record.tokens is not None and len(shard) != record.tokens:
                problems.append(f"{path}: {len(shard)} tokens, the manifest lists {record.tokens}")
            if len(shard):
                top = int(shard.tokens.max())
                max_id = max(max_id, top)
                if top >= info.vocab_size or top >= model_vocab_size:
                    problems.append(f"{path}: token id {top} >= vocab size "
                                    f"{min(info.vocab_size, model_vocab_size)}")
            shards += 1
            tokens += len(shard)
    if problems:
        fixes.append(retokenize)
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return CheckResult(TOKEN_SHARDS, "FAIL", "; ".join(problems[:3]) + more, "; ".join(dict.fromkeys(fixes)),
                           {"problems": problems})
    return CheckResult(TOKEN_SHARDS, "PASS",
                       f"{shards} shards of {len(sources)} sources, {tokens:,d} tokens, sha256 and sizes match the "
                       f"manifest, max id {max_id} < vocab {info.vocab_size}, tokenizer {info.sha256[:12]}",
                       measured={"shards": shards, "tokens": tokens, "max_id": max_id,
                                 "tokenizer_sha256": info.sha256})


# ---- 2. plan ----------------------------------------------------------------------------------------------
class PlanLike(Protocol):
    """What the check reads from a mixtures.planner.MixturePlan."""

    problems: list[str]
    warnings: list[str]
    stages: list[Any]  # each with name, seq_len, start_step, end_step, tokens

    def check(self) -> None: ...


@never_raises(PLAN)
def check_plan(plan: PlanLike, model_config: ModelConfig) -> CheckResult:
    """The planner's refusals (each with its fix) and stages whose seq_len the model has no positions for."""
    problems = list(plan.problems)
    for index, stage in enumerate(plan.stages):
        if stage.seq_len > model_config.max_seq_len:
            problems.append(f"stage {stage.name!r} has seq_len {stage.seq_len} > model.max_seq_len="
                            f"{model_config.max_seq_len} (mixture.stages.{index}.seq_len)")
    if problems:
        return CheckResult(PLAN, "FAIL", f"the planner refuses: {' | '.join(problems)}",
                           "change what each refusal names (see `mixlab mix plan --config RUN.yaml`)",
                           {"problems": problems, "warnings": list(plan.warnings)})
    plan.check()  # the planner's own verdict agrees (raises PlanError otherwise)
    tokens = sum(stage.tokens for stage in plan.stages)
    shown = [w if len(w) <= 140 else w[:139] + "…" for w in plan.warnings]
    warned = f", {len(shown)} warning(s): {' | '.join(shown)}" if shown else ""
    return CheckResult(PLAN, "PASS", f"{len(plan.stages)} stage(s), {tokens:,d} tokens planned, every source "
                       f"within its epoch limit{warned}", measured={"warnings": list(plan.warnings)})


# ---- 3. eval ----------------------------------------------------------------------------------------------
class EvaluatorLike(Protocol):
    def evaluate(self, model: nn.Module, device: torch.device | str | None = None) -> list[dict[str, Any]]: ...


@never_raises(EVAL)
def check_eval(setup: TrainingSetup, evaluator_factory: Callable[[], EvaluatorLike], expected_sources: Sequence[str],
               tasks_factory: Callable[[], EvaluatorLike] | None = None) -> CheckResult:
    """Build the evaluator (and the downstream tasks) and score a freshly initialised model once: a row for
    every evaluated source, finite loss and bits-per-byte (and finite task accuracies)."""
    fix = ("give every evaluated source a held-out split with windows of train.seq_len + 1 tokens (raise "
           "`mixlab tokenize --val-fraction`, lower eval.windows_per_source or train.seq_len), and score a dataset "
           "of the run's tokenizer (eval.curated)")
    evaluator = evaluator_factory()
    tasks = tasks_factory() if tasks_factory is not None else None  # built (maybe slowly) before the timing
    model = setup.new_model()
    with _threads(setup.train_config, setup.device):
        start = time.perf_counter()
        rows = evaluator.evaluate(model, setup.device)
        task_rows = tasks.evaluate(model, setup.device) if tasks is not None else []
        _sync(setup.device)
        seconds = time.perf_counter() - start
    by_source = {row["source"]: row for row in rows}
    problems = [f"no eval row for source {name!r}" for name in expected_sources if name not in by_source]
    problems += [f"{row['source']}: loss {row.get('loss')}, bpb {row.get('bpb')}" for row in rows
                 if not all(isinstance(row.get(k), int | float) and math.isfinite(row[k]) for k in ("loss", "bpb"))]
    problems += [f"task {row.get('task')!r}: accuracy {row.get('accuracy')}" for row in task_rows
                 if not (isinstance(row.get("accuracy"), int | float) and math.isfinite(row["accuracy"]))]
    measured = {"eval_seconds": seconds, "sources": sorted(by_source), "tasks": len(task_rows)}
    if problems:
        return CheckResult(EVAL, "FAIL", "; ".join(problems), fix, measured)
    overall = by_source.get("all", rows[-1])
    scored_tasks = f" + {len(task_rows)} task(s)" if tasks is not None else ""
    return CheckResult(EVAL, "PASS", f"{len(expected_sources)} source(s){scored_tasks} scored in {seconds:.2f}s; fresh model "
                       f"loss {overall['loss']:.3f} (ln vocab {math.log(setup.model_config.vocab_size):.3f}), bpb "
                       f"{overall['bpb']:.3f}", measured=measured)


# ---- 4. checkpoint round trip ----------------------------------------------------------------------------
def _plain(state: Any) -> Any:
    """A sampler state as it reads back from state.json (tuples become lists, keys strings)."""
    return json.loads(json.dumps(state))


def _tensor_differences(left: Mapping[str, Any], right: Mapping[str, Any], where: str) -> list[str]:
    """Keys missing on one side and values not equal bit for bit (nested dicts of tensors and numbers)."""
    problems = [f"{where}.{k} missing after loading" for k in left if k not in right]
    problems += [f"{where}.{k} appeared after loading" for k in right if k not in left]
    for key in left:
        if key not in right:
            continue
        a, b = left[key], right[key]
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            problems += _tensor_differences(a, b, f"{where}.{key}")
        elif torch.is_tensor(a) or torch.is_tensor(b):
            if not (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype
                    and torch.equal(a.detach().cpu(), b.detach().cpu())):
                problems.append(f"{where}.{key} differs")
        elif a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            problems.append(f"{where}.{key} differs ({a!r} != {b!r})")
    return problems


def _cloned(state: Any) -> Any:
    if torch.is_tensor(state):
        return state.detach().clone()
    if isinstance(state, Mapping):
        return {k: _cloned(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cloned(v) for v in state)
    return state


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: Sampler) -> dict[str, Any]:
    """Copies of everything a resume must restore: the state dict, every buffer (kept in the state dict or
    not: a buffer left out of it is state a checkpoint would lose), the optimizer state by name, the sampler."""
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "optimizer": _cloned(optimizer_state_by_name(model, optimizer)),  # on CPU .cpu() is no copy
        "sampler": _plain(sampler.state_dict()),
    }


@never_raises(CHECKPOINT)
def check_checkpoint_round_trip(setup: TrainingSetup, *, save: Callable[..., Path] = save_checkpoint,
                                load: Callable[..., Any] = load_checkpoint,
                                workdir: str | Path | None = None) -> CheckResult:
    """Train one step, save a checkpoint (into `workdir`, default a temporary directory), load it into a fresh
    model + optimizer + sampler: every tensor of model and optimizer state must be equal bit for bit, the
    sampler state equal, and the next step's loss from the loaded copy exactly the original's.

    `save` / `load` are `save_checkpoint` / `load_checkpoint` by default; another backend passes its own."""
    fix = ("make the checkpoint hold every piece of state (model state dict incl. buffers, optimizer state by "
           "name, sampler state_dict, RNG) and load all of it back; see training/checkpoint.py")
    cfg, device = setup.train_config, setup.device
    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(cfg, device))
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="mixlab-preflight-ckpt-")))
        model, optimizer, sampler = setup.build()
        model.train()
        train_step(model, optimizer, sampler, cfg, 0, device)
        start = time.perf_counter()
        path = save(root / "checkpoints", 1, model, optimizer, sampler_state=sampler.state_dict(),
                    trainer_state={"tokens": 0}, configs={"model_config": setup.model_config.to_dict(),
                                                          "train_config": cfg.to_dict()})
        save_seconds = time.perf_counter() - start
        saved = _snapshot(model, optimizer, sampler)
        rng_at_save = torch.get_rng_state()
        original_next, _ = train_step(model, optimizer, sampler, cfg, 1, device)
        del model, optimizer, sampler

        fresh, fresh_optimizer, fresh_sampler = setup.build()
        seed_everything(cfg.seed + 1)  # a different RNG stream: only the checkpoint may bring the original's back
        ckpt = load(path, fresh, fresh_optimizer)
        sampler_state = getattr(ckpt, "sampler_state", None)
        if sampler_state is None:
            return CheckResult(CHECKPOINT, "FAIL", f"{path}: the checkpoint holds no sampler state", fix)
        fresh_sampler.load_state_dict(sampler_state)
        loaded = _snapshot(fresh, fresh_optimizer, fresh_sampler)
        problems = (_tensor_differences(saved["model"], loaded["model"], "model")
                    + _tensor_differences(saved["buffers"], loaded["buffers"], "buffer")
                    + _tensor_differences(saved["optimizer"]["state"], loaded["optimizer"]["state"], "optimizer")
                    + _tensor_differences(saved["sampler"], loaded["sampler"], "sampler"))
        saved_groups = [{k: v for k, v in g.items() if k != "lr"} for g in saved["optimizer"]["param_groups"]]
        loaded_groups = [{k: v for k, v in g.items() if k != "lr"} for g in loaded["optimizer"]["param_groups"]]
        if saved_groups != loaded_groups:
            problems.append("optimizer param_groups (hyper-parameters) differ after loading")
        if not torch.equal(torch.get_rng_state(), rng_at_save):
            problems.append("the torch RNG state was not restored")
        fresh.train()
        loaded_next, _ = train_step(fresh, fresh_optimizer, fresh_sampler, cfg, 1, device)
        if loaded_next != original_next:
            problems.append(f"the next step's loss differs: {loaded_next!r} from the loaded copy, {original_next!r} "
                            "from the original")
        measured = {"save_seconds": save_seconds, "next_loss": original_next}
        if problems:
            more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
            return CheckResult(CHECKPOINT, "FAIL", "; ".join(problems[:4]) + more, fix,
                               {**measured, "problems": problems})
        tensors = len(saved["model"]) + sum(len(v) for v in saved["optimizer"]["state"].values())
        return CheckResult(CHECKPOINT, "PASS", f"{tensors} tensors of model and optimizer equal bit for bit, sampler "
                           f"state equal, next loss {loaded_next:.6f} identical (save {save_seconds:.2f}s)",
                           measured=measured)


# ---- 5. throughput and memory ----------------------------------------------------------------------------
def memory_available(device: torch.device) -> int:
    """Bytes this process could use: CUDA free + what torch holds, or MemAvailable + this process's RSS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    available = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return available + _current_rss()


def _current_rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return 0


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _count_every(total: int, every: int) -> int:
    """How often an `every`-step cadence fires over `total` steps (the last step always does)."""
    return total // every + (1 if total % every else 0)


@contextlib.contextmanager
def _threads(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg.resolved_threads())
    try:
        yield
    finally:
        torch.set_num_threads(before)


@never_raises(THROUGHPUT)
def check_throughput_and_memory(setup: TrainingSetup, steps: int = 5, warmup: int = 1, *,
                                eval_seconds: float | None = None, checkpoint_seconds: float | None = None,
                                time_budget_h: float | None = None, memory_limit_bytes: int | None = None
                                ) -> CheckResult:
    """Time `steps` real training steps (after `warmup`) on the run's device and threads; project the whole
    run (steps + its evals and checkpoints at their cadence) against `time_budget_h` (default
    train.time_budget_h; none: the projection is printed, the budget comparison skipped) and the peak memory
    against `memory_limit_bytes` (default: what the device has available)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: time at least one training step")
    cfg, device = setup.train_config, setup.device
    budget = cfg.time_budget_h if time_budget_h is None else time_budget_h
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    limit = memory_limit_bytes if memory_limit_bytes is not None else int(memory_available(device) * MEMORY_HEADROOM)
    with _threads(cfg, device):
        model, optimizer, sampler = setup.build()
        model.train()
        for step in range(warmup):
            train_step(model, optimizer, sampler, cfg, step, device)
        _sync(device)
        start, tokens = time.perf_counter(), 0
        for step in range(warmup, warmup + steps):
            tokens += train_step(model, optimizer, sampler, cfg, step, device)[1]
        _sync(device)
        seconds = time.perf_counter() - start
    peak = _peak_memory(device)
    per_step = seconds / steps
    evals = _count_every(cfg.steps, cfg.eval_every)
    checkpoints = _count_every(cfg.steps, cfg.checkpoint_every)
    projected_s = cfg.steps * per_step + evals * (eval_seconds or 0.0) + checkpoints * (checkpoint_seconds or 0.0)
    projected_h = projected_s / 3600
    measured = {"tokens_per_s": tokens / seconds, "seconds_per_step": per_step, "projected_hours": projected_h,
                "peak_memory_bytes": peak, "memory_limit_bytes": limit, "time_budget_h": budget}
    extras = (f" + {evals} eval(s) x {eval_seconds:.2f}s" if eval_seconds is not None else "") + (
        f" + {checkpoints} checkpoint(s) x {checkpoint_seconds:.2f}s" if checkpoint_seconds is not None else "")
    detail = (f"{tokens / seconds:,.0f} tokens/s, {per_step:.3f}s/step on {device.type}"
              f"{f' x {cfg.resolved_threads()} threads' if device.type == 'cpu' else ''}: {cfg.steps:,d} steps"
              f"{extras} = {_hours(projected_h)}; peak memory {_gib(peak)} of {_gib(limit)} available")
    problems, fixes = [], []
    if budget is None:
        detail += "; budget SKIP (train.time_budget_h unset)"
    elif projected_h > budget:
        problems.append(f"the run needs ~{_hours(projected_h)} but train.time_budget_h={budget:g}")
        fitting = int(budget * 3600 / per_step)
        fewer = f"fewer steps (train.total_steps <= {fitting:,d}), " if fitting >= 1 else ""
        fixes.append(f"{fewer}a smaller train.batch_size or model, or more time (train.time_budget_h)")
    else:
        detail += f"; within train.time_budget_h={budget:g}"
    if peak > limit:
        problems.append(f"peak memory {_gib(peak)} exceeds the {_gib(limit)} available")
        fixes.append("a smaller train.batch_size (raise train.grad_accum to keep the tokens per step), a shorter "
                     "train.seq_len or a smaller model")
    if problems:
        return CheckResult(THROUGHPUT, "FAIL", f"{'; '.join(problems)} ({detail})", "; ".join(fixes), measured)
    return CheckResult(THROUGHPUT, "PASS", detail, measured=measured)


def _hours(hours: float) -> str:
    if hours >= 0.1:
        return f"{hours:.2f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 1 else f"{hours * 3600:.1f} s"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


# ---- 6. rank seeds ---------------------------------------------------------------------------------------
def state_hash(model: nn.Module) -> str:
    """sha256 of every tensor of the state dict, in name order: equal weights, equal hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@never_raises(RANK_SEEDS)
def check_rank_seeds(setup: TrainingSetup, dp: int = 1, tp: int = 1, *,
                     seed_fn: Callable[[int, int, int], list[RankSeeds]] = world_seeds,
                     max_inits: int = 4) -> CheckResult:
    """The planned world's seeds (`seed_fn(seed, dp, tp)`, default `world_seeds`) against the rules of
    training/seeds.py, and the proof: the model initialised with each dp rank's init seed (at most `max_inits`
    of them) has the same weights on every replica, and the tp ranks' init seeds differ."""
    if dp < 1 or tp < 1:
        raise ValueError(f"dp={dp}, tp={tp}: a world has at least one rank of each")
    fix = ("derive seeds with training.seeds.rank_seeds: init from the tp rank only (same on dp replicas, distinct "
           "per tp rank), data from the run seed, local from (dp, tp)")
    seeds = seed_fn(setup.train_config.seed, dp, tp)
    problems = list(seed_violations(seeds))
    if len(seeds) != dp * tp:
        problems.append(f"{len(seeds)} rank seeds for a world of dp={dp} x tp={tp}")
    replicas = sorted((s for s in seeds if s.tp_rank == 0), key=lambda s: s.dp_rank)[:max_inits]
    hashes = {s.dp_rank: state_hash(setup.new_model(s.init, torch.device("cpu"))) for s in replicas}
    if len(set(hashes.values())) > 1:
        problems.append(f"the model initialised on dp ranks {sorted(hashes)} has {len(set(hashes.values()))} "
                        "different weight sets: data-parallel replicas must start identical")
    tp_inits = [s.init for s in seeds if s.dp_rank == 0]  # (shared tp init seeds: seed_violations says so)
    measured = {"dp": dp, "tp": tp, "init_seeds": [s.init for s in seeds], "weight_hashes": hashes}
    if problems:
        return CheckResult(RANK_SEEDS, "FAIL", "; ".join(problems), fix, measured)
    return CheckResult(RANK_SEEDS, "PASS", f"world dp={dp} x tp={tp}: {len(seeds)} ranks; init equal on dp replicas "
                       f"(weights identical on {len(hashes)} initialised), distinct across tp ranks "
                       f"({len(set(tp_inits))}); one data seed; local seeds all distinct", measured=measured)


def check_parallel_layout(setup: TrainingSetup, layout: Any) -> CheckResult:
    """The nanotron layout (training.nanotron_layout.ParallelLayout, dp resolved) against the model and batch:
    vocab and heads divisible by tp, layers by pp, the batch by dp; then the tensor-parallel seeding rule proved
    on the weights: the model is initialised once from the run seed and cut, so every tp rank's slice of a
    sharded weight must differ from every other's (SmolLM3 lost a run to identical shards), while replicated
    weights (norm gains) are equal by construction."""
    from mixlab.training.nanotron_layout import layout_problems, plain_split_dims, tp_slice

    cfg, model_config = setup.train_config, setup.model_config
    problems = layout_problems(model_config, layout, cfg.batch_size, cfg.grad_accum)
    measured: dict[str, Any] = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}
    if problems:
        return CheckResult(PARALLEL_LAYOUT, "FAIL", "; ".join(problems), FIXES[PARALLEL_LAYOUT], measured)
    model = setup.new_model(cfg.seed, torch.device("cpu"))
    splits = plain_split_dims(model_config)
    identical = []
    for name, p in model.named_parameters():
        dim = splits.get(name)
        if dim is None or layout.tp == 1:
            continue
        slices = [tp_slice(p.detach(), dim, layout.tp, r) for r in range(layout.tp)]
        if any(torch.equal(slices[a], slices[b]) for a in range(layout.tp) for b in range(a + 1, layout.tp)):
            identical.append(name)
    measured["sharded_weights"] = sum(1 for name, _ in model.named_parameters() if splits.get(name) is not None)
    if identical:
        return CheckResult(PARALLEL_LAYOUT, "FAIL", f"tensor-parallel ranks would start with identical slices of "
                           f"{identical[:4]}", "initialise the full model from the run seed, then cut it "
                           "(training.nanotron_layout.parallelize)", measured)
    stages = model_config.n_layers // layout.pp
    return CheckResult(PARALLEL_LAYOUT, "PASS", f"tp{layout.tp} x pp{layout.pp} x dp{layout.dp}: vocab "
                       f"{model_config.vocab_size} / tp = {model_config.vocab_size // layout.tp} rows per rank, "
                       f"{stages} layer(s) per stage, {measured['sharded_weights']} sharded weights distinct on "
                       "every tp rank", measured=measured)
