"""How LoRA enters each attention architecture: one registry of attention adapters (DESIGN §12).

An adapter recognises one kind of attention module and builds its acelora replacement: the same
frozen projections with q/k/v merged into one ``LoRAQKV`` (or a frozen merged Linear for a tower
without LoRA), running on SDPA and able to return the global token's attention row. The registry
is searched in order and the first match wins (peft's dispatcher idea), so a new architecture is
one adapter class registered here plus its test against a plain-PyTorch reference.

No class is monkey-patched: each module *instance* is replaced in its parent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from acelora.nn.attention import BertQKVSelfAttention, MultiheadSelfAttention, ViTAttention
from acelora.nn.lora import BlockLoRA, LoRALinear, LoRAQKV

ACELORA_ATTENTION = (ViTAttention, BertQKVSelfAttention, MultiheadSelfAttention)


@dataclass(frozen=True)
class LoRASpec:
    """The LoRA of one tower: rank r, scale s, dropout p, op backend."""
    rank: int
    scale: float
    dropout: float = 0.0
    backend: str = "auto"

    def qkv(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LoRAQKV:
        return LoRAQKV(weight, bias, rank=self.rank, scale=self.scale, dropout=self.dropout,
                       backend=self.backend)

    def linear(self, linear: nn.Linear, n_blocks: int = 1) -> LoRALinear:
        """LoRA on one frozen Linear whose output is ``n_blocks`` projections (e.g. fused k|v)."""
        return LoRALinear(linear.weight, linear.bias, n_blocks=n_blocks, rank=self.rank,
                          scale=self.scale, dropout=self.dropout)


def frozen_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen Linear holding a copy of (weight, bias): the merged q/k/v of a tower without LoRA."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.detach())
        if bias is not None:
            lin.bias.copy_(bias.detach())
    return lin.requires_grad_(False)


def _merged(weight, bias, lora: LoRASpec | None) -> nn.Module:
    return frozen_linear(weight, bias) if lora is None else lora.qkv(weight, bias)


class AttentionAdapter:
    """Base class. ``matches(module)``: is this the architecture? ``inject(module, lora)``: the
    replacement module (``lora`` None: no adapter, still SDPA + attention row)."""

    name = ""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def inject(module: nn.Module, lora: LoRASpec | None) -> nn.Module:
        raise NotImplementedError


class TimmAttentionAdapter(AttentionAdapter):
    """timm ViT ``Attention``: one fused ``qkv`` Linear (d -> 3d)."""

    name = "timm-attention"

    @staticmethod
    def matches(module):
        return (isinstance(getattr(module, "qkv", None), nn.Linear) and hasattr(module, "num_heads")
                and hasattr(module, "head_dim") and hasattr(module, "proj"))

    @staticmethod
    def inject(module, lora):
        qkv = module.qkv if lora is None else lora.qkv(module.qkv.weight, module.qkv.bias)
        return ViTAttention(module, qkv)


class BertSelfAttentionAdapter(AttentionAdapter):
    """HF BERT self-attention: separate query/key/value Linears, concatenated in q, k, v order."""

    name = "bert-self-attention"

    @staticmethod
    def matches(module):
        return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
                and hasattr(module, "num_attention_heads"))

    @staticmethod
    def inject(module, lora):
        lins = (module.query, module.key, module.value)
        biases = [m.bias for m in lins]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("q, k and v must all have a bias or none")
        weight = torch.cat([m.weight for m in lins]).detach()
        bias = None if biases[0] is None else torch.cat(biases).detach()
        return BertQKVSelfAttention(module, _merged(weight, bias, lora))


class MultiheadAttentionAdapter(AttentionAdapter):
    """``nn.MultiheadAttention`` (open_clip's native blocks): fused ``in_proj_weight`` [3d, d]."""

    name = "torch-multihead-attention"

    @staticmethod
    def matches(module):
        return isinstance(module, nn.MultiheadAttention)

    @staticmethod
    def inject(module, lora):
        if module.in_proj_weight is None:
            raise ValueError("nn.MultiheadAttention with separate q/k/v weights is not supported")
        return MultiheadSelfAttention(module, _merged(module.in_proj_weight, module.in_proj_bias, lora))


class CTViTAttentionAdapter(AttentionAdapter):
    """CT-CLIP's cosine attention (``acelora.models.ctvit.CosineAttention``): ``to_q`` reads the
    normalised tokens, the fused ``to_kv`` (d -> 2·inner) the raw ones.

    Composed, not fused: ``to_q`` gets a one-block ``LoRALinear`` and ``to_kv`` a two-block one
    (independent k and v adapters and dropout masks), replaced in place inside the same attention
    module, which already runs on SDPA. The fused LoRA-QKV op needs one input for q, k and v;
    here there are two, and the base computes two GEMMs anyway (why: ``acelora.models.tower_ct``).
    CTViT has no global token, so there is no attention row to return. ``lora`` None leaves the
    module as it is.
    """

    name = "ctvit-cosine-attention"

    @staticmethod
    def matches(module):
        projections = (nn.Linear, BlockLoRA)
        return (isinstance(getattr(module, "to_q", None), projections)
                and isinstance(getattr(module, "to_kv", None), projections)
                and hasattr(module, "q_scale") and hasattr(module, "k_scale"))

    @staticmethod
    def inject(module, lora):
        if isinstance(module.to_q, BlockLoRA) or isinstance(module.to_kv, BlockLoRA):
            raise ValueError("this model already has acelora attention modules (injected twice)")
        if lora is not None:
            module.to_q = lora.linear(module.to_q, n_blocks=1)
            module.to_kv = lora.linear(module.to_kv, n_blocks=2)
        return module


ATTENTION_ADAPTERS: list[type[AttentionAdapter]] = [
    TimmAttentionAdapter, BertSelfAttentionAdapter, MultiheadAttentionAdapter, CTViTAttentionAdapter]


def register_attention_adapter(adapter: type[AttentionAdapter], first: bool = True) -> None:
    """Add an adapter (``first``: before the built-in ones, so it wins a tie)."""
    if adapter in ATTENTION_ADAPTERS:
        return
    ATTENTION_ADAPTERS.insert(0, adapter) if first else ATTENTION_ADAPTERS.append(adapter)


def find_attention_adapter(module: nn.Module) -> type[AttentionAdapter]:
    for adapter in ATTENTION_ADAPTERS:
        if adapter.matches(module):
            return adapter
    raise TypeError(f"no acelora attention adapter for {type(module).__module__}."
                    f"{type(module).__name__}; known: {[a.name for a in ATTENTION_ADAPTERS]}")


@dataclass
class InjectedLayers:
    """The replaced attention modules of each tower, in depth order."""
    image: list[nn.Module] = field(default_factory=list)
    text: list[nn.Module] = field(default_factory=list)

    def lora_modules(self) -> list[nn.Module]:
        """Every module holding ``lora_A``/``lora_B`` (LoRAQKV and friends), in tower order."""
        return [m for layer in self.image + self.text for m in layer.modules()
                if hasattr(m, "lora_A") and hasattr(m, "lora_B")]


def inject_attention(towers: dict, lora: dict[str, LoRASpec | None]) -> InjectedLayers:
    """Replace every attention module of each tower in place; freeze all but the adapters.

    ``towers``: {"image": ImageTower, "text": TextTower}; ``lora``: the spec per tower kind (None:
    that tower gets no LoRA but still SDPA and the attention row).
    """
    out = InjectedLayers()
    for kind, tower in towers.items():
        for parent, attr in tower.attention_slots():
            module = getattr(parent, attr)
            if isinstance(module, ACELORA_ATTENTION):
                raise ValueError("this model already has acelora attention modules (injected twice)")
            new = find_attention_adapter(module).inject(module, lora.get(kind))
            setattr(parent, attr, new)
            getattr(out, kind).append(new)
    # Everything that came from the base stays frozen; only the adapters train.
    for m in out.image + out.text:
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return out
