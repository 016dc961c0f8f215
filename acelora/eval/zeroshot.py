"""Zero-shot classification with prompt ensembles (DESIGN §9).

A class is represented by the normalised mean of the normalised embeddings of its prompts (one per
template); the text tower refines each prompt with its HGNN before the average. An image's class
probabilities are ``softmax(logit_scale · image · classesᵀ)``.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from acelora.eval import metrics as M
from acelora.eval._runtime import (SkipCounter, encode_images, encode_texts, inference_model,
                                   iterate_batches, logit_scale, resolve_device)
from acelora.eval.prompts import (DEFAULT_TEMPLATES, check_templates, default_classnames,
                                   default_templates, fill)


def _check_classnames(classnames) -> list[str]:
    if classnames is None or isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"class names must be a non-empty list of strings, got {classnames!r}")
    names = [str(c).strip() for c in classnames]
    if any(not n for n in names):
        raise ValueError(f"empty class name in {list(classnames)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate class names in {names}")
    return names


def class_embeddings(model, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     batch_size: int = 256) -> torch.Tensor:
    """[C, D] L2-normalised class embeddings: for each class, embed every template's prompt
    (``model.encode_text``, HGNN refinement included), normalise, average, normalise."""
    names = _check_classnames(classnames)
    templates = check_templates(templates)
    prompts = [p for name in names for p in fill(templates, name)]
    emb = encode_texts(model, prompts, batch_size=batch_size)          # [C*T, D], normalised
    emb = emb.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


class ZeroShotClassifier:
    """Class embeddings computed once; then ``probs(images)`` per batch.

    Call it under :func:`acelora.eval._runtime.inference_model` (or on a model already in eval
    mode with merged adapters) for inference speed.
    """

    def __init__(self, model, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
        self.model = model
        self.classnames = _check_classnames(classnames)
        self.templates = check_templates(templates)
        self.class_emb = class_embeddings(model, self.classnames, self.templates)
        self.scale = logit_scale(model).to(self.class_emb.device)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * encode_images(self.model, images) @ self.class_emb.T

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)


def zero_shot_evaluate(model, dataset, classnames: Sequence[str] | None = None,
                       templates: Sequence[str] | None = None, batch_size: int = 64,
                       num_workers: int = 0, device=None, out_dir: str | None = None,
                       on_error: str = "skip", merge: bool = True, name: str = "zeroshot") -> dict:
    """Zero-shot accuracy, balanced accuracy, macro-F1 and AUROC of ``model`` on ``dataset``.

    ``dataset`` items are ``dict(image [3,H,W] (already transformed), label int, id)``.
    ``classnames`` default to the protocol's names for the known sets (CheXpert 5×200, RSNA,
    SIIM) or the dataset's ``classes``; ``templates`` to the protocol's (pathology ones for
    LC25000 / MHIST: :func:`~acelora.eval.prompts.default_templates`). Images are streamed in
    batches under inference mode, with LoRA merged (``merge``; restored afterwards). Images that
    fail to decode are counted in ``skipped`` (``on_error="skip"``) or raise (``"raise"``).

    With ``out_dir``: ``{name}.json`` (metrics, per-class table, confusion matrix, settings),
    ``{name}_confusion_matrix.png``, ``{name}_roc.png`` and ``{name}_predictions.csv``.
    """
    classnames = _check_classnames(classnames if classnames is not None else default_classnames(dataset))
    templates = check_templates(templates if templates is not None else default_templates(dataset))
    resolve_device(model, device)
    skips = SkipCounter()
    probs, targets, ids = [], [], []
    with inference_model(model, merge=merge), torch.inference_mode():
        classifier = ZeroShotClassifier(model, classnames, templates)
        for batch in iterate_batches(dataset, batch_size, num_workers, on_error, skips):
            if "labels" not in batch or batch["labels"].ndim != 1:
                raise ValueError(f"{type(dataset).__name__} items need an integer 'label' for "
                                 "single-label zero-shot evaluation (use multilabel_evaluate for "
                                 "multi-hot 'labels')")
            probs.append(classifier.probs(batch["images"]).cpu())
            targets.append(batch["labels"])
            ids.extend(batch["ids"])
    if not probs:
        raise ValueError(f"no readable items in {type(dataset).__name__} ({skips.count} skipped)")
    probs, targets = torch.cat(probs), torch.cat(targets)
    if int(targets.max()) >= len(classnames):
        raise ValueError(f"dataset labels go up to {int(targets.max())} but only {len(classnames)} "
                         f"class names were given: {classnames}")

    result = M.classification_metrics(probs, targets, classnames)
    result.update(skips.report(dataset))
    result.update({"classnames": classnames, "templates": list(templates),
                   "dataset": type(dataset).__name__, "logit_scale": float(classifier.scale)})
    if out_dir:
        result["files"] = write_report(out_dir, name, result, probs, targets, ids, classnames)
    return result


def write_report(out_dir: str, name: str, result: dict, probs: torch.Tensor, targets: torch.Tensor,
                 ids: list, classnames: list[str]) -> dict:
    """The JSON report, confusion-matrix and ROC plots, and per-image predictions."""
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "json": os.path.join(out_dir, f"{name}.json"),
        "confusion_matrix": os.path.join(out_dir, f"{name}_confusion_matrix.png"),
        "roc": os.path.join(out_dir, f"{name}_roc.png"),
        "predictions": os.path.join(out_dir, f"{name}_predictions.csv"),
    }
    M.plot_confusion_matrix(result["confusion_matrix"], classnames, files["confusion_matrix"],
                            title=f"{result.get('dataset', name)}: confusion matrix")
    M.plot_roc(probs, targets, classnames, files["roc"], title=f"{result.get('dataset', name)}: ROC")
    with open(files["predictions"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "target", "prediction", *classnames])
        for item_id, target, row in zip(ids, targets.tolist(), probs.tolist()):
            writer.writerow([item_id, classnames[target], classnames[max(range(len(row)), key=row.__getitem__)],
                             *(f"{p:.6f}" for p in row)])
    M.write_json(files["json"], {**result, "files": files})
    return files
