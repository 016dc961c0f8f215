"""What every evaluation shares: the model in inference form, text encoding, and batches that
count (instead of crash on) images that fail to decode."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from acelora.data._common import DataError, check_on_error

logger = logging.getLogger("acelora.eval")


# --- the model ----------------------------------------------------------------------------

def model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def logit_scale(model) -> torch.Tensor:
    """The logit multiplier: ``exp`` of the model's log-space ``logit_scale`` parameter."""
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise AttributeError(f"{type(model).__name__} has no logit_scale")
    if callable(scale) and not isinstance(scale, torch.Tensor):
        scale = scale()
    return torch.as_tensor(scale).detach().float().exp()


def _is_merged(model) -> bool:
    value = getattr(model, "merged", None)
    return value if isinstance(value, bool) else False


def _merge_methods(model):
    """``(merge, unmerge)`` of a model with LoRA adapters, or None for a model without."""
    merge, unmerge = getattr(model, "merge", None), getattr(model, "unmerge", None)
    if callable(merge) and callable(unmerge) and isinstance(getattr(model, "merged", None), bool):
        return merge, unmerge
    return None


@contextlib.contextmanager
def inference_model(model: torch.nn.Module, merge: bool = True):
    """``model`` in eval mode and, with ``merge``, its LoRA adapters folded into the frozen weights
    (exactly the base model's cost); both undone on exit."""
    was_training = model.training
    model.eval()
    methods = _merge_methods(model) if merge else None
    merged_here = False
    if methods is not None and not _is_merged(model):
        methods[0]()
        merged_here = True
    try:
        yield model
    finally:
        if merged_here:
            methods[1]()
        model.train(was_training)


def _tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise AttributeError(f"{type(model).__name__} has no tokenizer; zero-shot evaluation needs "
                             "model.tokenizer(texts) -> dict(input_ids, attention_mask)")
    return tokenizer


@torch.inference_mode()
def encode_texts(model, texts: Sequence[str], batch_size: int = 256,
                 device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised text embeddings [T, D] (float32) of ``texts``, through the whole text tower
    (LoRA and HGNN refinement included)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("no texts to encode")
    device = device or model_device(model)
    tokenizer = _tokenizer(model)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start:start + batch_size]))
        ids = torch.as_tensor(tokens["input_ids"], dtype=torch.long, device=device)
        mask = tokens.get("attention_mask")
        mask = torch.as_tensor(mask, dtype=torch.long, device=device) if mask is not None else None
        out.append(model.encode_text(ids, attention_mask=mask, normalize=True).float())
    return check_finite_embeddings(F.normalize(torch.cat(out), dim=-1), "text")


@torch.inference_mode()
def encode_images(model, images: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised global embeddings [B, D] (float32) of images [B, 3, H, W] or, for a 3D
    image tower, of CT volumes [B, 1, D, H, W]."""
    device = device or model_device(model)
    if not ((images.ndim == 4 and images.shape[1] == 3) or (images.ndim == 5 and images.shape[1] == 1)):
        raise ValueError(f"images must be [B, 3, H, W] (or volumes [B, 1, D, H, W]), got shape "
                         f"{tuple(images.shape)}")
    emb = model.encode_image(images.to(device, non_blocking=True), normalize=True)
    return check_finite_embeddings(F.normalize(emb.float(), dim=-1), "image")


def check_finite_embeddings(emb: torch.Tensor, what: str) -> torch.Tensor:
    """``emb``, or FloatingPointError when any value is NaN/Inf: scores computed from such
    embeddings (argmax of NaN picks class 0) would look like numbers but mean nothing."""
    if not bool(torch.isfinite(emb).all()):
        bad = int((~torch.isfinite(emb)).any(-1).sum()) if emb.ndim > 1 else 1
        raise FloatingPointError(f"the model produced non-finite {what} embeddings ({bad} of "
                                 f"{emb.shape[0]} rows): its weights have diverged or are damaged")
    return emb


def encode_volumes(model, volumes: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """L2-normalised global embeddings [B, D] (float32) of CT volumes [B, 1, D, H, W]."""
    if volumes.ndim != 5 or volumes.shape[1] != 1:
        raise ValueError(f"volumes must be [B, 1, D, H, W], got shape {tuple(volumes.shape)}")
    return encode_images(model, volumes, device)


# --- batches ------------------------------------------------------------------------------

class _Guarded(Dataset):
    """``dataset[i]``, or a marker naming the error when the image cannot be decoded."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except DataError as exc:
            return {"_error": str(exc), "_index": index}


def _collate(items: list[dict]):
    from acelora.data.collate import classification_collate

    good = [item for item in items if "_error" not in item]
    errors = [(item["_index"], item["_error"]) for item in items if "_error" in item]
    return (classification_collate(good) if good else None), errors


class SkipCounter:
    """Items that failed to decode during one evaluation: how many, and the first few reasons."""

    def __init__(self, keep: int = 10):
        self.count = 0
        self.examples: list[str] = []
        self.keep = keep

    def add(self, errors: list[tuple[int, str]]) -> None:
        for _, message in errors:
            self.count += 1
            if len(self.examples) < self.keep:
                self.examples.append(message)

    def report(self, dataset) -> dict:
        """Skips of this run plus those the dataset itself recorded (indexing, its own skip mode)."""
        own = int(getattr(dataset, "skipped", 0) or 0)
        if self.count:
            logger.warning("skipped %d item(s) that could not be read, e.g. %s", self.count,
                           self.examples[0])
        return {"skipped": self.count + own, "skipped_examples": list(self.examples)}


def iterate_batches(dataset, batch_size: int = 64, num_workers: int = 0, on_error: str = "skip",
                    skips: SkipCounter | None = None) -> Iterator[dict]:
    """Batches of ``dataset`` (``classification_collate`` format). An item whose image cannot be
    decoded raises (``on_error="raise"``) or is left out and counted in ``skips``."""
    check_on_error(on_error)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError(f"{type(dataset).__name__} is empty")
    loader = DataLoader(_Guarded(dataset), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers, collate_fn=_collate,
                        pin_memory=False, persistent_workers=False)
    for batch, errors in loader:
        if errors:
            if on_error == "raise":
                raise DataError(errors[0][1])
            if skips is not None:
                skips.add(errors)
        if batch is not None:
            yield batch


def resolve_device(model, device) -> torch.device:
    """``device`` if given (the model is moved there), else the model's own device."""
    if device is None:
        return model_device(model)
    device = torch.device(device)
    model.to(device)
    return device
