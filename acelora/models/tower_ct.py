"""CT-CLIP's towers (DESIGN §12, §13): the CTViT image tower and the CXR-BERT text tower.

The text tower is :class:`~acelora.models.tower_text.HFBertTower` over CT-CLIP's
``text_transformer`` with ``to_text_latent`` (CLS pooled, as CT-CLIP pools).

The image tower, :class:`CTViTTower`, runs CTViT, pools its tokens as CT-CLIP does (v2: mean over
depth, flattened) and projects with ``to_visual_latent``. CTViT has **no global token**: the
latent comes from all ``h·w·dim`` pooled features at once, so there is no token whose attention
row an ACE-HGNN could read and no per-token projection. The tower's output therefore holds one
token, the pooled latent (N = 1), and ACE-HGNN on CT is not offered (asking for a row is an
error).

LoRA (the ``ctvit-cosine-attention`` adapter in ``acelora.models.attention_adapters``): CTViT's
attention computes ``q = to_q(norm(x))`` and ``k, v = to_kv(x)``: two projections with different
inputs (normalised vs raw tokens) and widths (inner vs 2·inner). We **compose** rather than extend
the fused LoRA-QKV op: ``to_q`` gets a one-block :class:`~acelora.nn.lora.LoRALinear`, ``to_kv`` a
two-block one (independent k and v adapters and dropout masks), sharing initialisation, merge and
delta code with ``LoRAQKV`` through :class:`~acelora.nn.lora.BlockLoRA`. Why: the fused op's gain is
one GEMM over one input for all of q, k and v; with two inputs that gain does not exist (the base
already runs two GEMMs), and extending it would add a second input to its autograd function and to
its C++ and CUDA kernels for one architecture, with nothing to win. The q/k/v of CXR-BERT keep
``LoRAQKV``.

The vector quantiser: after it, the image latent is piecewise constant in the LoRA weights (a
small change of a token rarely changes its nearest code). ``quantizer="straight-through"`` (the
default, CT-CLIP's own training) passes the gradient to the pre-quantiser tokens unchanged in
training mode; ``"bypass"`` pools the continuous tokens instead (a documented deviation from
CT-CLIP, method-config field ``ct_quantizer``). The codebook is frozen either way.
"""
from __future__ import annotations

import torch
from torch import nn

from acelora.config import CT_QUANTIZER_MODES
from acelora.models.ctvit import CTViT
from acelora.models.towers import ImageTower, TowerOutput


def is_ctclip(model: nn.Module) -> bool:
    """A CT-CLIP base (``acelora.models.ctclip.CTCLIP`` or one with its module names)."""
    return (isinstance(getattr(model, "visual_transformer", None), CTViT)
            and hasattr(model, "to_visual_latent") and hasattr(model, "text_transformer"))


class CTViTTower(ImageTower):
    """CTViT -> (quantiser) -> CT-CLIP's pooling -> ``to_visual_latent``; inputs ``[B, 1, D, H, W]``."""

    name = "ctvit"
    has_global_token = False

    def __init__(self, model: nn.Module, quantizer: str = "straight-through"):
        if not is_ctclip(model):
            raise TypeError("not a CT-CLIP model (visual_transformer: CTViT, to_visual_latent, "
                            "text_transformer)")
        self.model, self.vit = model, model.visual_transformer
        self.quantizer = quantizer

    @property
    def quantizer(self) -> str:
        return self._quantizer

    @quantizer.setter
    def quantizer(self, mode: str) -> None:
        if mode not in CT_QUANTIZER_MODES:
            raise ValueError(f"ct_quantizer must be one of {CT_QUANTIZER_MODES}, got {mode!r}")
        self._quantizer = mode

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_ctclip(model)

    def attention_slots(self):
        # layers[i] = [PEG, attention, None, feed-forward]: the attention is child "1".
        return [(layer, "1") for transformer in (self.vit.enc_spatial_transformer,
                                                 self.vit.enc_temporal_transformer)
                for layer in transformer.layers]

    # ------------------------------------------------------------------ shapes
    @property
    def image_size(self) -> int:
        return int(self.vit.image_size[0])

    @property
    def patch_size(self) -> int:
        return int(self.vit.patch_size)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of the volumes the tower takes (what CTPreprocess must produce)."""
        return tuple(self.model.volume_shape)

    def describe(self) -> dict:
        cfg = self.vit.config
        return {"tower": self.name, "image_size": self.image_size, "patch_size": self.patch_size,
                "temporal_patch_size": int(cfg.temporal_patch_size), "width": int(cfg.dim),
                "depth": len(self.attention_slots()), "heads": int(cfg.heads),
                "volume_shape": list(self.volume_shape), "codebook_size": int(cfg.codebook_size),
                "pooling": str(self.model.config.pooling)}

    def hashed_tensors(self):
        # The patch embedding and the codebook: frozen, small, distinctive of the weights (the
        # v2 latent projection has 151 M values: too many to hash at every save).
        return {"patch_embed": self.vit.to_patch_emb[2].weight, "codebook": self.vit.vq.codebook}

    def check_images(self, volumes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        shape = tuple(volumes.shape) if torch.is_tensor(volumes) else type(volumes).__name__
        if not torch.is_tensor(volumes) or volumes.dim() != 5 or volumes.shape[1] != self.vit.config.channels:
            raise ValueError(f"CT volumes must be a [B, 1, D, H, W] tensor, got {shape}")
        if tuple(volumes.shape[2:]) != self.volume_shape:
            raise ValueError(f"volumes are {tuple(volumes.shape[2:])} (D, H, W), the model takes "
                             f"{self.volume_shape}: preprocess them with the model's CTPreprocess "
                             "(model.preprocess)")
        return volumes.to(device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------ forward
    def tokens(self, volumes: torch.Tensor) -> torch.Tensor:
        """``[B, T, h, w, dim]``: quantised (straight-through in training) unless bypassed."""
        x = self.check_images(volumes, self.vit.to_patch_emb[2].weight)
        tokens = self.vit.forward_features(x)
        if self.vit.use_quantizer and self.quantizer != "bypass":
            tokens, _ = self.vit.vq(tokens)
        return tokens

    def pooled(self, volumes: torch.Tensor) -> torch.Tensor:
        """``[B, dim_latent]``: CT-CLIP's image latent (not normalised)."""
        return self.model.to_visual_latent(self.model.pool(self.tokens(volumes)))

    def __call__(self, volumes: torch.Tensor, row_mode: str | None = None) -> TowerOutput:
        if row_mode is not None:
            raise ValueError("CTViT has no global token, so it has no attention row: ACE-HGNN is "
                             "not offered on CT-CLIP (use the medct preset, or hgnn: false)")
        return TowerOutput(self.pooled(volumes)[:, None])
