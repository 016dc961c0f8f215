"""Downstream dense tasks on a frozen encoder (DESIGN §9): SIIM segmentation and RSNA detection.

The encoder is never trained: the projected patch tokens ``model.encode_image_tokens(images)[:, 1:]``
are computed once per image (LoRA merged, inference mode), reshaped to the patch grid
[D, H/p, W/p] and cached (float16, CPU). A small head is then trained on 1 %, 10 % and 100 % of the
training split (a fixed random subset per fraction) and scored on the test split:

- segmentation: a convolutional decoder that upsamples the grid ×2 per stage back to the image;
  BCE + soft-Dice loss; Dice of the thresholded mask per image (both empty = 1), averaged.
- detection: per grid cell an objectness logit and a box given as distances from the cell centre
  to its four sides (FCOS-like); focal loss + L1 on log-distances + GIoU; NMS; mAP averaged over
  IoU 0.40:0.75:0.05.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from acelora.eval import metrics as M
from acelora.eval._runtime import SkipCounter, inference_model, iterate_batches, resolve_device

logger = logging.getLogger("acelora.eval")

FRACTIONS = (0.01, 0.1, 1.0)


def fraction_name(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def subset_indices(n: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """A fixed random ``fraction`` of ``range(n)`` (at least one item), sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"training fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ValueError("the training split is empty")
    k = max(1, int(round(n * fraction)))
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:k].sort().values


# --- frozen features ----------------------------------------------------------------------

def _patch_grid(model, num_patches: int) -> tuple[int, int]:
    image_size, patch = int(model.image_size), int(model.patch_size)
    side = image_size // patch
    if side * side != num_patches:
        raise ValueError(f"encode_image_tokens gave {num_patches} patch tokens; a {image_size}px image "
                         f"with {patch}px patches has {side}x{side}={side * side} (extra tokens such "
                         "as registers are not supported)")
    return side, side


@torch.inference_mode()
def extract_features(model, dataset, batch_size: int = 32, num_workers: int = 0,
                     on_error: str = "skip", merge: bool = True, dtype=torch.float16) -> dict:
    """Patch-grid features of every readable item: ``features`` [M, D, h, w] (CPU, ``dtype``),
    ``ids``, and the targets the items carry (``masks`` [M, S, S] bool, ``boxes`` list, ``labels``)."""
    device = next(model.parameters()).device
    skips = SkipCounter()
    out: dict[str, list] = {"features": [], "ids": [], "masks": [], "boxes": [], "labels": []}
    with inference_model(model, merge=merge):
        for batch in iterate_batches(dataset, batch_size, num_workers, on_error, skips):
            tokens = model.encode_image_tokens(batch["images"].to(device))
            if tokens.ndim != 3:
                raise ValueError(f"encode_image_tokens must return [B, N, D], got {tuple(tokens.shape)}")
            h, w = _patch_grid(model, tokens.shape[1] - 1)
            grid = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
            out["features"].append(grid.to("cpu", dtype))
            out["ids"].extend(batch["ids"])
            for key in ("masks", "labels"):
                if key in batch:
                    out[key].append(batch[key])
            if "boxes" in batch:
                out["boxes"].extend(b.float().reshape(-1, 4) for b in batch["boxes"])
    if not out["features"]:
        raise ValueError(f"no readable items in {type(dataset).__name__} ({skips.count} skipped)")
    result = {"features": torch.cat(out["features"]), "ids": out["ids"],
              "image_size": int(model.image_size), **skips.report(dataset)}
    for key in ("masks", "labels"):
        if out[key]:
            result[key] = torch.cat(out[key])
    if out["boxes"]:
        result["boxes"] = out["boxes"]
    return result


def _minibatches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """``steps`` random minibatches of indices into ``range(n)`` (reshuffled each epoch)."""
    done = 0
    while done < steps:
        for chunk in torch.randperm(n, generator=gen).split(batch_size):
            yield chunk
            done += 1
            if done == steps:
                return


def _train_steps(n: int, batch_size: int, epochs: int, min_steps: int) -> int:
    return max(int(min_steps), int(epochs) * math.ceil(n / batch_size))


def _head_schedule(module: nn.Module, n: int, batch_size: int, epochs: int, min_steps: int,
                   lr: float, seed: int):
    """AdamW + cosine over the head's steps, and the seeded minibatch index stream."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    steps = _train_steps(n, batch_size, epochs, min_steps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = _minibatches(n, batch_size, steps, torch.Generator().manual_seed(seed))
    return opt, sched, batches


# --- segmentation ---------------------------------------------------------------------------

class SegmentationDecoder(nn.Module):
    """Patch grid [B, D, h, w] -> mask logits [B, 1, h·p, w·p]: a 1×1 projection, then one
    (×2 bilinear upsample, 3×3 conv, GroupNorm, ReLU) stage per factor of two of the patch size."""

    def __init__(self, dim: int, patch_size: int, hidden: int = 128):
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {patch_size}")
        self.proj = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True))
        stages, width = [], hidden
        for _ in range(int(math.log2(patch_size))):
            out = max(16, width // 2)
            stages += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, out, 3, padding=1), nn.GroupNorm(8, out), nn.ReLU(inplace=True)]
            width = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.proj(features)))


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    inter = (prob * target).sum(1)
    return (1 - (2 * inter + eps) / (prob.sum(1) + target.sum(1) + eps)).mean()


def train_segmentation(train: dict, indices: torch.Tensor, patch_size: int, epochs: int = 20,
                       batch_size: int = 16, lr: float = 1e-3, min_steps: int = 100, seed: int = 0,
                       device=None) -> SegmentationDecoder:
    """A decoder trained on ``train["features"][indices]`` against ``train["masks"][indices]``."""
    if "masks" not in train:
        raise ValueError("segmentation needs masks: build the dataset with with_mask=True")
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    feats, masks = train["features"][indices], train["masks"][indices]
    decoder = SegmentationDecoder(feats.shape[1], patch_size).to(device)
    opt, sched, batches = _head_schedule(decoder, len(indices), batch_size, epochs, min_steps, lr, seed)
    decoder.train()
    for idx in batches:
        x = feats[idx].to(device, torch.float32)
        y = masks[idx].to(device, torch.float32)[:, None]
        logits = decoder(x)
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.binary_cross_entropy_with_logits(logits, y) + _soft_dice_loss(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return decoder.eval()


@torch.inference_mode()
def predict_masks(decoder: nn.Module, features: torch.Tensor, size: int, batch_size: int = 64,
                  threshold: float = 0.5) -> torch.Tensor:
    device = next(decoder.parameters()).device
    out = []
    for chunk in features.split(batch_size):
        logits = decoder(chunk.to(device, torch.float32))
        if logits.shape[-1] != size:
            logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
        out.append((logits.sigmoid() > threshold)[:, 0].cpu())
    return torch.cat(out)


def segmentation_evaluate(model, train_set, test_set, fractions: Sequence[float] = FRACTIONS,
                          epochs: int = 20, batch_size: int = 16, lr: float = 1e-3,
                          min_steps: int = 100, seed: int = 0, device=None, num_workers: int = 0,
                          on_error: str = "skip", out_dir: str | None = None,
                          name: str = "segment") -> dict:
    """Dice on ``test_set`` of decoders trained on each fraction of ``train_set`` (items with
    ``mask`` [S, S]: ``SIIMPneumothoraxDataset(..., with_mask=True)``), encoder frozen."""
    device = resolve_device(model, device)
    t0 = time.perf_counter()
    train, test = (extract_features(model, ds, num_workers=num_workers, on_error=on_error)
                   for ds in (train_set, test_set))
    if "masks" not in test:
        raise ValueError("segmentation needs masks: build the datasets with with_mask=True")
    feature_s = time.perf_counter() - t0
    size = int(test["masks"].shape[-1])
    positives = test["masks"].flatten(1).any(1)
    result = {"task": "segmentation", "dataset": type(test_set).__name__, "n_train": len(train["ids"]),
              "n_test": len(test["ids"]), "test_positives": int(positives.sum()),
              "skipped": train["skipped"] + test["skipped"], "feature_seconds": feature_s,
              "fractions": {}}
    for fraction in fractions:
        idx = subset_indices(len(train["ids"]), fraction, seed)
        t1 = time.perf_counter()
        decoder = train_segmentation(train, idx, int(model.patch_size), epochs, batch_size, lr,
                                     min_steps, seed, device)
        pred = predict_masks(decoder, test["features"], size)
        dice = M.dice_scores(pred, test["masks"])
        result["fractions"][fraction_name(fraction)] = {
            "fraction": fraction, "n_train": int(len(idx)), "dice": float(dice.mean()),
            "dice_positive": float(dice[positives].mean()) if positives.any() else math.nan,
            "train_seconds": time.perf_counter() - t1}
        logger.info("segmentation %s: dice %.4f", fraction_name(fraction), float(dice.mean()))
    if out_dir:
        result["files"] = {"json": M.write_json(os.path.join(out_dir, f"{name}.json"), result)}
    return result


# --- detection ----------------------------------------------------------------------------

class DetectionHead(nn.Module):
    """Patch grid [B, D, h, w] -> per-cell objectness logit [B, h, w] and box distances
    [B, h, w, 4] (left, top, right, bottom from the cell centre, in units of the cell size)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(8, hidden), nn.ReLU(inplace=True))
        self.objectness = nn.Conv2d(hidden, 1, 1)
        self.box = nn.Conv2d(hidden, 4, 1)
        # Rare positives: start at a low objectness prior (as RetinaNet/FCOS do).
        nn.init.constant_(self.objectness.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.body(features)
        return self.objectness(x)[:, 0], self.box(x).permute(0, 2, 3, 1)  # log-distances


def _cell_centres(h: int, w: int, stride: float, device=None) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], dim=-1).float()    # [h, w, 2]


def detection_targets(boxes: Sequence[torch.Tensor], h: int, w: int, stride: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cell: positive (its centre lies in a box; the smallest box wins; a box holding no
    centre claims the cell of its own centre) and the target box [h, w, 4] xyxy."""
    centres = _cell_centres(h, w, stride)
    pos = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    target = torch.zeros(len(boxes), h, w, 4)
    for b, gt in enumerate(boxes):
        if gt.numel() == 0:
            continue
        gt = gt.float().reshape(-1, 4)
        cx, cy = centres[..., 0:1], centres[..., 1:2]                                  # [h, w, 1]
        inside = (cx > gt[:, 0]) & (cx < gt[:, 2]) & (cy > gt[:, 1]) & (cy < gt[:, 3])  # [h, w, G]
        area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).expand(h, w, -1)
        area = torch.where(inside, area, torch.full_like(area, math.inf))
        best = area.argmin(-1)
        has = inside.any(-1)
        for g in range(gt.shape[0]):  # tiny boxes that hold no cell centre
            if not inside[..., g].any():
                j = int(((gt[g, 0] + gt[g, 2]) / 2 / stride).clamp(0, w - 1))
                i = int(((gt[g, 1] + gt[g, 3]) / 2 / stride).clamp(0, h - 1))
                if not has[i, j]:
                    has[i, j], best[i, j] = True, g
        pos[b] = has
        target[b] = gt[best]
    return pos, target


def _decode(log_dist: torch.Tensor, centres: torch.Tensor, stride: float) -> torch.Tensor:
    d = log_dist.clamp(max=8).exp() * stride
    return torch.cat([centres - d[..., :2], centres + d[..., 2:]], dim=-1)


def train_detection(train: dict, indices: torch.Tensor, stride: float, epochs: int = 20,
                    batch_size: int = 16, lr: float = 1e-3, min_steps: int = 100, seed: int = 0,
                    device=None) -> DetectionHead:
    """A head trained on ``train["features"][indices]`` against ``train["boxes"]`` (xyxy pixels)."""
    from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

    if "boxes" not in train:
        raise ValueError("detection needs boxes: use a dataset whose items carry 'boxes'")
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)
    feats = train["features"][indices]
    boxes = [train["boxes"][int(i)] for i in indices]
    h, w = feats.shape[-2:]
    pos_all, target_all = detection_targets(boxes, h, w, stride)
    centres = _cell_centres(h, w, stride, device)
    head = DetectionHead(feats.shape[1]).to(device)
    opt, sched, batches = _head_schedule(head, len(indices), batch_size, epochs, min_steps, lr, seed)
    head.train()
    for idx in batches:
        x = feats[idx].to(device, torch.float32)
        pos, target = pos_all[idx].to(device), target_all[idx].to(device)
        obj, log_dist = head(x)
        n_pos = max(1, int(pos.sum()))
        loss = sigmoid_focal_loss(obj, pos.float(), reduction="sum") / n_pos
        if pos.any():
            c = centres.expand_as(target[..., :2])[pos]
            t = target[pos]
            dist = torch.cat([c - t[:, :2], t[:, 2:] - c], dim=-1).clamp_min(stride * 1e-2)
            pred_log = log_dist[pos]
            loss = loss + F.smooth_l1_loss(pred_log, (dist / stride).log(), beta=0.1)
            loss = loss + generalized_box_iou_loss(_decode(pred_log, c, stride), t, reduction="mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@torch.inference_mode()
def predict_boxes(head: DetectionHead, features: torch.Tensor, stride: float, image_size: int,
                  score_threshold: float = 0.05, nms_iou: float = 0.5, max_detections: int = 20,
                  batch_size: int = 64) -> list[dict]:
    """Per image ``dict(boxes [n, 4] xyxy, scores [n], labels [n])`` after NMS."""
    from torchvision.ops import nms

    device = next(head.parameters()).device
    h, w = features.shape[-2:]
    centres = _cell_centres(h, w, stride, device)
    out = []
    for chunk in features.split(batch_size):
        obj, log_dist = head(chunk.to(device, torch.float32))
        scores = obj.sigmoid().flatten(1)
        boxes = _decode(log_dist, centres, stride).clamp(0, image_size).flatten(1, 2)
        for s, b in zip(scores, boxes):
            keep = s > score_threshold
            s, b = s[keep], b[keep]
            valid = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            s, b = s[valid], b[valid]
            keep = nms(b, s, nms_iou)[:max_detections]
            out.append({"boxes": b[keep].cpu(), "scores": s[keep].cpu(),
                        "labels": torch.zeros(len(keep), dtype=torch.long)})
    return out


def detection_evaluate(model, train_set, test_set, fractions: Sequence[float] = FRACTIONS,
                       epochs: int = 20, batch_size: int = 16, lr: float = 1e-3, min_steps: int = 100,
                       seed: int = 0, device=None, num_workers: int = 0, on_error: str = "skip",
                       iou_thresholds: Sequence[float] = M.DETECTION_IOU_THRESHOLDS,
                       out_dir: str | None = None, name: str = "detect") -> dict:
    """mAP@[.40:.75] on ``test_set`` of heads trained on each fraction of ``train_set`` (items
    with ``boxes`` [n, 4] xyxy in output pixels: ``RSNAPneumoniaDataset``), encoder frozen."""
    device = resolve_device(model, device)
    t0 = time.perf_counter()
    train, test = (extract_features(model, ds, num_workers=num_workers, on_error=on_error)
                   for ds in (train_set, test_set))
    if "boxes" not in test:
        raise ValueError("detection needs boxes: use a dataset whose items carry 'boxes'")
    feature_s = time.perf_counter() - t0
    image_size = int(model.image_size)
    stride = image_size / test["features"].shape[-1]
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in test["boxes"]]
    result = {"task": "detection", "dataset": type(test_set).__name__, "n_train": len(train["ids"]),
              "n_test": len(test["ids"]), "test_boxes": int(sum(len(b) for b in test["boxes"])),
              "iou_thresholds": [float(t) for t in iou_thresholds],
              "skipped": train["skipped"] + test["skipped"], "feature_seconds": feature_s,
              "fractions": {}}
    for fraction in fractions:
        idx = subset_indices(len(train["ids"]), fraction, seed)
        t1 = time.perf_counter()
        head = train_detection(train, idx, stride, epochs, batch_size, lr, min_steps, seed, device)
        preds = predict_boxes(head, test["features"], stride, image_size)
        scores = M.mean_average_precision(preds, targets, iou_thresholds)
        result["fractions"][fraction_name(fraction)] = {
            "fraction": fraction, "n_train": int(len(idx)), **scores,
            "train_seconds": time.perf_counter() - t1}
        result["map_backend"] = scores["backend"]
        logger.info("detection %s: mAP %.4f", fraction_name(fraction), scores["map"])
    if out_dir:
        result["files"] = {"json": M.write_json(os.path.join(out_dir, f"{name}.json"), result)}
    return result


__all__ = ["FRACTIONS", "SegmentationDecoder", "DetectionHead", "extract_features", "subset_indices",
           "train_segmentation", "predict_masks", "segmentation_evaluate", "detection_targets",
           "train_detection", "predict_boxes", "detection_evaluate"]
