"""The Triton backend of the ACE-HGNN hypergraph convolution (see acelora.ops.hypergraph for the
math): autograd over the sparse kernels of acelora.kernels.hypergraph, registered as the op's
"triton" implementation. No N×N tensor anywhere; the graph arithmetic is fp32 (also under
autocast), the MLPs follow the caller's dtype/autocast."""
from __future__ import annotations

import torch

from acelora.ops._backend import register
from acelora.ops.hypergraph import OP, TRITON_DTYPES, _global_tail, _row0_scores

# gather_mm, scatter_mm and sddmm are linear in each argument and each other's backward.


def _kernels():
    # acelora.kernels needs triton, an optional dependency: imported when the backend runs.
    from acelora.kernels import hypergraph
    return hypergraph


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


class _GatherMM(torch.autograd.Function):
    """Y = A·V with A = sparse(w, idx) [+ diag(diag) + c e_0ᵀ]: vertex → hyperedge."""

    @staticmethod
    def forward(ctx, w, c, idx, diag, v, out_dtype):
        ctx.save_for_backward(w, c, idx, diag, v)
        return _kernels().gather_mm(w, idx, v, diag, c, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy):
        w, c, idx, diag, v = ctx.saved_tensors
        dy = _c(dy)
        kern = _kernels()
        dw = kern.sddmm(dy, v, idx) if ctx.needs_input_grad[0] else None
        dc = None
        if ctx.needs_input_grad[1]:  # dc[r] = ⟨dY[r], V[0]⟩
            dc = (dy @ v[:, 0, :, None].to(dy.dtype)).float()[..., 0]
        dv = None
        if ctx.needs_input_grad[4]:
            dv = kern.scatter_mm(w, idx, dy, v.shape[1], diag, c).to(v.dtype)
        return dw, dc, None, None, dv, None


class _ScatterMM(torch.autograd.Function):
    """Z = Aᵀ·U (fp32): hyperedge → vertex."""

    @staticmethod
    def forward(ctx, w, c, idx, diag, u):
        ctx.save_for_backward(w, c, idx, diag, u)
        return _kernels().scatter_mm(w, idx, u, u.shape[1], diag, c)

    @staticmethod
    def backward(ctx, dz):
        w, c, idx, diag, u = ctx.saved_tensors
        dz = _c(dz)
        kern = _kernels()
        dw = kern.sddmm(u, dz, idx) if ctx.needs_input_grad[0] else None
        dc = None
        if ctx.needs_input_grad[1]:  # dc[r] = ⟨U[r], dZ[0]⟩
            dc = (u.to(dz.dtype) @ dz[:, 0, :, None]).float()[..., 0]
        du = None
        if ctx.needs_input_grad[4]:
            du = kern.gather_mm(w, idx, dz, diag, c, out_dtype=u.dtype)
        return dw, dc, None, None, du


class _SDDMM(torch.autograd.Function):
    """out[r, t] = ⟨X[r], X[idx[r, t]]⟩ (dot products of the kept pairs)."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(x, idx)
        return _kernels().sddmm(x, x, idx)

    @staticmethod
    def backward(ctx, dv):
        x, idx = ctx.saved_tensors
        dv = _c(dv.float())
        kern = _kernels()
        # ∂/∂X[r] Σ_t dv ⟨X[r], X[j]⟩ = Σ_t dv X[j] (gather) ; ∂/∂X[j] = dv X[r] (scatter)
        dx = kern.scatter_mm(dv, idx, x, x.shape[1], out=kern.gather_mm(dv, idx, x))
        return dx.to(x.dtype), None


def _triton_prepare(tokens, cls_attn, key_padding_mask):
    x = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    attn = _c(cls_attn)
    mask = _c(key_padding_mask) if key_padding_mask is not None else None
    # fp32 inverse norms (cosine = dot · inv_i · inv_j); differentiable, no fp32 copy of x kept.
    inv = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12).reciprocal()
    return x, attn, mask, inv


def _triton_full(tokens, cls_attn, edge_fn, node_fn, k, key_padding_mask):
    kern = _kernels()
    x, attn, mask, inv = _triton_prepare(tokens, cls_attn, key_padding_mask)
    b, n, _ = x.shape
    rows = torch.arange(n, device=x.device, dtype=torch.int32).expand(b, n).contiguous()
    with torch.no_grad():
        idx = kern.topk_incidence(x.detach(), inv.detach(), attn, rows, k, mask)   # [B, N, k]
    # Kept values: cosines of the local rows (sparse dots), the CLS attention for row 0.
    cos = _SDDMM.apply(x, idx) * inv[:, :, None] * inv.gather(1, idx.long().flatten(1)).view(b, n, k)
    v0 = _row0_scores(tokens, attn, None).float().gather(1, idx[:, 0].long() - 1)
    w = torch.softmax(torch.cat([v0[:, None], cos[:, 1:]], 1), -1)
    real = torch.ones(b, n, device=x.device) if mask is None else (~mask).float()
    w = _c(w * real[:, :, None])                                  # padded positions have no row
    c = torch.zeros(b, n, device=x.device).scatter(1, idx[:, 0].long(), w[:, 0])  # A[j, 0] = A[0, j]
    # vertex → hyperedge, H = A X, then hyperedge → vertex, Z = Aᵀ E, with
    # A = sparse(w, idx) + diag(real) (self loops) + c e_0ᵀ (the global node's column).
    h = _GatherMM.apply(w, c, idx, real, x, x.dtype)
    e = _c(edge_fn(h))
    z = _ScatterMM.apply(w, c, idx, real, e)
    out = node_fn(z.to(e.dtype))
    if mask is not None:
        out = out.masked_fill(mask[:, :, None], 0.0)
    return out


def _triton_global_only(tokens, cls_attn, edge_fn, node_fn, k, key_padding_mask):
    kern = _kernels()
    x, attn, mask, inv = _triton_prepare(tokens, cls_attn, key_padding_mask)
    b = x.shape[0]
    with torch.no_grad():
        rows0 = torch.zeros(b, 1, device=x.device, dtype=torch.int32)
        i0 = kern.topk_incidence(x, inv, attn, rows0, k, mask)[:, 0]        # [B, k]
        ir = kern.topk_incidence(x, inv, attn, _c(i0), k, mask)             # [B, k, k]
    s0 = _row0_scores(x, attn, mask)
    return _global_tail(x, s0, i0.long(), ir.long(), edge_fn, node_fn)


def _triton_impl(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask, global_only):
    if global_only:
        return _triton_global_only(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask)
    return _triton_full(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask)


register(OP, "triton", _triton_impl, dtypes=TRITON_DTYPES)
