"""CTViT forward (CT-CLIP v2 image tower, one volume, fp32): acelora's implementation against the
faithful eager formulation of CT-CLIP's code (tests/models/ctclip_reference.py: einsum attention,
the position-bias MLP over every (h*w)^2 pair on each call, the full [tokens, codes] similarity).

Both run the same random weights on the same volume (each run: encoder, then the code search); the
script checks that they agree (pre-quantiser tokens, chosen codes) and times them round-robin (one reference run, one of ours, repeated), so load
from other processes on a shared CPU hits both alike. The first run of each is the warm-up and is
counted with ``FlopCounterMode`` (matmul / attention / convolution FLOPs).

    python bench/bench_ctvit.py                     # 240 x 480 x 480, 3 timed runs each
    python bench/bench_ctvit.py --depth 40 --runs 3 # fewer depth slabs (say so when reporting)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import report  # noqa: E402

from acelora.models.ctclip import CTCLIP_CONFIGS  # noqa: E402
from acelora.models.ctvit import CTViT  # noqa: E402


def load_reference():
    path = os.path.join(HERE, "..", "tests", "models", "ctclip_reference.py")
    spec = importlib.util.spec_from_file_location("ctclip_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ctclip_reference", module)
    spec.loader.exec_module(module)
    return module


def counted(fn) -> tuple[object, float, float]:
    """(output, seconds, GFLOP) of one run under the FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, counter.get_total_flops() / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="ct-clip-v2", choices=["ct-clip-v2", "ct-clip-v1"])
    parser.add_argument("--depth", type=int, default=240, help="slices of the volume (D)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each implementation")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = load_reference()

    config = CTCLIP_CONFIGS[args.config].vision
    torch.manual_seed(0)
    vit = CTViT(config).eval()
    state = {"visual_transformer." + k: v for k, v in vit.state_dict().items()}
    spec = ref.RefSpec.of(config)
    x = torch.randn(1, 1, args.depth, *config.image_size, generator=torch.Generator().manual_seed(0))

    def ours():
        pre = vit.forward_features(x)
        return pre, vit.vq(pre)[1]

    def reference():
        pre = ref.ctvit_tokens(state, spec, x)
        return pre, ref.quantize(state, pre)[1]

    with torch.no_grad():
        (pre_ref, ref_codes), ref_warm_s, ref_gflop = counted(reference)
        (pre_ours, our_codes), our_warm_s, our_gflop = counted(ours)
        rel_err = ((pre_ours - pre_ref).norm() / pre_ref.norm()).item()
        same_codes = (our_codes == ref_codes).double().mean().item()
        del pre_ref, pre_ours
        times = {"reference": [], "acelora": []}
        for _ in range(args.runs):
            for name, fn in (("reference", reference), ("acelora", ours)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    t, h, w = config.grid(args.depth)
    rows = []
    for name, gflop, warm in (("reference", ref_gflop, ref_warm_s), ("acelora", our_gflop, our_warm_s)):
        rows.append({"impl": name, "volume": f"{args.depth}x{config.image_size[0]}x{config.image_size[1]}",
                     "tokens": t * h * w, "median_s": statistics.median(times[name]),
                     "min_s": min(times[name]), "runs": args.runs, "warmup_s": warm,
                     "gflop": gflop})
    speedup = rows[0]["median_s"] / rows[1]["median_s"]
    extra = {"speedup_median": speedup, "pre_quantizer_rel_err": rel_err,
             "codes_identical_fraction": same_codes, "threads": torch.get_num_threads(),
             "note": ("fp32 CPU, batch 1, no_grad, eval; reference = the faithful eager formulation "
                      "(einsum attention, position-bias MLP on all pairs per call, full code "
                      "similarity matrix); FLOPs counted on the warm-up run")}
    if args.depth != 240:
        extra["note"] += f"; reduced depth {args.depth} (full v2 is 240 slices)"
    print(f"speed-up (median) {speedup:.2f}x; pre-quantiser rel. err {rel_err:.2e}; "
          f"identical codes {same_codes:.4f}")
    if not args.no_write:
        from common import write_results
        path = write_results("ctvit", rows, {"args": vars(args), **extra})
        print(f"wrote {path}")
    report("ctvit", rows, ["impl", "volume", "tokens", "median_s", "min_s", "runs", "warmup_s",
                           "gflop"], args, write=False)
    return {"rows": rows, **extra}


if __name__ == "__main__":
    main()
