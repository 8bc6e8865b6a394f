"""The nanotron training backend: the embedded backend's surroundings around a 3D-parallel model.

Same sampler (each data-parallel replica reads its rows of the one global batch; the tp and pp ranks of a replica
read the same rows), same run record, same held-out evals and tasks, same checkpoints: the model is cut with
`nanotron_layout.parallelize` from a plain Transformer built exactly as the embedded backend builds it, and every
checkpoint gathers the full tensors and AdamW moments by parameter name on rank 0 and writes them with
`training.checkpoint.save_checkpoint`. So a run saved at tp2 x pp2 resumes at tp1, at dp2, or in the embedded
backend, and evaluation, export and reports read it as any other run.

One optimizer step: grad_accum micro-batches go through nanotron's pipeline engine (1F1B or all-forward-all-
backward; DDP syncs on the last backward), tied weights sync their gradients, the global gradient norm is clipped
(in the parameters' precision, each tied or replicated weight counted once), then AdamW steps.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from mixlab.training.checkpoint import latest_checkpoint, read_checkpoint, resolve_checkpoint, save_checkpoint
from mixlab.training.config import TrainConfig
from mixlab.training.data_parallel import DataParallelWorld
from mixlab.training.errors import ConfigError, NonFiniteLossError, ResumeError
from mixlab.training.evaluate import HeldOutEvaluator
from mixlab.training.lr_schedule import decay_start_step, lr_at
from mixlab.training.model import ModelConfig, Transformer
from mixlab.training.nanotron_layout import (
    HEAD_INPUTS,
    ParallelLayout,
    ParallelModel,
    build_optimizer,
    gather_full,
    layout_problems,
    parallelize,
    scatter_full,
    tp_slice,
    world_loss_mean,
)
from mixlab.training.run_record import RunRecord
from mixlab.training.seeds import seed_everything
from mixlab.training.throughput import mfu
from mixlab.training.trainer import (
    Sampler,
    TaskScorer,
    _check_decay_alignment,
    _check_sampler_budget,
    _init_from,
    _Progress,
    _resume,
    _stage_rope_theta,
    _StopSignals,
    finish_run,
    record_failure,
    world_peak_flops,
)
from tqdm.auto import tqdm


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    """The parameters' dtype: fp64 for numerical checks, else fp32 (master weights)."""
    return torch.float64 if cfg.precision == "fp64" else torch.float32


def _join_world() -> list[str] | None:
    """A process group for nanotron even with one process (its ParallelContext needs one and reads RANK and
    WORLD_SIZE from the environment). Returns the environment variables this call set (`_leave_world` removes
    them with the group), or None when a group was there already."""
    if torch_dist.is_initialized():
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("several processes but no process group: call through pretrain() or train_nanotron() "
                          "under torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    added = []
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(port))):
        if key not in os.environ:
            os.environ[key] = value
            added.append(key)
    torch_dist.init_process_group("gloo", rank=0, world_size=1)
    return added


def _leave_world(added: list[str] | None) -> None:
    """Undo `_join_world`: the group it created and the variables it set (a later run in this process, e.g. one
    that must start torchrun, reads the environment as the caller left it)."""
    if added is None:
        return
    torch_dist.destroy_process_group()
    for key in added:
        os.environ.pop(key, None)


def clip_grad_norm(parallel: ParallelModel, max_norm: float) -> float:
    """The global gradient norm over the model replica (tp x pp), clipped to max_norm when max_norm > 0.

    Sharded weights count each shard; a weight tied across ranks (norm gains replicated over tp, an embedding
    tied to the head across pp) counts once. Computed in the gradients' dtype (0.4's clip_grad_norm forces fp32)."""
    world_rank = torch_dist.get_rank()
    grads = [p.grad for _, p in parallel.named_parameters() if p.grad is not None]
    counted = [p.grad for _, p in parallel.named_parameters() if p.grad is not None and (
        not getattr(p, "is_tied", False) or world_rank == p.get_tied_info().global_ranks[0])]
    dtype = grads[0].dtype if grads else torch.float32
    total = torch.zeros((), dtype=dtype)
    for g in counted:
        total += g.detach().pow(2).sum()
    torch_dist.all_reduce(total, group=parallel.context.mp_pg)
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.detach().mul_(coef)
    return float(norm.item())


def _micro_batches(batches: list[Any], parallel: ParallelModel, device: torch.device) -> list[dict[str, Any]]:
    """What the engine feeds the model: input ids on the first stage, targets on the last, pointers elsewhere."""
    from nanotron.parallel.pipeline_parallel.tensor_pointer import TensorPointer

    last = parallel.layout.pp - 1
    out = []
    for batch in batches:
        tokens = torch.from_numpy(np.asarray(batch.tokens).astype(np.int64, copy=False)).to(device)
        rows = tokens.shape[0]
        micro = {"input_ids": tokens[:, :-1] if parallel.pp_rank == 0 else TensorPointer(group_rank=0)}
        if parallel.pp_rank == last:  # what the head stage's loss reads: SFT's loss mask, post-training side data
            mask = getattr(batch, "loss_mask", None)
            ref = getattr(batch, "ref_logps", None)
            desirable = getattr(batch, "desirable", None)
            teacher = getattr(batch, "teacher_logits", None)
            micro |= {
                "targets": tokens[:, 1:].contiguous(),
                "loss_mask": (torch.ones_like(tokens[:, 1:], dtype=torch.bool) if mask is None
                              else torch.as_tensor(np.asarray(mask, dtype=bool)).to(device)),
                "ref_logps": torch.as_tensor(np.zeros(rows) if ref is None else np.asarray(ref),
                                             dtype=torch.float64, device=device),
                "desirable": torch.as_tensor(np.zeros(rows // 2) if desirable is None else np.asarray(desirable),
                                             dtype=torch.bool, device=device),
                "teacher_logits": torch.zeros(0, device=device) if teacher is None else teacher.to(device)}
        else:
            micro |= {key: TensorPointer(group_rank=last) for key in HEAD_INPUTS}
        out.append(micro)
    return out


def _on_policy(batches: list[Any], objective: Any, student: Transformer | None, world: DataParallelWorld,
               parallel: ParallelModel, device: torch.device) -> None:
    """Fill each prompt batch with the student's samples and, on the last stage, this rank's vocabulary slice of
    the teacher's logits. The pipeline cannot decode, so rank 0 samples every data-parallel replica's prompts
    with `student` (the current weights gathered into the plain model) from each batch's own seed: the samples
    the embedded backend draws."""
    mine = [(np.asarray(b.tokens), np.asarray(b.prompt_lens), int(b.sample_seed)) for b in batches]
    everyone = world.all_gather_object((parallel.dp_rank, mine))
    sampled = None
    if world.is_main:
        student.eval()
        sampled = {}
        for dp_rank, items in everyone:
            if dp_rank not in sampled:
                sampled[dp_rank] = [tuple(t.cpu().numpy() for t in objective.sample(
                    student, torch.from_numpy(tokens).to(device), lens, seed)) for tokens, lens, seed in items]
    sampled = world.broadcast_object(sampled)[parallel.dp_rank]
    tp = parallel.layout.tp
    for batch, (tokens, mask) in zip(batches, sampled, strict=True):
        batch.tokens, batch.loss_mask = tokens, mask
        if parallel.is_last_stage:
            teacher = objective.teacher_logits(torch.from_numpy(tokens[:, :-1]).to(device))
            batch.teacher_logits = tp_slice(teacher, teacher.dim() - 1, tp, parallel.tp_rank).contiguous()


def _engine(layout: ParallelLayout) -> Any:
    from nanotron.parallel.pipeline_parallel.engine import (
        AllForwardAllBackwardPipelineEngine,
        OneForwardOneBackwardPipelineEngine,
    )

    return OneForwardOneBackwardPipelineEngine() if layout.pp_engine == "1f1b" else AllForwardAllBackwardPipelineEngine()


def train_nanotron(
    run: RunRecord,
    model_config: ModelConfig,
    train_config: TrainConfig,
    sampler: Sampler,
    evaluator: HeldOutEvaluator | None = None,
    *,
    layout: ParallelLayout | None = None,
    stop_after: int | None = None,
    tasks: TaskScorer | None = None,
    policy: Any = None,
    monitor: Any = None,
    objective: Any = None,
) -> dict[str, Any]:
    """Train (or resume) `run` on nanotron's parallel building blocks in `layout` (tp x pp x dp = the torchrun
    world; one process: tp = pp = dp = 1). Arguments and summary as `training.train`; the summary adds
    `parallel` (the layout) and `comm_share` is not measured here (bench/nanotron_bench.py does).
    Post-training runs here too: batches with a loss_mask (SFT), preference objectives, whose loss the last
    pipeline stage computes from the rows' summed log-probabilities (`from_sequence_logps`), and on-policy
    distillation (`_on_policy`: rank 0 samples with the gathered student, the last stage scores with the teacher).

    Mixture policies and training alerts stay with the embedded backend for now: passing one is refused."""
    from mixlab.training.nanotron_compat import ensure_nanotron, init_parallel_context

    if policy is not None or monitor is not None:
        raise ConfigError(f"run {run.run_id!r}: the nanotron backend does not run mixture policies or training "
                          "alerts yet; use backend 'embedded' for them", ["policy", "monitor", "backend"])
    if objective is not None and not (hasattr(objective, "from_sequence_logps") or hasattr(objective, "from_logits")):
        raise ConfigError(f"run {run.run_id!r}: objective {getattr(objective, 'name', objective)!r} has no loss the "
                          "nanotron head stage computes (from_sequence_logps or from_logits); run it with backend "
                          "'embedded'", ["backend"])
    ensure_nanotron()
    created = _join_world()
    world_size = torch_dist.get_world_size()
    layout = (layout or ParallelLayout()).resolved(world_size)
    if problems := layout_problems(model_config, layout, train_config.batch_size, train_config.grad_accum):
        raise ConfigError(f"run {run.run_id!r}: " + "; ".join(problems), ["parallel", "model", "train"])
    try:
        context = init_parallel_context(layout.tp, layout.pp, layout.dp)
        return _train(run, model_config, train_config, sampler, evaluator, layout, context, stop_after=stop_after,
                      tasks=tasks, objective=objective)
    finally:
        _leave_world(created)


def _train(run: RunRecord, model_config: ModelConfig, cfg: TrainConfig, sampler: Sampler,
           evaluator: HeldOutEvaluator | None, layout: ParallelLayout, context: Any, *, stop_after: int | None,
           tasks: TaskScorer | None, objective: Any = None) -> dict[str, Any]:
    from nanotron.parallel.tied_parameters import sync_tied_weights_gradients

    rank = torch_dist.get_rank()
    world = DataParallelWorld(rank=rank, world_size=torch_dist.get_world_size(),
                              local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend="gloo",
                              local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", torch_dist.get_world_size())))
    total = cfg.steps
    if cfg.seq_len > model_config.max_seq_len:
        raise ConfigError(f"run {run.run_id!r}: train.seq_len={cfg.seq_len} exceeds model.max_seq_len="
                          f"{model_config.max_seq_len}", ["train.seq_len", "model.max_seq_len"])
    if not world.is_main:
        run = run.follower()
    found = latest_checkpoint(run.checkpoint_dir) if world.is_main else None
    latest_name = world.broadcast_object(str(found) if found is not None else None)
    latest = Path(latest_name) if latest_name is not None else None
    if latest is not None and not cfg.resume:
        raise ResumeError(f"run {run.run_id!r} already has checkpoints ({latest}) and TrainConfig.resume is off: "
                          "use a new run id, or delete the run directory to start it over")
    device = torch.device("cpu") if cfg.resolved_device().type == "cpu" else torch.device(
        "cuda", world.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world.local_world_size))
    precision = "fp64" if cfg.precision == "fp64" else "fp32"  # (bf16 mixed precision: not in this backend yet)
    dtype = model_dtype(cfg)
    _check_sampler_budget(sampler, cfg)
    _check_decay_alignment(sampler, cfg)
    peak_flops = world_peak_flops(world, device, dtype)

    def plain_model() -> tuple[Transformer, torch.optim.Optimizer]:
        model = Transformer(model_config).to(device=device, dtype=dtype)
        return model, model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

    seed_everything(cfg.seed)  # every rank builds the same full model (the embedded backend's), then cuts its part
    fresh, _ = plain_model()
    facts = {"params": fresh.num_params(), "non_embedding_params": fresh.num_params(non_embedding=True),
             "flops_per_token": fresh.estimate_flops_per_token(cfg.seq_len)}
    flops_of = fresh.estimate_flops_per_token
    parallel = parallelize(fresh, context, layout)
    del fresh
    if objective is not None:
        parallel.use_objective(objective)
    optimizer = build_optimizer(parallel, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    engine = _engine(layout)
    configs = {"model_config": model_config.to_dict(), "train_config": cfg.to_dict(), "parallel": layout.to_dict()}
    shadow: list[Any] = []  # rank 0's plain model and AdamW: what checkpoints and evals read

    def gathered(with_optimizer: bool) -> Transformer | None:
        if world.is_main and not shadow:
            shadow.extend(plain_model())
        gather_full(parallel, optimizer if with_optimizer else None, shadow[0] if world.is_main else None,
                    shadow[1] if world.is_main and with_optimizer else None)
        return shadow[0] if world.is_main else None

    step, progress, resumed_from = 0, _Progress(), None
    last_loss, eval_rows, call_tokens = float("nan"), [], 0
    stop_signal = 0
    bar = None

    def checkpoint(at: int) -> None:
        model = gathered(with_optimizer=True)
        if world.is_main:
            save_checkpoint(run.checkpoint_dir, at, model, shadow[1], sampler_state=sampler.state_dict(),
                            trainer_state=progress.state_dict(), configs=configs, keep_last=cfg.keep_last_checkpoints)
            run.flush()
        world.barrier()

    def run_eval(at: int) -> list[dict[str, Any]]:
        model = gathered(with_optimizer=False)
        rows = None
        if world.is_main:
            model.eval()
            rows = evaluator.evaluate(model, device)
            for row in rows:
                run.log_eval(at, row["source"], **{k: v for k, v in row.items() if k != "source"})
            if tasks is not None:
                for row in tasks.evaluate(model, device):
                    run.log_task(at, row["task"], **{k: v for k, v in row.items() if k != "task"})
        return world.broadcast_object(rows)

    previous_status = run.display_status() if (run.path / "run.json").exists() else None
    run.acquire()
    stop = _StopSignals()
    try:
        stop.__enter__()
        if latest is not None:
            step = read_checkpoint(latest).step
            restored, restored_optimizer = plain_model()
            progress = _resume(latest, run, restored, restored_optimizer, sampler, model_config, cfg)
            scatter_full(parallel, optimizer, restored, restored_optimizer)
            del restored, restored_optimizer
            resumed_from = str(latest)
        elif cfg.init_from:  # a post-training run starts from its parent's weights and moments
            restored, restored_optimizer = plain_model()
            run.summary["initialized_from"] = _init_from(resolve_checkpoint(cfg.init_from), run, restored,
                                                         restored_optimizer, model_config)
            scatter_full(parallel, optimizer, restored, restored_optimizer)
            del restored, restored_optimizer
        run.use_tensorboard(cfg.tensorboard)
        run.truncate_after(step)
        run.config.update({"model": model_config.to_dict(), "train": cfg.to_dict(),
                           "decay_start_step": decay_start_step(cfg), "device": str(device), "precision": precision,
                           "compiled": False, "world_size": world.world_size})
        if latest is not None or previous_status in ("stale", "interrupted", "failed"):
            run.summary.setdefault("restarts", []).append(
                {"step": step, "previous_status": previous_status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        run.status = "running"
        run.summary.pop("stopped_by", None)
        run.summary.update({**facts, "active_params": facts["params"], "activation_ratio": 1.0, "total_steps": total,
                            "matmul_peak_flops": peak_flops, "world_size": world.world_size,
                            "parallel": layout.to_dict()})
        run.save()
        bar = tqdm(total=total, initial=step, disable=not cfg.progress_bar or not world.is_main, unit="step",
                   dynamic_ncols=True, desc=f"{run.run_id} [{layout.describe()}]")
        window_tokens, window_time, stage = 0, 0.0, ""
        rope_theta = model_config.rope_theta
        parallel.module.train()
        while step < total and (stop_after is None or step < stop_after) and stop_signal == 0:
            t0 = time.perf_counter()
            if (theta := _stage_rope_theta(sampler, model_config.rope_theta)) != rope_theta:
                rope_theta = theta
                parallel.use_rope_theta(theta)
                configs["model_config"]["rope_theta"] = theta
                changes = run.summary.setdefault("rope_theta_changes", [])
                if not changes or changes[-1]["rope_theta"] != theta:
                    changes.append({"step": step, "rope_theta": theta})
                if shadow:
                    shadow[0].use_rope_theta(theta)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [sampler.next_batch(parallel.dp_rank, layout.dp) for _ in range(cfg.grad_accum)]
            for batch in batches:
                tokens = np.asarray(batch.tokens)
                if tokens.min() < 0 or tokens.max() >= model_config.vocab_size:
                    raise ConfigError(f"sampler gave token ids in [{tokens.min()}, {tokens.max()}] but vocab_size="
                                      f"{model_config.vocab_size}: set ModelConfig.vocab_size to the tokenizer's")
            if hasattr(objective, "sample"):
                _on_policy(batches, objective, gathered(with_optimizer=False), world, parallel, device)
            seq_len = np.asarray(batches[0].tokens).shape[1] - 1
            stage = batches[-1].stage
            outputs = engine.train_batch_iter(parallel.module, pg=context.pp_pg,
                                              batch=_micro_batches(batches, parallel, device),
                                              nb_microbatches=cfg.grad_accum, grad_accumulator=None)
            with warnings.catch_warnings():  # nanotron 0.4 reduces tied gradients with all_reduce_coalesced
                warnings.filterwarnings("ignore", message=".*all_reduce_coalesced.*", category=FutureWarning)
                sync_tied_weights_gradients(parallel.unwrapped, context, None)
            loss = sum(o["loss"] for o in outputs) if parallel.is_last_stage else torch.zeros(())
            last_loss = world_loss_mean(loss, parallel)
            step_metrics = {}
            for k, name in enumerate(getattr(objective, "metric_names", ())):  # averaged like the loss
                value = (sum(o["metrics"][k] for o in outputs) / len(outputs) if parallel.is_last_stage
                         else torch.zeros(()))
                step_metrics[name] = world_loss_mean(value, parallel)
            grad_norm = clip_grad_norm(parallel, cfg.grad_clip)
            if not math.isfinite(last_loss) or not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"run {run.run_id!r} step {step + 1}: loss {last_loss}, grad norm {grad_norm} at lr {lr:.3g} "
                    f"(stage {stage!r}); the update was not applied. Rerun (it resumes from the last checkpoint) "
                    "with a lower train.lr or a longer train.warmup_steps", ["train.lr", "train.warmup_steps"])
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            n = sum(np.asarray(b.tokens).shape[0] * (np.asarray(b.tokens).shape[1] - 1) for b in batches) * layout.dp
            dt = time.perf_counter() - t0
            progress.tokens += n
            progress.train_time_s += dt
            call_tokens += n
            window_tokens, window_time = window_tokens + n, window_time + dt
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                tok_s = window_tokens / window_time if window_time > 0 else 0.0
                run.log_metrics(step, loss=last_loss, lr=lr, grad_norm=grad_norm if cfg.grad_clip > 0 else float("nan"),
                                tokens=progress.tokens, tokens_per_s=tok_s,
                                mfu=mfu(flops_of(seq_len), tok_s, peak_flops), stage=stage,
                                tokens_by_source=_tokens_by_source(sampler, progress), **step_metrics)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tok_s:,.0f}", stage=stage)
                window_tokens, window_time = 0, 0.0
            if evaluator is not None and (step % cfg.eval_every == 0 or step == total):
                eval_rows = run_eval(step)
                if world.is_main:
                    bar.write(f"[{run.run_id}] step {step}: eval loss {eval_rows[-1]['loss']:.4f}, bpb "
                              f"{eval_rows[-1]['bpb']:.4f}", file=sys.stderr)
            stop_signal = world.all_max(stop.received or 0)
            if step % cfg.checkpoint_every == 0 or step == total or step == stop_after or stop_signal:
                checkpoint(step)
    except BaseException as exc:
        record_failure(run, exc, step)
        raise
    finally:
        stop.__exit__()
        if bar is not None:
            bar.close()
    return finish_run(run, world, step=step, total=total, progress=progress,
                      tokens_by_source=_tokens_by_source(sampler, progress), final_loss=last_loss if call_tokens
                      else None, resumed_from=resumed_from, flops_per_token=facts["flops_per_token"],
                      peak_flops=peak_flops, measure_peak=lambda: world_peak_flops(world, device, dtype, cached=False),
                      stopped_by=signal.Signals(stop_signal).name if stop_signal else None,
                      eval_rows=eval_rows)


def _tokens_by_source(sampler: Sampler, progress: _Progress) -> dict[str, int]:
    counts = getattr(sampler, "tokens_by_source", None)
    return dict(counts()) if callable(counts) else dict(progress.tokens_by_source or {})
