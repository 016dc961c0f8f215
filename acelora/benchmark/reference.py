"""The research code's formulation of the same model, the benchmark's ``reference`` case: split
q/k/v LoRA, the dense hypergraph, explicit softmax(q kᵀ) v attention. Each is built explicitly
from the library's module it replaces and computes the same function."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from acelora.nn.hgnn import ACEHGNN
from acelora.nn.lora import LoRAQKV


class SplitLoRAQKV(nn.Module):
    """The research code's q/k/v LoRA: three frozen Linears, three separate LoRA branches.

    Computes the same function as the merged ``LoRAQKV`` it is built from, as three projections
    and three ``B(dropout(A x))`` branches whose outputs are concatenated.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, dropout_p: float):
        super().__init__()
        d3, d_in = weight.shape
        d_out, r = d3 // 3, lora_A.shape[0] // 3
        self.scale = float(scale)
        self.proj = nn.ModuleList()
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.ModuleList()
        for i in range(3):
            lin = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(weight[i * d_out:(i + 1) * d_out])
                if bias is not None:
                    lin.bias.copy_(bias[i * d_out:(i + 1) * d_out])
            lin.requires_grad_(False)
            self.proj.append(lin)
            self.lora_A.append(nn.Parameter(lora_A[i * r:(i + 1) * r].detach().clone()))
            self.lora_B.append(nn.Parameter(lora_B[i * d_out:(i + 1) * d_out].detach().clone()))
            self.dropout.append(nn.Dropout(dropout_p))

    @classmethod
    def from_merged(cls, module: LoRAQKV) -> "SplitLoRAQKV":
        return cls(module.weight, module.bias, module.lora_A, module.lora_B, module.scale,
                   module.dropout).train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [proj(x) + self.scale * F.linear(F.linear(drop(x), a), b)
                for proj, a, b, drop in zip(self.proj, self.lora_A, self.lora_B, self.dropout)]
        return torch.cat(outs, dim=-1)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def split_qkv_lora(model: nn.Module) -> int:
    """Replace every merged ``LoRAQKV`` of ``model`` by a :class:`SplitLoRAQKV`; return how many."""
    if getattr(model, "merged", False):
        raise ValueError("unmerge the adapters before splitting the LoRA-QKV modules")
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAQKV)]
    if any(m.merged for _, m in swaps):
        raise ValueError("unmerge the adapters before splitting the LoRA-QKV modules")
    for name, module in swaps:
        _replace(model, name, SplitLoRAQKV.from_merged(module))
    return len(swaps)


class DenseHGNN(nn.Module):
    """Runs the wrapped ACE-HGNN on the dense path (all N tokens) and takes token 0 when the
    caller asked for the global-only output: the research code's formulation."""

    def __init__(self, hgnn: ACEHGNN):
        super().__init__()
        self.hgnn = hgnn

    def forward(self, tokens, cls_attn, key_padding_mask=None, global_only=False):
        out = self.hgnn(tokens, cls_attn, key_padding_mask=key_padding_mask, global_only=False)
        return out[:, 0] if global_only else out


def dense_hgnn(model: nn.Module) -> int:
    """Wrap every ACE-HGNN of ``model`` in :class:`DenseHGNN`; return how many."""
    swaps = [(name, m) for name, m in model.named_modules()
             if isinstance(m, ACEHGNN) and not name.endswith(".hgnn")]
    for name, module in swaps:
        _replace(model, name, DenseHGNN(module))
    return len(swaps)


def explicit_attention(model: nn.Module) -> int:
    """Run every acelora attention module of ``model`` on explicit softmax(q kᵀ) v with the
    attention row read off the full matrix (their ``explicit`` switch), and turn off timm's
    ``fused_attn`` where an untouched timm Attention is left. Returns how many changed."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "explicit", None), bool) and not m.explicit:
            m.explicit = True
            n += 1
        elif isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn:
            m.fused_attn = False
            n += 1
    return n
