"""Shared plumbing of the per-op benchmarks: timing, peak memory, environment record, table and
JSON output. Timing, environment and table come from ``acelora.benchmark`` (the ``acelora bench``
command), so both kinds of result file record the same things the same way.

A timing is the median of many runs after warm-up: CUDA events on a GPU (one event pair per run,
synchronised once at the end), ``time.perf_counter`` on the CPU.
"""
from __future__ import annotations

import json
import os
import statistics
from typing import Callable

import torch

from acelora import benchmark as _acelora_bench

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 30,
            device: torch.device | str | None = None) -> dict:
    """Median and spread (p10/p90, min) of ``fn()`` in milliseconds."""
    device = torch.device(device if device is not None else "cpu")
    times = sorted(_acelora_bench.time_steps(fn, iters, warmup, device))
    q = _acelora_bench.quantile
    return {"median_ms": statistics.median(times), "p10_ms": q(times, 0.1), "p90_ms": q(times, 0.9),
            "min_ms": times[0], "iters": iters, "warmup": warmup}


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cuda") -> int | None:
    """Peak extra bytes allocated on a CUDA device while ``fn()`` runs (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(run: Callable[[], object], device: str, warmup: int, iters: int) -> dict:
    """Timing and peak extra memory of ``run``; an out-of-memory case is a row, not a crash."""
    try:
        row = time_fn(run, warmup=warmup, iters=iters, device=device)
        mem = peak_memory(run, device)
        row["peak_extra_MiB"] = None if mem is None else mem / 2**20
        return row
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}


def env_info() -> dict:
    """Device, versions and commit, recorded with every result file."""
    info = _acelora_bench.env_info()
    info["device"] = info["gpu"] or f"cpu ({os.cpu_count()} cores)"
    for name in ("xformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def device_tag() -> str:
    """File-name-safe device name, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu'."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> str:
    """Write ``bench/results/<name>-<device>.json`` with the environment and every row."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}-{device_tag()}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "env": env_info(), "rows": rows, **(extra or {})}, f, indent=2)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Plain fixed-width table of ``rows`` (dicts) to stdout."""
    if rows:
        columns = columns or list(dict.fromkeys(k for r in rows for k in r))
        print(_acelora_bench.format_table(rows, columns), end="")


def report(name: str, rows: list[dict], columns: list[str], args, write: bool = True) -> str | None:
    """Print the table (only the columns some row has) and write the JSON with the run's args."""
    print_table(rows, [c for c in columns if any(r.get(c) is not None for r in rows)])
    if not write:
        return None
    path = write_results(name, rows, {"args": vars(args)})
    print(f"wrote {path}")
    return path
