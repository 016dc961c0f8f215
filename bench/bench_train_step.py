"""Images/s of one full ACE-LoRA training step (both towers + HGNNs, loss, backward, AdamW):
the eager fp32 research-code path vs acelora's defaults vs defaults + torch.compile
(DESIGN §11: ≥ 3× the reference's images/s at batch 64 on BiomedCLIP shapes, GPU).

    python bench/bench_train_step.py --model biomedclip --batch 64 256            # GPU
    python bench/bench_train_step.py --model tiny --batch 8 --device cpu --steps 5  # CPU smoke
    python -m pytest bench/bench_train_step.py --benchmark-enable                   # pytest-benchmark

A thin wrapper over ``acelora bench`` (the acelora.benchmark package), which owns the cases; results go to
bench/results/train_step-<model>-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR  # noqa: E402

from acelora import benchmark  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser, cases="reference,default,compile", out=RESULTS_DIR)
    return benchmark.main_from_args(parser.parse_args(argv), name="train_step")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (run with --benchmark-enable; GPU cases skip on the CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bench_step(benchmark_fixture, case: str, model: str, batch: int, device: str):
    tc = benchmark.build_train_case(case, model, batch, torch.device(device))
    try:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def step():
            tc.step()
            sync()

        step()  # warm-up (and compilation)
        benchmark_fixture.extra_info.update(case=case, model=model, batch=batch, device=device)
        benchmark_fixture(step)
    finally:
        benchmark.remove_hooks(tc.hooks)


@pytest.mark.parametrize("case", ["reference", "default"])
def test_train_step_tiny_cpu(benchmark, case):
    _bench_step(benchmark, case, "tiny", 8, "cpu")


@needs_cuda
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("case", ["reference", "default", "compile"])
def test_train_step_biomedclip_cuda(benchmark, case, batch):
    _bench_step(benchmark, case, "biomedclip", batch, "cuda")


if __name__ == "__main__":
    main()
