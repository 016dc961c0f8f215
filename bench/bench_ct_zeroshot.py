"""CT-RATE zero-shot throughput (18 findings) and CTViT LoRA training cost, on the CPU by default.

1. Zero-shot volumes/s, CT-CLIP's protocol ("{f} is present." / "{f} is not present." per
   finding, softmax over the pair): acelora encodes each volume **once** and the 36 prompts once
   (``MultiLabelClassifier``, as ``acelora eval ct-rate`` does); CT-CLIP's ``zero_shot.py`` calls
   the whole model per finding, i.e. 18 image encodings and 18 x 2 text encodings per volume.
   Both run the same acelora model (same weights, same kernels), so the ratio is the protocol's
   alone; the per-finding probabilities of the two agree (checked).
2. LoRA (medct) forward + backward of the image tower at one volume, against the frozen forward:
   train mode, gradient straight through the quantiser to every CTViT adapter.

Models: ``ct-clip-tiny`` (16 x 48 x 48) and v2's architecture at a reduced volume (default 40 x
240 x 240: 4 x 12 x 12 tokens, 73,728 pooled features; full v2 is 240 x 480 x 480), random
weights. Results: ``bench/results/ct_zeroshot-<device>.json``.

    python bench/bench_ct_zeroshot.py                       # both models, 2 volumes each
    python bench/bench_ct_zeroshot.py --v2-volume 40 480 480 --volumes 1
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import print_table, write_results  # noqa: E402

import acelora  # noqa: E402
from acelora.data.ctrate import CT_RATE_FINDINGS  # noqa: E402
from acelora.eval.ct_zeroshot import CT_CLIP_NEGATIVE_TEMPLATES, CT_CLIP_POSITIVE_TEMPLATES  # noqa: E402
from acelora.eval.multilabel import MultiLabelClassifier  # noqa: E402
from acelora.models.ace_lora import ACELoRAModel, CLIPModel  # noqa: E402
from acelora.models.ctclip import CTCLIP, CTCLIP_CONFIGS  # noqa: E402
from acelora.models.tokenizer import TextTokenizer  # noqa: E402


def reduced_v2(volume: tuple[int, int, int]) -> CTCLIP:
    """v2's architecture (patches 20/10, dim 512, 4+4 layers, CXR-BERT) at ``volume`` (D, H, W)."""
    v2 = CTCLIP_CONFIGS["ct-clip-v2"]
    config = dataclasses.replace(v2, depth=volume[0],
                                 vision=dataclasses.replace(v2.vision, image_size=tuple(volume[1:])))
    torch.manual_seed(0)
    return CTCLIP(config, name=f"ct-clip-v2@{'x'.join(map(str, volume))}").eval()


def per_finding_like_ct_clip(model, volume: torch.Tensor, tokenizer) -> torch.Tensor:
    """CT-CLIP's zero_shot.py: for each finding, the model on (volume, its two prompts)."""
    probs = []
    scale = model.logit_scale.exp()
    for finding in CT_RATE_FINDINGS:
        tokens = tokenizer([CT_CLIP_POSITIVE_TEMPLATES[0].format(c=finding),
                            CT_CLIP_NEGATIVE_TEMPLATES[0].format(c=finding)])
        text = model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        image = model.encode_image(volume)                   # re-encoded for every finding
        probs.append((scale * image @ text.T).softmax(-1)[:, 0])
    return torch.stack(probs, dim=-1)


def timed(fn, runs: int) -> tuple[object, list[float]]:
    out, times = None, []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


@torch.inference_mode()
def zero_shot_rows(name: str, model, tokenizer, volumes: torch.Tensor, runs: int) -> list[dict]:
    def prompts():
        return MultiLabelClassifier(model, list(CT_RATE_FINDINGS), CT_CLIP_POSITIVE_TEMPLATES,
                                    CT_CLIP_NEGATIVE_TEMPLATES)       # the 36 prompts, once

    def ours(classifier):
        return torch.cat([classifier.probs_from_embeddings(
            torch.nn.functional.normalize(model.encode_image(v[None]).float(), dim=-1))
            for v in volumes])

    def original():
        return torch.cat([per_finding_like_ct_clip(model, v[None], tokenizer) for v in volumes])

    classifier = prompts()
    ours(classifier)                                         # warm-up (and the bias cache)
    _, t_prompts = timed(prompts, runs)
    p_ours, t_ours = timed(lambda: ours(classifier), runs)
    p_orig, t_orig = timed(original, max(1, runs // 2))
    diff = (p_ours - p_orig).abs().max().item()
    n = len(volumes)
    rows = [{"model": name, "impl": "encode once (acelora)", "volumes": n,
             "s_per_volume": statistics.median(t_ours) / n, "prompts_once_s": statistics.median(t_prompts),
             "runs": len(t_ours), "max_prob_diff": diff},
            {"model": name, "impl": "re-encode per finding (CT-CLIP)", "volumes": n,
             "s_per_volume": statistics.median(t_orig) / n, "runs": len(t_orig), "max_prob_diff": diff}]
    for row in rows:
        row["volumes_per_s"] = 1.0 / row["s_per_volume"]
    rows[0]["speedup"] = rows[1]["s_per_volume"] / rows[0]["s_per_volume"]
    return rows


def lora_rows(name: str, base: CTCLIP, volume: torch.Tensor, runs: int) -> list[dict]:
    model = ACELoRAModel(base, TextTokenizer.generated(512), None, "medct")
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.normal_(0, 0.01)
    image_lora = [p for layer in model.layers.image for n, p in layer.named_parameters() if "lora_" in n]

    def frozen_forward():
        with torch.no_grad():
            return model.encode_image(volume)

    def lora_step():
        model.zero_grad(set_to_none=True)
        model.encode_image(volume).square().sum().backward()
        return sum(p.grad.abs().sum() for p in image_lora)

    model.eval()
    frozen_forward()
    _, t_fwd = timed(frozen_forward, runs)
    model.train()
    grad = lora_step()
    _, t_step = timed(lora_step, runs)
    rows = [{"model": name, "impl": "frozen forward (eval, no grad)", "median_s": statistics.median(t_fwd),
             "runs": runs},
            {"model": name, "impl": "LoRA forward + backward (train, STE)",
             "median_s": statistics.median(t_step), "runs": runs,
             "image_lora_params": sum(p.numel() for p in image_lora),
             "grad_reaches_lora": bool(grad > 0)}]
    rows[1]["ratio_to_forward"] = rows[1]["median_s"] / rows[0]["median_s"]
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v2-volume", type=int, nargs=3, default=(40, 240, 240), metavar=("D", "H", "W"))
    parser.add_argument("--volumes", type=int, default=2, help="volumes per zero-shot timing")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    tiny: CLIPModel = acelora.create_model("ct-clip-tiny")
    v2 = reduced_v2(tuple(args.v2_volume))
    v2_model = CLIPModel(v2, TextTokenizer.generated(512)).eval()
    zero_shot, lora = [], []
    for name, model in (("ct-clip-tiny", tiny), (v2.name, v2_model)):
        volumes = torch.rand(args.volumes, 1, *model.volume_shape, generator=g) * 2 - 1
        zero_shot += zero_shot_rows(name, model, model.tokenizer, volumes, args.runs)
        print_table(zero_shot[-2:])
        lora += lora_rows(name, model.base, volumes[:1], args.runs)
        print_table(lora[-2:])
    extra = {"args": vars(args), "threads": torch.get_num_threads(), "lora_rows": lora,
             "note": ("fp32, batch 1, random weights; zero-shot: 18 CT-RATE findings, CT-CLIP's "
                      "prompt pair; 'CT-CLIP' row = its protocol (model called per finding) on "
                      "acelora's model, so only the protocol differs; acelora's volumes/s leave "
                      "out the 36 prompt encodings done once per evaluation (prompts_once_s); "
                      "LoRA: medct preset (r = 23 on q/k/v of both towers), loss = sum of squared "
                      "latents")}
    if not args.no_write:
        print(f"wrote {write_results('ct_zeroshot', zero_shot, extra)}")
    return {"zero_shot": zero_shot, **extra}


if __name__ == "__main__":
    main()
