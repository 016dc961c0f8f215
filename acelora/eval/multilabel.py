"""Multi-label zero-shot evaluation (NIH ChestX-ray14, CT-CLIP style; DESIGN §9).

Each finding is decided on its own: a positive and a negative prompt (each the normalised mean of
its templates' embeddings), and ``P(finding) = softmax(logit_scale · [image·pos, image·neg])[0]``.
Reported per finding and averaged: AUROC, accuracy (P > 0.5) and F1.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from acelora.data._common import DataError, ImageDataset, read_csv
from acelora.data.images import load_image
from acelora.data.labels import LabelPolicy
from acelora.eval import metrics as M
from acelora.eval._runtime import (SkipCounter, encode_images, encode_texts, inference_model,
                                   iterate_batches, logit_scale, resolve_device)
from acelora.eval.prompts import (NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES, check_templates, fill,
                                  finding_text)


def _check_findings(findings) -> list[str]:
    if findings is None or isinstance(findings, str) or len(findings) == 0:
        raise ValueError(f"findings must be a non-empty list of names, got {findings!r}")
    names = [str(f).strip() for f in findings]
    if any(not n for n in names):
        raise ValueError(f"empty finding name in {list(findings)}")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate finding names in {names}")
    return names


def finding_embeddings(model, findings: Sequence[str], positive: Sequence[str] = POSITIVE_TEMPLATES,
                       negative: Sequence[str] = NEGATIVE_TEMPLATES) -> torch.Tensor:
    """[L, 2, D] normalised (positive, negative) prompt embeddings of each finding."""
    names = _check_findings(findings)
    positive, negative = check_templates(positive, "positive templates"), \
        check_templates(negative, "negative templates")
    prompts = [p for n in names for p in (*fill(positive, n), *fill(negative, n))]
    emb = encode_texts(model, prompts)
    emb = emb.view(len(names), len(positive) + len(negative), -1)
    pos = F.normalize(emb[:, :len(positive)].mean(1), dim=-1)
    neg = F.normalize(emb[:, len(positive):].mean(1), dim=-1)
    return torch.stack([pos, neg], dim=1)


class MultiLabelClassifier:
    """Prompt embeddings computed once; ``probs(images)`` -> [B, L] positive probabilities."""

    def __init__(self, model, findings: Sequence[str], positive: Sequence[str] = POSITIVE_TEMPLATES,
                 negative: Sequence[str] = NEGATIVE_TEMPLATES):
        self.model = model
        self.findings = _check_findings(findings)
        self.prompt_emb = finding_embeddings(model, self.findings, positive, negative)   # [L, 2, D]
        self.scale = logit_scale(model).to(self.prompt_emb.device)

    @torch.inference_mode()
    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.probs_from_embeddings(encode_images(self.model, images))

    @torch.inference_mode()
    def probs_from_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """[B, L] from normalised image embeddings [B, D]: each image (or CT volume) is encoded
        once for all L findings."""
        logits = self.scale * torch.einsum("bd,lkd->blk", image, self.prompt_emb)        # [B, L, 2]
        return logits.softmax(dim=-1)[..., 0]


def multilabel_evaluate(model, dataset, findings: Sequence[str] | None = None,
                        positive_templates: Sequence[str] = POSITIVE_TEMPLATES,
                        negative_templates: Sequence[str] = NEGATIVE_TEMPLATES,
                        batch_size: int = 64, num_workers: int = 0, device=None,
                        out_dir: str | None = None, on_error: str = "skip", merge: bool = True,
                        name: str = "multilabel") -> dict:
    """Per-finding and mean AUROC, accuracy and F1 of ``model`` on a multi-hot ``dataset``
    (items ``dict(image, labels FloatTensor[L], id)``, e.g. :class:`NIHChestXray14Dataset` or
    :class:`MultiLabelCSVDataset`). ``findings`` (the names put in the prompts) default to the
    dataset's ``classes`` with underscores as spaces.

    With ``out_dir``: ``{name}.json``, ``{name}_roc.png`` and ``{name}_predictions.csv``.
    """
    if findings is None:
        classes = getattr(dataset, "classes", None)
        if not classes:
            raise ValueError(f"no finding names: {type(dataset).__name__} has no `classes`; pass "
                             "findings=[...] (or --classes on the command line)")
        findings = [finding_text(str(c)) for c in classes]
    findings = _check_findings(findings)
    resolve_device(model, device)
    skips = SkipCounter()
    probs, targets, ids = [], [], []
    with inference_model(model, merge=merge), torch.inference_mode():
        classifier = MultiLabelClassifier(model, findings, positive_templates, negative_templates)
        for batch in iterate_batches(dataset, batch_size, num_workers, on_error, skips):
            labels = batch.get("labels")
            if labels is None or labels.ndim != 2:
                raise ValueError(f"{type(dataset).__name__} items need multi-hot 'labels' [L] for "
                                 "multi-label evaluation (use zero_shot_evaluate for one label per image)")
            if labels.shape[1] != len(findings):
                raise ValueError(f"{len(findings)} finding names for {labels.shape[1]} label columns")
            probs.append(classifier.probs(batch["images"]).cpu())
            targets.append(labels.float())
            ids.extend(batch["ids"])
    if not probs:
        raise ValueError(f"no readable items in {type(dataset).__name__} ({skips.count} skipped)")
    probs, targets = torch.cat(probs), torch.cat(targets)
    result = M.multilabel_metrics(probs, targets, findings)
    result.update(skips.report(dataset))
    result.update({"findings": findings, "positive_templates": list(positive_templates),
                   "negative_templates": list(negative_templates),
                   "dataset": type(dataset).__name__, "logit_scale": float(classifier.scale)})
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        files = {"json": os.path.join(out_dir, f"{name}.json"),
                 "roc": os.path.join(out_dir, f"{name}_roc.png"),
                 "predictions": os.path.join(out_dir, f"{name}_predictions.csv")}
        M.plot_roc(probs, targets, findings, files["roc"], multilabel=True,
                   title=f"{result['dataset']}: ROC per finding")
        write_multilabel_predictions(files["predictions"], ids, targets, probs, findings)
        result["files"] = files
        M.write_json(files["json"], result)
    return result


def write_multilabel_predictions(path: str, ids, targets: torch.Tensor, probs: torch.Tensor,
                                 findings) -> None:
    """One CSV row per item: its id, the target of each finding, then each probability."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *(f"{n} (target)" for n in findings), *(f"{n} (prob)" for n in findings)])
        for item_id, t, p in zip(ids, targets.tolist(), probs.tolist()):
            writer.writerow([item_id, *(int(v) for v in t), *(f"{v:.6f}" for v in p)])


class MultiLabelCSVDataset(ImageDataset):
    """Any CSV of images and multi-hot findings: an image-path column and one column per finding
    holding 1 / 0 / −1 (uncertain) / blank, mapped by ``label_policy`` (default: only 1 is positive).

    ``findings`` default to every column except the path column. Item
    ``dict(image, labels FloatTensor[L], id)``; ``classes`` = the finding columns.
    """

    def __init__(self, csv_path: str, findings: Sequence[str] | None = None, image_col: str = "path",
                 root: str | None = None, transform=None, label_policy: LabelPolicy | None = None,
                 on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        rows = read_csv(csv_path, (image_col, *(findings or ())))
        if findings is None:
            findings = [h for h in (rows[0] if rows else {}) if h != image_col]
        if not findings:
            raise DataError(f"{csv_path}: no finding columns besides {image_col!r}")
        self.classes = list(findings)
        self.root = root or os.path.dirname(os.path.abspath(csv_path))
        policy = label_policy or LabelPolicy()
        labels = []
        for line_no, row in enumerate(rows, start=2):
            try:
                vector = [policy(row[c]) for c in self.classes]
            except ValueError as exc:
                raise DataError(f"{csv_path}:{line_no}: {exc}") from None
            rel = row[image_col].strip()
            path = os.path.join(self.root, rel)
            if check_files and not os.path.isfile(path):
                self._bad_record("missing image", f"image file not found: {path!r}")
                continue
            self.records.append((rel, path))
            labels.append(vector)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, len(self.classes)))
        self._check_nonempty(csv_path)

    def _load(self, index: int) -> dict:
        rel, path = self.records[index]
        return {"image": self._image_tensor(load_image(path)), "labels": self.labels[index].clone(),
                "id": rel}
