"""ACE-HGNN forward + backward: dense eager reference vs the global-only path vs the Triton kernels,
B = 256, N = 197 (image) / 256 (text, padded), D = 512, k = 5 on a GPU (DESIGN §11: Triton ≥ 5×
faster than eager with ≤ ¼ of its peak extra memory); on the CPU, B = 64, N = 197 with 2 threads:
the global-only path against the dense formulation (target ≥ 10×).

    python bench/bench_hgnn.py [--dtype bf16|fp32] [--batch 256] [--quick] [--threads 2]
    python -m pytest bench/bench_hgnn.py --benchmark-enable      # pytest-benchmark cases
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, report  # noqa: E402

from acelora.nn.hgnn import ACEHGNN  # noqa: E402

D, K = 512, 5
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# name -> (backend, global_only)
KINDS = {"dense": ("reference", False), "global": ("reference", True),
         "triton": ("triton", False), "triton-global": ("triton", True)}


def make_inputs(b: int, n: int, dtype=torch.float32, device="cuda", padded=False, seed: int = 0):
    """Normalised leaf tokens, a CLS-attention row and (text) a padding mask, lengths in [N/4, N]."""
    g = torch.Generator().manual_seed(seed)
    tokens = F.normalize(torch.randn(b, n, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
    attn = torch.rand(b, n - 1, generator=g).softmax(-1).to(device).requires_grad_()
    mask = None
    if padded:
        lengths = torch.randint(n // 4, n + 1, (b,), generator=g)
        mask = (torch.arange(n)[None] >= lengths[:, None]).to(device)
    return tokens, attn, mask


def _step(kind: str, hgnn: ACEHGNN, tokens, attn, mask):
    backend, global_only = KINDS[kind]

    def run():
        tokens.grad = attn.grad = None
        for p in hgnn.parameters():
            p.grad = None
        hgnn.backend = backend
        out = hgnn(tokens, attn, mask, global_only=global_only)
        out.float().square().mean().backward()
    return run


def bench_case(kind: str, b: int, n: int, dtype, device: str, padded=False, warmup=5, iters=30) -> dict:
    tokens, attn, mask = make_inputs(b, n, dtype, device, padded)
    hgnn = ACEHGNN(D, 128, K).to(device, dtype)
    run = _step(kind, hgnn, tokens, attn, mask)
    row = {"op": kind, "B": b, "N": n, "D": D, "k": K, "padded": padded,
           "dtype": str(dtype).replace("torch.", ""), "device": device,
           "threads": torch.get_num_threads() if device == "cpu" else None}
    row.update(measure(run, device, warmup, iters))
    return row


def _relative(rows: list[dict], base_kind: str = "dense") -> None:
    base = next((r for r in rows if r["op"] == base_kind and "median_ms" in r), None)
    for r in rows:
        if base and r.get("median_ms"):
            r["speedup_vs_dense"] = base["median_ms"] / r["median_ms"]
            if base.get("peak_extra_MiB") and r.get("peak_extra_MiB") is not None:
                r["mem_vs_dense"] = r["peak_extra_MiB"] / base["peak_extra_MiB"]


def run_all(batch: int, dtype, quick=False, threads: int = 2) -> list[dict]:
    rows = []
    if not torch.cuda.is_available():
        torch.set_num_threads(min(threads, os.cpu_count() or 1))
        case = [bench_case(kind, 64, 197, torch.float32, "cpu", warmup=2, iters=5 if quick else 15)
                for kind in ("dense", "global")]
        _relative(case)
        return case
    iters = 10 if quick else 30
    for n, padded in ((197, False), (256, True)):
        case = [bench_case(kind, batch, n, dtype, "cuda", padded, iters=iters) for kind in KINDS]
        _relative(case)
        rows += case
    return rows


COLUMNS = ["op", "B", "N", "padded", "dtype", "device", "threads", "median_ms", "p10_ms", "p90_ms",
           "speedup_vs_dense", "peak_extra_MiB", "mem_vs_dense", "error"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU case only)")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    rows = run_all(args.batch, DTYPES[args.dtype], args.quick, args.threads)
    report("hgnn", rows, COLUMNS, args, write=not args.no_write)
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (run with --benchmark-enable; GPU cases skip on the CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("n,padded", [(197, False), (256, True)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_hgnn_fwd_bwd_gpu(benchmark, kind, n, padded):
    tokens, attn, mask = make_inputs(256, n, torch.bfloat16, "cuda", padded)
    run = _step(kind, ACEHGNN(D, 128, K).to("cuda", torch.bfloat16), tokens, attn, mask)

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark(synced)


@pytest.mark.parametrize("kind", ["dense", "global"])
def test_hgnn_fwd_bwd_cpu(benchmark, kind):
    tokens, attn, mask = make_inputs(64, 197, torch.float32, "cpu")
    benchmark(_step(kind, ACEHGNN(D, 128, K), tokens, attn, mask))


if __name__ == "__main__":
    main()
