"""LoRA-QKV forward + backward (dX, dA, dB; W frozen): the frozen dense qkv floor, split q/k/v LoRA
(research layout), peft's LoRA on the same fused Linear, the reference op and the compiled op.
Tokens 64·197 and 256·197, 768→2304, r=4, bf16, dropout 0.1 (DESIGN §11: ≤ 1.15× the dense floor,
≥ 1.5× faster than split q/k/v LoRA and than peft).

    python bench/bench_lora_qkv.py [--tokens 12608,50432] [--dtype bf16] [--quick]
    python -m pytest bench/bench_lora_qkv.py --benchmark-enable     # pytest-benchmark cases

On the CPU the script runs small shapes in fp32 (the C++ path of the extension vs the reference).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, report  # noqa: E402

from acelora.ops import _backend, _extension  # noqa: E402
from acelora.ops.lora_qkv import lora_qkv  # noqa: E402

D_IN, D_OUT, RANK, DROPOUT = 768, 768, 4, 0.1
SCALE = 1.0 / math.sqrt(RANK)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
KINDS = ("dense", "split", "peft", "reference", "ours")


class SplitLoRA(nn.Module):
    """The research layout: three frozen Linears, three LoRA branches each with its own dropout."""

    def __init__(self, weight, bias, rank=RANK, p=DROPOUT):
        super().__init__()
        d_out, d_in = weight.shape[0] // 3, weight.shape[1]
        self.base = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(3))
        self.A = nn.ModuleList(nn.Linear(d_in, rank, bias=False) for _ in range(3))
        self.B = nn.ModuleList(nn.Linear(rank, d_out, bias=False) for _ in range(3))
        self.drop = nn.ModuleList(nn.Dropout(p) for _ in range(3))
        with torch.no_grad():
            for g, lin in enumerate(self.base):
                lin.weight.copy_(weight[g * d_out:(g + 1) * d_out])
                lin.bias.copy_(bias[g * d_out:(g + 1) * d_out])
                lin.requires_grad_(False)
            for b in self.B:
                nn.init.normal_(b.weight, std=0.02)

    def forward(self, x):
        return [lin(x) + SCALE * b(a(d(x))) for lin, a, b, d in zip(self.base, self.A, self.B, self.drop)]


class FusedQKV(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            self.qkv.bias.copy_(bias)

    def forward(self, x):
        return self.qkv(x)


def _peft_model(weight, bias):
    try:
        from peft import LoraConfig, get_peft_model
    except Exception:  # pragma: no cover - peft is a test/bench dependency
        return None
    cfg = LoraConfig(r=RANK, lora_alpha=1.0, lora_dropout=DROPOUT, target_modules=["qkv"], use_rslora=True)
    return get_peft_model(FusedQKV(weight, bias), cfg)


def make_case(kind: str, tokens: int, dtype, device: str, seed: int = 0):
    """A closure running one forward + backward of ``kind``, or None when unavailable."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    weight = (torch.randn(3 * D_OUT, D_IN, generator=g) / D_IN ** 0.5)
    bias = torch.randn(3 * D_OUT, generator=g) * 0.02
    x = torch.randn(tokens, D_IN, generator=g).to(device, dtype).requires_grad_()
    grad = torch.randn(tokens, 3 * D_OUT, generator=g).to(device, dtype)
    weight, bias = weight.to(device, dtype), bias.to(device, dtype)

    if kind == "dense":
        def run():
            x.grad = None
            F.linear(x, weight, bias).backward(grad)
        return run
    if kind == "split":
        mod = SplitLoRA(weight.float(), bias.float()).to(device, dtype).train()
        grads = grad.chunk(3, -1)

        def run():
            x.grad = None
            mod.zero_grad(set_to_none=True)
            torch.autograd.backward(mod(x), grads)
        return run
    if kind == "peft":
        mod = _peft_model(weight.float(), bias.float())
        if mod is None:
            return None
        mod = mod.to(device, dtype).train()

        def run():
            x.grad = None
            mod.zero_grad(set_to_none=True)
            mod(x).backward(grad)
        return run
    # the library's op: reference or compiled ("ours": what backend="auto" picks, or the extension)
    A = (torch.randn(3 * RANK, D_IN, generator=g) / D_IN ** 0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(3 * D_OUT, RANK, generator=g) * 0.02).to(device, dtype).requires_grad_()
    if kind == "ours":
        ok, _ = _backend.backend_available("lora_qkv", "cuda", torch.device(device))
        if not ok:
            return None
        backend = "cuda"
    else:
        backend = "reference"

    def run():
        x.grad = A.grad = B.grad = None
        lora_qkv(x, weight, bias, A, B, SCALE, DROPOUT, True, backend=backend).backward(grad)
    return run


def bench_case(kind: str, tokens: int, dtype, device: str, warmup=5, iters=30) -> dict | None:
    run = make_case(kind, tokens, dtype, device)
    if run is None:
        return None
    row = {"op": kind, "tokens": tokens, "shape": f"{D_IN}->{3 * D_OUT}", "r": RANK,
           "dtype": str(dtype).replace("torch.", ""), "device": device}
    row.update(measure(run, device, warmup, iters))
    return row


def run_all(tokens_list, dtype, device, quick=False) -> list[dict]:
    rows = []
    warmup, iters = (2, 5) if quick or device == "cpu" else (10, 50)
    for tokens in tokens_list:
        case = {}
        for kind in KINDS:
            row = bench_case(kind, tokens, dtype, device, warmup, iters)
            if row is not None:
                case[kind] = row
        dense = case.get("dense", {}).get("median_ms")
        ours = case.get("ours", {}).get("median_ms")
        for kind, row in case.items():
            if dense and row.get("median_ms"):
                row["x_dense"] = row["median_ms"] / dense
            if ours and row.get("median_ms"):
                row["ours_speedup"] = row["median_ms"] / ours
            rows.append(row)
    return rows


COLUMNS = ["op", "tokens", "shape", "r", "dtype", "device", "median_ms", "p10_ms", "p90_ms", "x_dense",
           "ours_speedup", "peak_extra_MiB", "error"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default=None, help="comma-separated token counts "
                        "(default 64*197,256*197 on a GPU, 2*197,8*197 on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default_tokens = "12608,50432" if device == "cuda" else "394,1576"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",") if t]
    dtype = DTYPES[args.dtype or ("bf16" if device == "cuda" else "fp32")]
    if not _extension.cpu_ops_available():
        print(f"note: compiled op unavailable ({_extension.unavailable_reason()})")
    rows = run_all(tokens, dtype, device, args.quick)
    report("lora_qkv", rows, COLUMNS, args, write=not args.no_write)
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (run with --benchmark-enable; GPU cases skip on the CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bench(benchmark, run, device):
    if run is None:
        pytest.skip("case unavailable (extension or peft missing)")

    def synced():
        run()
        if device == "cuda":
            torch.cuda.synchronize()
    benchmark(synced)


@needs_cuda
@pytest.mark.parametrize("tokens", [64 * 197, 256 * 197])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_qkv_fwd_bwd_gpu(benchmark, kind, tokens):
    _bench(benchmark, make_case(kind, tokens, torch.bfloat16, "cuda"), "cuda")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_qkv_fwd_bwd_cpu(benchmark, kind):
    _bench(benchmark, make_case(kind, 2 * 197, torch.float32, "cpu"), "cpu")


if __name__ == "__main__":
    main()
