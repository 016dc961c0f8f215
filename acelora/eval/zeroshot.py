"""Zero-shot classification with prompt ensembles (DESIGN §9).

A class embedding is built from its prompts (one per template) by one of two rules:

* ``per-prompt``: each prompt through the whole text tower (HGNN refinement included), normalised;
  their mean, normalised. The ``paper`` preset's rule, and the only one for models without a text
  HGNN or with an EOT-pooled text tower.
* ``token-mean``: each prompt's projected tokens normalised per token, averaged over the templates
  position by position (not renormalised), its CLS-attention rows averaged the same way; the text
  HGNN runs once on that average; the global output, normalised. What the public ACE-LoRA
  evaluation scripts do, so the ``official`` preset's rule (its text is padded to the full context,
  so positions line up across prompts).

An image's class probabilities are ``softmax(scale · image · classesᵀ)``, with the scale an explicit
choice: ``checkpoint`` (the model's own, learned one; ``paper``) or ``base`` (the frozen base
model's; ``official``, as the public scripts use).
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from acelora.eval import metrics as M
from acelora.eval._runtime import (SkipCounter, _tokenizer, encode_images, encode_texts,
                                   inference_model, iterate_batches, logit_scale, model_device,
                                   resolve_device)
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


CLASS_EMBEDDING_RULES = ("per-prompt", "token-mean")
LOGIT_SCALES = ("base", "checkpoint")

# Printed beside the metrics and written into the reports: "accuracy" alone is ambiguous.
METRIC_NOTES = {
    "accuracy": "plain accuracy: the fraction of images whose most probable class is the true one",
    "balanced_accuracy": "the mean over classes of per-class recall; what the public ACE-LoRA "
                         "CheXpert 5x200 script reports as its accuracy (torchmetrics "
                         "MulticlassAccuracy, macro average); its RSNA/SIIM accuracy is the plain one",
}


def _preset(model) -> str | None:
    return getattr(getattr(model, "config", None), "preset", None)


def token_mean_problem(model) -> str | None:
    """Why the ``token-mean`` rule is not defined for ``model``, or None when it is."""
    if getattr(model, "text_hgnn", None) is None:
        return ("the model has no text HGNN (token-mean averages the HGNN's inputs over the "
                "templates)")
    if getattr(getattr(model, "text_tower", None), "name", "") == "open_clip-text":
        return ("its text tower is EOT-pooled (open_clip-text): each prompt's pooled token is moved "
                "to index 0 and what follows depends on the prompt's length, so token positions "
                "do not line up across templates")
    if not getattr(getattr(model, "config", None), "text_padding_as_vertices", False):
        return ("its text padding is not made of HGNN vertices (text_padding_as_vertices=False, "
                "the paper preset): prompts are not padded to a common length, so token positions "
                "do not line up across templates")
    return None


def resolve_class_embedding(model, rule: str | None = None) -> str:
    """The class-embedding rule to use: ``rule``, or the preset's default (``token-mean`` for the
    ``official`` preset where it is defined, else ``per-prompt``). ValueError for an unknown rule
    or ``token-mean`` where it is not defined."""
    if rule is None:
        official = _preset(model) == "official" and token_mean_problem(model) is None
        return "token-mean" if official else "per-prompt"
    if rule not in CLASS_EMBEDDING_RULES:
        raise ValueError(f"unknown class-embedding rule {rule!r}; choose from {CLASS_EMBEDDING_RULES}")
    if rule == "token-mean":
        problem = token_mean_problem(model)
        if problem is not None:
            raise ValueError(f"the token-mean class embedding is not defined for this model: "
                             f"{problem}; use per-prompt")
    return rule


def resolve_logit_scale(model, choice: str | None = None) -> tuple[str, torch.Tensor]:
    """``(choice, multiplier)``: ``base`` is the frozen base model's scale (the ``official``
    preset's default, as the public evaluation scripts use), ``checkpoint`` the model's own
    (learned) one (every other model's default)."""
    if choice is None:
        choice = "base" if _preset(model) == "official" else "checkpoint"
    if choice not in LOGIT_SCALES:
        raise ValueError(f"unknown logit scale {choice!r}; choose from {LOGIT_SCALES}")
    if choice == "checkpoint":
        return choice, logit_scale(model)
    base = getattr(model, "base", None)
    if getattr(base, "logit_scale", None) is None:
        raise ValueError(f"logit scale 'base' needs a model over a base model with a logit_scale "
                         f"({type(model).__name__} has no base.logit_scale); use 'checkpoint'")
    return choice, logit_scale(base)


def class_embeddings(model, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     rule: str | None = None, batch_size: int = 256) -> torch.Tensor:
    """[C, D] L2-normalised float32 class embeddings by ``rule`` (``per-prompt`` | ``token-mean``;
    None: the model preset's default, see :func:`resolve_class_embedding`)."""
    names = _check_classnames(classnames)
    templates = check_templates(templates)
    if resolve_class_embedding(model, rule) == "token-mean":
        return _token_mean_embeddings(model, names, templates, batch_size)
    prompts = [p for name in names for p in fill(templates, name)]
    emb = encode_texts(model, prompts, batch_size=batch_size)          # [C*T, D], normalised
    emb = emb.view(len(names), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1)


@torch.inference_mode()
def _token_mean_embeddings(model, names: list[str], templates: tuple[str, ...],
                           batch_size: int) -> torch.Tensor:
    """The token-mean rule. Classes go through the tower in groups of whole classes (about
    ``batch_size`` prompts), so each group's mean over templates is a reshape: deterministic, no
    scatter-add, no host sync per prompt."""
    device, tokenizer = model_device(model), _tokenizer(model)
    hgnn = model.text_hgnn
    hgnn_dtype = next(hgnn.parameters()).dtype
    n_templates = len(templates)
    per_group = max(1, batch_size // n_templates)
    out = []
    for first in range(0, len(names), per_group):
        group = names[first:first + per_group]
        prompts = [p for name in group for p in fill(templates, name)]
        tokens, rows = [], []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size])
            ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
            mask = batch.get("attention_mask")
            mask = torch.as_tensor(mask, dtype=torch.long, device=device) if mask is not None else None
            tower = model.text_features(ids, mask, cls_attn=True)
            if tower.padding is not None:   # a vertex mask would differ from prompt to prompt
                raise RuntimeError("token-mean class embeddings need every text position to be an "
                                   "HGNN vertex, but the text tower returned a padding mask")
            tokens.append(F.normalize(tower.tokens.float(), dim=-1))
            rows.append(tower.cls_attn.float())
        tokens = torch.cat(tokens).unflatten(0, (len(group), n_templates)).mean(dim=1)
        rows = torch.cat(rows).unflatten(0, (len(group), n_templates)).mean(dim=1)
        # The mean tokens go in as they are (refine() would renormalise them): the HGNN's top-k
        # uses their cosines, its messages their values -- as the public scripts compute it.
        out.append(hgnn(tokens.to(hgnn_dtype), rows, None, global_only=True).float())
    return F.normalize(torch.cat(out), dim=-1)


class ZeroShotClassifier:
    """Class embeddings computed once; then ``probs(images)`` per batch.

    ``class_embedding`` (``per-prompt`` | ``token-mean``) and ``logit_scale`` (``base`` |
    ``checkpoint``): None takes the model preset's defaults; the choices made are kept in
    ``self.class_embedding`` and ``self.logit_scale_source``, the multiplier in ``self.scale``.
    Call it under :func:`acelora.eval._runtime.inference_model` (or on a model already in eval
    mode with merged adapters) for inference speed.
    """

    def __init__(self, model, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 class_embedding: str | None = None, logit_scale: str | None = None):
        self.model = model
        self.classnames = _check_classnames(classnames)
        self.templates = check_templates(templates)
        self.class_embedding = resolve_class_embedding(model, class_embedding)
        self.logit_scale_source, scale = resolve_logit_scale(model, logit_scale)
        self.class_emb = class_embeddings(model, self.classnames, self.templates, rule=self.class_embedding)
        self.scale = scale.to(self.class_emb.device)

    def settings(self) -> dict:
        """What the report records about how the classes were scored."""
        return {"class_embedding": self.class_embedding, "logit_scale_source": self.logit_scale_source,
                "logit_scale": float(self.scale)}

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.scale * encode_images(self.model, images) @ self.class_emb.T

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).softmax(dim=-1)


def zero_shot_evaluate(model, dataset, classnames: Sequence[str] | None = None,
                       templates: Sequence[str] | None = None, batch_size: int = 64,
                       num_workers: int = 0, device=None, out_dir: str | None = None,
                       on_error: str = "skip", merge: bool = True, name: str = "zeroshot",
                       class_embedding: str | None = None, logit_scale: str | None = None) -> dict:
    """Zero-shot accuracy, balanced accuracy, macro-F1 and AUROC of ``model`` on ``dataset``.

    ``dataset`` items are ``dict(image [3,H,W] (already transformed), label int, id)``.
    ``classnames`` default to the protocol's names for the known sets (CheXpert 5×200, RSNA,
    SIIM) or the dataset's ``classes``; ``templates`` to the protocol's (pathology ones for
    LC25000 / MHIST: :func:`~acelora.eval.prompts.default_templates`). Images are streamed in
    batches under inference mode, with LoRA merged (``merge``; restored afterwards). Images that
    fail to decode are counted in ``skipped`` (``on_error="skip"``) or raise (``"raise"``).

    ``class_embedding`` (``per-prompt`` | ``token-mean``) and ``logit_scale`` (``base`` |
    ``checkpoint``) as :class:`ZeroShotClassifier`; the result records both (``class_embedding``,
    ``logit_scale_source``, and the multiplier used as ``logit_scale``). ``accuracy`` is plain
    accuracy, ``balanced_accuracy`` the mean per-class recall (``metric_notes`` says so).

    With ``out_dir``: ``{name}.json`` (metrics, per-class table, confusion matrix, settings),
    ``{name}_confusion_matrix.png``, ``{name}_roc.png`` and ``{name}_predictions.csv``.
    """
    classnames = _check_classnames(classnames if classnames is not None else default_classnames(dataset))
    templates = check_templates(templates if templates is not None else default_templates(dataset))
    resolve_device(model, device)
    skips = SkipCounter()
    probs, targets, ids = [], [], []
    with inference_model(model, merge=merge), torch.inference_mode():
        classifier = ZeroShotClassifier(model, classnames, templates, class_embedding=class_embedding,
                                        logit_scale=logit_scale)
        for batch in iterate_batches(dataset, batch_size, num_workers, on_error, skips):
            target = batch.get("label")
            if target is None:
                raise ValueError(f"{type(dataset).__name__} items need an integer 'label' for "
                                 "single-label zero-shot evaluation (use multilabel_evaluate for "
                                 "multi-hot 'labels')")
            probs.append(classifier.probs(batch["images"]).cpu())
            targets.append(target)
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
                   "dataset": type(dataset).__name__, **classifier.settings(),
                   "metric_notes": dict(METRIC_NOTES)})
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
