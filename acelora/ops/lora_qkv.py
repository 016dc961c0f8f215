"""The LoRA-augmented merged QKV projection.

    y = x Wᵀ + b + s · [ drop_q(x) A_qᵀ B_qᵀ | drop_k(x) A_kᵀ B_kᵀ | drop_v(x) A_vᵀ B_vᵀ ]

Shapes: x [..., d_in]; weight [3·d_out, d_in] and bias [3·d_out] (frozen); lora_A [3r, d_in]
(A_q; A_k; A_v stacked); lora_B [3·d_out, r] (B_q; B_k; B_v stacked — the block-diagonal
3·d_out × 3r matrix of DESIGN §4 stored without its zero blocks). Dropout masks are independent
for q, k and v and only act in training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from acelora.ops._backend import implementation, register

OP = "lora_qkv"


def check_lora_qkv_args(x, weight, bias, lora_A, lora_B) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices; return (d_in, d_out, r)."""
    if weight.dim() != 2 or weight.shape[0] % 3:
        raise ValueError(f"weight must be [3*d_out, d_in], got {tuple(weight.shape)}")
    d_in, d_out = weight.shape[1], weight.shape[0] // 3
    if x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {d_in}")
    if bias is not None and tuple(bias.shape) != (3 * d_out,):
        raise ValueError(f"bias must be [{3 * d_out}], got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] % 3 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A must be [3*r, {d_in}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // 3
    if tuple(lora_B.shape) != (3 * d_out, r):
        raise ValueError(f"lora_B must be [{3 * d_out}, {r}], got {tuple(lora_B.shape)}")
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    return d_in, d_out, r


def lora_qkv_reference(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                       training: bool = False) -> torch.Tensor:
    """Plain PyTorch: the CPU path and the oracle of the fused implementations."""
    d_in, d_out, r = check_lora_qkv_args(x, weight, bias, lora_A, lora_B)
    y = F.linear(x, weight, bias)
    if training and dropout_p > 0:
        # Independent masks for q, k and v.
        down = torch.cat([F.linear(F.dropout(x, dropout_p, True), a) for a in lora_A.chunk(3)], -1)
    else:
        down = F.linear(x, lora_A)                                    # [..., 3r]
    up = torch.einsum("...gr,gor->...go", down.unflatten(-1, (3, r)),
                      lora_B.view(3, d_out, r)).flatten(-2)           # block-diagonal B
    return y + scale * up


register(OP, "reference", lora_qkv_reference)


def lora_qkv(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
             training: bool = False, backend: str = "auto") -> torch.Tensor:
    """y = x Wᵀ + b + s·B·drop(A x) for q, k and v at once (see the module docstring)."""
    fn = implementation(OP, backend, x.device)
    return fn(x, weight, bias, lora_A, lora_B, scale, dropout_p, training)
