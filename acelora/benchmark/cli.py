"""The ``acelora bench`` command (and the argument set bench/bench_train_step.py and
bench/bench_inference.py reuse)."""
from __future__ import annotations

import argparse

from acelora.benchmark.runner import CASES, parse_cases, run


def add_arguments(p: argparse.ArgumentParser, cases: str = ",".join(CASES),
                  out: str = "bench/results") -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny",
                   help="tiny | biomedclip | a local model folder (random weights are fine)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    p.add_argument("--device", nargs="+", default=["auto"], help="cpu and/or cuda (auto: cuda if present)")
    p.add_argument("--cases", default=cases, help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per case")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch.profiler chrome trace and a per-phase breakdown per case")
    p.add_argument("--out", default=out, help="folder for the JSON results ('' to skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main_from_args(args: argparse.Namespace, name: str = "bench") -> dict:
    return run(model=args.model, batches=args.batch, devices=args.device,
               cases=parse_cases(args.cases), steps=args.steps, warmup=args.warmup,
               profile=args.profile, out=args.out or None, threads=args.threads, name=name)


def _cmd_bench(args: argparse.Namespace) -> int:
    from acelora.provenance import is_random_init

    if is_random_init(args.model):
        # Speed does not depend on the weights' values: a benchmark measures random ones by design.
        print(f"note: --model {args.model} is a built-in architecture without weights: measuring "
              "speed on random (seeded) weights, by design", flush=True)
    results = main_from_args(args)
    return 0 if any(r["status"] == "ok" for r in results["rows"]) else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="images/s of a training step and of zero-shot inference",
        description="Images/s of a full ACE-LoRA training step and of zero-shot inference. "
        "Cases: reference (eager fp32 research-code path), default (library defaults), compile "
        "(default + torch.compile), inference (zero-shot, merged adapters vs the base model).")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)
