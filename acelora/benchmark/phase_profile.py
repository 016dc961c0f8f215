"""Where a training step's time goes: named ranges around the HGNNs, a torch.profiler chrome
trace and a per-phase time table (``acelora bench --profile DIR``)."""
from __future__ import annotations

import os

import torch
from torch import nn

from acelora.benchmark import reference
from acelora.benchmark.report import PHASE_COLUMNS, format_table
from acelora.nn.hgnn import ACEHGNN
from acelora.profiling import PhaseTimer, annotate_module, phase, remove_hooks


def install_phase_hooks(model: nn.Module) -> list:
    """A "hypergraph" range around each HGNN (forward hooks, added from outside the model; the
    attention row of the last blocks marks its own "cls_attention" range). Returns the handles."""
    wrapped = {id(m.hgnn) for m in model.modules() if isinstance(m, reference.DenseHGNN)}
    handles = []
    for m in model.modules():
        if isinstance(m, reference.DenseHGNN) or (isinstance(m, ACEHGNN) and id(m) not in wrapped):
            handles += annotate_module(m, "hypergraph")
    return handles


def profile_case(case, device: torch.device, out_dir: str, tag: str, steps: int = 3) -> dict:
    """Chrome trace of a few steps of a ``TrainCase`` (torch.profiler) and a per-phase time table
    of a few more."""
    os.makedirs(out_dir, exist_ok=True)
    hooks = [] if case.hooks or case.name == "compile" else install_phase_hooks(case.model)
    try:
        return _profile_steps(case.step, device, out_dir, tag, steps)
    finally:
        remove_hooks(hooks)


def _profile_steps(step, device: torch.device, out_dir: str, tag: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace = os.path.join(out_dir, f"trace-{tag}.json")
    prof.export_chrome_trace(trace)

    step()  # the first step after the profiler is slow: not measured
    timer = PhaseTimer(device)
    with timer:
        for _ in range(steps):
            with phase("step"):
                step()
            timer.step()
    rows = timer.table()
    step_ms = next((r["ms_per_step"] for r in rows if r["phase"] == "step"), None)
    for r in rows:
        r["self_pct_of_step"] = 100.0 * r["self_ms_per_step"] / step_ms if step_ms else None
    breakdown = os.path.join(out_dir, f"breakdown-{tag}.txt")
    with open(breakdown, "w") as f:
        f.write(f"# per-phase time of {steps} steps ({tag}, {device}); ms per step; 'self' excludes "
                "nested phases\n")
        f.write(format_table(rows, PHASE_COLUMNS))
    return {"trace": trace, "breakdown": breakdown, "phases": rows}
