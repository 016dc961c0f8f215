"""Shared benchmark plumbing: timing, peak memory, environment record, table and JSON output.

A timing is the median of many runs after warm-up: CUDA events on a GPU (one event pair per run,
synchronised once at the end), ``time.perf_counter`` on the CPU.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _sync(device: torch.device | None):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], warmup: int = 5, iters: int = 30,
            device: torch.device | str | None = None) -> dict:
    """Median and spread (p10/p90, min) of ``fn()`` in milliseconds."""
    device = torch.device(device) if device is not None else None
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device is not None and device.type == "cuda":
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * (len(times) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p10_ms": q(0.1), "p90_ms": q(0.9),
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


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(RESULTS_DIR),
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def env_info() -> dict:
    """Device, versions and commit, recorded with every result file."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": _git_commit(), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "hostname": platform.node()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores)"
    for name in ("triton", "open_clip", "timm", "transformers", "xformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            pass
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
    if not rows:
        return
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def report(name: str, rows: list[dict], columns: list[str], args, write: bool = True) -> str | None:
    """Print the table (only the columns some row has) and write the JSON with the run's args."""
    print_table(rows, [c for c in columns if any(r.get(c) is not None for r in rows)])
    if not write:
        return None
    path = write_results(name, rows, {"args": vars(args)})
    print(f"wrote {path}")
    return path
