"""Label-guided InfoNCE (DESIGN §6): CLIP's symmetric contrastive loss without false negatives.

    S = s · I Tᵀ                                   (I, T [B, D] L2-normalised; s = logit_scale)
    M[i, j] = (i ≠ j) and labels_i == labels_j     (whole label vectors; the diagonal never masked)
    L = ½ · ( mean_i CE(S[i, :] with M[i, :] = −∞, i) + mean_j CE(S[:, j] with M[:, j] = −∞, j) )

A non-matching pair with the anchor's exact label vector is left out of the denominator. With
``labels=None`` nothing is masked and L is open_clip's ClipLoss.

Backends: ``"reference"`` materialises S (the CPU path and the test oracle); ``"triton"`` never
materialises B×B: the forward keeps one log-sum-exp per row and per column, the backward
recomputes the tiles (acelora.kernels.infonce).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from acelora.ops._backend import implementation, register

OP = "label_guided_infonce"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def labels_to_ids(labels: torch.Tensor) -> torch.Tensor:
    """Integer class ids [B] such that ids[i] == ids[j] exactly when the label rows are equal.

    ``labels`` is either [B, L] multi-hot (float, bool or integer) or [B] integer/bool ids, which
    are returned as int64.
    """
    if not torch.is_tensor(labels):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    if labels.dim() == 1:
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"[B] labels must be integer class ids, got {labels.dtype}; "
                            "pass multi-hot labels as [B, L]")
        return labels.long()
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, L] multi-hot or [B] ids, got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool:
        labels = labels.to(torch.uint8)
    if labels.shape[1] == 0:  # no findings at all: every row is the same (empty) vector
        return torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync on a GPU and no dynamic output shape for torch.compile (unique's size
        # depends on the data: a graph break). Same ids as unique (both rank rows lexicographically).
        return _group_rows_sync_free(labels)
    # Eager CPU: unique is exact and ~10x cheaper than the per-column sorts at small B.
    _, ids = torch.unique(labels, dim=0, return_inverse=True)
    return ids


def _group_rows_sync_free(labels: torch.Tensor) -> torch.Tensor:
    """Same grouping as ``torch.unique(dim=0, return_inverse=True)`` without its device sync
    (unique's output size depends on the data): a lexicographic order from one stable sort per
    column, then a new id wherever consecutive sorted rows differ. O(L · B log B), no B×B."""
    n, n_cols = labels.shape
    perm = torch.arange(n, device=labels.device)
    for k in range(n_cols - 1, -1, -1):  # least significant column first
        perm = perm[torch.sort(labels[perm, k], stable=True).indices]
    ordered = labels[perm]
    new_group = (ordered[1:] != ordered[:-1]).any(dim=1)
    group = torch.cat([new_group.new_zeros(1), new_group]).long().cumsum(0)
    return torch.empty_like(group).scatter_(0, perm, group)


def check_infonce_args(image_emb, text_emb, logit_scale, labels) -> None:
    """Raise a clear error for inputs the loss cannot take."""
    for name, t in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if image_emb.shape[0] != text_emb.shape[0]:
        raise ValueError(f"batch sizes differ: image_emb has {image_emb.shape[0]} rows, "
                         f"text_emb {text_emb.shape[0]}")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding sizes differ: image_emb has D={image_emb.shape[1]}, "
                         f"text_emb D={text_emb.shape[1]}")
    if image_emb.shape[0] == 0:
        raise ValueError("the batch is empty")
    if image_emb.dtype != text_emb.dtype:
        raise TypeError(f"image_emb and text_emb dtypes differ: {image_emb.dtype} vs {text_emb.dtype}")
    device = image_emb.device
    if text_emb.device != device:
        raise ValueError(f"image_emb is on {device} but text_emb on {text_emb.device}")
    if torch.is_tensor(logit_scale):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        if not logit_scale.is_floating_point():
            raise TypeError(f"logit_scale must be floating point, got {logit_scale.dtype}")
        if logit_scale.device != device:
            raise ValueError(f"logit_scale is on {logit_scale.device} but the embeddings on {device}")
    elif not isinstance(logit_scale, numbers.Real):
        raise TypeError(f"logit_scale must be a float or a scalar tensor, got {type(logit_scale).__name__}")
    if labels is not None:
        if not torch.is_tensor(labels):
            raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
        if labels.dim() not in (1, 2):
            raise ValueError(f"labels must be [B, L] multi-hot or [B] ids, got shape {tuple(labels.shape)}")
        if labels.shape[0] != image_emb.shape[0]:
            raise ValueError(f"labels have {labels.shape[0]} rows but the batch has {image_emb.shape[0]}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the embeddings on {device}")


def label_guided_infonce_reference(image_emb, text_emb, logit_scale, labels=None) -> torch.Tensor:
    """Eager PyTorch: materialises the B×B logits in (at least) fp32. CPU path and oracle."""
    check_infonce_args(image_emb, text_emb, logit_scale, labels)
    dtype = torch.promote_types(image_emb.dtype, torch.float32)
    logits = logit_scale * (image_emb.to(dtype) @ text_emb.to(dtype).T)
    if labels is not None:
        ids = labels_to_ids(labels)
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# The kernels as opaque custom ops: torch.compile keeps them whole (no graph break, no tracing
# into the launch code); autograd is the Function below.
@torch.library.custom_op("acelora::infonce_fwd", mutates_args=())
def _infonce_fwd_op(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
                    ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from acelora.kernels import infonce as kernels

    return kernels.infonce_fwd(image_emb, text_emb, scale, ids)


@_infonce_fwd_op.register_fake
def _(image_emb, text_emb, scale, ids):
    n = image_emb.shape[0]
    return tuple(image_emb.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("acelora::infonce_grad", mutates_args=())
def _infonce_grad_op(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                     lse_a: torch.Tensor, lse_b: torch.Tensor, ids: Optional[torch.Tensor],
                     with_dscale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from acelora.kernels import infonce as kernels

    da, dscale_rows = kernels.infonce_grad(a, b, scale, coef, lse_a, lse_b, ids, with_dscale)
    return da, (dscale_rows if with_dscale else lse_a.new_empty(0))  # ops cannot return None


@_infonce_grad_op.register_fake
def _(a, b, scale, coef, lse_a, lse_b, ids, with_dscale):
    n = a.shape[0] if with_dscale else 0
    return torch.empty_like(a, memory_format=torch.contiguous_format), lse_a.new_empty(n)


class _LabelGuidedInfoNCETriton(torch.autograd.Function):
    """Forward saves the row and column log-sum-exps ([B] each); backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, image_emb, text_emb, logit_scale, ids):
        n = image_emb.shape[0]
        scale = logit_scale.detach().reshape(1).to(torch.float32).contiguous()
        # One pass over the tiles gives both directions: image→text rows, text→image columns.
        lse_rows, lse_cols, diag_dots = _infonce_fwd_op(image_emb, text_emb, scale, ids)
        positive = scale[0] * diag_dots
        # Per-sample cross-entropies first: small terms, no cancellation between large sums.
        loss = ((lse_rows - positive).sum() + (lse_cols - positive).sum()) / (2 * n)
        ctx.save_for_backward(image_emb, text_emb, ids, scale, lse_rows, lse_cols, diag_dots)
        ctx.scale_meta = (logit_scale.shape, logit_scale.dtype)
        return loss

    @staticmethod
    @once_differentiable  # the kernels are not differentiable: no silent zero second derivative
    def backward(ctx, grad_loss):
        image_emb, text_emb, ids, scale, lse_rows, lse_cols, diag_dots = ctx.saved_tensors
        n = image_emb.shape[0]
        g = grad_loss.reshape(1).to(torch.float32)
        # dS = g/(2B)·(P_row + P_col) − g/B·δ; dI = s·dS·T, dT = s·dSᵀ·I.
        coef = torch.cat([g * scale / (2 * n), -g * scale / n]).contiguous()
        need_image, need_text, need_scale = ctx.needs_input_grad[:3]
        d_image = d_text = d_scale = None
        if need_image or need_scale:
            d_image, dscale_rows = _infonce_grad_op(
                image_emb, text_emb, scale, coef, lse_rows, lse_cols, ids, need_scale)
            if need_scale:
                # dL/ds = g/B · Σ_i (½ Σ_j P_ij ⟨I_i, T_j⟩ − ⟨I_i, T_i⟩), summed per row first.
                d_scale = g[0] * (0.5 * dscale_rows - diag_dots).sum() / n
                d_scale = d_scale.reshape(ctx.scale_meta[0]).to(ctx.scale_meta[1])
            if not need_image:
                d_image = None
        if need_text:
            d_text, _ = _infonce_grad_op(text_emb, image_emb, scale, coef, lse_cols, lse_rows, ids,
                                         False)
        return d_image, d_text, d_scale, None


def label_guided_infonce_triton(image_emb, text_emb, logit_scale, labels=None) -> torch.Tensor:
    """Fused Triton path (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); takes
    ``TRITON_DTYPES`` embeddings (the dispatch checks)."""
    # Only the feature dimension needs unit stride; copy otherwise (gradients flow through).
    if image_emb.stride(-1) != 1:
        image_emb = image_emb.contiguous()
    if text_emb.stride(-1) != 1:
        text_emb = text_emb.contiguous()
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), device=image_emb.device)
    ids = labels_to_ids(labels).contiguous() if labels is not None else None
    return _LabelGuidedInfoNCETriton.apply(image_emb, text_emb, logit_scale, ids)


register(OP, "reference", label_guided_infonce_reference)
register(OP, "triton", label_guided_infonce_triton, dtypes=TRITON_DTYPES)


def label_guided_infonce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                         labels: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Symmetric label-guided InfoNCE of L2-normalised embeddings (see the module docstring).

    Args:
        image_emb, text_emb: [B, D], one dtype and device, L2-normalised by the caller.
        logit_scale: the (already exponentiated) multiplier: a float or a scalar tensor, which
            receives a gradient.
        labels: [B, L] multi-hot (float/bool/int), [B] integer ids, or None for the plain CLIP loss.
        backend: "auto" (Triton for CUDA tensors of ``TRITON_DTYPES``, else the reference; see
            ``acelora.ops.use_backend``), "reference" or "triton".
    Returns:
        A scalar tensor (float32 for half-precision inputs).
    """
    check_infonce_args(image_emb, text_emb, logit_scale, labels)
    fn = implementation(OP, backend, image_emb.device, image_emb.dtype)
    return fn(image_emb, text_emb, logit_scale, labels)
