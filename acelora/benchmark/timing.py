"""Timing of benchmark steps: medians and spreads of many calls after warm-up (CUDA events on a
GPU, ``perf_counter`` on the CPU), peak memory and FLOP counts."""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable

import torch


def time_steps(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    return time_interleaved({"fn": fn}, steps, warmup, device)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of ``steps`` calls of each function after ``warmup`` calls, timed round-robin
    (one call of each in turn) so that they see the same machine conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    marks: dict[str, list] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks[name].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in marks.items()}
    return marks


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise(times_ms: list[float], batch: int) -> dict:
    t = sorted(times_ms)
    med, p10, p90 = statistics.median(t), quantile(t, 0.1), quantile(t, 0.9)
    return {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "min_ms": t[0], "max_ms": t[-1],
            "timed_steps": len(t),
            "images_per_s": batch / (med / 1e3),
            # throughput percentiles mirror the time percentiles (p90 time -> p10 images/s)
            "images_per_s_p10": batch / (p90 / 1e3), "images_per_s_p90": batch / (p10 / 1e3)}


def count_flops(fn: Callable[[], object]) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:
        return None


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Max CUDA memory allocated during one call, everything resident included (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def record_failure(row: dict, exc: BaseException) -> None:
    """Mark a result row failed with the error (a failed case is reported, not raised)."""
    row["status"] = "failed"
    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]


def add_throughput(row: dict, times_ms: list[float], step: Callable[[], object],
                   device: torch.device, peak: float | None,
                   counted: Callable[[], object] | None = None) -> None:
    """Timing summary, peak memory of one ``step()``, FLOPs of one ``counted()`` (default: the
    step) and MFU into ``row``."""
    row.update(summarise(times_ms, row["batch"]))
    row["peak_mem_bytes"] = peak_memory(step, device)
    flops = count_flops(counted or step)
    row["flops_per_step"] = flops
    row["mfu"] = (flops / (row["median_ms"] / 1e3) / peak) if (flops and peak) else None
