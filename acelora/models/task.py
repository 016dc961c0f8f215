"""The training step's computation, defined once (open_clip's "task" idea): a model, its loss and
the label policy. ``model(images, tokens, labels=...)``, the Trainer (under DDP the task is what
DistributedDataParallel wraps) and the benchmark all run through ``ContrastiveTask``.
"""
from __future__ import annotations

import torch
from torch import nn

from acelora.profiling import phase


class ContrastiveTask(nn.Module):
    """``forward(images, input_ids, attention_mask) -> (image_emb, text_emb, logit multiplier)``
    and ``loss(...)`` = the (label-guided) InfoNCE of those, with the label policy applied.

    Args:
        model: anything with ``encode_image``, ``encode_text``, ``logit_scale`` (its log) and,
            for ACE-LoRA, ``config.label_guided``.
        loss_fn: the loss module (default ``model.loss_fn``); the Trainer passes one that
            gathers features across ranks.
        label_guided: the label policy; default ``model.config.label_guided`` (True without one).

    One module around the model, so DDP sees every parameter used in its forward (the logit
    scale too).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module | None = None,
                 label_guided: bool | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn if loss_fn is not None else model.loss_fn
        if label_guided is None:
            label_guided = getattr(getattr(model, "config", None), "label_guided", True)
        self.label_guided = bool(label_guided)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None):
        # Named phases: NVTX / profiler ranges (no-ops unless one is on, and under compile).
        with phase("image_tower"):
            image = self.model.encode_image(images, normalize=True)
        with phase("text_tower"):
            text = self.model.encode_text(input_ids, attention_mask, normalize=True)
        return image, text, self.model.logit_scale.exp()

    def labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the loss sees: None (plain CLIP loss) unless the method is label-guided."""
        return labels if self.label_guided else None

    def loss(self, image_emb, text_emb, scale, labels=None) -> torch.Tensor:
        labels = self.labels(labels)
        if labels is not None:
            labels = labels.to(image_emb.device)
        with phase("loss"):
            return self.loss_fn(image_emb, text_emb, scale, labels)

    def step(self, images, input_ids, attention_mask=None, labels=None) -> dict[str, torch.Tensor]:
        """One forward of a training step: {"loss", "image_emb", "text_emb", "logit_scale"}."""
        image, text, scale = self(images, input_ids, attention_mask)
        return {"loss": self.loss(image, text, scale, labels), "image_emb": image, "text_emb": text,
                "logit_scale": scale}
