"""Zero-shot evaluation time per image: the base model vs ACE-LoRA with merged adapters.

DESIGN §11 target: inference with merged adapters ≤ 1.05× the base model's latency. Merging folds
every LoRA update into its frozen weight, so the towers cost exactly the base's; what remains is
the ACE-HGNN's global-only refinement of the image embedding. Cases (same images, same class
embeddings, one ``ZeroShotClassifier.probs`` call per batch, inference mode):

* ``base``            the frozen base model (CLS projection)
* ``lora_merged``     LoRA merged, no HGNN: must equal the base's cost
* ``ace_merged``      the full ACE-LoRA model, LoRA merged (what ``acelora eval`` runs)
* ``ace_unmerged``    the same with LoRA as a side branch (what merging saves)

    python bench/bench_zeroshot.py --model biomedclip --batch-size 16      # prints a table, writes JSON
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

try:
    from bench import common
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common

CASES = ("base", "lora_merged", "ace_merged", "ace_unmerged")


def _models(name: str, device: torch.device):
    import acelora

    torch.manual_seed(0)
    base = acelora.create_model(name, device=device)
    models = {"base": base}
    for case, hgnn in (("lora_merged", False), ("ace_merged", True)):
        torch.manual_seed(0)  # the same random base weights as ``base``
        model = acelora.create_ace_lora(name, hgnn=hgnn, device=device)
        with torch.no_grad():  # trained-looking adapters: merging must fold a non-zero update
            for m in model.lora_modules():
                m.lora_B.normal_(0, 0.02)
        models[case] = model
    models["ace_unmerged"] = models["ace_merged"]
    return models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict:
    ordered = sorted(times)
    q = lambda p: ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"median_ms": statistics.median(ordered), "p10_ms": q(0.1), "p90_ms": q(0.9),
            "min_ms": ordered[0], "iters": len(ordered)}


def run(model: str = "tiny", batch_size: int = 16, warmup: int = 3, iters: int = 20,
        device: str | None = None, cases=CASES) -> list[dict]:
    """Milliseconds of one zero-shot batch per case. The cases take turns every iteration, so
    drift in the machine's load (a shared CPU) hits them alike; ``vs_base`` is the median of the
    per-iteration ratios to the base model."""
    from acelora.eval.zeroshot import ZeroShotClassifier

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = _models(model, device)
    size = int(models["base"].image_size)
    images = torch.randn(batch_size, 3, size, size, device=device)
    classnames = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    plan = []  # (case, model, merged?, classifier)
    with torch.inference_mode():
        for case in cases:
            m = models[case].eval()
            plan.append((case, m, case in ("lora_merged", "ace_merged"), ZeroShotClassifier(m, classnames)))

        def set_state(m, merged):  # untimed: ace_merged and ace_unmerged share one model
            if hasattr(m, "merge") and m.merged != merged:
                m.merge() if merged else m.unmerge()

        times: dict[str, list[float]] = {case: [] for case in cases}
        for it in range(warmup + iters):
            for case, m, merged, clf in plan:
                set_state(m, merged)
                _sync(device)
                t0 = time.perf_counter()
                clf.probs(images)
                _sync(device)
                if it >= warmup:
                    times[case].append((time.perf_counter() - t0) * 1e3)
        for _, m, _, _ in plan:
            set_state(m, False)
    rows = [{"case": case, "model": model, "batch": batch_size,
             "ms_per_image": statistics.median(times[case]) / batch_size, **_stats(times[case])}
            for case in cases]
    if "base" in times:
        for r in rows:
            r["vs_base"] = statistics.median(t / b for t, b in zip(times[r["case"]], times["base"]))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="biomedclip", help="tiny | biomedclip | a model folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--no-write", action="store_true", help="print only; no JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.model, args.batch_size, args.warmup, args.iters, args.device)
    common.print_table(rows, ["case", "model", "batch", "ms_per_image", "median_ms", "p10_ms", "p90_ms", "vs_base"])
    ratio = next(r["vs_base"] for r in rows if r["case"] == "ace_merged")
    lora_ratio = next(r["vs_base"] for r in rows if r["case"] == "lora_merged")
    summary = {"merged_vs_base": ratio, "lora_merged_vs_base": lora_ratio, "target": 1.05,
               "meets_target": ratio <= 1.05}
    print(f"ACE-LoRA merged / base = {ratio:.3f}x (LoRA only merged: {lora_ratio:.3f}x; target <= 1.05x)")
    if not args.no_write:
        summary["file"] = common.write_results(f"zeroshot-{args.model.replace('/', '_')}", rows, summary)
        print(f"wrote {summary['file']}")
    return {"rows": rows, **summary}


def test_zeroshot_merged_tiny(benchmark):
    """pytest-benchmark case: one zero-shot batch of the merged tiny ACE-LoRA model."""
    from acelora.eval.zeroshot import ZeroShotClassifier

    model = _models("tiny", torch.device("cpu"))["ace_merged"]
    model.merge()
    images = torch.randn(16, 3, model.image_size, model.image_size)
    with torch.inference_mode():
        clf = ZeroShotClassifier(model, ["a", "b", "c"])
        benchmark(lambda: clf.probs(images))


if __name__ == "__main__":
    main()
