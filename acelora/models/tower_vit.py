"""Image towers: a timm ViT inside open_clip's ``TimmModel`` (BiomedCLIP) and open_clip's native
``VisionTransformer`` (ViT-B-32, ViT-L-14, QuiltNet, BMC-CLIP, ...). The global token is the CLS
token at index 0 in both."""
from __future__ import annotations

import torch
from torch import nn

from acelora.models.towers import ImageTower, TowerOutput, run_blocks


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


class TimmViTTower(ImageTower):
    """``visual.trunk`` = timm ``VisionTransformer`` with token pooling; ``visual.head`` projects."""

    name = "timm-vit"

    def __init__(self, visual: nn.Module):
        trunk = getattr(visual, "trunk", None)
        blocks = getattr(trunk, "blocks", None)
        if blocks is None or len(blocks) == 0 or not all(hasattr(b, "attn") for b in blocks):
            raise TypeError("the image tower must be an open_clip TimmModel over a timm "
                            "VisionTransformer (visual.trunk.blocks[i].attn)")
        if getattr(trunk, "global_pool", "token") != "token" or getattr(trunk, "num_prefix_tokens", 1) != 1:
            raise ValueError("only timm ViTs pooled on a single CLS token are supported "
                             f"(global_pool={getattr(trunk, 'global_pool', None)!r})")
        if not isinstance(getattr(trunk, "fc_norm", nn.Identity()), nn.Identity):
            raise ValueError("timm ViTs with an fc_norm after pooling are not supported (the CLS "
                             "token would not equal the pooled embedding)")
        self.visual, self.trunk = visual, trunk

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        return hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks")

    def attention_slots(self):
        return [(b, "attn") for b in self.trunk.blocks]

    @property
    def image_size(self) -> int:
        return _pair0(self.visual.image_size)

    @property
    def patch_size(self) -> int:
        return _pair0(self.trunk.patch_embed.patch_size)

    def describe(self) -> dict:
        return {"tower": self.name, "image_size": self.image_size, "patch_size": self.patch_size,
                "width": int(self.trunk.embed_dim), "depth": len(self.trunk.blocks),
                "heads": int(self.trunk.blocks[0].attn.num_heads)}

    def hashed_tensors(self):
        return {"patch_embed": self.trunk.patch_embed.proj.weight,
                "image_proj": self.visual.head.proj.weight}

    def _features(self, images, row_mode):
        t = self.trunk
        x = t.patch_embed(self.check_images(images, t.patch_embed.proj.weight))
        x = t.norm_pre(t.patch_drop(t._pos_embed(x)))
        x = run_blocks(t.blocks[:-1], x, bool(getattr(t, "grad_checkpointing", False)))
        last = t.blocks[-1]
        attn = last.attn
        if row_mode is None or not hasattr(attn, "forward_with_row"):
            if row_mode is not None:
                raise RuntimeError("the attention row needs acelora attention modules in the tower")
            x, row = last(x), None
        else:
            a, row = attn.forward_with_row(last.norm1(x), row_mode)
            x = x + last.drop_path1(last.ls1(a))
            x = x + last.drop_path2(last.ls2(last.mlp(last.norm2(x))))
        return t.norm(x), row

    def __call__(self, images, row_mode=None) -> TowerOutput:
        x, row = self._features(images, row_mode)
        return TowerOutput(self.visual.head(x), None if row is None else row[:, 1:], None)

    def pooled(self, images):
        x, _ = self._features(images, None)
        return self.visual.head(self.trunk.forward_head(x))


class OpenCLIPViTTower(ImageTower):
    """open_clip's native ``VisionTransformer``: conv patches, CLS + learned positions, ln_pre,
    residual blocks with ``nn.MultiheadAttention``, ln_post, ``proj`` on the CLS token."""

    name = "open_clip-vit"

    def __init__(self, visual: nn.Module):
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(visual, "conv1"):
            raise TypeError("not an open_clip VisionTransformer (visual.conv1, visual.transformer.resblocks)")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip ViTs with attentional pooling (CoCa) are not supported")
        if getattr(visual, "pool_type", "tok") != "tok" or getattr(visual, "final_ln_after_pool", False):
            raise ValueError(f"only open_clip ViTs pooled on the CLS token are supported "
                             f"(pool_type={getattr(visual, 'pool_type', None)!r})")
        if not all(isinstance(getattr(b, "attn", None), nn.MultiheadAttention) or
                   hasattr(getattr(b, "attn", None), "forward_with_row") for b in blocks):
            raise ValueError("open_clip ViTs with custom attention blocks (qk-norm, scaled cosine "
                             "attention) are not supported")
        self.visual = visual

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        return hasattr(visual, "conv1") and hasattr(getattr(visual, "transformer", None), "resblocks")

    def attention_slots(self):
        return [(b, "attn") for b in self.visual.transformer.resblocks]

    @property
    def image_size(self) -> int:
        return _pair0(self.visual.image_size)

    @property
    def patch_size(self) -> int:
        return _pair0(self.visual.patch_size)

    def describe(self) -> dict:
        blocks = self.visual.transformer.resblocks
        return {"tower": self.name, "image_size": self.image_size, "patch_size": self.patch_size,
                "width": int(self.visual.transformer.width), "depth": len(blocks),
                "heads": int(blocks[0].attn.num_heads)}

    def hashed_tensors(self):
        return {"patch_embed": self.visual.conv1.weight, "image_proj": self.visual.proj}

    def _features(self, images, row_mode):
        v = self.visual
        x = v._embeds(self.check_images(images, v.conv1.weight))
        blocks = v.transformer.resblocks
        x = run_blocks(blocks[:-1], x, bool(v.transformer.grad_checkpointing))
        last = blocks[-1]
        if row_mode is None:
            x, row = last(x), None
        else:
            if not hasattr(last.attn, "forward_with_row"):
                raise RuntimeError("the attention row needs acelora attention modules in the tower")
            a, row = last.attn.forward_with_row(last.ln_1(x), row_mode)
            x = x + last.ls_1(a)
            x = x + last.ls_2(last.mlp(last.ln_2(x)))
        return v.ln_post(x), row

    def _project(self, x):
        return x @ self.visual.proj if self.visual.proj is not None else x

    def __call__(self, images, row_mode=None) -> TowerOutput:
        x, row = self._features(images, row_mode)
        return TowerOutput(self._project(x), None if row is None else row[:, 1:], None)

    def pooled(self, images):
        x, _ = self._features(images, None)
        return self._project(x[:, 0])


IMAGE_TOWERS = (TimmViTTower, OpenCLIPViTTower)


def image_tower(model: nn.Module) -> ImageTower:
    """The image tower of a base model: CT-CLIP's CTViT, or the ViT of an open_clip model (the
    model or its ``model.visual``; first matching type)."""
    from acelora.models.tower_ct import CTViTTower, is_ctclip

    if is_ctclip(model):
        return CTViTTower(model)
    visual = getattr(model, "visual", model)
    for cls in IMAGE_TOWERS:
        if cls.matches(visual):
            return cls(visual)
    raise ValueError(f"unsupported image tower {type(visual).__name__}: acelora supports ViT towers "
                     "(timm ViT in open_clip, open_clip's native VisionTransformer) and CT-CLIP's "
                     "CTViT; ResNet, "
                     "ConvNeXt and other families are not supported")
