"""AdamW over the trainable parameters and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch
from torch import nn


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The one rule for what training updates, saves and restores: ``(name, parameter)`` of the
    model's adapter tensors (``adapter_state_dict``: LoRA, HGNNs, logit scale, chosen by role)
    when it has adapters, else of every parameter that requires a gradient; in module order."""
    if hasattr(model, "adapter_state_dict"):
        return list(model.adapter_state_dict().items())
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    """AdamW on the trainable parameters only (the frozen base never enters the optimizer).

    Matrices decay; biases, norms, gains and ``logit_scale`` (anything with fewer than two
    dimensions) do not, as in CLIP/open_clip training.
    """
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    named = trainable_named_parameters(model)
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters; nothing to optimise")
    decay = [p for n, p in named if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "logit_scale" not in n)]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based: the lr used *by* step ``step``).

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (never a zero lr on
    the first step), then cosine decay from 1 to ``min_factor`` over the remaining steps.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_factor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with :func:`lr_factor`; call ``scheduler.step()`` after each optimizer step."""
    # Validate eagerly: LambdaLR calls the lambda once at construction anyway.
    lr_factor(0, warmup_steps, total_steps, min_factor)
    warmup = min(warmup_steps, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, min_factor))
