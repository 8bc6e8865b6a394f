"""What nanotron 0.4 needs to run mixlab's nanotron backend, applied at import without editing nanotron.

nanotron 0.4 (the release installable from the registry) was written for CUDA + NCCL and has an import cycle. Each
`CompatPatch` below names the 0.4 file and line it works around and carries a probe: a few lines that fail on
unpatched 0.4. tests/test_nanotron_compat.py runs every probe in a fresh interpreter with that one patch left out
(it must fail: the patch is still needed) and with all patches (it must pass: the patch still applies), so a
nanotron upgrade that fixes or moves one of these fails the test that names it.

On a machine with CUDA and NCCL the CPU-only patches step aside and nanotron runs as upstream wrote it; the import
cycle is broken everywhere.

Not patched but avoided (see training/nanotron_layout.py): 0.4's async row-parallel backward reads other ranks'
weight shards (upstream #46, fixed after 0.4), so the layout uses the sync all-reduce mode, which needs neither the
fix nor 0.4's CUDA_DEVICE_MAX_CONNECTIONS assert; 0.4's clip_grad_norm (device="cuda", forced fp32), gradient
accumulator (device="cuda") and checkpoint files (layout-dependent optimizer names) are replaced by mixlab's own.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from mixlab.training.errors import TrainingError

NANOTRON_VERSION = "0.4"


class NanotronCompatError(TrainingError, RuntimeError):
    """nanotron is missing, is not the release these patches were written for, or a patch no longer applies."""


@dataclass(frozen=True)
class CompatPatch:
    """One workaround: what it fixes (`works_around`: 0.4 file:line and symptom), whether it is only for CPU/gloo,
    how to apply it, a probe that fails on nanotron without it, and the text of that failure (`symptom`)."""

    name: str
    works_around: str
    cpu_only: bool
    apply: Callable[[], None]
    probe: Callable[[], None]
    symptom: str


# ---- 1. the import cycle ----------------------------------------------------------------------------------------
def _break_import_cycle() -> None:
    """Import nanotron.logging once against a stand-in nanotron.config, then the real config package."""
    if "nanotron.logging" in sys.modules and hasattr(sys.modules["nanotron.logging"], "log_rank"):
        return
    stand_in = types.ModuleType("nanotron.config")
    stand_in_config = types.ModuleType("nanotron.config.config")

    class LoggingArgs:  # what nanotron.logging imports from the config (a type annotation there)
        pass

    stand_in_config.LoggingArgs = LoggingArgs  # type: ignore[attr-defined]
    stand_in.config = stand_in_config  # type: ignore[attr-defined]
    saved = {name: sys.modules.get(name) for name in ("nanotron.config", "nanotron.config.config")}
    sys.modules.update({"nanotron.config": stand_in, "nanotron.config.config": stand_in_config})
    try:
        logging_module = importlib.import_module("nanotron.logging")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    real = importlib.import_module("nanotron.config.config")
    logging_module.LoggingArgs = real.LoggingArgs  # type: ignore[attr-defined]


def _probe_import_cycle() -> None:
    importlib.import_module("nanotron.parallel.pipeline_parallel.engine")
    importlib.import_module("nanotron.parallel.tensor_parallel.nn")
    importlib.import_module("nanotron.config")


# ---- 2. ParallelContext picks a CUDA device ----------------------------------------------------------------------
def _cpu_set_device() -> None:
    from nanotron.parallel.context import ParallelContext

    upstream = ParallelContext.set_device
    if getattr(upstream, "_mixlab_compat", False):
        return

    def set_device(self: Any) -> None:
        if torch.cuda.is_available():
            upstream(self)

    set_device._mixlab_compat = True  # type: ignore[attr-defined]
    ParallelContext.set_device = set_device  # type: ignore[method-assign]


# ---- 3. ParallelContext refuses every backend but NCCL -----------------------------------------------------------
def _accept_gloo() -> None:
    """0.4 asserts backend == "nccl" (the argument's only use: the groups are made with the default group's own
    backend). A process group initialised with gloo before the context is built is accepted as it is."""
    from nanotron.parallel.context import ParallelContext

    upstream = ParallelContext.__init__
    if getattr(upstream, "_mixlab_compat", False):
        return

    def __init__(self: Any, tensor_parallel_size: int, pipeline_parallel_size: int, data_parallel_size: int,
                 expert_parallel_size: int = 1, backend: str = "nccl") -> None:
        if backend != "nccl" and not (torch_dist.is_initialized() and torch_dist.get_backend() == backend):
            raise NanotronCompatError(f"ParallelContext(backend={backend!r}): initialise the {backend} process "
                                      "group first (torch.distributed.init_process_group)")
        upstream(self, tensor_parallel_size, pipeline_parallel_size, data_parallel_size, expert_parallel_size,
                 backend="nccl")

    __init__._mixlab_compat = True  # type: ignore[attr-defined]
    ParallelContext.__init__ = __init__  # type: ignore[method-assign]


def _probe_parallel_context() -> None:
    """A one-process gloo context on CPU (what every probe of patches 2 and 3 builds)."""
    import os
    import socket

    if not torch_dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
        torch_dist.init_process_group("gloo", rank=0, world_size=1)
    from nanotron.parallel.context import ParallelContext

    context = ParallelContext(tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1,
                              backend="gloo")
    assert context.tp_pg is not None


PATCHES: tuple[CompatPatch, ...] = (
    CompatPatch(
        "import-cycle",
        "logging.py:38 imports config.config, whose utils_config.py:8 imports pipeline_parallel/engine.py, whose "
        "line 8 imports logging again: most modules fail with 'partially initialized module' (upstream #191, #235)",
        cpu_only=False, apply=_break_import_cycle, probe=_probe_import_cycle, symptom="partially initialized module"),
    CompatPatch(
        "cuda-set-device",
        "parallel/context.py:48,118: ParallelContext.__init__ calls torch.cuda.set_device, which raises without CUDA",
        cpu_only=True, apply=_cpu_set_device, probe=_probe_parallel_context, symptom="_cuda_setDevice"),
    CompatPatch(
        "nccl-only",
        "parallel/context.py:50: ParallelContext asserts backend == 'nccl', so gloo (CPU) cannot be used",
        cpu_only=True, apply=_accept_gloo, probe=_probe_parallel_context,
        symptom="Only nccl backend is supported"),
)

_applied: list[str] = []


def steps_aside(cuda: bool | None = None, nccl: bool | None = None) -> bool:
    """True on a machine where nanotron runs as upstream wrote it (CUDA and NCCL): the CPU-only patches are not
    applied there."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    nccl = torch_dist.is_nccl_available() if nccl is None else nccl
    return bool(cuda and nccl)


def _check_version() -> None:
    try:
        from importlib.metadata import version

        found = version("nanotron")
    except Exception as exc:  # noqa: BLE001 - any failure means: not installed
        raise NanotronCompatError(f"the nanotron backend needs nanotron=={NANOTRON_VERSION} (pip install "
                                  f"nanotron=={NANOTRON_VERSION}, or make setup): {exc}") from exc
    if found != NANOTRON_VERSION:
        raise NanotronCompatError(f"nanotron {found} is installed but training/nanotron_compat.py is written for "
                                  f"{NANOTRON_VERSION}: pip install nanotron=={NANOTRON_VERSION}")


def ensure_nanotron(skip: Iterable[str] = ()) -> list[str]:
    """Apply the patches this machine needs (once per process) and return their names. `skip` leaves patches
    out (the compat tests use it to show that each is still needed)."""
    _check_version()
    skipped = set(skip)
    unknown = skipped - {p.name for p in PATCHES}
    if unknown:
        raise NanotronCompatError(f"no compat patch named {sorted(unknown)}; known: {[p.name for p in PATCHES]}")
    aside = steps_aside()
    for patch in PATCHES:
        if patch.name in _applied or patch.name in skipped or (patch.cpu_only and aside):
            continue
        try:
            patch.apply()
        except Exception as exc:
            raise NanotronCompatError(f"compat patch {patch.name!r} no longer applies to the installed nanotron "
                                      f"({patch.works_around}): {type(exc).__name__}: {exc}") from exc
        _applied.append(patch.name)
    return list(_applied)


def applied_patches() -> list[str]:
    return list(_applied)


def init_parallel_context(tp: int, pp: int, dp: int) -> Any:
    """nanotron's ParallelContext over the already-initialised default process group (gloo on CPU)."""
    ensure_nanotron()
    from nanotron.parallel.context import ParallelContext

    backend = torch_dist.get_backend()
    return ParallelContext(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
                           backend=backend)


def run_probe(name: str, skip: Iterable[str] = ()) -> None:
    """Apply the patches (less `skip`) and run patch `name`'s probe: for the compat tests, in a fresh process."""
    ensure_nanotron(skip)
    next(p for p in PATCHES if p.name == name).probe()
