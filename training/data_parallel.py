"""Data parallelism for the embedded backend: one process per device (or per CPU share), launched by torchrun.

The model stays an ordinary module: `DataParallelWorld.wrap` puts DistributedDataParallel around it from outside,
so checkpoints keep the plain model's names (checkpoint.canonical_name strips `module.`). Each rank reads its own
rows of the one global batch (`MixtureSampler.next_batch(rank, world_size)`), DDP averages the gradients, and the
few decisions that must agree everywhere (stop, eval rows, policy moves) travel from rank 0 with
`broadcast_object`. With one process (no torchrun environment) every method is a cheap no-op, so the trainer
has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from mixlab.training.errors import ConfigError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} must be a whole number (torchrun sets it)",
                          [name]) from None


@dataclass
class DataParallelWorld:
    """Where this process stands among the data-parallel ranks: rank, world_size, local_rank and the
    collective backend ("gloo" on CPU, "nccl" on CUDA)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "gloo"
    local_world_size: int = 1

    @classmethod
    def from_env(cls, device: torch.device | str | None = None) -> DataParallelWorld:
        """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); a world of one when
        they are absent. `device` picks the backend: nccl for CUDA, gloo otherwise."""
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        local_world = _env_int("LOCAL_WORLD_SIZE", world_size)
        if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank < max(local_world, 1):
            raise ConfigError(f"torchrun environment RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} "
                              "is inconsistent: launch with torchrun, or unset them for one process",
                              ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
        kind = torch.device(device).type if device is not None else "cpu"
        return cls(rank=rank, world_size=world_size, local_rank=local_rank,
                   backend="nccl" if kind == "cuda" else "gloo", local_world_size=max(local_world, 1))

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run record, TensorBoard events and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ---- process group -------------------------------------------------------------------------------------
    def init(self, timeout_s: float = 1800.0) -> bool:
        """Join the process group (env:// rendezvous from torchrun). Returns True when this call created it, so
        the caller that created it is the one that destroys it; False for one process or a group that exists."""
        if not self.distributed or dist.is_initialized():
            return False
        if self.backend == "nccl":
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                timeout=timedelta(seconds=timeout_s))
        return True

    def destroy(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, requested: torch.device) -> torch.device:
        """The device of this rank: on CUDA the local rank's GPU, else the requested device."""
        if requested.type == "cuda" and self.distributed:
            return torch.device("cuda", self.local_rank)
        return requested

    # ---- model ---------------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """DistributedDataParallel around `model` (which stays the module to save and evaluate); the model
        itself for one process. DDP broadcasts rank 0's weights, so replicas start identical."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        # buffers are not re-broadcast at every forward: per-rank routing counts would be overwritten by rank 0's;
        # the ones that must agree (an MoE's expert bias) are updated from all-reduced counts on every rank
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
                                       broadcast_buffers=False)

    # ---- collectives ---------------------------------------------------------------------------------------
    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over ranks (a new tensor; the input is left alone)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().to(self._collective_device(), copy=True)  # nccl reduces CUDA tensors only
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(tensor.device)

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (e.g. an MoE layer's routing counts before its bias step)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_max(self, value: int) -> int:
        """The largest of an integer over ranks (e.g. a signal number: any rank's signal stops them all)."""
        if not self.distributed:
            return value
        out = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return int(out.item())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable object on every rank (what the others passed is ignored)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
