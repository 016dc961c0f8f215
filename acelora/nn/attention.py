"""Self-attention modules that run on ``F.scaled_dot_product_attention`` around a merged QKV
projection and, when asked, also return the attention row of a tower's global token (DESIGN §5, §12).

Drop-in replacements, swapped in per instance by ``acelora.models.attention_adapters``:

* ``ViTAttention`` for timm's ``Attention`` (fused ``qkv``; same submodule names, so the base
  state-dict keys are unchanged).
* ``BertQKVSelfAttention`` for HF ``BertSelfAttention`` (query/key/value concatenated into one
  ``qkv``).
* ``MultiheadSelfAttention`` for ``nn.MultiheadAttention`` in open_clip's native residual blocks
  (fused ``in_proj_weight``; causal text masks).

Each keeps its original call signature (``forward``) and adds ``forward_with_row(x, mode, ...)``
returning ``(output, row)``: the head-averaged attention row of one query (the global token) over
every key, [B, N] in float32. Only that row is computed explicitly (O(N·d) per head); the full
attention stays on SDPA / flash. Nothing is kept on the module between calls.

``explicit = True`` on a module computes softmax(q kᵀ) v with the full matrix instead, reading
the row off it (the research code's formulation; the benchmark's reference path).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from acelora.profiling import phase

ROW_MODES = ("probs", "logits")


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (meta)
        return contextlib.nullcontext()


def _row_of_mask(attn_mask: torch.Tensor | None, index: torch.Tensor | None, batch: int):
    """The mask row of each sample's query ([B, 1, 1 or H... , N] broadcastable to [B, H, 1, N])."""
    if attn_mask is None:
        return None
    if attn_mask.dim() == 2:                      # [Lq, N] shared by the batch (e.g. causal)
        rows = attn_mask[:1] if index is None else attn_mask[index]       # [1 or B, N]
        return rows[:, None, None, :]
    if attn_mask.shape[-2] == 1:                  # [B, 1|H, 1, N]: a key mask
        return attn_mask
    if index is None:
        return attn_mask[..., :1, :]
    idx = index.view(-1, 1, 1, 1).expand(batch, attn_mask.shape[1], 1, attn_mask.shape[-1])
    return attn_mask.expand(batch, *attn_mask.shape[1:]).gather(-2, idx)


def attention_row(q: torch.Tensor, k: torch.Tensor, scale: float, mode: str = "probs",
                  attn_mask: torch.Tensor | None = None,
                  index: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of one query per sample over every key.

    Args:
        q, k: [B, H, N, d_head].
        scale: the softmax scale.
        mode: "probs" (softmax probabilities) or "logits" (pre-softmax q·kᵀ·scale).
        attn_mask: None, or what SDPA takes ([N, N] or broadcastable to [B, H, N, N]; bool with
            True = attend, or additive float). Masked keys get probability 0 ("probs") or the most
            negative finite value ("logits"), so they are never selected.
        index: [B] position of the query per sample, or None for position 0 (a CLS token).
    Returns: [B, N] in float32 (whatever q's dtype: the HGNN selects on it, and bf16 rounding
    would make ties).
    """
    if mode not in ROW_MODES:
        raise ValueError(f"attention row mode must be one of {ROW_MODES}, got {mode!r}")
    B = q.shape[0]
    # A named phase: its own range in profiler traces, NVTX and the benchmark's phase table.
    with _autocast_off(q.device.type), phase("cls_attention"):
        if index is None:
            qr = q[:, :, :1]
        else:
            qr = q.gather(2, index.view(-1, 1, 1, 1).expand(B, q.shape[1], 1, q.shape[-1]))
        logits = torch.matmul(qr.float(), k.float().transpose(-2, -1)) * scale  # [B, H, 1, N]
        return _reduce_row(logits, _row_of_mask(attn_mask, index, B), mode)


def _reduce_row(logits: torch.Tensor, mask_row: torch.Tensor | None, mode: str) -> torch.Tensor:
    keep = None
    if mask_row is not None:
        if mask_row.dtype == torch.bool:
            keep = mask_row
            logits = logits.masked_fill(~keep, float("-inf"))
        else:
            logits = logits + mask_row.float()
            keep = torch.isfinite(mask_row) if mode == "logits" else None
    if mode == "probs":
        return logits.softmax(-1).mean(1)[:, 0]
    if keep is not None:
        # Average the finite logits, then mark masked keys (a mean over -inf is -inf or nan).
        keep = keep.expand_as(logits)
        out = logits.masked_fill(~keep, 0.0).mean(1)
        out = out.masked_fill(~keep.all(1), torch.finfo(out.dtype).min)
    else:
        out = logits.mean(1).clamp_min(torch.finfo(logits.dtype).min)
    return out[:, 0]


def _explicit_attention(q, k, v, scale, attn_mask, is_causal, dropout_p, training):
    """softmax(q kᵀ·scale + mask) v with the matrix materialised; also returns the probabilities."""
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        n = q.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else logits + attn_mask
    probs = logits.softmax(-1)
    return torch.matmul(F.dropout(probs, dropout_p, training), v), logits


def attend(module: nn.Module, q, k, v, attn_mask=None, is_causal: bool = False,
           dropout_p: float = 0.0, row_mode: str | None = None, row_index=None):
    """Attention output [B, H, N, d] and, with ``row_mode``, the global token's row [B, N]."""
    if getattr(module, "explicit", False):
        out, logits = _explicit_attention(q, k, v, module.scale, attn_mask, is_causal, dropout_p,
                                          module.training)
        row = None
        if row_mode is not None:
            B = q.shape[0]
            with _autocast_off(q.device.type), phase("cls_attention"):
                if row_index is None:
                    lrow = logits[:, :, :1]
                else:
                    lrow = logits.gather(2, row_index.view(-1, 1, 1, 1).expand(
                        B, logits.shape[1], 1, logits.shape[-1]))
                lrow = lrow.float()
                row = lrow.softmax(-1).mean(1)[:, 0] if row_mode == "probs" else \
                    lrow.clamp_min(torch.finfo(lrow.dtype).min).mean(1)[:, 0]
        return out, row
    row = None
    if row_mode is not None:
        mask = attn_mask
        if is_causal:
            n = q.shape[-2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        row = attention_row(q, k, module.scale, row_mode, mask, row_index)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                         dropout_p=dropout_p, scale=module.scale)
    return out, row


class ViTAttention(nn.Module):
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
        self.explicit = False
        self.train(attn.training)  # keep the replaced module's mode

    def forward_with_row(self, x: torch.Tensor, mode: str | None, attn_mask=None,
                         is_causal: bool = False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x, row = attend(self, q, k, v, attn_mask, is_causal,
                        self.attn_drop.p if self.training else 0.0, mode)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), row

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        return self.forward_with_row(x, None, attn_mask, is_causal)[0]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class BertQKVSelfAttention(nn.Module):
    """HF ``BertSelfAttention`` (encoder self-attention) with one merged ``qkv``, on SDPA.

    Called by ``BertAttention`` as ``self.self(hidden_states, attention_mask=..., **kwargs)``
    and returns ``(context [B, L, H·d_head], None)`` like the original. ``attention_mask`` is
    None, a bool mask (True = attend) or an additive one, broadcastable to [B, H, L, L].
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
        self.explicit = False
        self.train(attn.training)

    def forward_with_row(self, hidden_states: torch.Tensor, mode: str | None, attention_mask=None):
        B, L, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, row = attend(self, q, k, v, attention_mask, False,
                          self.dropout.p if self.training else 0.0, mode)
        return out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim), row

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, encoder_hidden_states=None, **kwargs):
        if past_key_values is not None or encoder_hidden_states is not None:
            raise ValueError("BertQKVSelfAttention is encoder self-attention only (no cache, no "
                             "cross-attention)")
        return self.forward_with_row(hidden_states, None, attention_mask)[0], None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class MultiheadSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` used as self-attention (open_clip's native blocks), on SDPA.

    ``in_proj`` computes [q | k | v] (the fused ``in_proj_weight``/``in_proj_bias``, e.g. a
    ``LoRAQKV``); ``out_proj`` is the original output projection. Accepts the original call
    ``attn(x, x, x, need_weights=False, attn_mask=...)`` and returns ``(output, None)``.
    ``attn_mask``: [L, L] or [B·H, L, L] as nn.MultiheadAttention takes it (additive float, or
    bool with True = *masked*, PyTorch's convention there).
    """

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module):
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(mha).__name__}")
        if not getattr(mha, "_qkv_same_embed_dim", True) or mha.in_proj_weight is None:
            raise ValueError("nn.MultiheadAttention with separate k/v dimensions is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with bias_k/bias_v or add_zero_attn is not supported")
        self.num_heads = int(mha.num_heads)
        self.embed_dim = int(mha.embed_dim)
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.batch_first = bool(mha.batch_first)
        self.dropout_p = float(mha.dropout)
        self.in_proj = in_proj
        self.out_proj = mha.out_proj
        self.explicit = False
        self.train(mha.training)

    def _sdpa_mask(self, attn_mask, B: int):
        if attn_mask is None:
            return None
        if attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask               # MHA: True = masked; SDPA: True = attend
        if attn_mask.dim() == 3:                 # [B·H, L, L]
            attn_mask = attn_mask.view(B, self.num_heads, *attn_mask.shape[-2:])
        return attn_mask

    def forward_with_row(self, x: torch.Tensor, mode: str | None, attn_mask=None, row_index=None):
        """x [B, L, D] (batch first); returns ([B, L, D], row [B, L] or None)."""
        B, L, _ = x.shape
        qkv = self.in_proj(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = self._sdpa_mask(attn_mask, B)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out, row = attend(self, q, k, v, mask, False, self.dropout_p if self.training else 0.0,
                          mode, row_index)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim)), row

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights: bool = False,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("MultiheadSelfAttention is self-attention only (no cross-attention)")
        if need_weights or key_padding_mask is not None:
            raise ValueError("need_weights and key_padding_mask are not supported here")
        x = query if self.batch_first else query.transpose(0, 1)
        out = self.forward_with_row(x, None, attn_mask)[0]
        return (out if self.batch_first else out.transpose(0, 1)), None

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"
