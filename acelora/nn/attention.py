"""Attention modules that run on ``F.scaled_dot_product_attention`` around a merged QKV projection
and, in a tower's last block, also return the CLS row of the attention (DESIGN §5).

Two drop-in replacements, swapped in per instance by ``acelora.models.inject``:

* ``ViTAttention`` for timm's ``Attention`` (fused ``qkv``; same submodule names, so the base
  state-dict keys are unchanged).
* ``BertQKVSelfAttention`` for HF ``BertSelfAttention`` (query/key/value concatenated into one
  ``qkv``).

Only the CLS query row is computed explicitly ([B, H, 1, N], O(N·d) per head); the full attention
stays on SDPA / flash. The captured row is kept on the module (``cls_attn``) until the model pops
it right after the tower's forward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

CLS_ATTN_MODES = ("probs", "logits")


def cls_attention_row(q: torch.Tensor, k: torch.Tensor, scale: float, mode: str = "probs",
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of the CLS query (position 0) over keys 1..N-1.

    Args:
        q, k: [B, H, N, d_head].
        scale: the softmax scale (1/√d_head).
        mode: "probs" (softmax probabilities) or "logits" (pre-softmax q·kᵀ·scale).
        attn_mask: None, or a mask broadcastable to [B, H, N, N] as SDPA takes it: bool (True =
            attend) or additive float. Masked keys get probability 0 ("probs") or the most negative
            finite value ("logits"), so they are never selected.
    Returns: [B, N-1] in float32 (whatever q's dtype; the HGNN selects on it).
    """
    if mode not in CLS_ATTN_MODES:
        raise ValueError(f"CLS attention mode must be one of {CLS_ATTN_MODES}, got {mode!r}")
    # fp32 even under autocast: the row feeds a top-k selection, where bf16 rounding makes ties.
    with _autocast_off(q.device.type):
        return _cls_attention_row(q, k, scale, mode, attn_mask)


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (meta)
        return contextlib.nullcontext()


def _cls_attention_row(q, k, scale, mode, attn_mask):
    logits = torch.matmul(q[:, :, :1].float(), k.float().transpose(-2, -1)) * scale  # [B,H,1,N]
    keep = None
    if attn_mask is not None:
        row = attn_mask[..., :1, :] if attn_mask.shape[-2] > 1 else attn_mask
        if row.dtype == torch.bool:
            keep = row
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    if mode == "probs":
        out = logits.softmax(-1).mean(1)
    else:
        if keep is not None:
            # Average the finite logits, then mark masked keys (a mean over -inf is -inf or nan).
            out = logits.masked_fill(~keep, 0.0).mean(1)
            out = out.masked_fill(~keep.all(1), torch.finfo(out.dtype).min)
        else:
            out = logits.mean(1).clamp_min(torch.finfo(logits.dtype).min)
    return out[:, 0, 1:]


class _CLSCapture(nn.Module):
    """Holds the CLS-attention capture switch and the last captured row."""

    def __init__(self):
        super().__init__()
        self.cls_attn_mode: str | None = None
        self.cls_attn: torch.Tensor | None = None

    def capture_cls_attention(self, mode: str | None) -> None:
        """Compute the CLS row in every forward ("probs" | "logits"), or stop (None)."""
        if mode is not None and mode not in CLS_ATTN_MODES:
            raise ValueError(f"CLS attention mode must be one of {CLS_ATTN_MODES}, got {mode!r}")
        self.cls_attn_mode = mode
        self.cls_attn = None

    def pop_cls_attn(self) -> torch.Tensor:
        """The row captured by the last forward ([B, N-1]); cleared so the graph is not kept."""
        if self.cls_attn is None:
            raise RuntimeError("no CLS attention captured: capture_cls_attention() was not enabled "
                               "on this block, or its forward has not run")
        out, self.cls_attn = self.cls_attn, None
        return out


class ViTAttention(_CLSCapture):
    """timm ViT ``Attention`` with its ``qkv`` replaced (e.g. by ``LoRAQKV``), on SDPA.

    Reuses the original module's submodules (q/k norm, output norm, gate, proj, dropouts).
    """

    def __init__(self, attn: nn.Module, qkv: nn.Module | None = None):
        super().__init__()
        for name in ("num_heads", "head_dim", "qkv", "proj"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} is not a timm ViT Attention (no {name!r})")
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.attn_dim = int(getattr(attn, "attn_dim", self.num_heads * self.head_dim))
        self.scale = float(getattr(attn, "scale", self.head_dim ** -0.5))
        self.qkv = attn.qkv if qkv is None else qkv
        self.q_norm = getattr(attn, "q_norm", nn.Identity())
        self.k_norm = getattr(attn, "k_norm", nn.Identity())
        self.attn_drop = getattr(attn, "attn_drop", nn.Dropout(0.0))
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self.proj = attn.proj
        self.proj_drop = getattr(attn, "proj_drop", nn.Dropout(0.0))
        self.train(attn.training)  # keep the replaced module's mode

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cls_attn_mode is not None:
            if is_causal:
                raise ValueError("CLS attention capture is for bidirectional attention")
            self.cls_attn = cls_attention_row(q, k, self.scale, self.cls_attn_mode, attn_mask)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
            dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, cls_attn={self.cls_attn_mode}"


class BertQKVSelfAttention(_CLSCapture):
    """HF ``BertSelfAttention`` (encoder self-attention) with one merged ``qkv``, on SDPA.

    Called by ``BertAttention`` as ``self.self(hidden_states, attention_mask=..., **kwargs)``
    and returns ``(context [B, L, H·d_head], None)`` like the original. ``attention_mask`` is
    whatever ``BertModel`` built for SDPA: None, a bool mask (True = attend) or an additive one.
    """

    def __init__(self, attn: nn.Module, qkv: nn.Module):
        super().__init__()
        for name in ("query", "key", "value", "num_attention_heads", "attention_head_size"):
            if not hasattr(attn, name):
                raise TypeError(f"{type(attn).__name__} is not a BERT self-attention (no {name!r})")
        if getattr(attn, "is_decoder", False) or getattr(attn, "is_causal", False):
            raise ValueError("only encoder (bidirectional) BERT self-attention can be replaced")
        self.num_heads = int(attn.num_attention_heads)
        self.head_dim = int(attn.attention_head_size)
        self.scale = float(getattr(attn, "scaling", self.head_dim ** -0.5))
        self.qkv = qkv
        self.dropout = attn.dropout
        self.train(attn.training)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, encoder_hidden_states=None, **kwargs):
        if past_key_values is not None or encoder_hidden_states is not None:
            raise ValueError("BertQKVSelfAttention is encoder self-attention only (no cache, no "
                             "cross-attention)")
        B, L, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.cls_attn_mode is not None:
            self.cls_attn = cls_attention_row(q, k, self.scale, self.cls_attn_mode, attention_mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, scale=self.scale,
            dropout_p=self.dropout.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim), None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, cls_attn={self.cls_attn_mode}"
