"""LoRA on frozen projections whose output splits into independent blocks (DESIGN §4, §13).

``LoRAQKV`` replaces one attention layer's q, k and v projections (timm's fused ``qkv`` Linear or
BERT's three Linears concatenated) by

    y = x Wᵀ + b + s · [B_q A_q x | B_k A_k x | B_v A_v x]       (dropout on x per q/k/v in training)

with W [3·d_out, d_in] and b frozen, A = [A_q; A_k; A_v] [3r, d_in] and B = [B_q; B_k; B_v]
[3·d_out, r] (the block-diagonal 3·d_out × 3r matrix stored without its zero blocks). The math runs
in ``acelora.ops.lora_qkv``, which picks the backend.

``LoRALinear`` is the same layer with ``n_blocks`` blocks (1: one projection; 2: CTViT's fused
``to_kv``), in plain PyTorch. It serves projections that do not share one input with the others:
CTViT's ``to_q`` reads the normalised tokens, its ``to_kv`` the raw ones, so they cannot be one
fused q/k/v op; composing two small layers keeps the fused op's kernels untouched (see
``acelora.models.tower_ct``). Both share :class:`BlockLoRA`: storage, initialisation, the delta
that ``merge()`` folds into W, and the merged-layer guard.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from acelora.ops.lora_qkv import lora_qkv


class BlockLoRA(nn.Module):
    """Frozen projection ``W [n·d_out, d_in]`` (+ ``b``) with one rank-``r`` adapter per output
    block: ``lora_A [n·r, d_in]`` (blocks stacked), ``lora_B [n·d_out, r]``. Subclasses set
    ``n_blocks`` and implement :meth:`adapted` (the unmerged forward)."""

    n_blocks = 1

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int = 4,
                 scale: float = 0.5, dropout: float = 0.0):
        super().__init__()
        n = self.n_blocks
        if weight.dim() != 2 or weight.shape[0] % n:
            raise ValueError(f"weight must be [{n}*d_out, d_in], got {tuple(weight.shape)}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        d_out_all, d_in = weight.shape
        self.in_features, self.out_features, self.rank = d_in, d_out_all // n, int(rank)
        self.scale, self.dropout = float(scale), float(dropout)
        # Frozen base: parameters (so they live in state_dict and .to()) without gradients.
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        dd = dict(device=weight.device, dtype=weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(n * rank, d_in, **dd))
        self.lora_B = nn.Parameter(torch.empty(n * self.out_features, rank, **dd))
        self.merged = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        if self.merged:
            raise RuntimeError("unmerge() before resetting the adapter")
        # kaiming-uniform(a=√5) per block, as nn.Linear (and peft) initialise A; B = 0 so the
        # layer starts as the base layer.
        for block in self.lora_A.chunk(self.n_blocks):   # fan_in = d_in for each [r, d_in] block
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """s · blockdiag(B) · A, the [n·d_out, d_in] update that merge() adds to W (float64)."""
        n, r, d = self.n_blocks, self.rank, self.out_features
        a = self.lora_A.view(n, r, self.in_features).double()
        b = self.lora_B.view(n, d, r).double()
        return (self.scale * torch.bmm(b, a)).reshape(n * d, self.in_features)

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

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise RuntimeError(f"{type(self).__name__} is merged (inference only): call "
                                   "unmerge() before training")
            return F.linear(x, self.weight, self.bias)
        return self.adapted(x)

    def _blocks_repr(self) -> str:
        return f"{self.n_blocks}x{self.out_features}"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self._blocks_repr()}, "
                f"rank={self.rank}, scale={self.scale:.4g}, dropout={self.dropout}, "
                f"merged={self.merged}")


class LoRAQKV(BlockLoRA):
    """Frozen merged QKV projection plus a rank-``r`` adapter per q, k and v.

    Args:
        weight: [3·d_out, d_in] the frozen projection (copied).
        bias: [3·d_out] or None (copied).
        rank: r. scale: s (``cfg.lora_scale``). dropout: p of the dropout on the adapter input.
        backend: passed to ``acelora.ops.lora_qkv``.
    """

    n_blocks = 3

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rank: int = 4,
                 scale: float = 0.5, dropout: float = 0.0, backend: str = "auto"):
        super().__init__(weight, bias, rank=rank, scale=scale, dropout=dropout)
        self.backend = backend

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

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        return lora_qkv(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale,
                        dropout_p=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class LoRALinear(BlockLoRA):
    """A frozen Linear whose output is ``n_blocks`` independent projections, each with its own
    rank-``r`` adapter and its own dropout mask on the adapter input:

        y = x Wᵀ + b + s · [B_1 A_1 drop_1(x) | ... | B_n A_n drop_n(x)]

    ``n_blocks=1`` is plain LoRA on one projection; ``n_blocks=2`` on a fused k|v projection.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, n_blocks: int = 1,
                 rank: int = 4, scale: float = 0.5, dropout: float = 0.0):
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.n_blocks = int(n_blocks)   # instance value, read by BlockLoRA.__init__
        super().__init__(weight, bias, rank=rank, scale=scale, dropout=dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, n_blocks: int = 1, **kwargs) -> "LoRALinear":
        return cls(linear.weight, linear.bias, n_blocks=n_blocks, **kwargs)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        n, r = self.n_blocks, self.rank
        y = F.linear(x, self.weight, self.bias)
        if self.training and self.dropout > 0:   # an independent mask per block
            down = torch.cat([F.linear(F.dropout(x, self.dropout, True), a)
                              for a in self.lora_A.chunk(n)], dim=-1)
        else:
            down = F.linear(x, self.lora_A)                                   # [..., n·r]
        if n == 1:
            return y + self.scale * F.linear(down, self.lora_B)
        up = torch.einsum("...gr,gor->...go", down.unflatten(-1, (n, r)),
                          self.lora_B.view(n, self.out_features, r)).flatten(-2)  # block-diagonal B
        return y + self.scale * up
