"""CT-RATE 18-finding zero-shot evaluation with CT-CLIP's protocol (DESIGN §9, §13).

Per finding, "{finding} is present." vs "{finding} is not present.": ``P = softmax(scale ·
[v·pos, v·neg])[0]`` (the multi-label classifier of :mod:`acelora.eval.multilabel`), with each
volume encoded once for all findings (CT-CLIP's script re-runs the image tower per finding).
AUROC per finding; accuracy and F1 at CT-CLIP's threshold (``scripts/bootstrap_values.py``):
the point of the 100-point grid ``np.linspace(0, 1, 100)`` whose ``prob > t`` predictions lie
closest to the ROC corner (0, 1), i.e. minimise √((1−TPR)² + FPR²), the last one on ties
(CT-CLIP compares with ``<=``). CT-CLIP picks it on the evaluation set itself, which flatters
accuracy and F1; a held-out split can be given instead, and the report says which was used.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

from acelora.eval import metrics as M
from acelora.eval._runtime import (SkipCounter, encode_volumes, inference_model, iterate_batches,
                                   resolve_device)
from acelora.eval.multilabel import MultiLabelClassifier, _check_findings, write_multilabel_predictions

CT_CLIP_POSITIVE_TEMPLATES = ("{c} is present.",)
CT_CLIP_NEGATIVE_TEMPLATES = ("{c} is not present.",)
CT_CLIP_THRESHOLD_GRID = np.linspace(0.0, 1.0, 100)
THRESHOLD_RULE = ("CT-CLIP's: on the grid np.linspace(0, 1, 100), predict prob > t and take the t "
                  "minimising sqrt((1 - TPR)^2 + FPR^2), the largest on ties; 0.5 where the "
                  "threshold split holds one class only")
METRIC_NAMES = {
    "auroc": "area under the ROC curve of the positive-prompt probability",
    "accuracy": "fraction of volumes whose prediction (prob > threshold) matches the label",
    "weighted_f1": "CT-CLIP's F1: scikit-learn f1_score(average='weighted'), the F1 of both "
                   "classes weighted by their support",
    "positive_f1": "F1 of the positive class (finding present), the usual binary F1",
    "precision": "positive predictive value", "recall": "sensitivity (TPR)",
    "specificity": "1 - FPR",
}


def _rates(targets: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR of each row of ``preds`` [T, N] against ``targets`` [N] (NaN when undefined)."""
    pos, neg = targets == 1, targets == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = (preds & pos).sum(1) / pos.sum()
        fpr = (preds & neg).sum(1) / neg.sum()
    return tpr, fpr


def ct_clip_threshold(probs, targets, grid: np.ndarray = CT_CLIP_THRESHOLD_GRID) -> float | None:
    """CT-CLIP's threshold for one finding, or None when ``targets`` hold a single class."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    targets = (np.asarray(targets, dtype=np.float64).ravel() > 0.5).astype(np.int64)
    if probs.shape != targets.shape:
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} differ in length")
    if np.unique(targets).size < 2:
        return None
    tpr, fpr = _rates(targets, probs[None, :] > grid[:, None])
    distance = np.sqrt((1.0 - tpr) ** 2 + fpr ** 2)
    best = np.flatnonzero(distance == distance.min())[-1]      # CT-CLIP's `<=`: the last minimum
    return float(grid[best])


def thresholded_metrics(probs, targets, threshold: float) -> dict:
    """Accuracy, weighted and positive-class F1, precision, recall, specificity at ``prob > t``."""
    probs = np.asarray(probs, dtype=np.float64).ravel()
    targets = (np.asarray(targets, dtype=np.float64).ravel() > 0.5).astype(np.int64)
    preds = (probs > threshold).astype(np.int64)
    tpr, fpr = _rates(targets, preds[None, :].astype(bool))
    return {
        "accuracy": float(skm.accuracy_score(targets, preds)),
        "weighted_f1": float(skm.f1_score(targets, preds, average="weighted", zero_division=0)),
        "positive_f1": float(skm.f1_score(targets, preds, pos_label=1, average="binary",
                                          zero_division=0)),
        "precision": float(skm.precision_score(targets, preds, pos_label=1, average="binary",
                                               zero_division=0)),
        "recall": float(tpr[0]), "specificity": float(1.0 - fpr[0]),
    }


def ct_clip_metrics(probs, targets, findings: Sequence[str], thresholds: Sequence[float | None]) -> dict:
    """Per-finding AUROC and thresholded metrics and their means over findings (AUROC over the
    findings where it is defined). ``thresholds[j]`` None means 0.5 (reported in
    ``threshold_fallback``)."""
    probs, targets = np.asarray(probs, dtype=np.float64), (np.asarray(targets) > 0.5).astype(np.int64)
    if probs.ndim != 2 or probs.shape != targets.shape or probs.shape[1] != len(findings):
        raise ValueError(f"probs {probs.shape} and targets {targets.shape} must both be [N, "
                         f"{len(findings)}]")
    per, fallback = {}, []
    for j, name in enumerate(findings):
        t = thresholds[j]
        if t is None:
            fallback.append(name)
            t = 0.5
        per[name] = {"auroc": M.binary_auroc(targets[:, j], probs[:, j]), "threshold": float(t),
                     **thresholded_metrics(probs[:, j], targets[:, j], t),
                     "positives": int(targets[:, j].sum())}
    aurocs = [row["auroc"] for row in per.values() if not math.isnan(row["auroc"])]
    means = {f"mean_{key}": float(np.mean([row[key] for row in per.values()]))
             for key in ("accuracy", "weighted_f1", "positive_f1", "precision", "recall", "specificity")}
    return {"n": int(probs.shape[0]), "mean_auroc": float(np.mean(aurocs)) if aurocs else math.nan,
            **means, "per_finding": per, "threshold_fallback": fallback}


def _as_eval_dataset(dataset):
    # A volume that fails to load must reach the evaluation's skip counter, instead of the
    # dataset's skip mode serving the next volume twice.
    if getattr(dataset, "on_error", None) == "skip":
        dataset.on_error = "raise"
    return dataset


def volume_probabilities(classifier: MultiLabelClassifier, dataset, batch_size: int = 1,
                         num_workers: int = 0, on_error: str = "skip",
                         skips: SkipCounter | None = None):
    """``(probs [N, L], targets [N, L], ids)`` of every readable volume of ``dataset``; each
    batch of volumes goes through the image tower once."""
    probs, targets, ids = [], [], []
    for batch in iterate_batches(_as_eval_dataset(dataset), batch_size, num_workers, on_error, skips):
        labels = batch.get("labels")
        if labels is None or labels.ndim != 2 or labels.shape[1] != len(classifier.findings):
            raise ValueError(f"{type(dataset).__name__} items need 'labels' [{len(classifier.findings)}] "
                             f"(one per finding); got {None if labels is None else tuple(labels.shape)}")
        image = encode_volumes(classifier.model, batch["images"])
        probs.append(classifier.probs_from_embeddings(image).cpu())
        targets.append(labels.float())
        ids.extend(batch["ids"])
    if not probs:
        raise ValueError(f"no readable volumes in {type(dataset).__name__}"
                         + (f" ({skips.count} skipped)" if skips is not None else ""))
    return torch.cat(probs).double().numpy(), torch.cat(targets).numpy(), ids


def ct_zero_shot_evaluate(model, dataset, findings: Sequence[str] | None = None,
                          threshold_dataset=None, threshold_split: str | None = None,
                          positive_templates: Sequence[str] = CT_CLIP_POSITIVE_TEMPLATES,
                          negative_templates: Sequence[str] = CT_CLIP_NEGATIVE_TEMPLATES,
                          logit_scale: float | None = None, batch_size: int = 1, num_workers: int = 0,
                          device=None, out_dir: str | None = None, on_error: str = "skip",
                          merge: bool = True, name: str = "ct_zeroshot") -> dict:
    """CT-CLIP's zero-shot protocol on a multi-hot CT dataset (e.g. :class:`CTRATEDataset`).

    ``findings``: the names put in the prompts (default the dataset's ``classes``).
    ``threshold_dataset``: pick each finding's threshold there (``threshold_split`` names it in
    the report) instead of on ``dataset`` itself. ``logit_scale``: the multiplier of the cosine
    similarities (default the model's, ``exp(logit_scale)``). With ``out_dir``: ``{name}.json``,
    ``{name}_per_finding.csv``, ``{name}_predictions.csv`` and ``{name}_roc.png``.
    """
    findings = _check_findings(findings if findings is not None else getattr(dataset, "classes", None))
    resolve_device(model, device)
    skips, threshold_skips = SkipCounter(), SkipCounter()
    with inference_model(model, merge=merge), torch.inference_mode():
        classifier = MultiLabelClassifier(model, findings, positive_templates, negative_templates)
        scale_source = "the model's exp(logit_scale)"
        if logit_scale is not None:
            if not (math.isfinite(logit_scale) and logit_scale > 0):
                raise ValueError(f"logit_scale must be a positive multiplier, got {logit_scale}")
            classifier.scale = torch.tensor(float(logit_scale), device=classifier.prompt_emb.device)
            scale_source = "given"
        probs, targets, ids = volume_probabilities(classifier, dataset, batch_size, num_workers,
                                                   on_error, skips)
        if threshold_dataset is not None:
            t_probs, t_targets, _ = volume_probabilities(classifier, threshold_dataset, batch_size,
                                                         num_workers, on_error, threshold_skips)
            source = f"held-out split {threshold_split or type(threshold_dataset).__name__!r} " \
                     f"({t_probs.shape[0]} volumes)"
        else:
            t_probs, t_targets = probs, targets
            source = "the evaluation set itself (CT-CLIP's protocol; optimistic for accuracy and F1)"
    thresholds = [ct_clip_threshold(t_probs[:, j], t_targets[:, j]) for j in range(len(findings))]
    result = ct_clip_metrics(probs, targets, findings, thresholds)
    argmax = M.multilabel_metrics(probs, targets, findings)         # the softmax's own decision
    result.update(skips.report(dataset))
    result.update({
        "findings": findings, "threshold_source": source, "threshold_rule": THRESHOLD_RULE,
        "metric_names": METRIC_NAMES,
        "at_probability_0.5": {"mean_accuracy": argmax["mean_accuracy"],
                               "mean_positive_f1": argmax["macro_f1"]},
        "positive_templates": list(positive_templates), "negative_templates": list(negative_templates),
        "logit_scale": float(classifier.scale), "logit_scale_source": scale_source,
        "dataset": type(dataset).__name__,
    })
    if threshold_dataset is not None:
        result["threshold_split_skipped"] = threshold_skips.report(threshold_dataset)["skipped"]
    if out_dir:
        result["files"] = _write_reports(out_dir, name, result, probs, targets, ids, findings)
    return result


def _write_reports(out_dir, name, result, probs, targets, ids, findings) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    files = {key: os.path.join(out_dir, f"{name}{suffix}") for key, suffix in (
        ("json", ".json"), ("per_finding", "_per_finding.csv"), ("predictions", "_predictions.csv"),
        ("roc", "_roc.png"))}
    M.plot_roc(probs, targets, findings, files["roc"], multilabel=True,
               title=f"{result['dataset']}: ROC per finding (CT-CLIP prompts)")
    columns = ["auroc", "threshold", "accuracy", "weighted_f1", "positive_f1", "precision", "recall",
               "specificity", "positives"]
    with open(files["per_finding"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["finding", *columns])
        for finding, row in result["per_finding"].items():
            writer.writerow([finding, *("" if isinstance(row[c], float) and math.isnan(row[c])
                                        else row[c] for c in columns)])
        writer.writerow(["mean", result["mean_auroc"], "", *(result[f"mean_{c}"] for c in columns[2:-1]), ""])
    write_multilabel_predictions(files["predictions"], ids, targets, probs, findings)
    result["files"] = files
    M.write_json(files["json"], result)
    return files


__all__ = ["ct_zero_shot_evaluate", "ct_clip_threshold", "ct_clip_metrics", "thresholded_metrics",
           "volume_probabilities", "CT_CLIP_POSITIVE_TEMPLATES", "CT_CLIP_NEGATIVE_TEMPLATES",
           "CT_CLIP_THRESHOLD_GRID"]
