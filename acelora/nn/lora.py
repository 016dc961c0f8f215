"""LoRA on a merged q/k/v projection (DESIGN §4).

``LoRAQKV`` replaces one attention layer's q, k and v projections (timm's fused ``qkv`` Linear or
BERT's three Linears concatenated) by

    y = x Wᵀ + b + s · [B_q A_q x | B_k A_k x | B_v A_v x]       (dropout on x per q/k/v in training)

with W [3·d_out, d_in] and b frozen, A = [A_q; A_k; A_v] [3r, d_in] and B = [B_q; B_k; B_v]
[3·d_out, r] (the block-diagonal 3·d_out × 3r matrix stored without its zero blocks). The math runs
in ``acelora.ops.lora_qkv``, which picks the backend.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from acelora.ops.lora_qkv import lora_qkv


class LoRAQKV(nn.Module):
    """Frozen merged QKV projection plus a rank-``r`` adapter per q, k and v.

    Args:
        weight: [3·d_out, d_in] the frozen projection (copied).
        bias: [3·d_out] or None (copied).
        rank: r. scale: s (``cfg.lora_scale``). dropout: p of the dropout on the adapter input.
        backend: passed to ``acelora.ops.lora_qkv``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int = 4,
                 scale: float = 0.5, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if weight.dim() != 2 or weight.shape[0] % 3:
            raise ValueError(f"weight must be [3*d_out, d_in], got {tuple(weight.shape)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        d_out3, d_in = weight.shape
        self.in_features, self.out_features, self.rank = d_in, d_out3 // 3, int(rank)
        self.scale, self.dropout, self.backend = float(scale), float(dropout), backend
        # Frozen base: parameters (so they live in state_dict and .to()) without gradients.
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        dd = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(3 * rank, d_in, **dd))
        self.lora_B = nn.Parameter(torch.empty(3 * self.out_features, rank, **dd))
        self.merged = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, qkv: nn.Linear, **kwargs) -> "LoRAQKV":
        """From timm's fused ``qkv`` Linear."""
        return cls(qkv.weight, qkv.bias, **kwargs)

    @classmethod
    def from_linears(cls, q: nn.Linear, k: nn.Linear, v: nn.Linear, **kwargs) -> "LoRAQKV":
        """From separate q/k/v Linears (BERT): weights and biases concatenated in q, k, v order."""
        biases = [m.bias for m in (q, k, v)]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise ValueError("q, k and v must all have a bias or none")
        weight = torch.cat([q.weight, k.weight, v.weight]).detach()
        bias = None if biases[0] is None else torch.cat(biases).detach()
        return cls(weight, bias, **kwargs)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before resetting the adapter")
        # kaiming-uniform(a=√5) per q/k/v block, as nn.Linear (and peft) initialise A; B = 0 so the
        # layer starts as the base layer.
        for block in self.lora_A.chunk(3):   # fan_in = d_in for each [r, d_in] block
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s · blockdiag(B) · A, the [3·d_out, d_in] update that merge() adds to W."""
        r, d = self.rank, self.out_features
        a = self.lora_A.view(3, r, self.in_features).double()
        b = self.lora_B.view(3, d, r).double()
        return (self.scale * torch.bmm(b, a)).reshape(3 * d, self.in_features)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into W: inference then costs exactly the base projection."""
        if not self.merged:
            self.weight.copy_((self.weight.double() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.double() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise RuntimeError("LoRAQKV is merged (inference only): call unmerge() before training")
            return F.linear(x, self.weight, self.bias)
        return lora_qkv(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale,
                        dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features=3x{self.out_features}, "
                f"rank={self.rank}, scale={self.scale:.4g}, dropout={self.dropout}, "
                f"backend={self.backend!r}, merged={self.merged}")
