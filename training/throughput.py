"""Model FLOPs utilisation against what this machine can actually do, not a datasheet number.

A CPU's peak depends on its vector units, its thread count and what else runs on it; a GPU's on clocks and the
dtype. So the denominator of MFU is measured: the best FLOP/s of a square matmul, in the training dtype, with
the threads the trainer set. MFU = model FLOPs per token x tokens/s / that peak (PaLM's definition, with the
achievable rather than the nominal peak), which is what tells a slow run from a slow machine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# (device, dtype, size, threads) -> FLOP/s: a process measures its machine once, whatever number of runs it trains
_PEAK_CACHE: dict[tuple[str, str, int, int], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        size: int | None = None, seconds: float = 0.5, cached: bool = True) -> float:
    """FLOP/s of a `size` x `size` matmul on `device` in `dtype`, the best of a few timed repetitions after a
    warm-up (the best, not the mean: the peak is what the hardware can reach; noise only slows it down).
    `size` defaults to 512 on CPU (fits the caches of small cores, still compute-bound) and 4096 on CUDA.
    `seconds` bounds the measuring time; with `cached` a process measures each (device, dtype, size, threads)
    once."""
    device = torch.device(device)
    if size is None:
        size = 4096 if device.type == "cuda" else 512
    if size < 1 or seconds <= 0:
        raise ValueError(f"measure_matmul_peak needs size >= 1 and seconds > 0, got size={size}, seconds={seconds}")
    key = (str(device), str(dtype), size, torch.get_num_threads())
    if cached and key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    generator = torch.Generator(device="cpu").manual_seed(0)  # not the global RNG: measuring must not move a run's stream
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * size**3
    with torch.no_grad():
        torch.matmul(a, b)  # warm-up: kernel selection, thread pool start, clocks
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        one = max(time.perf_counter() - start, 1e-9)
        # repetitions per timed rep so that each rep lasts >= ~20 ms (timer resolution, launch overhead)
        per_rep = max(1, int(0.02 / one))
        best = flops / one
        deadline = time.perf_counter() + seconds
        reps = 0
        while reps < 3 or time.perf_counter() < deadline:
            start = time.perf_counter()
            for _ in range(per_rep):
                torch.matmul(a, b)
            _sync(device)
            elapsed = max(time.perf_counter() - start, 1e-9)
            best = max(best, flops * per_rep / elapsed)
            reps += 1
            if reps >= 50:
                break
    _PEAK_CACHE[key] = max(best, _PEAK_CACHE.get(key, 0.0))  # a fresh measurement only ever raises the cached one
    return best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of `peak_flops` (FLOP/s) that training at `tokens_per_s` uses,
    given the model's training FLOPs per token (Transformer.estimate_flops_per_token). 0 when unknown."""
    if peak_flops <= 0 or tokens_per_s <= 0 or flops_per_token <= 0:
        return 0.0
    return flops_per_token * tokens_per_s / peak_flops


# An MFU above this says the peak was measured while something else used the machine (noise only lowers it), not
# that the run is that efficient: dense training reaches ~40-60% of a well-measured peak.
IMPLAUSIBLE_MFU = 0.8


def settled_peak(peak_flops: float, run_mfu: float, measure_again: Callable[[], float]) -> float:
    """The peak to report a run's MFU against: the one measured at its start, or, when that gave an implausible
    `run_mfu`, the better of it and a measurement taken now (`measure_again`)."""
    if run_mfu <= IMPLAUSIBLE_MFU:
        return peak_flops
    return max(peak_flops, measure_again())
