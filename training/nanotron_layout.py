"""The nanotron backend's parallel layout: mixlab's plain Transformer cut into nanotron 0.4's building blocks from
outside, and back.

`parallelize` takes the plain model (built and initialised exactly as the embedded backend builds it, so both start
from the same weights) and applies a `ParallelLayout`:
- tensor parallel (tp): the q/k/v and gate/up projections become `TensorParallelColumnLinear`, the attention and
  MLP output projections `TensorParallelRowLinear` (sync all-reduce mode), the token embedding a vocab-parallel
  `TensorParallelEmbedding` and the head a column linear whose vocab-sharded logits go to nanotron's
  `sharded_cross_entropy`; each rank keeps its slice of the full weight, attention keeps its local heads;
- pipeline parallel (pp): embedding, each decoder layer, and head + loss are `PipelineBlock`s placed on
  contiguous pipeline ranks, run by nanotron's 1F1B or all-forward-all-backward engine;
- data parallel (dp): torch DDP over nanotron's dp group, optionally ZeRO-1 (`ZeroDistributedOptimizer`).

The model file is untouched: its `Block`s are reused as they are, only their linear layers are swapped. Every
parallel parameter knows its plain name and the dimension it is split on, so `gather_full` assembles the plain
model and a plain AdamW on rank 0 (a checkpoint then is the embedded backend's: full tensors and optimizer state
by parameter name, whatever the layout) and `scatter_full` copies them into any other layout.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from mixlab.training.config import ConfigDict
from mixlab.training.errors import ConfigError
from mixlab.training.model import ModelConfig, Transformer

PipelineEngineName = Literal["1f1b", "afab"]


@dataclass
class ParallelLayout(ConfigDict):
    """How a run is cut over its processes: tp x pp x dp = the world size (torchrun's WORLD_SIZE).

    dp None: the world size / (tp x pp). pp_engine: "1f1b" (one forward one backward: less activation memory) or
    "afab" (all forwards, then all backwards). zero_stage 1 shards AdamW's moments over the dp ranks."""

    tp: int = 1
    pp: int = 1
    dp: int | None = None
    pp_engine: PipelineEngineName = "1f1b"
    zero_stage: int = 0

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp"):
            value = getattr(self, name)
            if value is None and name == "dp":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be a whole number >= 1", [f"parallel.{name}"])
        if self.pp_engine not in ("1f1b", "afab"):
            raise ConfigError(f"parallel.pp_engine={self.pp_engine!r}: choose '1f1b' or 'afab'", ["parallel.pp_engine"])
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage!r}: nanotron 0.4 has ZeRO stage 0 or 1",
                              ["parallel.zero_stage"])

    def resolved(self, world_size: int) -> ParallelLayout:
        """This layout with dp filled in for `world_size` processes; refuses a product that is not the world."""
        dp = self.dp if self.dp is not None else max(1, world_size // (self.tp * self.pp))
        if self.tp * self.pp * dp != world_size:
            raise ConfigError(f"parallel layout tp={self.tp} x pp={self.pp} x dp={dp} = {self.tp * self.pp * dp} "
                              f"processes, but the world has {world_size}: launch with torchrun --nproc_per_node "
                              f"{self.tp * self.pp * dp}, or change parallel.tp/pp/dp",
                              ["parallel.tp", "parallel.pp", "parallel.dp"])
        return ParallelLayout(tp=self.tp, pp=self.pp, dp=dp, pp_engine=self.pp_engine, zero_stage=self.zero_stage)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * (self.dp or 1)

    def describe(self) -> str:
        return f"tp{self.tp}xpp{self.pp}xdp{self.dp}" + (f" {self.pp_engine}" if self.pp > 1 else "") + (
            " zero1" if self.zero_stage else "")


def layout_problems(model_config: ModelConfig, layout: ParallelLayout, batch_size: int | None = None,
                    grad_accum: int = 1) -> list[str]:
    """What keeps this model from this layout, one sentence each naming the fields (empty: it fits)."""
    cfg, tp, pp = model_config, layout.tp, layout.pp
    problems = []
    if cfg.vocab_size % tp:
        problems.append(f"model.vocab_size={cfg.vocab_size} is not divisible by parallel.tp={tp}: the vocab-parallel "
                        "embedding and head give each rank vocab_size / tp rows (pad the tokenizer's vocabulary)")
    if cfg.n_layers % pp:
        problems.append(f"model.n_layers={cfg.n_layers} is not divisible by parallel.pp={pp}: every pipeline stage "
                        "holds the same number of decoder layers")
    for field, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_hidden", cfg.ffn_hidden)):
        if value % tp:
            problems.append(f"model.{field}={value} is not divisible by parallel.tp={tp}: tensor parallelism splits "
                            f"it over the ranks")
    unsupported = [(cfg.attention != "mha", "attention='mla'"), (cfg.n_experts > 0, "n_experts > 0 (MoE)"),
                   (bool(cfg.ssm_layers), "ssm_layers (hybrid SSM)"), (cfg.doc_masking, "doc_masking"),
                   (cfg.z_loss > 0, "z_loss > 0")]
    for bad, what in unsupported:
        if bad:
            problems.append(f"model {what} is not in the nanotron backend's layout yet: train it with the embedded "
                            "backend")
    if batch_size is not None and layout.dp is not None and batch_size % layout.dp:
        problems.append(f"train.batch_size={batch_size} (the global batch) is not divisible by parallel.dp="
                        f"{layout.dp}: each replica reads an equal share of its rows")
    if pp > 1 and layout.pp_engine == "1f1b" and grad_accum < pp - 1:
        problems.append(f"the 1F1B pipeline engine needs train.grad_accum >= pp - 1 = {pp - 1} micro-batches per "
                        f"step (got {grad_accum})")
    return problems


# ---- the pipeline stages: small dict-in, dict-out wrappers around the plain model's own modules ----------------
class _EmbeddingStage(nn.Module):
    def __init__(self, tok_emb: nn.Module):
        super().__init__()
        self.tok_emb = tok_emb

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.tok_emb(input_ids)}


class _DecoderStage(nn.Module):
    """One plain `Block` and the RoPE tables it reads (derived state, rebuilt by `use_rope_theta`)."""

    def __init__(self, block: nn.Module, rope_cos: torch.Tensor, rope_sin: torch.Tensor):
        super().__init__()
        self.block = block
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.block(hidden, self.rope_cos, self.rope_sin)}


HEAD_INPUTS = ("targets", "loss_mask", "ref_logps", "desirable", "teacher_logits")  # fed to the last stage


class _HeadStage(nn.Module):
    """Final norm, the vocab-parallel head and the sharded cross-entropy: mean loss, and each row's mean (what a
    mixture policy reads) detached."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, tp_group: Any):
        super().__init__()
        self.norm, self.lm_head, self.tp_group = norm, lm_head, tp_group
        self.objective: Any = None  # a post-training objective with from_sequence_logps (ParallelModel.use_objective)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor, ref_logps: torch.Tensor,
                desirable: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy over the targets in loss_mask (all of them in pre-training: the plain mean), or the
        objective's loss: from each row's summed log-probability (preference), or from the logits and the
        teacher's over this rank's vocabulary slice (distillation); `metrics` holds the objective's metrics in the
        order of its metric_names (empty without one)."""
        from nanotron.parallel.tensor_parallel.functional import sharded_cross_entropy

        logits = self.lm_head(self.norm(hidden))
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        if self.objective is not None and hasattr(self.objective, "from_logits"):
            loss, metrics = self.objective.from_logits(logits, teacher_logits, loss_mask, self.tp_group)
            return {"loss": loss, "row_losses": torch.zeros(logits.shape[0], dtype=loss.dtype, device=loss.device),
                    "metrics": torch.stack([metrics[n].detach().to(loss.dtype) for n in self.objective.metric_names])}
        per_token = sharded_cross_entropy(logits, targets, group=self.tp_group)
        mask = loss_mask.to(per_token.dtype)
        counts = mask.sum(dim=1)
        masked = per_token * mask
        rows = (masked.sum(dim=1) / counts.clamp(min=1)).detach()
        if self.objective is None:
            loss = per_token.mean() if bool(loss_mask.all()) else masked.sum() / counts.sum().clamp(min=1)
            return {"loss": loss, "row_losses": rows, "metrics": torch.zeros(0, device=loss.device)}
        loss, metrics = self.objective.from_sequence_logps(-masked.sum(dim=1), counts, ref_logps, desirable.bool())
        return {"loss": loss, "row_losses": rows,
                "metrics": torch.stack([metrics[name].detach().to(loss.dtype) for name in self.objective.metric_names])}


class ParallelTransformer(nn.Module):
    """The plain Transformer as nanotron PipelineBlocks: forward(input_ids, targets) -> {"loss", "row_losses"}
    (tensors on the last pipeline rank, TensorPointers elsewhere), the signature nanotron's engines call."""

    def __init__(self, embed: nn.Module, layers: list[nn.Module], head: nn.Module):
        super().__init__()
        self.embed, self.layers, self.head = embed, nn.ModuleList(layers), head

    def forward(self, input_ids: Any, targets: Any, loss_mask: Any, ref_logps: Any, desirable: Any,
                teacher_logits: Any) -> dict[str, Any]:
        hidden = self.embed(input_ids=input_ids)["hidden"]
        for layer in self.layers:
            hidden = layer(hidden=hidden)["hidden"]
        return self.head(hidden=hidden, targets=targets, loss_mask=loss_mask, ref_logps=ref_logps,
                         desirable=desirable, teacher_logits=teacher_logits)


@dataclass(frozen=True)
class ShardSpec:
    """Where one parallel parameter comes from: its plain name and the dimension it is split over tp (None:
    replicated on every tp rank)."""

    plain_name: str
    split_dim: int | None


@dataclass
class ParallelModel:
    """What `parallelize` returns: the (possibly DDP-wrapped) module the engine runs, the unwrapped one, the
    parallel context and layout, and each local parameter's ShardSpec."""

    module: nn.Module
    unwrapped: ParallelTransformer
    context: Any  # nanotron ParallelContext
    layout: ParallelLayout
    model_config: ModelConfig
    specs: dict[str, ShardSpec]  # parallel parameter name (without DDP's module.) -> ShardSpec

    # ---- ranks ---------------------------------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return torch_dist.get_rank(self.context.tp_pg)

    @property
    def pp_rank(self) -> int:
        return torch_dist.get_rank(self.context.pp_pg)

    @property
    def dp_rank(self) -> int:
        return torch_dist.get_rank(self.context.dp_pg)

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.unwrapped.named_parameters()

    def use_rope_theta(self, theta: float) -> None:
        """A long-context stage's RoPE base on every local decoder stage (as Transformer.use_rope_theta)."""
        from mixlab.training.model import rope_tables

        cos, sin = rope_tables(self.model_config.rope_table_dim, self.model_config.max_seq_len, theta,
                               self.model_config)
        for module in self.unwrapped.modules():
            if isinstance(module, _DecoderStage):
                module.rope_cos.copy_(cos)
                module.rope_sin.copy_(sin)

    def use_objective(self, objective: Any) -> None:
        """A post-training objective (training.posttrain's PreferenceObjective or DistillObjective) as the head
        stage's loss."""
        for module in self.unwrapped.modules():
            if isinstance(module, _HeadStage):
                module.objective = objective

    def shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor of parallel parameter `name`."""
        return tp_slice(full, self.specs[name].split_dim, self.layout.tp, self.tp_rank)


def tp_slice(full: torch.Tensor, split_dim: int | None, tp: int, tp_rank: int) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s contiguous slice of `full` along `split_dim` (all of it when replicated)."""
    if split_dim is None:
        return full
    size = full.shape[split_dim] // tp
    return full.narrow(split_dim, tp_rank * size, size)


def _tp_linear(kind: str, linear: nn.Linear, tp_group: Any, tp: int, tp_rank: int) -> nn.Module:
    """A TensorParallel{Column,Row}Linear holding this rank's slice of `linear`'s weight (rows for column, columns
    for row); sync all-reduce mode (0.4's async row backward is wrong, see nanotron_compat)."""
    from nanotron.parallel.tensor_parallel.enum import TensorParallelLinearMode
    from nanotron.parallel.tensor_parallel.nn import TensorParallelColumnLinear, TensorParallelRowLinear

    cls = TensorParallelColumnLinear if kind == "column" else TensorParallelRowLinear
    weight = linear.weight.detach()
    layer = cls(linear.in_features, linear.out_features, pg=tp_group, mode=TensorParallelLinearMode.ALL_REDUCE,
                bias=False, device=weight.device, dtype=weight.dtype, async_communication=False)
    dim = 0 if kind == "column" else 1
    size = weight.shape[dim] // tp
    with torch.no_grad():
        layer.weight.copy_(weight.narrow(dim, tp_rank * size, size))
    return layer


def _tp_embedding(embedding: nn.Embedding, tp_group: Any, tp: int, tp_rank: int) -> nn.Module:
    from nanotron.parallel.tensor_parallel.enum import TensorParallelLinearMode
    from nanotron.parallel.tensor_parallel.nn import TensorParallelEmbedding

    weight = embedding.weight.detach()
    layer = TensorParallelEmbedding(embedding.num_embeddings, embedding.embedding_dim, pg=tp_group,
                                    mode=TensorParallelLinearMode.ALL_REDUCE, device=weight.device, dtype=weight.dtype)
    rows = weight.shape[0] // tp
    with torch.no_grad():
        layer.weight.copy_(weight[tp_rank * rows:(tp_rank + 1) * rows])
    return layer


def stage_of_layer(layer: int, n_layers: int, pp: int) -> int:
    """The pipeline rank of decoder layer `layer`: contiguous, n_layers / pp layers per stage."""
    return layer * pp // n_layers


def parallelize(model: Transformer, context: Any, layout: ParallelLayout) -> ParallelModel:
    """Cut `model` (its weights as initialised or loaded) into `layout` over nanotron's `context`. The plain
    model's modules are moved into the result: use the ParallelModel from here on."""
    from nanotron import distributed as nt_dist
    from nanotron.parallel.pipeline_parallel.block import PipelineBlock
    from nanotron.parallel.pipeline_parallel.p2p import P2P
    from nanotron.parallel.tied_parameters import create_pg_for_tied_weights, tie_parameters

    cfg = model.config
    if problems := layout_problems(cfg, layout):
        raise ConfigError("; ".join(problems), ["parallel", "model"])
    tp, pp = layout.tp, layout.pp
    tp_group = context.tp_pg
    tp_rank = torch_dist.get_rank(tp_group)
    device = model.tok_emb.weight.device
    specs_by_plain: dict[str, int | None] = {}

    tok_emb = _tp_embedding(model.tok_emb, tp_group, tp, tp_rank)
    specs_by_plain["tok_emb.weight"] = 0
    tied_in_place = cfg.tie_embeddings and pp == 1
    head_linear = _tp_linear("column", model.lm_head, tp_group, tp, tp_rank)
    if tied_in_place:
        head_linear.weight = tok_emb.weight  # one parameter, both shards [vocab / tp, d_model]
    else:
        specs_by_plain["lm_head.weight"] = 0
    for i, block in enumerate(model.layers):
        attn, mlp = block.attn, block.mlp
        for kind, parent, names in (("column", attn, ("wq", "wk", "wv")), ("row", attn, ("wo",)),
                                    ("column", mlp, ("w_gate", "w_up")), ("row", mlp, ("w_down",))):
            for name in names:
                setattr(parent, name, _tp_linear(kind, getattr(parent, name), tp_group, tp, tp_rank))
                specs_by_plain[f"layers.{i}.{'attn' if parent is attn else 'mlp'}.{name}.weight"] = (
                    0 if kind == "column" else 1)
        attn.n_heads //= tp  # the local heads; GQA's query-to-kv grouping is the same within a rank
        attn.n_kv_heads //= tp

    p2p = P2P(context.pp_pg, device=device)

    def placed(module: nn.Module, rank: int, inputs: set[str], outputs: set[str]) -> PipelineBlock:
        block = PipelineBlock(p2p=p2p, module_builder=lambda: module, module_kwargs={}, module_input_keys=inputs,
                              module_output_keys=outputs)
        block.build_and_set_rank(rank)
        return block

    embed = placed(_EmbeddingStage(tok_emb), 0, {"input_ids"}, {"hidden"})
    layers = [placed(_DecoderStage(block, model.rope_cos.clone(), model.rope_sin.clone()),
                     stage_of_layer(i, cfg.n_layers, pp), {"hidden"}, {"hidden"})
              for i, block in enumerate(model.layers)]
    head = placed(_HeadStage(model.norm, head_linear, tp_group), pp - 1,
                  {"hidden", *HEAD_INPUTS}, {"loss", "row_losses", "metrics"})
    parallel = ParallelTransformer(embed, layers, head).to(device)

    specs = {name: ShardSpec(_plain_name(name), specs_by_plain.get(_plain_name(name)))
             for name, _ in parallel.named_parameters()}
    # replicated parameters (norm gains) are equal on every tp rank by construction (ALL_REDUCE mode): tied across
    # the tp group without a reduction, so the grad norm counts them once
    tp_ranks = tuple(sorted(torch_dist.get_process_group_ranks(tp_group)))
    for name, spec in specs.items():
        if spec.split_dim is None:
            tie_parameters(root_module=parallel, ties=[(name, tp_ranks)], parallel_context=context, reduce_op=None)
    if cfg.tie_embeddings and pp > 1:  # the embedding (first stage) and the head (last) are one weight: sum grads
        dp_rank = torch_dist.get_rank(context.dp_pg)
        ranks = [int(context.world_rank_matrix[0, stage, dp_rank, tp_rank]) for stage in (0, pp - 1)]
        ties = [("embed.pp_block.tok_emb.weight", (ranks[0],)), ("head.pp_block.lm_head.weight", (ranks[1],))]
        tie_parameters(root_module=parallel, ties=ties, parallel_context=context, reduce_op=nt_dist.ReduceOp.SUM)
        specs = {name: ShardSpec(_plain_name(name), 0) if _plain_name(name) == "lm_head.weight" else spec
                 for name, spec in specs.items()}
    create_pg_for_tied_weights(root_module=parallel, parallel_context=context)
    module: nn.Module = parallel
    if layout.dp and layout.dp > 1:
        from torch.nn.parallel import DistributedDataParallel

        with warnings.catch_warnings():  # the RoPE tables are equal on every replica: no buffer sync wanted
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            module = DistributedDataParallel(parallel, process_group=context.dp_pg, broadcast_buffers=False)
    return ParallelModel(module=module, unwrapped=parallel, context=context, layout=layout, model_config=cfg,
                         specs=specs)


def _plain_name(parallel_name: str) -> str:
    """embed.pp_block.tok_emb.weight -> tok_emb.weight; layers.3.pp_block.block.attn.wq.weight ->
    layers.3.attn.wq.weight; head.pp_block.norm.weight -> norm.weight."""
    name = parallel_name.replace("module.", "", 1) if parallel_name.startswith("module.") else parallel_name
    stage, _, rest = name.partition(".pp_block.")
    if stage == "embed" or stage == "head":
        return rest
    return f"{stage}.{rest.removeprefix('block.')}"


# ---- optimizer ------------------------------------------------------------------------------------------------
def build_optimizer(parallel: ParallelModel, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> Any:
    """nanotron's NamedOptimizer over torch AdamW (ZeRO-1 over the dp group when the layout asks), with the
    embedded backend's decay groups: weight matrices decayed, norm gains and the (tied) embedding not."""
    from nanotron.optim.named_optimizer import NamedOptimizer
    from nanotron.optim.zero import ZeroDistributedOptimizer

    decay, no_decay = [], []
    for name, p in parallel.named_parameters():
        plain = parallel.specs[name].plain_name
        decayed = p.dim() >= 2 and not plain.startswith("tok_emb") and not (
            plain == "lm_head.weight" and parallel.model_config.tie_embeddings)
        (decay if decayed else no_decay).append((name, p))
    groups = [{"named_params": decay, "weight_decay": weight_decay},
              {"named_params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["named_params"]]

    def adamw(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps)

    def named(param_groups: list[dict[str, Any]]) -> Any:
        return NamedOptimizer(named_params_or_groups=param_groups, optimizer_builder=adamw)

    if parallel.layout.zero_stage == 1:
        return ZeroDistributedOptimizer(named_params_or_groups=groups, optimizer_builder=named,
                                        dp_pg=parallel.context.dp_pg)
    return named(groups)


def _zero_offsets(optimizer: Any, name: str, dp_rank: int) -> tuple[int, int] | None:
    offsets = getattr(optimizer, "param_name_to_dp_rank_offsets", None)
    if offsets is None:
        return None
    span = offsets[name].get(dp_rank)
    return (int(span[0]), int(span[1])) if span is not None else (0, 0)


def _base_state_by_name(optimizer: Any) -> dict[str, dict[str, Any]]:
    """The torch AdamW state of this rank's (slices of) parameters, by parallel parameter name."""
    base = optimizer.get_base_optimizer()
    return {optimizer.id_to_name[id(p)]: state for p, state in base.state.items()}


def _base_param_by_name(optimizer: Any) -> dict[str, torch.Tensor]:
    base = optimizer.get_base_optimizer()
    return {optimizer.id_to_name[id(p)]: p for group in base.param_groups for p in group["params"]}


# ---- full tensors by name: gather to rank 0, scatter from a plain model -------------------------------------------
def gather_full(parallel: ParallelModel, optimizer: Any | None, plain: Transformer | None,
                plain_optimizer: torch.optim.Optimizer | None) -> None:
    """Every rank sends its shards; global rank 0 writes the full tensors into `plain` (and the full AdamW moments
    into `plain_optimizer`, by parameter). A collective: every rank calls it; only rank 0 passes the plain objects."""
    tp_rank, dp_rank = parallel.tp_rank, parallel.dp_rank
    weights: dict[str, tuple[int, torch.Tensor]] = {}
    if dp_rank == 0:
        for name, p in parallel.named_parameters():
            spec = parallel.specs[name]
            if spec.split_dim is None and tp_rank != 0:
                continue
            weights[spec.plain_name] = (tp_rank, p.detach().cpu().clone())
    moments: dict[str, tuple[int, tuple[int, int] | None, dict[str, Any]]] = {}
    if optimizer is not None:
        zero = parallel.layout.zero_stage == 1
        for name, state in _base_state_by_name(optimizer).items():
            spec = parallel.specs[name]
            if (spec.split_dim is None and tp_rank != 0) or (not zero and dp_rank != 0):
                continue
            span = _zero_offsets(optimizer, name, dp_rank) if zero else None
            moments.setdefault(spec.plain_name, [])  # type: ignore[arg-type]
            moments[spec.plain_name].append((tp_rank, span, {k: v.detach().cpu().clone() if torch.is_tensor(v)
                                                             else v for k, v in state.items()}))  # type: ignore
    parts: list[Any] = [None] * torch_dist.get_world_size() if torch_dist.get_rank() == 0 else None  # type: ignore
    torch_dist.gather_object((weights, moments), parts, dst=0)
    if torch_dist.get_rank() != 0:
        return
    assert plain is not None
    shards: dict[str, dict[int, torch.Tensor]] = {}
    moment_parts: dict[str, list[tuple[int, tuple[int, int] | None, dict[str, Any]]]] = {}
    for part_weights, part_moments in parts:
        for name, (rank, tensor) in part_weights.items():
            shards.setdefault(name, {})[rank] = tensor
        for name, entries in part_moments.items():
            moment_parts.setdefault(name, []).extend(entries)
    split_of = {spec.plain_name: spec.split_dim for spec in parallel.specs.values()}
    split_of.update(plain_split_dims(parallel.model_config))
    full_params = dict(plain.named_parameters())
    with torch.no_grad():
        for name, p in full_params.items():
            if name not in shards:
                raise RuntimeError(f"gather_full: no rank holds parameter {name!r}")
            p.copy_(_join(shards[name], split_of.get(name)))
    if plain_optimizer is None:
        return
    for group in plain_optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"], strict=True):
            entries = moment_parts.get(name)
            if not entries:
                continue
            state: dict[str, Any] = {}
            for key in ("exp_avg", "exp_avg_sq"):
                by_tp: dict[int, torch.Tensor] = {}
                for rank in sorted({e[0] for e in entries}):
                    pieces = sorted((e for e in entries if e[0] == rank), key=lambda e: e[1][0] if e[1] else 0)
                    if pieces[0][1] is None:
                        by_tp[rank] = pieces[0][2][key]
                    else:  # ZeRO-1: flat slices of this tp shard, in dp order
                        shape = _shard_shape(p.shape, split_of.get(name), parallel.layout.tp)
                        by_tp[rank] = torch.cat([e[2][key].reshape(-1) for e in pieces]).view(shape)
                state[key] = _join(by_tp, split_of.get(name)).to(p.dtype)
            state["step"] = entries[0][2]["step"].clone()
            plain_optimizer.state[p] = state


def plain_split_dims(cfg: ModelConfig) -> dict[str, int | None]:
    """The tp split dimension of every plain parameter name (None: replicated); a rank's specs know only its own
    stages'."""
    splits: dict[str, int | None] = {"tok_emb.weight": 0, "lm_head.weight": 0, "norm.weight": None}
    for i in range(cfg.n_layers):
        for name in ("wq", "wk", "wv"):
            splits[f"layers.{i}.attn.{name}.weight"] = 0
        splits[f"layers.{i}.attn.wo.weight"] = 1
        splits[f"layers.{i}.mlp.w_gate.weight"] = 0
        splits[f"layers.{i}.mlp.w_up.weight"] = 0
        splits[f"layers.{i}.mlp.w_down.weight"] = 1
    return splits


def _shard_shape(full: torch.Size, split_dim: int | None, tp: int) -> tuple[int, ...]:
    shape = list(full)
    if split_dim is not None:
        shape[split_dim] //= tp
    return tuple(shape)


def _join(by_tp_rank: dict[int, torch.Tensor], split_dim: int | None) -> torch.Tensor:
    if split_dim is None or len(by_tp_rank) == 1:
        return by_tp_rank[min(by_tp_rank)]
    return torch.cat([by_tp_rank[r] for r in sorted(by_tp_rank)], dim=split_dim)


def scatter_full(parallel: ParallelModel, optimizer: Any | None, plain: Transformer,
                 plain_optimizer: torch.optim.Optimizer | None) -> None:
    """Copy the plain model's weights (and the plain AdamW's moments, by parameter name) into this rank's shards:
    how a checkpoint saved in any layout (or by the embedded backend) continues in this one. Local: every rank
    holds the plain objects (loaded from the checkpoint) when it calls this."""
    full_params = dict(plain.named_parameters())
    tied_head = parallel.model_config.tie_embeddings
    with torch.no_grad():
        for name, p in parallel.named_parameters():
            plain_name = parallel.specs[name].plain_name
            source = full_params["tok_emb.weight" if plain_name == "lm_head.weight" and tied_head else plain_name]
            p.copy_(parallel.shard(name, source.detach()))
    if optimizer is None or plain_optimizer is None:
        return
    saved = {name: plain_optimizer.state.get(p) for group in plain_optimizer.param_groups
             for name, p in zip(group["param_names"], group["params"], strict=True)}
    zero = parallel.layout.zero_stage == 1
    base = optimizer.get_base_optimizer()
    params = _base_param_by_name(optimizer)
    for name, p in params.items():
        plain_name = parallel.specs[name].plain_name
        state = saved.get("tok_emb.weight" if plain_name == "lm_head.weight" and tied_head else plain_name)
        if not state:
            continue
        new: dict[str, Any] = {"step": state["step"].clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            local = parallel.shard(name, state[key]).to(p.dtype)
            if zero:
                start, end = _zero_offsets(optimizer, name, parallel.dp_rank) or (0, 0)
                local = local.reshape(-1)[start:end]
            new[key] = local.clone().view(p.shape) if not zero else local.clone()
        base.state[p] = new


def world_loss_mean(value: torch.Tensor, parallel: ParallelModel) -> float:
    """The step's loss on every rank: the last pipeline stage holds it (equal on its tp ranks), averaged over dp."""
    out = value.detach().to(torch.float64).reshape(1).clone() if parallel.is_last_stage else torch.zeros(
        1, dtype=torch.float64)
    torch_dist.all_reduce(out)
    return float(out.item()) / (parallel.layout.tp * (parallel.layout.dp or 1))


def gathered_rows(rows: torch.Tensor | None, parallel: ParallelModel) -> list[float]:
    """Each row's loss of the global batch, in dp rank order, on every rank (the last stage computed them)."""
    payload = rows.detach().cpu().tolist() if rows is not None and parallel.is_last_stage and parallel.tp_rank == 0 \
        else None
    every: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(every, payload)
    return [v for part in every if part is not None for v in part]

