"""Zero-shot inference images/s: ACE-LoRA with merged adapters vs the base model
(DESIGN §11: ≤ 1.05× the base model's latency, CPU and GPU).

    python bench/bench_inference.py --model biomedclip --batch 64 --device cpu cuda
    python bench/bench_inference.py --model tiny --batch 16 --device cpu --steps 10   # CPU smoke
    python -m pytest bench/bench_inference.py --benchmark-enable

One inference step = image tower (+ the image HGNN's global-only path for ACE-LoRA) and the
similarities against precomputed class-prompt embeddings. A thin wrapper over ``acelora bench
--cases inference``; results go to bench/results/inference-<model>-<device>.json.
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
    benchmark.add_arguments(parser, cases="inference", out=RESULTS_DIR)
    parser.set_defaults(batch=[64])
    return benchmark.main_from_args(parser.parse_args(argv), name="inference")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark cases (run with --benchmark-enable; GPU cases skip on the CPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bench_infer(benchmark_fixture, which: str, model: str, batch: int, device: str):
    infer = benchmark.build_inference_case(which, model, batch, torch.device(device))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        infer()
        sync()

    step()
    benchmark_fixture.extra_info.update(case=which, model=model, batch=batch, device=device)
    benchmark_fixture(step)


@pytest.mark.parametrize("which", ["base", "merged"])
def test_inference_tiny_cpu(benchmark, which):
    _bench_infer(benchmark, which, "tiny", 16, "cpu")


@needs_cuda
@pytest.mark.parametrize("which", ["base", "merged"])
def test_inference_biomedclip_cuda(benchmark, which):
    _bench_infer(benchmark, which, "biomedclip", 64, "cuda")


if __name__ == "__main__":
    main()
