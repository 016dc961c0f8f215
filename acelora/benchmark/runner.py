"""``run()``: every asked case on every device and batch size, one results dict (and JSON file)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from acelora.benchmark.environment import (FLOPS_NOTE, PEAK_FLOPS, device_peak_flops, device_tag,
                                           env_info, loadavg)
from acelora.benchmark.inference import run_inference_cases
from acelora.benchmark.report import TIMING_NOTE, print_report, row_line, speedups, write_json
from acelora.benchmark.train_cases import TRAIN_CASES, run_train_cases

CASES = TRAIN_CASES + ("inference",)


def resolve_devices(names: list[str]) -> list[torch.device]:
    devices = []
    for name in names:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("acelora bench: --device cuda asked for, but no CUDA device is available")
        if dev.type not in ("cpu", "cuda"):
            raise SystemExit(f"acelora bench: unsupported device {name!r} (cpu or cuda)")
        devices.append(dev)
    return devices


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise SystemExit(f"acelora bench: unknown case(s) {bad}; choose from {','.join(CASES)}")
    return cases


def run(model: str = "tiny", batches=(64, 256), devices=("auto",), cases=CASES, steps: int = 20,
        warmup: int = 5, profile: str | None = None, out: str | None = "bench/results",
        threads: int | None = None, verbose: bool = True, name: str = "bench",
        interleave: bool | None = None) -> dict:
    """Run the benchmark; return the results dict (also written to ``out`` as JSON).

    ``interleave``: time the training cases round-robin (default: on the CPU, where load from
    other processes drifts; on a GPU the cases run one after the other to fit in memory)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if threads:
        torch.set_num_threads(threads)
    devs = resolve_devices(list(devices))
    interleaved = {dev: interleave if interleave is not None else dev.type == "cpu" for dev in devs}
    load_start = loadavg()
    rows: list[dict] = []
    for dev in devs:
        peak = device_peak_flops(dev)
        for batch in batches:
            new = []
            train = [c for c in cases if c in TRAIN_CASES]
            if train:
                new += run_train_cases(train, model, batch, dev, steps, warmup, peak, profile,
                                       interleave=interleaved[dev])
            if "inference" in cases:
                new += run_inference_cases(model, batch, dev, steps, warmup, peak)
            for r in new:
                r["peak_flops"] = peak
                if verbose:
                    print(row_line(r), flush=True)
            rows += new
    results = {"benchmark": name, "env": env_info(),
               "settings": {"model": model, "batches": list(batches), "devices": [str(d) for d in devs],
                            "cases": list(cases), "steps": steps, "warmup": warmup,
                            "profile": profile, "preset": "paper",
                            "random_weights": _random_weights(model),
                            "loadavg_start": load_start, "loadavg_end": loadavg(),
                            "interleaved_training_cases": {str(d): v for d, v in interleaved.items()}},
               "flops_note": FLOPS_NOTE, "peak_flops_table": PEAK_FLOPS, "timing_note": TIMING_NOTE,
               "rows": rows, "speedups": speedups(rows)}
    if verbose:
        print_report(results)
    if out:
        tag = "-".join(dict.fromkeys(device_tag(d) for d in devs))
        results["path"] = write_json(results, os.path.join(out, f"{name}-{Path(model).name}-{tag}.json"))
        if verbose:
            print(f"\nwrote {results['path']}")
    return results


def _random_weights(model) -> bool:
    from acelora.provenance import is_random_init

    return is_random_init(model)
