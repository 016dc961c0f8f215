"""A small stand-in for the model contract (encode_image / encode_text / encode_image_tokens,
tokenizer, logit_scale, merge/unmerge) and in-memory datasets, so the evaluation code is tested
without the real towers. The fake's image embedding goes through a LoRA-like side branch that
``merge()`` folds into the weight, and counts how often the side branch runs."""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from acelora.data._common import DataError
from acelora.testing import pad_token_rows


class FakeTokenizer:
    vocab = 97

    def __call__(self, texts, context_length=None):
        if isinstance(texts, str):
            texts = [texts]
        rows = [[1] + [2 + zlib.crc32(w.lower().encode()) % (self.vocab - 2) for w in t.split()]
                for t in texts]
        return pad_token_rows(rows)


class FakeCLIP(nn.Module):
    image_size = 32
    patch_size = 8
    embed_dim = 16
    context_length = 32

    def __init__(self, seed: int = 0, lora: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        d = self.embed_dim
        self.tokenizer = FakeTokenizer()
        self.patch = nn.Conv2d(3, d, self.patch_size, self.patch_size)
        with torch.no_grad():
            self.patch.weight.copy_(torch.randn(self.patch.weight.shape, generator=gen) * 0.2)
            self.patch.bias.zero_()
        self.proj = nn.Parameter(torch.randn(d, d, generator=gen) / math.sqrt(d))
        self.word = nn.Parameter(torch.randn(FakeTokenizer.vocab, d, generator=gen))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.has_lora = lora
        if lora:
            self.lora_A = nn.Parameter(torch.randn(2, d, generator=gen) * 0.3)
            self.lora_B = nn.Parameter(torch.randn(d, 2, generator=gen) * 0.3)
        self.merged = False
        self.lora_calls = 0

    # --- LoRA-like side branch
    def merge(self):
        if self.has_lora and not self.merged:
            with torch.no_grad():
                self.proj += self.lora_B @ self.lora_A
        self.merged = True

    def unmerge(self):
        if self.has_lora and self.merged:
            with torch.no_grad():
                self.proj -= self.lora_B @ self.lora_A
        self.merged = False

    def _project(self, x):
        out = x @ self.proj.T
        if self.has_lora and not self.merged:
            self.lora_calls += 1
            out = out + (x @ self.lora_A.T) @ self.lora_B.T
        return out

    # --- the contract
    def _grid(self, images):
        return self.patch(images).flatten(2).transpose(1, 2)            # [B, g*g, D]

    def encode_image_tokens(self, images):
        grid = self._grid(images)
        tokens = torch.cat([grid.mean(1, keepdim=True), grid], dim=1)
        return F.normalize(self._project(tokens), dim=-1)

    def encode_image(self, images, normalize=True):
        out = self._project(self._grid(images).mean(1))
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        m = attention_mask.unsqueeze(-1).float()
        out = (self.word[input_ids] * m).sum(1) / m.sum(1)
        return F.normalize(out, dim=-1) if normalize else out


class TensorItems(Dataset):
    """Items from lists; ``bad`` indices raise DataError as an undecodable image would."""

    def __init__(self, images, bad=(), classes=None, **fields):
        self.images = images
        self.fields = fields
        self.bad = set(bad)
        if classes is not None:
            self.classes = list(classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i in self.bad:
            raise DataError(f"cannot read image item{i}.png: corrupt")
        item = {"image": self.images[i], "id": f"item{i}"}
        for key, values in self.fields.items():
            item[key] = values[i]
        return item
