"""The benchmark's report: a plain-text table, the speed-ups between cases, the JSON file."""
from __future__ import annotations

import json
import os

TABLE_COLUMNS = ["case", "batch", "device", "dtype", "status", "images_per_s", "images_per_s_p10",
                 "images_per_s_p90", "median_ms", "p10_ms", "p90_ms", "min_ms", "peak_mem_bytes", "mfu"]
PHASE_COLUMNS = ["phase", "calls_per_step", "ms_per_step", "self_ms_per_step", "self_pct_of_step"]
TIMING_NOTE = ("median/p10/p90 over the timed steps after warm-up; CUDA events on a GPU, "
               "perf_counter on the CPU; images_per_s = batch / median step time; "
               "images_per_s_p10/_p90 = batch / p90/p10 step time; peak_mem_bytes = max CUDA memory "
               "allocated during one step (model included), null on the CPU")


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"


def speedups(rows: list[dict]) -> dict:
    """default/compile vs reference images/s, and merged inference latency vs the base's."""
    out = {}
    ok = {(r["case"], r["batch"], r["device"]): r for r in rows if r.get("status") == "ok"}
    for (case, batch, dev), r in ok.items():
        ref = ok.get(("reference", batch, dev))
        if case in ("default", "compile") and ref is not None:
            out[f"{case}_vs_reference/b{batch}/{dev}"] = r["images_per_s"] / ref["images_per_s"]
        base = ok.get(("inference-base", batch, dev))
        if case.startswith("inference-merged") and base is not None:
            out[f"{case[len('inference-'):]}_latency_vs_base/b{batch}/{dev}"] = \
                r["median_ms"] / base["median_ms"]
    return out


def row_line(row: dict) -> str:
    """One line per finished case, printed as the run goes."""
    head = f"{row['case']:<23} b={row['batch']:<4} {row['device']}:"
    if row["status"] == "ok":
        return f"{head} {row['images_per_s']:.1f} images/s"
    return f"{head} FAILED {row['error'][:200]}"


def print_report(results: dict) -> None:
    print()
    print(format_table(results["rows"], TABLE_COLUMNS), end="")
    for k, v in results["speedups"].items():
        print(f"{k}: {v:.3f}")
    for r in results["rows"]:
        if "profile" in r:
            p = r["profile"]
            print(f"\nphases of {r['case']} b={r['batch']} ({r['device']}), trace {p['trace']}")
            print(format_table(p["phases"], PHASE_COLUMNS), end="")


def write_json(results: dict, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    return path
