"""CT-RATE in ``acelora train`` (DESIGN §13): the training set and the validation, kept apart
from ``acelora.train.run`` so that module stays small.

Training items: the preprocessed volume (the model's ``CTPreprocess``: HU, spacing, crop/pad),
Findings (+ Impressions) as text, and the 18 labels for the label-guided loss. Validation: CT-CLIP's
zero-shot protocol (``acelora.eval.ct_zeroshot``) on CT-RATE's ``valid`` split; its mean AUROC picks
the best epoch.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from acelora.train.settings import TrainConfig

VAL_METRIC = "mean_auroc"


def _check_ct_model(model: nn.Module) -> None:
    if getattr(model, "volume_shape", None) is None:
        raise ValueError("dataset/val 'ct-rate' needs a CT model (ct-clip-tiny, ct-clip-v2, "
                         "ct-clip-v1 or a CT-CLIP checkpoint); this one takes 2D images")


def ct_rate_train_dataset(cfg: TrainConfig, model: nn.Module):
    """CT-RATE's ``train`` split under ``cfg.data_root`` (volumes that fail are skipped, counted)."""
    from acelora.data.ctrate import CTRATEDataset
    from acelora.eval.ct_commands import ct_preprocess_for

    _check_ct_model(model)
    return CTRATEDataset(cfg.data_root, split="train", preprocess=ct_preprocess_for(model),
                         with_text=True, with_impressions=cfg.with_impressions,
                         cache_dir=cfg.cache_dir, on_error="skip", progress=cfg.progress)


def ct_rate_evaluator(cfg: TrainConfig, model: nn.Module) -> tuple[Callable, str]:
    """(evaluate(model) -> CT-CLIP zero-shot metrics on the ``valid`` split of ``cfg.val_root``
    (default ``cfg.data_root``), "mean_auroc" unless another metric was asked for)."""
    from acelora.data.ctrate import CTRATEDataset
    from acelora.eval.ct_commands import ct_preprocess_for
    from acelora.eval.ct_zeroshot import ct_zero_shot_evaluate

    _check_ct_model(model)
    data = CTRATEDataset(cfg.val_root or cfg.data_root, split="valid",
                         preprocess=ct_preprocess_for(model), with_text=False,
                         cache_dir=cfg.cache_dir, on_error="skip", progress=cfg.progress)

    def evaluate(mdl):
        # merge=False: merging and unmerging would perturb the frozen weights by rounding.
        out = ct_zero_shot_evaluate(mdl, data, merge=False)
        return {k: v for k, v in out.items()
                if isinstance(v, (int, float)) and k not in ("n", "skipped", "logit_scale")}
    metric = VAL_METRIC if cfg.val_metric == "accuracy" else cfg.val_metric
    return evaluate, metric
