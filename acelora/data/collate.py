"""Batching: image–text pairs (with tokenisation) and classification items."""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch


def _ids(batch: Sequence[dict]) -> list[str]:
    # Datasets name items by "id" (and "path"); either is enough to trace a sample.
    return [str(item.get("id", item.get("path", i))) for i, item in enumerate(batch)]


def _takes_context_length(tokenizer: Callable) -> bool:
    try:
        params = inspect.signature(tokenizer).parameters
    except (TypeError, ValueError):
        return False
    return "context_length" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _stack_images(batch: Sequence[dict]) -> torch.Tensor:
    shapes = {tuple(item["image"].shape) for item in batch}
    if len(shapes) != 1:
        raise ValueError(f"images of one batch differ in shape {sorted(shapes)}; use a transform "
                         "with a fixed output size (e.g. biomedclip_transform)")
    return _stack([item["image"] for item in batch])


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack, done by NumPy for plain CPU tensors: a single-threaded copy. torch's
    multi-threaded copy of a batch of images can be 100x slower on a busy CPU (the main process
    of a DataLoader without workers pays it)."""
    if all(t.device.type == "cpu" and not t.requires_grad for t in tensors):
        return torch.from_numpy(np.stack([t.numpy() for t in tensors]))
    return torch.stack(list(tensors))


class ImageTextCollator:
    """Items of :class:`MimicCXRDataset` / :class:`SyntheticCXRPairs` (any ``image/text[/labels]``
    dicts) → one batch.

    ``tokenizer(texts[, context_length]) -> dict(input_ids [B, L], attention_mask [B, L])``
    padded to the batch's longest (``model.tokenizer``); ``context_length`` (default: the
    tokenizer's own) is passed on when the tokenizer takes it, and longer output is cut to it.
    Output: ``dict(images [B,3,H,W], input_ids, attention_mask, labels [B,14] (when the items
    have labels), ids list[str], paths list[str] (when the items have paths))``.
    """

    def __init__(self, tokenizer: Callable, context_length: int | None = None):
        if context_length is not None and int(context_length) < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.context_length = None if context_length is None else int(context_length)
        self._pass_length = self.context_length is not None and _takes_context_length(tokenizer)

    def __call__(self, batch: Sequence[dict]) -> dict:
        if not batch:
            raise ValueError("empty batch")
        missing = [key for key in ("image", "text") if key not in batch[0]]
        if missing:
            raise KeyError(f"items lack {missing} (have {sorted(batch[0])}); ImageTextCollator "
                           "needs image-text pairs")
        texts = [item["text"] for item in batch]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"empty or non-string report text at batch position(s) {bad}")
        if self._pass_length:
            tokens = self.tokenizer(texts, context_length=self.context_length)
        else:
            tokens = self.tokenizer(texts)
        for key in ("input_ids", "attention_mask"):
            if key not in tokens:
                raise KeyError(f"tokenizer output lacks {key!r} (has {sorted(tokens)})")
        input_ids = torch.as_tensor(tokens["input_ids"], dtype=torch.long)
        attention_mask = torch.as_tensor(tokens["attention_mask"], dtype=torch.long)
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2 or input_ids.shape[0] != len(batch):
            raise ValueError(f"tokenizer returned input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} for {len(batch)} texts; expected [B, L] each")
        if self.context_length is not None:
            input_ids = input_ids[:, :self.context_length]
            attention_mask = attention_mask[:, :self.context_length]
        out = {
            "images": _stack_images(batch),
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask.contiguous(),
            "ids": _ids(batch),
        }
        if "path" in batch[0]:
            out["paths"] = [str(item.get("path", "")) for item in batch]
        if "labels" in batch[0]:
            out["labels"] = torch.stack([torch.as_tensor(item["labels"], dtype=torch.float32)
                                         for item in batch])
        return out


def classification_collate(batch: Sequence[dict]) -> dict:
    """Classification/detection/segmentation items → ``dict(images, labels, ids[, boxes list]
    [, masks [B,H,W]])``; boxes stay a list because their count varies per image."""
    if not batch:
        raise ValueError("empty batch")
    out = {"images": _stack_images(batch), "ids": _ids(batch)}
    if "path" in batch[0]:
        out["paths"] = [str(item.get("path", "")) for item in batch]
    if "label" in batch[0]:  # the class id; also under "labels" unless items carry multi-hot ones
        out["label"] = torch.tensor([int(item["label"]) for item in batch], dtype=torch.long)
        out["labels"] = out["label"]
    if "labels" in batch[0]:
        out["labels"] = torch.stack([item["labels"] for item in batch])
    if "boxes" in batch[0]:
        out["boxes"] = [item["boxes"] for item in batch]
    if "mask" in batch[0]:
        out["masks"] = _stack([item["mask"] for item in batch])
    return out
