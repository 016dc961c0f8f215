"""Evaluation metrics, computed by scikit-learn and torchmetrics, and the report plots.

Conventions (DESIGN §9): binary AUROC scores the positive-class (index 1) probability; multi-class
AUROC is the macro average of one-vs-rest AUROCs. An AUROC is undefined when the targets hold one
class only; it is then reported as NaN (``None`` in JSON) instead of failing the evaluation.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def binary_auroc(targets, scores) -> float:
    """AUROC of ``scores`` for 0/1 ``targets``; NaN when only one class is present."""
    targets, scores = _numpy(targets).astype(np.int64).ravel(), _numpy(scores).astype(np.float64).ravel()
    if targets.shape != scores.shape:
        raise ValueError(f"targets {targets.shape} and scores {scores.shape} differ in length")
    if np.unique(targets).size < 2:
        return math.nan
    return float(skm.roc_auc_score(targets, scores))


def _check_probs(probs: np.ndarray, targets: np.ndarray) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probabilities must be [N, C], got shape {probs.shape}")
    if targets.shape != (probs.shape[0],):
        raise ValueError(f"targets must be [N] = [{probs.shape[0]}], got shape {targets.shape}")
    if probs.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    if targets.size and (targets.min() < 0 or targets.max() >= probs.shape[1]):
        raise ValueError(f"targets must lie in [0, {probs.shape[1]}), got range "
                         f"[{targets.min()}, {targets.max()}]")


def classification_metrics(probs, targets, classnames: Sequence[str] | None = None) -> dict:
    """Single-label metrics of class probabilities ``probs`` [N, C] against ``targets`` [N].

    Returns accuracy, balanced_accuracy, macro_f1, auroc, n, the confusion matrix (rows = truth)
    and a per-class table (precision, recall, f1, support, one-vs-rest auroc).
    """
    probs, targets = _numpy(probs).astype(np.float64), _numpy(targets).astype(np.int64)
    _check_probs(probs, targets)
    num_classes = probs.shape[1]
    labels = list(range(num_classes))
    classnames = list(classnames) if classnames is not None else [str(i) for i in labels]
    if len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} class names for {num_classes} probability columns")
    preds = probs.argmax(axis=1)

    per_class_auroc = [binary_auroc(targets == c, probs[:, c]) for c in labels]
    if num_classes == 2:
        auroc = per_class_auroc[1]
    else:
        defined = [a for a in per_class_auroc if not math.isnan(a)]
        auroc = float(np.mean(defined)) if defined else math.nan

    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" on small sets: the score is still well defined.
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(skm.balanced_accuracy_score(targets, preds))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        targets, preds, labels=labels, zero_division=0)
    return {
        "n": int(targets.size),
        "accuracy": float(skm.accuracy_score(targets, preds)),
        "balanced_accuracy": balanced,
        "macro_f1": float(skm.f1_score(targets, preds, labels=labels, average="macro", zero_division=0)),
        "auroc": auroc,
        "confusion_matrix": skm.confusion_matrix(targets, preds, labels=labels).tolist(),
        "per_class": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                   "support": int(support[c]), "auroc": per_class_auroc[c]}
            for c, name in enumerate(classnames)
        },
    }


def multilabel_metrics(probs, targets, findings: Sequence[str] | None = None,
                       threshold: float = 0.5) -> dict:
    """Per-finding metrics of positive probabilities ``probs`` [N, L] against 0/1 ``targets`` [N, L].

    Returns mean_auroc (over findings whose AUROC is defined), mean_accuracy, macro_f1 (mean of the
    per-finding binary F1s) and a per-finding table. A finding is predicted when its probability
    is above ``threshold`` (0.5: the positive prompt beats the negative one).
    """
    probs, targets = _numpy(probs).astype(np.float64), _numpy(targets)
    if probs.ndim != 2 or targets.shape != probs.shape:
        raise ValueError(f"probabilities and targets must both be [N, L]; got {probs.shape} and "
                         f"{targets.shape}")
    if probs.shape[0] == 0:
        raise ValueError("no samples to evaluate")
    targets = (targets > 0.5).astype(np.int64)
    findings = list(findings) if findings is not None else [str(i) for i in range(probs.shape[1])]
    if len(findings) != probs.shape[1]:
        raise ValueError(f"{len(findings)} finding names for {probs.shape[1]} columns")
    preds = (probs > threshold).astype(np.int64)
    aurocs = [binary_auroc(targets[:, j], probs[:, j]) for j in range(probs.shape[1])]
    f1 = skm.f1_score(targets, preds, average=None, zero_division=0)
    accuracy = (preds == targets).mean(axis=0)
    defined = [a for a in aurocs if not math.isnan(a)]
    return {
        "n": int(probs.shape[0]),
        "mean_auroc": float(np.mean(defined)) if defined else math.nan,
        "mean_accuracy": float(accuracy.mean()),
        "macro_f1": float(skm.f1_score(targets, preds, average="macro", zero_division=0)),
        "per_finding": {
            name: {"auroc": aurocs[j], "accuracy": float(accuracy[j]), "f1": float(f1[j]),
                   "positives": int(targets[:, j].sum())}
            for j, name in enumerate(findings)
        },
    }


def dice_scores(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of boolean masks [B, H, W]; an image with both masks empty scores 1
    (the SIIM convention)."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"masks must both be [B, H, W]; got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.bool().flatten(1), target.bool().flatten(1)
    inter = (pred & target).sum(1).double()
    total = (pred.sum(1) + target.sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))


DETECTION_IOU_THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))  # 0.40:0.75:0.05


def _coco_backend_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("pycocotools", "faster_coco_eval"))


def detection_map(iou_thresholds: Sequence[float] = DETECTION_IOU_THRESHOLDS):
    """torchmetrics' MeanAveragePrecision over ``iou_thresholds`` (xyxy boxes, COCO-style
    101-point interpolation). Needs pycocotools (or faster-coco-eval) installed."""
    from torchmetrics.detection import MeanAveragePrecision

    try:
        # COCO's 101 recall points in float64 (torchmetrics' default is a float32 linspace,
        # whose 0.41 is not COCO's 0.41).
        return MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                    iou_thresholds=[float(t) for t in iou_thresholds],
                                    rec_thresholds=np.linspace(0.0, 1.0, 101).tolist())
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "detection mAP needs pycocotools (pip install pycocotools) for torchmetrics' "
            f"MeanAveragePrecision: {exc}") from None


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a.double(), b.double())


def coco_average_precision(preds: Sequence[dict], targets: Sequence[dict], iou_threshold: float,
                           max_detections: int = 100) -> float:
    """COCO's AP of one class at one IoU threshold: each image's ``max_detections`` best
    detections, greedy matching in score order to the unmatched ground truth of highest IoU
    (>= threshold), precision made monotone, sampled at 101 recall points. NaN without any
    ground-truth box."""
    scores, matched = [], []
    n_gt = 0
    for pred, target in zip(preds, targets):
        gt = target["boxes"].reshape(-1, 4)
        n_gt += gt.shape[0]
        order = torch.argsort(pred["scores"].double(), descending=True, stable=True)[:max_detections]
        boxes, s = pred["boxes"].reshape(-1, 4)[order], pred["scores"].double()[order]
        taken = torch.zeros(gt.shape[0], dtype=torch.bool)
        iou = _box_iou(boxes, gt) if gt.shape[0] and boxes.shape[0] else None
        for d in range(boxes.shape[0]):
            hit = False
            if iou is not None:
                cand = iou[d].masked_fill(taken, -1.0)
                best = int(cand.argmax())
                if cand[best] >= min(iou_threshold, 1 - 1e-10):
                    taken[best] = hit = True
            scores.append(float(s[d]))
            matched.append(hit)
    if n_gt == 0:
        return math.nan
    if not scores:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tp = np.asarray(matched, dtype=np.float64)[order]
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = tp_cum / n_gt
    precision = tp_cum / (tp_cum + fp_cum)
    precision = np.maximum.accumulate(precision[::-1])[::-1]          # monotone envelope
    points = np.linspace(0.0, 1.0, 101)
    where = np.searchsorted(recall, points, side="left")
    sampled = np.where(where < len(precision), precision[np.minimum(where, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def mean_average_precision(preds: Sequence[dict], targets: Sequence[dict],
                           iou_thresholds: Sequence[float] = DETECTION_IOU_THRESHOLDS,
                           backend: str = "auto") -> dict:
    """Single-class detection mAP averaged over ``iou_thresholds`` (DESIGN §9: 0.40:0.75:0.05).

    ``preds``: per image ``dict(boxes [n,4] xyxy, scores [n], labels [n])``; ``targets``: per
    image ``dict(boxes, labels)``. ``backend``: ``"torchmetrics"`` (MeanAveragePrecision; needs
    pycocotools or faster-coco-eval), ``"acelora"`` (:func:`coco_average_precision`, the same COCO
    protocol in NumPy) or ``"auto"`` (torchmetrics when its backend is installed, else acelora,
    with a warning). Returns ``map``, ``map_per_iou`` and the ``backend`` used.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} images")
    thresholds = [float(t) for t in iou_thresholds]
    if backend == "auto":
        backend = "torchmetrics" if _coco_backend_available() else "acelora"
        if backend == "acelora":
            warnings.warn("pycocotools / faster-coco-eval not installed: detection mAP computed by "
                          "acelora's own COCO-protocol implementation instead of torchmetrics' "
                          "MeanAveragePrecision", stacklevel=2)
    if backend == "torchmetrics":
        per_iou = []
        for t in thresholds:  # one threshold at a time gives the per-IoU APs directly
            metric = detection_map([t])
            metric.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
                          [{k: g[k] for k in ("boxes", "labels")} for g in targets])
            value = float(metric.compute()["map"])
            per_iou.append(math.nan if value < 0 else value)
    elif backend == "acelora":
        per_iou = [coco_average_precision(preds, targets, t) for t in thresholds]
    else:
        raise ValueError(f"backend must be 'auto', 'torchmetrics' or 'acelora', got {backend!r}")
    defined = [v for v in per_iou if not math.isnan(v)]
    return {"map": float(np.mean(defined)) if defined else math.nan,
            "map_per_iou": {f"{t:.2f}": v for t, v in zip(thresholds, per_iou)}, "backend": backend}


# --- reports and plots --------------------------------------------------------------------

def json_safe(value):
    """NaN/inf → None, numpy/torch scalars → Python, recursively (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, report: dict) -> str:
    """The report as JSON, written atomically (temp file + rename, mode 0644)."""
    from acelora.outputs import atomic_write_json

    return atomic_write_json(path, json_safe(report), indent=2)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(matrix, classnames: Sequence[str], path: str, title: str = "") -> str:
    """The confusion matrix (rows = truth, columns = prediction) as a PNG, counts in the cells."""
    plt = _pyplot()
    matrix = np.asarray(matrix)
    size = max(4.0, 0.9 * len(classnames) + 2.0)
    fig, ax = plt.subplots(figsize=(size, size))
    try:
        skm.ConfusionMatrixDisplay(matrix, display_labels=list(classnames)).plot(
            ax=ax, cmap="Blues", colorbar=False, xticks_rotation=45)
        ax.set_title(title or "Confusion matrix")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def plot_roc(probs, targets, classnames: Sequence[str], path: str, title: str = "",
             multilabel: bool = False) -> str:
    """ROC curves as a PNG: the positive class of a binary task, one-vs-rest curves of a
    multi-class task, or one curve per finding (``multilabel``). Undefined curves are left out."""
    plt = _pyplot()
    probs, targets = _numpy(probs).astype(np.float64), _numpy(targets)
    if multilabel:
        curves = [(name, targets[:, j] > 0.5, probs[:, j]) for j, name in enumerate(classnames)]
    elif probs.shape[1] == 2:
        curves = [(classnames[1], targets == 1, probs[:, 1])]
    else:
        curves = [(name, targets == c, probs[:, c]) for c, name in enumerate(classnames)]
    fig, ax = plt.subplots(figsize=(6, 6))
    try:
        for name, y, score in curves:
            if np.unique(y).size < 2:
                continue
            fpr, tpr, _ = skm.roc_curve(y.astype(np.int64), score)
            ax.plot(fpr, tpr, label=f"{name} (AUROC {skm.auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(title or "ROC")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
