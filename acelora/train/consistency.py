"""Resuming with the settings a run was started with.

A checkpoint records the run's config, a hash of the frozen (base) weights and the size of the
training set. On resume, every setting that changes what the run computes — the schedule (lr,
weight decay, warm-up, epochs), batch and accumulation, seed, precision, gradient clipping, the
training data, the base weights and the whole method config — must match; otherwise the resume
is refused with the list of differences, or, with ``allow_config_change``, the new values are
applied and the change is recorded in the run's history (``config.json``).
"""
from __future__ import annotations

from typing import Any

import torch

from acelora.errors import UserError

# Run settings that change the result of the steps still to come. Not listed, because they do
# not: where outputs go, logging, workers, device, max_steps (when to stop), validation, the NaN
# policy, gradient checkpointing (same numbers), the starting adapters (the checkpoint wins).
RESULT_RUN_FIELDS = ("lr", "weight_decay", "warmup_steps", "epochs", "batch_size", "grad_accum",
                     "seed", "precision", "clip_grad_norm", "dataset", "data_root", "synthetic_size",
                     "synthetic_domain", "image_column", "caption_column", "label_columns")
# Changing these would break the position inside the epoch; never applied to a checkpoint.
UNCHANGEABLE_FIELDS = ("batch_size",)


def result_fields() -> list[str]:
    """The config keys compared on resume (run fields above that exist + every method field)."""
    import dataclasses

    from acelora.config import ACELoRAConfig
    from acelora.train.settings import RUN_FIELDS

    return [f for f in RESULT_RUN_FIELDS if f in RUN_FIELDS] + [
        f.name for f in dataclasses.fields(ACELoRAConfig)]


def frozen_weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the parameters that do not train (the base model), in name order."""
    from acelora.provenance import tensors_sha256

    return tensors_sha256((n, p) for n, p in model.named_parameters() if not p.requires_grad)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resume_changes(saved_config: dict[str, Any], saved_extra: dict[str, Any],
                   config: dict[str, Any], frozen_hash: str | None, train_items: int) -> dict[str, dict]:
    """``{name: {"checkpoint": old, "now": new}}`` for every result-changing difference between
    a checkpoint and this run (settings, base weights, training set size)."""
    changes: dict[str, dict] = {}
    for key in result_fields():
        if key in saved_config and not _same(saved_config[key], config.get(key)):
            changes[key] = {"checkpoint": saved_config[key], "now": config.get(key)}
    saved_hash = saved_extra.get("frozen_weights_sha256")
    if saved_hash and frozen_hash and saved_hash != frozen_hash:
        changes["base weights"] = {"checkpoint": saved_hash[:16], "now": frozen_hash[:16]}
    saved_items = saved_extra.get("train_items")
    if saved_items is not None and int(saved_items) != int(train_items):
        changes["training set size"] = {"checkpoint": int(saved_items), "now": int(train_items)}
    return changes


def check_resume(path: str, changes: dict[str, dict], allow_config_change: bool) -> None:
    """Refuse a resume whose result-changing settings differ, naming each difference."""
    if not changes:
        return
    shown = "; ".join(f"{k}: {v['checkpoint']!r} in the checkpoint, {v['now']!r} now"
                      for k, v in changes.items())
    fixed = [k for k in changes if k in UNCHANGEABLE_FIELDS]
    if fixed:
        raise UserError(f"cannot resume {path!r}: {', '.join(fixed)} cannot change within a run "
                        f"({shown}); start a new run (another --output-dir or --overwrite)")
    if not allow_config_change:
        raise UserError(f"cannot resume {path!r} with other settings than it was trained with: {shown}. "
                        "Resume with the checkpoint's settings, or pass --allow-config-change to "
                        "apply the new ones (recorded in config.json's history)")


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler, lr: float,
                             weight_decay: float) -> None:
    """After loading a checkpoint's optimizer/scheduler state: the new base lr and weight decay
    (the schedule's shape comes from the scheduler built for this run)."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        if any(p.ndim >= 2 for p in group["params"]):  # the decayed group (build_optimizer)
            group["weight_decay"] = weight_decay
    if scheduler is not None and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas] \
            if hasattr(scheduler, "lr_lambdas") else [1.0] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, factors):
            group["lr"] = lr * factor
