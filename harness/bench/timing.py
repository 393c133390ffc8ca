"""Timing and memory for the benchmarks: interleaved rounds, robust statistics, peak memory per call.

Two (or more) contenders are timed in the same process, alternating: after ``warmup`` calls of
each, every round times ``calls`` consecutive calls of one and then of the other (the order flips
every round, so neither always runs on a warmer or cooler machine; with more than two, each round
runs them in turn, in reverse order every other round). The device is
synchronized around each timed window. Each round gives one seconds-per-call value per
contender; the median over rounds is the result, the quartiles and the extremes its spread,
and the per-round ratio (rounds are paired) the spread of the ratio.

Peak memory of one call is measured the same way on every device: the bytes a contender
keeps between calls (``resident_bytes``: parameters, buffers, optimizer state) plus the
highest number of bytes allocated above the starting point during the call. On CUDA the
latter comes from ``torch.cuda.max_memory_allocated``; on CPU from the profiler's record of
every allocation and free through PyTorch's CPU allocator (``profile_memory=True``), summed in
time order. Memory that kernels allocate outside PyTorch's allocator (oneDNN or BLAS scratch
space) is not seen on CPU, as CUDA's figure does not see cuDNN workspaces outside the caching
allocator.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..device import sync


@dataclass
class Contender:
    """Something to time: ``call()`` does one unit of work producing ``tokens`` counted tokens."""

    name: str
    call: Callable[[], object]
    tokens: int
    seconds: list[float] = field(default_factory=list)  # per call, one value per round


def time_interleaved(a: Contender, b: Contender, *, device: torch.device, rounds: int, calls: int,
                     warmup: int) -> None:
    """Fill ``a.seconds`` and ``b.seconds`` with ``rounds`` paired per-call times."""
    time_rounds([a, b], device=device, rounds=rounds, calls=calls, warmup=warmup)


def time_rounds(contenders: list[Contender], *, device: torch.device, rounds: int, calls: int, warmup: int) -> None:
    """Fill each contender's ``seconds`` with ``rounds`` per-call times, the contenders taking turns within a
    round in an order reversed every other round (for two: the order flips), so that none always runs first."""
    for _ in range(warmup):
        for c in contenders:
            c.call()
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                c.call()
            sync(device)
            c.seconds.append((time.perf_counter() - start) / calls)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def summary(c: Contender) -> dict:
    """Median seconds per call, its spread, and tokens per second at the median."""
    med = statistics.median(c.seconds)
    q1, q3 = quartiles(c.seconds)
    return {"seconds": c.seconds, "median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(c.seconds),
            "max_s": max(c.seconds), "iqr_pct": 100 * (q3 - q1) / med, "tokens": c.tokens,
            "tokens_per_s": c.tokens / med}


def paired_ratio(a: Contender, b: Contender) -> dict:
    """Speed of ``a`` over ``b`` (>1: ``a`` faster): at the medians, and its min/max over the paired rounds."""
    per_round = [(tb / b.tokens) / (ta / a.tokens) for ta, tb in zip(a.seconds, b.seconds)]
    ratio = (a.tokens / statistics.median(a.seconds)) / (b.tokens / statistics.median(b.seconds))
    return {"ratio": ratio, "ratio_min": min(per_round), "ratio_max": max(per_round), "ratio_rounds": per_round}


def resident_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared and tied tensors counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def state_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    """What a training contender keeps between steps: parameters, gradients, buffers, optimizer state."""
    out = [*model.parameters(), *(p.grad for p in model.parameters()), *model.buffers()]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def peak_call_bytes(call: Callable[[], object], device: torch.device) -> int:
    """Highest bytes allocated above the starting point while ``call()`` runs (see the module docstring)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        call()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type != "cpu":
        raise ValueError(f"peak memory is measured on cpu and cuda, not {device.type}")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()  # negative for a free
        peak = max(peak, current)
    return peak
