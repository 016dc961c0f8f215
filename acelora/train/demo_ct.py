"""``acelora demo --ct``: MedCT-VLM (LoRA on both towers of CT-CLIP) on a CPU in a few minutes.

1. A *generalist*: ``ct-clip-tiny`` (CT-CLIP's structure at toy size) trained briefly, every
   weight, as a plain CLIP on synthetic chest CT volume–report pairs of the reference domain
   (``shift`` 0), then frozen.
2. For each of three seeds: the generalist's zero-shot AUROC per finding (CT-CLIP's protocol:
   "{finding} is present." vs "... is not present.") on that seed's held-out volumes of a shifted
   domain (denser lungs, brighter soft tissue, more noise, larger bodies, fainter findings);
   LoRA on the q/k/v of every attention layer of both towers (the ``medct`` preset: label-guided
   InfoNCE over CT-RATE's 18 labels, no HGNN) trained from that seed's initialisation on
   that seed's shifted-domain pairs, keeping the epoch with the best mean AUROC on a shifted
   validation set; the same held-out volumes again.

The report gives each finding's AUROC and the mean, before -> after, as mean ± sd over the seeds
(each seed: its own adapters, adaptation, validation and test volumes; one generalist).
The steps are those of ``acelora demo`` (:mod:`acelora.train.demo`): the same trainer, seeding and
folder handling; only the model, the data and the metric are CT's.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from acelora.config import get_config
from acelora.train.demo import _say
from acelora.train.loop import Trainer, seed_everything
from acelora.train.settings import TrainConfig

MODEL = "ct-clip-tiny"


@dataclass(frozen=True)
class CTDemoPlan:
    """Sizes of the two phases, the domain shift and the number of seeds."""

    pretrain_pairs: int = 1600
    pretrain_epochs: int = 3
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    adapt_pairs: int = 480
    adapt_epochs: int = 3
    adapt_batch: int = 16
    adapt_lr: float = 7.5e-3
    val_size: int = 96
    test_size: int = 384
    # synthetic_ct's shift: at 2 the findings are faint and the scans noisy; the generalist
    # loses most on pleural effusion. (At 1 CTViT's per-patch LayerNorm absorbs most of the
    # shift: the generalist barely notices it.)
    shift: float = 2.0
    seeds: int = 3


FULL = CTDemoPlan()
# 100 generalist steps and 3 x 60 adaptation steps of 16 pairs.
QUICK = CTDemoPlan(pretrain_pairs=800, pretrain_epochs=2, adapt_pairs=320, adapt_epochs=3,
                   test_size=192)

FULL_OUTPUT_DIR = "acelora-demo-ct"
QUICK_OUTPUT_DIR = "acelora-demo-ct-quick"
DEMO_ENTRIES = ("generalist", "ct_demo_summary.json")   # plus one seed-<n> folder per seed


def _auroc(model, data, findings) -> dict[str, Any]:
    """CT-CLIP's zero-shot protocol (thresholds on the evaluated set): mean and per-finding AUROC."""
    from acelora.eval.ct_zeroshot import ct_zero_shot_evaluate

    out = ct_zero_shot_evaluate(model, data, findings=findings, batch_size=32, merge=False)
    return {"mean_auroc": out["mean_auroc"],
            "per_finding": {f: out["per_finding"][f]["auroc"] for f in findings}}


def _spread(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def run_ct_demo(output_dir: str | None = None, quick: bool = False, seed: int = 0,
                device: str = "cpu", plan: CTDemoPlan | None = None, verbose: bool = True,
                progress: bool = True, tensorboard: bool = True, overwrite: bool = False,
                ct_quantizer: str = "straight-through") -> dict[str, Any]:
    """Run the CT demo for seeds ``seed, seed+1, ...``; returns AUROC before/after per seed and
    their mean ± sd. ``ct_quantizer``: how LoRA trains through CT-CLIP's quantiser."""
    from acelora.errors import UserError
    from acelora.outputs import RunFolderLock

    plan = plan or (QUICK if quick else FULL)
    output_dir = output_dir or (QUICK_OUTPUT_DIR if quick else FULL_OUTPUT_DIR)
    with RunFolderLock(output_dir):
        other = sorted(e for e in os.listdir(output_dir) if not e.startswith(".")
                       and e not in DEMO_ENTRIES and not e.startswith("seed-"))
        if other and not overwrite:
            raise UserError(f"output folder {output_dir!r} holds files that are not a CT demo's "
                            f"({', '.join(other[:5])}); choose another --output-dir or pass --overwrite")
        return _run(output_dir, plan, seed, device, verbose, progress, tensorboard, ct_quantizer)


def _run(output_dir, plan, seed, device, verbose, progress, tensorboard, ct_quantizer):
    from acelora.data.synthetic_ct import SYNTHETIC_CT_FINDINGS
    from acelora.outputs import atomic_write_json

    t_start = time.perf_counter()
    findings = list(SYNTHETIC_CT_FINDINGS)
    common = dict(dataset="synthetic", val="none", progress=progress, tensorboard=tensorboard,
                  log_every=5, precision="fp32")
    generalist = _generalist(os.path.join(output_dir, "generalist"), plan, seed, device, verbose, common)
    runs = []
    for s in range(seed, seed + plan.seeds):
        _say(f"=== seed {s} ({s - seed + 1}/{plan.seeds}) ===", verbose)
        runs.append(_adapt(os.path.join(output_dir, f"seed-{s}"), generalist, plan, s, device,
                           findings, verbose, common, ct_quantizer, show_report=s == seed))
    summary = {"before": {}, "after": {}}
    for when in ("before", "after"):
        for name in ("mean_auroc", *findings):
            values = [r[when]["mean_auroc"] if name == "mean_auroc" else r[when]["per_finding"][name]
                      for r in runs]
            summary[when][name] = _spread(values)
    elapsed = time.perf_counter() - t_start
    result = {"model": MODEL, "findings": findings, "runs": runs, "summary": summary,
              "generalist_weights": str(generalist), "seeds": [r["seed"] for r in runs],
              "trainable_parameters": runs[0]["trainable_parameters"],
              "total_parameters": runs[0]["total_parameters"], "ct_quantizer": ct_quantizer,
              "plan": dataclasses.asdict(plan), "seconds": elapsed}
    atomic_write_json(os.path.join(output_dir, "ct_demo_summary.json"), result, indent=2)
    lines = [f"zero-shot AUROC on held-out shifted-domain volumes ({plan.test_size} per seed), "
             f"mean ± sd over {plan.seeds} seeds, generalist -> LoRA (medct preset):"]
    for name in (*findings, "mean_auroc"):
        (b, b_sd), (a, a_sd) = summary["before"][name], summary["after"][name]
        label = "mean over findings" if name == "mean_auroc" else name
        lines.append(f"      {label:<20s} {b:.3f} ± {b_sd:.3f} -> {a:.3f} ± {a_sd:.3f}")
    lines.append(f"trainable parameters: {result['trainable_parameters']:,} of "
                 f"{result['total_parameters']:,}; quantiser: {ct_quantizer}")
    lines.append(f"generalist: {generalist}\nsummary:    "
                 f"{os.path.join(output_dir, 'ct_demo_summary.json')}  ({elapsed:.0f} s)")
    _say("\n".join(lines), verbose)
    return result


def _pairs(prep, n: int, shift: float, seed: int, stream: int, **kw):
    from acelora.data.synthetic_ct import SyntheticCTPairs
    return SyntheticCTPairs(n, prep, shift=shift, seed=seed * 1000 + stream, **kw)


def _generalist(folder, plan, seed, device, verbose, common):
    """ct-clip-tiny trained from scratch, every weight, on reference-domain pairs; its weights file.

    CT-CLIP fits its codebook to the tokens during training (EMA); here the codebook is frozen, so
    the generalist is trained with the quantiser bypassed and then used as CT-CLIP is, quantised."""
    import acelora
    from acelora.models.ctclip import save_ctclip

    seed_everything(seed)
    base = acelora.create_model(MODEL, device=device)
    base.requires_grad_(True)
    base.train()
    base.image_tower.quantizer = "bypass"
    data = _pairs(base.preprocess, plan.pretrain_pairs, 0.0, seed, 1)
    _say(f"[1/3] generalist: training {MODEL} ({base.num_parameters():,} parameters, all "
         f"trainable) on {len(data)} synthetic reference-domain CT volume-report pairs", verbose)
    cfg = TrainConfig(model=MODEL, output_dir=folder, lr=plan.pretrain_lr, weight_decay=0.05,
                      epochs=plan.pretrain_epochs, batch_size=plan.pretrain_batch, warmup_steps=5,
                      seed=seed, method=get_config("medct", label_guided=False), **common)
    Trainer(base, data, cfg, overwrite=True).fit()
    return save_ctclip(base.base, os.path.join(folder, "ct-clip-tiny.pt"))


def _adapt(folder, weights, plan, seed, device, findings, verbose, common, ct_quantizer,
           show_report=False):
    """Before/after AUROC of LoRA (medct) on the frozen generalist, for one seed."""
    import acelora

    seed_everything(seed + 100)
    method = get_config("medct", ct_quantizer=ct_quantizer)
    model = acelora.create_ace_lora(MODEL, config=method, pretrained=str(weights), device=device)
    prep = model.preprocess
    test = _pairs(prep, plan.test_size, plan.shift, seed, 3, findings=findings)
    before = _auroc(model, test, findings)      # fresh adapters (B = 0): the generalist itself
    _say(f"      generalist, shifted domain: mean AUROC {before['mean_auroc']:.3f}", verbose)
    model.train()
    if show_report:
        _say("[2/3] LoRA on the frozen generalist:\n" + model.trainable_parameter_report(), verbose)
    adapt = _pairs(prep, plan.adapt_pairs, plan.shift, seed, 2)
    val = _pairs(prep, plan.val_size, plan.shift, seed, 4, findings=findings)
    cfg = TrainConfig(model=MODEL, output_dir=os.path.join(folder, "lora"), lr=plan.adapt_lr,
                      weight_decay=0.01, epochs=plan.adapt_epochs, batch_size=plan.adapt_batch,
                      warmup_steps=3, seed=seed, val_metric="mean_auroc", method=method, **common)
    summary = Trainer(model, adapt, cfg, overwrite=True,
                      evaluate=lambda m: {"mean_auroc": _auroc(m, val, findings)["mean_auroc"]}).fit()
    if summary["best"]:
        model.load_adapters(summary["best"])
    after = _auroc(model, test, findings)
    _say(f"[3/3] shifted-domain mean AUROC: {before['mean_auroc']:.3f} -> {after['mean_auroc']:.3f}",
         verbose)
    return {"seed": seed, "before": before, "after": after,
            "trainable_parameters": model.num_trainable_parameters(),
            "total_parameters": model.num_parameters(),
            "adapters": summary["adapters"], "best_adapters": summary["best"]}
