"""Label-guided InfoNCE, forward + backward: eager reference vs fused Triton vs open_clip's ClipLoss
(unmasked, the ceiling an eager CLIP loss reaches), B = 1k…8k, D = 512; and the peak extra memory
at B = 65,536 (DESIGN §11: ≥ 2× faster than eager; < 1 GiB where eager needs ~17 GiB).

    python bench/bench_infonce.py [--dtype bf16|fp32] [--batches 1024,2048,4096,8192] [--quick]
    python -m pytest bench/bench_infonce.py --benchmark-enable      # pytest-benchmark cases

GPU cases skip cleanly on the CPU; there the script times the reference and ClipLoss at small B.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import measure, peak_memory, report, time_fn  # noqa: E402

from acelora.ops import label_guided_infonce  # noqa: E402

try:
    from open_clip.loss import ClipLoss
except Exception:  # pragma: no cover - open_clip is a dependency, but keep the bench usable
    ClipLoss = None

D = 512
N_FINDINGS = 14
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def make_inputs(b: int, d: int = D, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """L2-normalised leaf embeddings, a learnable multiplier and CheXpert-like multi-hot labels
    (sparse, so that many reports share a label vector: 'No Finding'-style duplicates)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    text = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device).requires_grad_()
    labels = (torch.rand(b, N_FINDINGS, generator=g) < 0.08).float().to(device)
    return image, text, scale, labels


def _step(kind: str, image, text, scale, labels):
    """One forward + backward of ``kind``; gradients are cleared so memory does not pile up."""
    def run():
        image.grad = text.grad = scale.grad = None
        if kind == "clip":
            loss = ClipLoss()(image, text, scale)
        else:
            loss = label_guided_infonce(image, text, scale, labels, backend=kind)
        loss.backward()
    return run


def bench_case(kind: str, b: int, dtype, device: str, warmup=5, iters=30) -> dict:
    image, text, scale, labels = make_inputs(b, dtype=dtype, device=device)
    run = _step(kind, image, text, scale, labels)
    row = {"op": kind, "B": b, "D": D, "dtype": str(dtype).replace("torch.", ""), "device": device}
    row.update(measure(run, device, warmup, iters))
    return row


def memory_case(kind: str, b: int, dtype) -> dict:
    """Peak extra memory of one fwd+bwd at batch ``b`` (the inputs themselves not counted)."""
    row = {"op": kind, "B": b, "D": D, "dtype": str(dtype).replace("torch.", ""), "device": "cuda"}
    image, text, scale, labels = make_inputs(b, dtype=dtype, device="cuda")
    run = _step(kind, image, text, scale, labels)
    try:
        run()  # warm-up: autotuning and compilation allocate too
        torch.cuda.synchronize()
        row["peak_extra_MiB"] = peak_memory(run, "cuda") / 2**20
        row.update(time_fn(run, warmup=1, iters=5, device="cuda"))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        del image, text, scale, labels, run
        torch.cuda.empty_cache()
    return row


def run_all(batches, dtype, big_batch=65536, quick=False) -> list[dict]:
    rows = []
    if not torch.cuda.is_available():
        # CPU: the reference is the only backend; time it against ClipLoss at small sizes.
        for b in (256, 1024):
            for kind in ("reference", "clip"):
                if kind == "clip" and ClipLoss is None:
                    continue
                rows.append(bench_case(kind, b, torch.float32, "cpu", warmup=2, iters=5))
        return rows
    iters = 10 if quick else 30
    for b in batches:
        case_rows = {}
        for kind in ("reference", "triton", "clip"):
            if kind == "clip" and ClipLoss is None:
                continue
            case_rows[kind] = bench_case(kind, b, dtype, "cuda", iters=iters)
        eager = case_rows["reference"].get("median_ms")
        for row in case_rows.values():
            if eager and row.get("median_ms"):
                row["speedup_vs_eager"] = eager / row["median_ms"]
            rows.append(row)
    if big_batch:
        rows.append(memory_case("triton", big_batch, dtype))
        if not quick:  # eager needs tens of GiB here; record the OOM if it does not fit
            rows.append(memory_case("reference", big_batch, dtype))
    return rows


COLUMNS = ["op", "B", "D", "dtype", "device", "median_ms", "p10_ms", "p90_ms", "speedup_vs_eager",
           "peak_extra_MiB", "error"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batches", default="1024,2048,4096,8192")
    parser.add_argument("--big-batch", type=int, default=65536, help="0 skips the memory case")
    parser.add_argument("--quick", action="store_true", help="fewer iterations, no eager big batch")
    parser.add_argument("--no-write", action="store_true", help="do not write bench/results/*.json")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b]
    rows = run_all(batches, DTYPES[args.dtype], args.big_batch, args.quick)
    report("infonce", rows, COLUMNS, args, write=not args.no_write)
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (run with --benchmark-enable; GPU cases skip on the CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("b", [1024, 4096, 8192])
@pytest.mark.parametrize("kind", ["reference", "triton", "clip"])
def test_infonce_fwd_bwd_gpu(benchmark, kind, b):
    if kind == "clip" and ClipLoss is None:
        pytest.skip("open_clip is not importable")
    run = _step(kind, *make_inputs(b, dtype=torch.bfloat16, device="cuda"))

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark(synced)


@needs_cuda
def test_infonce_big_batch_memory_gpu():
    row = memory_case("triton", 65536, torch.bfloat16)
    assert "error" not in row, row
    assert row["peak_extra_MiB"] < 1024, row


@pytest.mark.parametrize("kind", ["reference", "clip"])
def test_infonce_fwd_bwd_cpu(benchmark, kind):
    if kind == "clip" and ClipLoss is None:
        pytest.skip("open_clip is not importable")
    benchmark(_step(kind, *make_inputs(256, dtype=torch.float32, device="cpu")))


if __name__ == "__main__":
    main()
