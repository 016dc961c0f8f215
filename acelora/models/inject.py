"""Module swapping: put LoRA-QKV attention into the towers of an open_clip model, per instance.

No class is monkey-patched: each timm ``Attention`` / HF ``BertSelfAttention`` *instance* is
replaced by an ``acelora.nn.attention`` module that reuses its frozen submodules. The last block
of each tower is switched to capture its CLS attention row.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from acelora.config import ACELoRAConfig
from acelora.nn.attention import BertQKVSelfAttention, ViTAttention
from acelora.nn.lora import LoRAQKV


@dataclass
class InjectedLayers:
    """The swapped attention modules of each tower, in depth order."""
    image: list[nn.Module] = field(default_factory=list)
    text: list[nn.Module] = field(default_factory=list)

    def lora_modules(self) -> list[LoRAQKV]:
        return [m.qkv for m in self.image + self.text if isinstance(m.qkv, LoRAQKV)]


def vit_blocks(model: nn.Module):
    """The transformer blocks of an open_clip timm image tower."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    blocks = getattr(trunk, "blocks", None)
    if blocks is None or len(blocks) == 0 or not all(hasattr(b, "attn") for b in blocks):
        raise TypeError("the image tower must be an open_clip TimmModel over a timm VisionTransformer "
                        "(model.visual.trunk.blocks[i].attn)")
    return blocks


def bert_layers(model: nn.Module):
    """The encoder layers of an open_clip HF (BERT) text tower."""
    transformer = getattr(getattr(model, "text", None), "transformer", None)
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    if layers is None or len(layers) == 0 or not all(hasattr(lay, "attention") for lay in layers):
        raise TypeError("the text tower must be an open_clip HFTextEncoder over a BERT model "
                        "(model.text.transformer.encoder.layer[i].attention.self)")
    return layers


def _lora_kwargs(cfg: ACELoRAConfig) -> dict:
    return dict(rank=cfg.lora_rank, scale=cfg.lora_scale, dropout=cfg.lora_dropout,
                backend=cfg.backend)


def inject_adapters(model: nn.Module, cfg: ACELoRAConfig) -> InjectedLayers:
    """Swap every attention layer of both towers in place; returns the new modules.

    Towers listed in ``cfg.lora_towers`` get a ``LoRAQKV``; the others a frozen merged QKV
    Linear-equivalent (still SDPA, still capturing the CLS row). The last block of each tower
    captures its CLS attention (``cfg.image_cls_attn`` / ``cfg.text_cls_attn``) when ``cfg.hgnn``.
    """
    unknown = set(cfg.lora_towers) - {"image", "text"}
    if unknown:
        raise ValueError(f"lora_towers may hold 'image' and 'text', got {sorted(unknown)}")
    blocks, layers = vit_blocks(model), bert_layers(model)
    if any(isinstance(b.attn, ViTAttention) for b in blocks) or any(
            isinstance(lay.attention.self, BertQKVSelfAttention) for lay in layers):
        raise ValueError("this model already has acelora attention modules (inject_adapters ran twice)")

    out = InjectedLayers()
    for block in blocks:
        qkv = block.attn.qkv
        if not isinstance(qkv, nn.Linear):
            raise TypeError(f"ViT qkv must be an nn.Linear, got {type(qkv).__name__}")
        if "image" in cfg.lora_towers:
            qkv = LoRAQKV.from_linear(qkv, **_lora_kwargs(cfg))
        block.attn = ViTAttention(block.attn, qkv)
        out.image.append(block.attn)

    bert_cfg = model.text.transformer.config
    if getattr(bert_cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        # Our modules read BertModel's dense [B,1,L,L] mask; flash-style backends pass none.
        bert_cfg._attn_implementation = "sdpa"
    for layer in layers:
        sa = layer.attention.self
        if not all(isinstance(getattr(sa, n, None), nn.Linear) for n in ("query", "key", "value")):
            raise TypeError(f"{type(sa).__name__} is not a BERT self-attention with query/key/value")
        if "text" in cfg.lora_towers:
            qkv = LoRAQKV.from_linears(sa.query, sa.key, sa.value, **_lora_kwargs(cfg))
        else:
            qkv = _merged_linear(sa.query, sa.key, sa.value)
        layer.attention.self = BertQKVSelfAttention(sa, qkv)
        out.text.append(layer.attention.self)

    # Everything that came from the base stays frozen; only the adapters train.
    for m in out.image + out.text:
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    if cfg.hgnn:
        out.image[-1].capture_cls_attention(cfg.image_cls_attn)
        out.text[-1].capture_cls_attention(cfg.text_cls_attn)
    return out


def _merged_linear(q: nn.Linear, k: nn.Linear, v: nn.Linear) -> nn.Linear:
    """One frozen Linear computing [q | k | v] (the text tower without LoRA)."""
    import torch

    weight = torch.cat([q.weight, k.weight, v.weight]).detach()
    bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias]).detach()
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)
