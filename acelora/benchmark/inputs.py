"""Synthetic benchmark inputs: images, report-like texts and CheXpert-style labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_WORDS = ("the lungs are clear there is no focal consolidation pleural effusion or pneumothorax "
          "heart size is normal mild cardiomegaly is stable small left basilar atelectasis "
          "moderate pulmonary edema right lower lobe opacity concerning for pneumonia "
          "endotracheal tube terminates above the carina no acute cardiopulmonary process "
          "compared to prior study interval improvement of bibasilar opacities").split()


@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    texts: list[str]


def synthetic_texts(n: int, context_length: int, generator: torch.Generator) -> list[str]:
    """Report-like texts whose word counts spread over roughly 10–45 % of the context length."""
    lo = max(4, context_length // 10)
    hi = max(lo + 1, int(context_length * 0.45))
    lengths = torch.randint(lo, hi, (n,), generator=generator).tolist()
    picks = torch.randint(0, len(_WORDS), (sum(lengths),), generator=generator).tolist()
    texts, i = [], 0
    for length in lengths:
        texts.append(" ".join(_WORDS[j] for j in picks[i:i + length]) + ".")
        i += length
    return texts


def synthetic_labels(n: int, generator: torch.Generator, num_labels: int = 14) -> torch.Tensor:
    """Multi-hot CheXpert-style labels; about a third of the rows identical ("No Finding")."""
    labels = (torch.rand(n, num_labels, generator=generator) < 0.12).float()
    normal = torch.rand(n, generator=generator) < 0.35
    labels[normal] = 0.0
    labels[normal, 8] = 1.0  # CHEXPERT_FINDINGS[8] == "No Finding"
    return labels


def make_batch(model, batch_size: int, device: torch.device, fixed_length: bool, seed: int = 0) -> Batch:
    """A batch for ``model``; ``fixed_length`` pads every text to the full context length (the
    research code's configuration) instead of the batch's longest."""
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch_size, 3, size, size, generator=g)
    texts = synthetic_texts(batch_size, model.context_length, g)
    tok = model.tokenizer(texts, context_length=model.context_length)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if fixed_length and ids.shape[1] < model.context_length:
        pad = model.context_length - ids.shape[1]
        ids = F.pad(ids, (0, pad), value=model.pad_token_id)
        mask = F.pad(mask, (0, pad), value=0)
    return Batch(images.to(device), ids.to(device), mask.to(device),
                 synthetic_labels(batch_size, g).to(device), texts)
