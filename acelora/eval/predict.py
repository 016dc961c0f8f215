"""Zero-shot prediction for a few image files (DICOM, PNG, JPEG): per-class probabilities."""
from __future__ import annotations

import json
import logging
from typing import Sequence

import torch

from acelora.data._common import DataError
from acelora.data.images import load_image
from acelora.eval._runtime import inference_model
from acelora.eval.prompts import DEFAULT_TEMPLATES
from acelora.eval.zeroshot import (ZeroShotClassifier, _check_classnames, resolve_class_embedding,
                                   resolve_logit_scale)

logger = logging.getLogger("acelora.eval")


def image_transform(model):
    """The model's evaluation preprocessing (PIL -> [3, S, S]): the same as training and
    evaluation use (``model.image_transform()``); its ``preprocess`` or BiomedCLIP's for other
    models."""
    from acelora.eval.loading import dataset_transform

    if hasattr(model, "image_transform"):
        return dataset_transform(model)
    preprocess = getattr(model, "preprocess", None)
    if callable(preprocess):
        return preprocess
    return dataset_transform(model)


def predict(model, paths: Sequence[str], classnames: Sequence[str],
            templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 16,
            on_error: str = "skip", merge: bool = True, class_embedding: str | None = None,
            logit_scale: str | None = None) -> list[dict]:
    """Class probabilities of each image in ``paths``.

    Returns one ``dict(path, probs {class: p}, prediction)`` per path, in order; a file that cannot
    be read gives ``dict(path, error)`` (``on_error="skip"``) or raises :class:`DataError`
    (``"raise"``). Runs under inference mode with LoRA merged into the frozen weights.
    ``class_embedding`` and ``logit_scale``: as :class:`~acelora.eval.zeroshot.ZeroShotClassifier`
    (None: the model preset's defaults).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise ValueError("no image paths given")
    classnames = _check_classnames(classnames)
    if len(classnames) < 2:
        raise ValueError(f"zero-shot prediction needs at least two classes, got {classnames}")
    # Checked before any image is read (a run whose images all fail would not reach the classifier).
    class_embedding = resolve_class_embedding(model, class_embedding)
    logit_scale = resolve_logit_scale(model, logit_scale)[0]
    transform = image_transform(model)
    results: list[dict | None] = [None] * len(paths)
    images, where = [], []
    for i, path in enumerate(paths):
        try:
            images.append(transform(load_image(path)))
            where.append(i)
        except DataError as exc:
            if on_error == "raise":
                raise
            logger.warning("skipped %s", exc)
            results[i] = {"path": str(path), "error": str(exc)}
    device = next(model.parameters()).device
    with inference_model(model, merge=merge), torch.inference_mode():
        classifier = ZeroShotClassifier(model, classnames, templates, class_embedding=class_embedding,
                                        logit_scale=logit_scale) if images else None
        for start in range(0, len(images), batch_size):
            batch = torch.stack(images[start:start + batch_size]).to(device)
            probs = classifier.probs(batch).cpu()
            for row, i in zip(probs.tolist(), where[start:start + batch_size]):
                best = max(range(len(row)), key=row.__getitem__)
                results[i] = {"path": str(paths[i]), "probs": dict(zip(classnames, row)),
                              "prediction": classnames[best]}
    return results


def format_predictions(results: list[dict], as_json: bool = False) -> str:
    """A table (one row per image, one column per class) or JSON text."""
    if as_json:
        return json.dumps(results, indent=2)
    classes = next((list(r["probs"]) for r in results if "probs" in r), [])
    width = max([len("image")] + [len(r["path"]) for r in results])
    cols = [max(7, len(c)) for c in classes]
    lines = ["  ".join(["image".ljust(width), *(c.rjust(w) for c, w in zip(classes, cols)), "prediction"])]
    for r in results:
        if "error" in r:
            lines.append(f"{r['path'].ljust(width)}  skipped: {r['error']}")
            continue
        cells = [f"{r['probs'][c]:.4f}".rjust(w) for c, w in zip(classes, cols)]
        lines.append("  ".join([r["path"].ljust(width), *cells, r["prediction"]]))
    return "\n".join(lines)
