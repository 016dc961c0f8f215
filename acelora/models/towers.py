"""Towers: one interface over the two sides of every CLIP-like model (DESIGN §12).

A tower, in one call, returns a ``TowerOutput``: the projected tokens with the global token at
index 0, that token's attention row of the last block (only that row computed; the rest runs on
SDPA) and the key-padding mask. HGNN, zero-shot and dense heads read only this; nothing is stashed
on modules. A tower is a plain object over submodules of the base model (it owns no parameters,
so the base's state-dict keys and ``.to()`` are unchanged).

Where padding is decided: ``TextTower.fit`` is the one place (pad to the context for the
``official`` preset, pad up to the vertices the HGNN needs, trim micro-batches) and
``TextTower.vertex_padding`` the one rule for which positions are HGNN vertices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class TowerOutput:
    """What a tower hands to the HGNN and the heads.

    tokens:   [B, N, D] projected (not normalised); index 0 is the global token.
    cls_attn: [B, N-1] float32 attention of the global token over tokens 1..N-1 in the last block
              (heads averaged), or None when not asked for.
    padding:  [B, N] bool, True where a position is not an HGNN vertex, or None (all are).
    """
    tokens: torch.Tensor
    cls_attn: torch.Tensor | None = None
    padding: torch.Tensor | None = None

    @property
    def global_token(self) -> torch.Tensor:
        return self.tokens[:, 0]


@dataclass(frozen=True)
class PaddingPolicy:
    """How a text tower treats padding (decided once, by the model's config).

    as_vertices: padded positions are HGNN vertices and the text is padded to the full context
        (the ``official`` preset: the released checkpoint always saw fixed-length padding).
    min_vertices: a text with fewer real tokens borrows its first padded positions so every
        hyperedge can be built (k + 2 with an HGNN, 0 without).
    """
    as_vertices: bool = False
    min_vertices: int = 0


def run_blocks(blocks, x: torch.Tensor, checkpointing: bool, **kwargs) -> torch.Tensor:
    """Every block but the last, under activation checkpointing when the base asks for it."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False, **kwargs)
        else:
            x = blk(x, **kwargs)
        if isinstance(x, tuple):  # transformers 4.x layers return tuples
            x = x[0]
    return x


class Tower:
    """Base class: a tower of ``base``. Subclasses set ``kind`` and implement the methods."""

    kind: str = ""          # "image" | "text"
    name: str = ""          # registry name of the architecture

    def attention_slots(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every attention module, in depth order."""
        raise NotImplementedError

    def attention_modules(self) -> list[nn.Module]:
        return [getattr(parent, attr) for parent, attr in self.attention_slots()]

    def describe(self) -> dict:
        """Numbers that define the architecture (adapter fingerprints); works on meta."""
        raise NotImplementedError

    def hashed_tensors(self) -> dict[str, torch.Tensor]:
        """A few frozen tensors LoRA never touches (adapter fingerprints)."""
        raise NotImplementedError

    @property
    def width(self) -> int:
        return int(self.describe()["width"])

    @property
    def depth(self) -> int:
        return len(self.attention_slots())


class ImageTower(Tower):
    kind = "image"

    def __call__(self, images: torch.Tensor, row_mode: str | None = None) -> TowerOutput:
        raise NotImplementedError

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D]: the base model's own global embedding (only that token projected)."""
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        raise NotImplementedError

    def check_images(self, images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes "
                             f"{self.image_size}x{self.image_size}")
        return images.to(device=weight.device, dtype=weight.dtype)


class TextTower(Tower):
    kind = "text"
    padding_policy = PaddingPolicy()

    @property
    def context_length(self) -> int:
        raise NotImplementedError

    @property
    def pad_token_id(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def __call__(self, input_ids, attention_mask=None, row_mode: str | None = None) -> TowerOutput:
        raise NotImplementedError

    def pooled(self, input_ids, attention_mask=None) -> torch.Tensor:
        raise NotImplementedError

    # -------------------------------------------------------------- padding: the one place
    def check(self, input_ids, attention_mask):
        """Validated (input_ids, attention_mask) on the tower's device."""
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [B, L] tensor (use model.tokenizer(texts))")
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"input_ids have length {input_ids.shape[1]} > context length "
                             f"{self.context_length}")
        if attention_mask is None:
            attention_mask = self.default_mask(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids "
                             f"{tuple(input_ids.shape)} differ in shape")
        return input_ids.to(self.device), attention_mask.to(self.device).long()

    def default_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids != self.pad_token_id).long()

    def fit(self, input_ids, attention_mask, trim: bool = False):
        """Pad (or, with ``trim``, cut) a batch to the length the padding policy wants.

        ``official`` (padding as vertices): the full context length, so an embedding does not
        depend on the other texts of its batch. Otherwise up to ``min_vertices`` at least; with
        ``trim`` also down to the batch's longest text (micro-batches of a split batch; this reads
        the lengths on the host, so it is only asked for where a sync already happens).
        """
        policy = self.padding_policy
        if policy.as_vertices:
            target = self.context_length
        else:
            target = max(policy.min_vertices, input_ids.shape[1])
            if trim:
                target = max(policy.min_vertices, int(attention_mask.sum(1).max()))
        if target < input_ids.shape[1]:
            return input_ids[:, :target], attention_mask[:, :target]
        short = target - input_ids.shape[1]
        if short > 0:
            input_ids = F.pad(input_ids, (0, short), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, short), value=0)
        return input_ids, attention_mask

    def vertex_padding(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """key_padding_mask of the HGNN (True = not a vertex), in the tower's token order.

        Branch-free (no `if too_short.any()`): that test would be a device->host sync every text
        forward on a GPU and a torch.compile graph break.
        """
        policy = self.padding_policy
        if policy.as_vertices:
            return None
        padding = attention_mask == 0
        need = policy.min_vertices
        too_short = (~padding).sum(1, keepdim=True) < need
        first = torch.arange(padding.shape[1], device=padding.device) < need
        return padding & ~(too_short & first)
