"""Zero-shot inference cases: images/s of the image tower + similarity against precomputed class
embeddings, for the base model, ACE-LoRA with merged adapters, and the same without its HGNN."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

import acelora
from acelora.benchmark.timing import add_throughput, free_memory, record_failure, time_interleaved
from acelora.benchmark.train_cases import bf16_autocast
from acelora.profiling import phase

INFERENCE_CASES = ("base", "merged", "merged-nohgnn")
ZERO_SHOT_CLASSES = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")


def build_inference_case(which: str, model_name: str, batch_size: int, device: torch.device,
                         seed: int = 0) -> Callable[[], torch.Tensor]:
    """A zero-shot ``infer()`` closure: image embeddings of a fixed batch against precomputed
    class-prompt embeddings, argmax. ``which``: "base" (the frozen base model), "merged"
    (ACE-LoRA, paper preset, adapters with nonzero B folded into W) or "merged-nohgnn" (the same
    without the HGNN: isolates the cost of the merged LoRA, which should be exactly the base's)."""
    if which not in INFERENCE_CASES:
        raise ValueError(f"inference case must be one of {INFERENCE_CASES}, got {which!r}")
    torch.manual_seed(seed)
    if which == "base":
        model = acelora.create_model(model_name, device=device)
    else:
        model = acelora.create_ace_lora(model_name, config="paper", device=device,
                                        hgnn=which == "merged")
        _randomise_lora_b(model)  # B = 0 at init; nonzero, as after training
        model.merge()
    model.eval()
    use_bf16 = device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    tok = model.tokenizer([f"a chest X-ray image of {c}." for c in ZERO_SHOT_CLASSES])
    with torch.inference_mode(), bf16_autocast(device, use_bf16):
        class_emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))

    def infer() -> torch.Tensor:
        with torch.inference_mode(), bf16_autocast(device, use_bf16):
            with phase("image_tower"):
                emb = model.encode_image(images)
            return (emb @ class_emb.T).argmax(-1)

    infer.model = model
    return infer


def run_inference_cases(model_name: str, batch_size: int, device: torch.device, steps: int,
                        warmup: int, peak: float | None) -> list[dict]:
    """Zero-shot images/s of the base model and of ACE-LoRA with merged adapters (same inputs).

    The cases are timed round-robin (one step of each in turn), so a change in machine load
    during the run hits all of them alike and their ratio stays meaningful."""
    rows, fns = [], {}
    for which in INFERENCE_CASES:
        row = {"case": f"inference-{which}", "kind": "zero_shot_inference", "model": model_name,
               "batch": batch_size, "device": str(device),
               "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
               "timing": "interleaved with the other inference cases"}
        try:
            fns[which] = build_inference_case(which, model_name, batch_size, device)
            row["status"] = "ok"
        except Exception as exc:
            record_failure(row, exc)
        rows.append(row)
    try:
        times = time_interleaved(fns, steps, warmup, device)
        for row, which in zip(rows, INFERENCE_CASES):
            if which in fns:
                add_throughput(row, times[which], fns[which], device, peak)
    except Exception as exc:
        for row in rows:
            if row["status"] == "ok":
                record_failure(row, exc)
    finally:
        fns.clear()
        free_memory(device)
    base = rows[0]
    for row in rows[1:]:
        if base["status"] == row["status"] == "ok":
            row["latency_vs_base"] = row["median_ms"] / base["median_ms"]
    return rows


def _randomise_lora_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
