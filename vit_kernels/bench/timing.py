"""How a call is timed: device events, warm-up, L2 flushed and inputs rotated between runs, percentiles.

Every provider is timed by ``measure`` on a list of zero-argument calls, one per input set; runs
cycle through them so that repeated runs do not find their inputs in the cache.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

# 256 MiB is several times the L2 of any current GPU (H100: 50 MiB, H200: 60 MiB, B200: 126 MiB).
_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    runs: int
    peak_mem_mb: Optional[float] = None   # memory the calls needed beyond what was resident before
    # False when the median of the first half of the timed runs and that of the second half differ
    # by more than STEADY_TOLERANCE after a second try: the calls were still changing speed (one-time
    # work not finished, the machine busy with something else), so p50 is no steady-state time.
    steady: bool = True
    halves_ms: tuple = ()


@dataclass
class Budget:
    warmup_ms: float = 50.0
    measure_ms: float = 300.0
    min_runs: int = 5
    max_runs: int = 500


QUICK = Budget(warmup_ms=20.0, measure_ms=100.0, min_runs=3, max_runs=100)
# Warm-up calls every input set this many times before anything is timed: the first call on a
# set may compile, autotune or specialise (Triton specialises on pointer alignment, so a second
# set can compile again), allocate, or load code.
WARMUP_ROUNDS = 2
STEADY_TOLERANCE = 0.25


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class _Clock:
    """Times one call: CUDA events on a GPU (with the L2 flushed before each), the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # int8 so the flush is one byte per element; fill_ with a non-zero value writes every line.
        self.flush_buffer = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None
        self.pending: list = []

    def time(self, call: Callable[[], object]) -> None:
        if self.cuda:
            self.flush_buffer.fill_(1)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            self.pending.append((start, end))
        else:
            start = time.perf_counter()
            call()
            self.pending.append((time.perf_counter() - start) * 1e3)

    def collect(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in self.pending]
        else:
            times = list(self.pending)
        self.pending = []
        return times


def measure(calls: Sequence[Callable[[], object]], device: torch.device, budget: Budget = Budget()) -> Timing:
    """Warm up, then time ``calls`` in rotation; returns p20/p50/p80 in milliseconds and peak memory.

    Every call runs WARMUP_ROUNDS times untimed, then until ``budget.warmup_ms`` is spent (this
    also estimates one call's time, which sets the number of timed runs). If the timed runs were
    not steady, they are discarded and taken once more.
    """
    clock = _Clock(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    warm, elapsed = 0, 0.0
    while warm < WARMUP_ROUNDS * len(calls) or (elapsed < budget.warmup_ms and warm < budget.max_runs):
        clock.time(calls[warm % len(calls)])
        elapsed += clock.collect()[0]
        warm += 1
    per_call = max(elapsed / warm, 1e-3)
    runs = int(min(budget.max_runs, max(budget.min_runs, budget.measure_ms / per_call)))
    for _ in range(2):  # a second try after an unsteady one
        for i in range(runs):
            clock.time(calls[i % len(calls)])
        times = clock.collect()
        halves = (percentile(times[:runs // 2], 50), percentile(times[runs // 2:], 50)) if runs >= 2 else ()
        steady = not halves or abs(halves[0] - halves[1]) <= STEADY_TOLERANCE * min(halves)
        if steady:
            break
    peak = None
    if cuda:
        # The flush buffer was allocated after `resident` was read: leave it out of the figure.
        peak = (torch.cuda.max_memory_allocated(device) - resident - _FLUSH_BYTES) / 2**20
        peak = max(peak, 0.0)
    return Timing(percentile(times, 20), percentile(times, 50), percentile(times, 80), runs, peak, steady, halves)


@dataclass
class Ceilings:
    """The device's own limits, measured in this run: copy bandwidth and matmul rate (best runs)."""
    gbps: float
    tflops: float
    matmul_dtype: str
    how: str


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    """A large device-to-device copy (bytes read + written) and large matmuls, on random data.

    A ceiling is what the device reached at its best, so the fastest fifth of the timed runs
    counts (p20; the rows are medians), and the matmul rate is the best of several sizes. A row's
    rate above it means the ceiling was not one: ``bench.run`` then leaves the peak column out.
    """
    cuda = device.type == "cuda"
    budget = QUICK if quick else Budget()
    numel = 1 << 28 if cuda else 1 << 23   # 512 MiB of bf16 on a GPU, 32 MiB of fp32 on a CPU
    dtype = torch.bfloat16 if cuda else torch.float32
    randn = functools.partial(torch.randn, device=device, dtype=dtype)
    copy_ms = _p20_ms(lambda: (randn(numel), torch.empty(numel, device=device, dtype=dtype)),
                      lambda src, dst: dst.copy_(src), device, budget)
    gbps = 2 * numel * torch.empty((), dtype=dtype).element_size() / copy_ms / 1e6
    sizes = (4096, 8192) if cuda else (384, 768, 1024)
    tflops = max(2 * n**3 / _p20_ms(lambda: (randn(n, n), randn(n, n)), torch.matmul, device, budget) / 1e9
                 for n in sizes)
    how = (f"fastest fifth of copies of {numel} {dtype} elements (2x bytes); best of {'/'.join(map(str, sizes))}"
           f"-cubed {dtype} matmuls")
    return Ceilings(gbps, tflops, str(dtype).replace("torch.", ""), how)


def _p20_ms(make_operands: Callable[[], tuple], run: Callable, device: torch.device, budget: Budget) -> float:
    """The fastest fifth of ``run(*operands)``; the operands are freed when this returns."""
    operands = make_operands()
    return measure([lambda: run(*operands)], device, budget).p20_ms
