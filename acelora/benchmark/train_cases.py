"""Training-step cases: one step = forward of both towers with their HGNNs, the loss, backward,
AdamW.

* ``reference`` — the research-code configuration, eager fp32 (:mod:`.reference`): split q/k/v
  LoRA, explicit softmax(q kᵀ) v attention with the CLS row read off the full N×N matrix, the
  dense hypergraph, the loss on the reference backend, text padded to the full context length.
* ``default`` — the library's defaults: bf16 autocast on a GPU, ``backend="auto"``, the
  global-only HGNN path, SDPA, text padded to the batch's longest report.
* ``compile`` — ``default`` with the forward compiled by ``torch.compile`` (a failure is caught
  and reported in the results, not raised).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import acelora
from acelora.benchmark import reference
from acelora.benchmark.inputs import Batch, make_batch
from acelora.benchmark.phase_profile import install_phase_hooks, profile_case
from acelora.benchmark.timing import add_throughput, free_memory, record_failure, time_interleaved
from acelora.models.task import ContrastiveTask
from acelora.nn.loss import LabelGuidedInfoNCELoss
from acelora.profiling import nvtx_enabled, phase, remove_hooks
from acelora.train.optim import build_optimizer

TRAIN_CASES = ("reference", "default", "compile")


def bf16_autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def training_forward(task: ContrastiveTask, batch: Batch, use_bf16: bool) -> torch.Tensor:
    """The training step's computation as the benchmark runs it: ``ContrastiveTask`` (the one
    definition of the step: both towers with their HGNNs, then the loss; its phases are no-ops
    unless a profiler, a PhaseTimer or NVTX is on, and inside torch.compile)."""
    with bf16_autocast(batch.images.device, use_bf16):
        return task.step(batch.images, batch.input_ids, batch.attention_mask, batch.labels)["loss"]


@dataclass
class TrainCase:
    name: str
    model: nn.Module
    batch: Batch
    step: Callable[[], torch.Tensor]
    forward: Callable[[], torch.Tensor]
    dtype: str
    notes: list[str]
    hooks: list


def build_train_case(case: str, model_name: str, batch_size: int, device: torch.device,
                     seed: int = 0, instrument: bool = True) -> TrainCase:
    """Model, inputs and a ``step()`` closure for one training-step case.

    ``instrument``: add the hypergraph ranges (:func:`install_phase_hooks`; never for
    ``compile``); remove them with ``remove_hooks(case.hooks)``."""
    if case not in TRAIN_CASES:
        raise ValueError(f"unknown training case {case!r}; choose from {TRAIN_CASES}")
    is_reference = case == "reference"
    backend = "reference" if is_reference else "auto"
    torch.manual_seed(seed)
    model = acelora.create_ace_lora(model_name, config="paper", device=device, backend=backend)
    notes = []
    if is_reference:
        notes.append(f"split q/k/v LoRA in {reference.split_qkv_lora(model)} layers")
        notes.append(f"dense HGNN (global_only=False, token 0) in {reference.dense_hgnn(model)} modules")
        notes.append(f"explicit (non-SDPA) attention in {reference.explicit_attention(model)} modules")
        notes.append("reference loss, fp32, text padded to the context length")
    model.train()
    batch = make_batch(model, batch_size, device, fixed_length=is_reference, seed=seed)
    loss_fn = LabelGuidedInfoNCELoss(gather=False, backend=backend)
    use_bf16 = not is_reference and device.type == "cuda"
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.1)
    hooks = install_phase_hooks(model) if instrument and case != "compile" else []

    task = ContrastiveTask(model, loss_fn)

    def forward() -> torch.Tensor:
        return training_forward(task, batch, use_bf16)

    fwd = forward
    if case == "compile":
        torch._dynamo.reset()  # no guards/caches left from other cases' models
        fwd = torch.compile(forward)
        notes.append("torch.compile of the forward (both towers, HGNN, loss)")

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            loss = fwd()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
        return loss.detach()

    dtype = "bf16-autocast" if use_bf16 else "fp32"
    return TrainCase(case, model, batch, step, forward, dtype, notes, hooks)


def _prepare_train_row(case: str, model_name: str, batch_size: int, device: torch.device,
                       instrument: bool) -> tuple[dict, TrainCase | None]:
    """Build the case (and compile it, for ``compile``); a failure lands in the row."""
    row = {"case": case, "kind": "train_step", "model": model_name, "batch": batch_size,
           "device": str(device)}
    tc = None
    try:
        tc = build_train_case(case, model_name, batch_size, device, instrument=instrument)
        row.update(dtype=tc.dtype, text_length=int(tc.batch.input_ids.shape[1]),
                   text_tokens_mean=float(tc.batch.attention_mask.sum(1).float().mean()),
                   image_size=int(tc.batch.images.shape[-1]), notes=tc.notes)
        if case == "compile":
            # Compile (first call) outside the timing; record how often dynamo broke the graph.
            from torch._dynamo.utils import counters
            counters.clear()
            t0 = time.perf_counter()
            tc.step()
            row["compile_s"] = time.perf_counter() - t0
            breaks = dict(counters.get("graph_break", {}))
            row["graph_breaks"] = int(sum(breaks.values()))
            row["graph_break_reasons"] = [str(k)[:300] for k in list(breaks)[:10]]
        row["status"] = "ok"
    except Exception as exc:  # report, don't abort the other cases
        record_failure(row, exc)
        if tc is not None:
            remove_hooks(tc.hooks)
        tc = None
    return row, tc


def run_train_cases(cases, model_name: str, batch_size: int, device: torch.device, steps: int,
                    warmup: int, peak: float | None, profile_dir: str | None = None,
                    interleave: bool = False) -> list[dict]:
    """Rows of the training-step cases. ``interleave``: build every case first and time them
    round-robin (robust to a shared, noisy CPU; needs all models in memory at once); otherwise
    one case after the other, each freed before the next (what a GPU at batch 256 needs)."""
    # Nsight ranges in the timed steps when NVTX is on; otherwise time bare steps.
    instrument = nvtx_enabled()
    groups = [list(cases)] if interleave else [[c] for c in cases]
    rows = []
    for group in groups:
        built = [_prepare_train_row(c, model_name, batch_size, device, instrument) for c in group]
        rows += [row for row, _ in built]
        live = {row["case"]: tc for row, tc in built if tc is not None}
        try:
            times = time_interleaved({c: tc.step for c, tc in live.items()}, steps, warmup, device)
            for row, tc in built:
                if tc is not None:
                    # FLOPs of the eager forward+backward (for compile: the same math, uncompiled).
                    add_throughput(row, times[row["case"]], tc.step, device, peak,
                                   counted=lambda tc=tc: tc.forward().backward())
            if profile_dir is not None:
                for row, tc in built:
                    if tc is not None and row["case"] != "compile":
                        row["profile"] = profile_case(tc, device, profile_dir,
                                                      f"{row['case']}-b{batch_size}",
                                                      steps=max(1, min(3, steps)))
        except Exception as exc:
            for row, tc in built:
                if tc is not None and "median_ms" not in row:
                    record_failure(row, exc)
        finally:
            for _, tc in built:
                if tc is not None:
                    remove_hooks(tc.hooks)
            built.clear()
            live.clear()
            free_memory(device)
    return rows


def run_train_case(case: str, model_name: str, batch_size: int, device: torch.device,
                   steps: int, warmup: int, peak: float | None, profile_dir: str | None = None) -> dict:
    """One training-step case on its own (see :func:`run_train_cases`)."""
    return run_train_cases([case], model_name, batch_size, device, steps, warmup, peak, profile_dir)[0]
