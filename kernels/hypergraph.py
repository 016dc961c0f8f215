"""ACE-HGNN kernels: top-k incidence without N×N, and sparse two-stage message passing.

The incidence of one sample is kept as k (weight, column) pairs per row: w, idx [B, R, K]
(R rows, usually all N). Four kernels:

* ``topk_incidence(x, inv_norm, attn, rows, K, mask)`` -> idx [B, R, K] int32: for each requested
  row, the K best columns of the affinity S (DESIGN §5: row 0 = CLS attention, other rows = cosine
  of the tokens; the diagonal, column 0 of local rows and padded columns excluded).
  Columns are walked in BLOCK_N tiles with a running top-K per row; ties go to the lower column
  because value and column are packed into one int64 key (tl.max/tl.sort give values only).
* ``gather_mm(w, idx, V, diag, c)`` -> Y = A·V, A[r] = Σ_t w[r, t] e_{idx[r, t]} + diag[r] e_r
  + c[r] e_0 (the self loops and the symmetric column of the global node ride along)
* ``scatter_mm(w, idx, U, N, diag, c)`` -> Z = Aᵀ·U [B, N, D] (fp32 atomics)
* ``sddmm(P, Q, idx)`` -> [B, R, K]:            out[r, t] = ⟨P[r], Q[idx[r, t]]⟩

gather/scatter/sddmm are each other's backward (acelora.ops.hypergraph builds autograd on them).
Inputs of any float dtype are loaded and cast to fp32; accumulation is fp32, and so are the
outputs but gather_mm's (stored in the dtype asked for, e.g. the MLP's bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs

INT64_LOWEST = tl.constexpr(-9223372036854775807)  # below every packed key (−∞ packs to about −9.19e18)


@triton.jit
def _pack_key(value, cols):
    """Order-preserving int64 key of (fp32 value, column): larger value first, then lower column."""
    value = tl.where(value == 0.0, 0.0, value)              # −0.0 ties with +0.0, as in torch.sort
    bits = value.to(tl.int32, bitcast=True)
    mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)     # signed order == float order
    low = (2147483647 - cols).to(tl.int64)                   # lower column -> larger key
    return (mono.to(tl.int64) << 32) | low


@triton.jit
def _topk_kernel(x_ptr, inv_ptr, attn_ptr, rows_ptr, mask_ptr, idx_ptr,
                 N, D, R, stride_xb, stride_xn, stride_nb, stride_ab, stride_rb, stride_mb,
                 stride_ib, stride_ir,
                 K: tl.constexpr, KPAD: tl.constexpr, HAS_MASK: tl.constexpr,
                 PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r_off = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r_off < R
    rows = tl.load(rows_ptr + b * stride_rb + r_off, mask=r_ok, other=0)
    slots = tl.arange(0, KPAD)
    best = tl.full((BLOCK_R, KPAD), INT64_LOWEST, dtype=tl.int64)
    x_base = x_ptr + b * stride_xb
    inv_rows = tl.load(inv_ptr + b * stride_nb + rows, mask=r_ok, other=0.0)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < N
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            p = tl.load(x_base + rows.to(tl.int64)[:, None] * stride_xn + ks[None, :],
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            q = tl.load(x_base + cols.to(tl.int64)[:, None] * stride_xn + ks[None, :],
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(p, tl.trans(q), acc, input_precision=PRECISION)
        # Row 0 scores with the CLS attention (column j ↔ attn[j-1]); local rows with cosines.
        inv_cols = tl.load(inv_ptr + b * stride_nb + cols, mask=c_ok, other=0.0)
        a = tl.load(attn_ptr + b * stride_ab + (cols - 1), mask=c_ok & (cols >= 1), other=0.0)
        cos = acc * inv_rows[:, None] * inv_cols[None, :]
        s = tl.where(rows[:, None] == 0, a.to(tl.float32)[None, :], cos)
        blocked = (cols[None, :] == rows[:, None]) | (cols[None, :] == 0) | (c_ok[None, :] == 0)
        if HAS_MASK:
            pad = tl.load(mask_ptr + b * stride_mb + cols, mask=c_ok, other=1)
            blocked = blocked | (pad[None, :] != 0)
        s = tl.where(blocked, float("-inf"), s)
        cand = _pack_key(s, cols[None, :])
        # Merge the tile into the running top-K: K rounds of "take the larger head" (keys are
        # unique, so exactly one entry leaves per round).
        merged = tl.full((BLOCK_R, KPAD), INT64_LOWEST, dtype=tl.int64)
        for t in tl.static_range(K):
            m = tl.maximum(tl.max(best, axis=1), tl.max(cand, axis=1))
            merged = tl.where(slots[None, :] == t, m[:, None], merged)
            best = tl.where(best == m[:, None], INT64_LOWEST, best)
            cand = tl.where(cand == m[:, None], INT64_LOWEST, cand)
        best = merged
    col = 2147483647 - (best - ((best >> 32) << 32))       # low 32 bits of the key
    out = idx_ptr + b * stride_ib + r_off[:, None] * stride_ir + slots[None, :]
    tl.store(out, col.to(tl.int32), mask=r_ok[:, None] & (slots[None, :] < K))


@triton.jit
def _gather_mm_kernel(w_ptr, idx_ptr, diag_ptr, c_ptr, v_ptr, y_ptr, R, D,
                      stride_wb, stride_wr, stride_vb, stride_vn, stride_yb, stride_yr,
                      K: tl.constexpr, HAS_DIAG: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = d < D
    ok = r_ok[:, None] & d_ok[None, :]
    v_base = v_ptr + b * stride_vb
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if HAS_DIAG:  # A[r, r] = diag[r] and A[r, 0] += c[r]
        dg = tl.load(diag_ptr + b * R + r, mask=r_ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + b * R + r, mask=r_ok, other=0.0).to(tl.float32)
        v_own = tl.load(v_base + r.to(tl.int64)[:, None] * stride_vn + d[None, :], mask=ok, other=0.0)
        v_0 = tl.load(v_base + d, mask=d_ok, other=0.0)
        acc += dg[:, None] * v_own.to(tl.float32) + c[:, None] * v_0.to(tl.float32)[None, :]
    for t in tl.static_range(K):
        w = tl.load(w_ptr + b * stride_wb + r * stride_wr + t, mask=r_ok, other=0.0).to(tl.float32)
        j = tl.load(idx_ptr + b * stride_wb + r * stride_wr + t, mask=r_ok, other=0)
        v = tl.load(v_base + j.to(tl.int64)[:, None] * stride_vn + d[None, :], mask=ok, other=0.0)
        acc += w[:, None] * v.to(tl.float32)
    tl.store(y_ptr + b * stride_yb + r.to(tl.int64)[:, None] * stride_yr + d[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter_mm_kernel(w_ptr, idx_ptr, diag_ptr, c_ptr, u_ptr, z_ptr, R, D,
                       stride_wb, stride_wr, stride_ub, stride_ur, stride_zb, stride_zn,
                       K: tl.constexpr, HAS_DIAG: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < R
    d_ok = d < D
    ok = r_ok[:, None] & d_ok[None, :]
    z_base = z_ptr + b * stride_zb
    u = tl.load(u_ptr + b * stride_ub + r.to(tl.int64)[:, None] * stride_ur + d[None, :],
                mask=ok, other=0.0).to(tl.float32)
    if HAS_DIAG:  # the transpose of A[r, r] = diag[r] and A[r, 0] += c[r]
        dg = tl.load(diag_ptr + b * R + r, mask=r_ok, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + b * R + r, mask=r_ok, other=0.0).to(tl.float32)
        tl.atomic_add(z_base + r.to(tl.int64)[:, None] * stride_zn + d[None, :], dg[:, None] * u,
                      mask=ok & (dg[:, None] != 0.0))
        tl.atomic_add(z_base + d, tl.sum(c[:, None] * u, axis=0), mask=d_ok)
    for t in tl.static_range(K):
        w = tl.load(w_ptr + b * stride_wb + r * stride_wr + t, mask=r_ok, other=0.0).to(tl.float32)
        j = tl.load(idx_ptr + b * stride_wb + r * stride_wr + t, mask=r_ok, other=0)
        tl.atomic_add(z_base + j.to(tl.int64)[:, None] * stride_zn + d[None, :],
                      w[:, None] * u, mask=ok & (w[:, None] != 0.0))


@triton.jit
def _sddmm_kernel(p_ptr, q_ptr, idx_ptr, out_ptr, R, D,
                  stride_pb, stride_pr, stride_qb, stride_qn, stride_ib, stride_ir,
                  K: tl.constexpr, KPAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    slots = tl.arange(0, KPAD)
    acc = tl.zeros((BLOCK_R, KPAD), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = r_ok[:, None] & (d[None, :] < D)
        p = tl.load(p_ptr + b * stride_pb + r.to(tl.int64)[:, None] * stride_pr + d[None, :],
                    mask=ok, other=0.0).to(tl.float32)
        for t in tl.static_range(K):
            j = tl.load(idx_ptr + b * stride_ib + r * stride_ir + t, mask=r_ok, other=0)
            q = tl.load(q_ptr + b * stride_qb + j.to(tl.int64)[:, None] * stride_qn + d[None, :],
                        mask=ok, other=0.0).to(tl.float32)
            acc = tl.where(slots[None, :] == t, acc + tl.sum(p * q, axis=1)[:, None], acc)
    tl.store(out_ptr + b * stride_ib + r[:, None] * stride_ir + slots[None, :], acc,
             mask=r_ok[:, None] & (slots[None, :] < K))


# ----------------------------------------------------------------------------------------------
# Launch wrappers (tiles: kernels/configs.py)

def _check_sparse(w: torch.Tensor | None, idx: torch.Tensor, b: int):
    if idx.dim() != 3 or idx.dtype != torch.int32 or not idx.is_contiguous() or idx.shape[0] != b:
        raise ValueError(f"idx must be a contiguous int32 [B, R, K] tensor, got {idx.dtype} "
                         f"{tuple(idx.shape)}")
    if w is not None and (w.shape != idx.shape or not w.is_contiguous()):
        raise ValueError(f"w must be contiguous with idx's shape {tuple(idx.shape)}, got {tuple(w.shape)}")


def _check_rows(t: torch.Tensor, name: str):
    if t.dim() != 3 or t.stride(-1) != 1:
        raise ValueError(f"{name} must be [B, *, D] with a unit stride along D, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")


def topk_incidence(x: torch.Tensor, inv_norm: torch.Tensor, attn: torch.Tensor, rows: torch.Tensor,
                   k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Column indices [B, R, k] (int32) of the top-k affinities of the rows ``rows`` [B, R].

    x [B, N, D] tokens (any float dtype), inv_norm [B, N] fp32 their inverse L2 norms (cosine =
    dot · inv_i · inv_j), attn [B, N-1] the CLS attention, mask [B, N] (True at padding) or None.
    Every row must have at least k candidates (checked by the caller).
    """
    _check_rows(x, "x")
    bsz, n, d = x.shape
    if inv_norm.shape != (bsz, n) or inv_norm.dtype != torch.float32 or inv_norm.stride(-1) != 1:
        raise ValueError(f"inv_norm must be fp32 [B, N] with unit stride, got {inv_norm.dtype} "
                         f"{tuple(inv_norm.shape)}")
    if attn.shape != (bsz, n - 1) or attn.stride(-1) != 1:
        raise ValueError(f"attn must be [B, N-1] with unit stride, got {tuple(attn.shape)}")
    if rows.dim() != 2 or rows.shape[0] != bsz or rows.dtype != torch.int32 or not rows.is_contiguous():
        raise ValueError(f"rows must be a contiguous int32 [B, R] tensor, got {rows.dtype} "
                         f"{tuple(rows.shape)}")
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        if mask.shape != (bsz, n) or mask.stride(-1) != 1:
            raise ValueError(f"mask must be [B, N] with unit stride, got {tuple(mask.shape)}")
    r = rows.shape[1]
    idx = torch.empty(bsz, r, k, device=x.device, dtype=torch.int32)
    launch = configs.hgnn_topk()
    grid = (bsz, triton.cdiv(r, launch.tiles["BLOCK_R"]))
    mask_arg = mask if mask is not None else rows
    _topk_kernel[grid](x, inv_norm, attn, rows, mask_arg, idx, n, d, r,
                       x.stride(0), x.stride(1), inv_norm.stride(0), attn.stride(0), rows.stride(0),
                       mask_arg.stride(0), idx.stride(0), idx.stride(1),
                       K=k, KPAD=max(2, triton.next_power_of_2(k)), HAS_MASK=mask is not None,
                       PRECISION="ieee", **launch.kwargs())
    return idx


def _check_diag(diag, c, idx):
    if (diag is None) != (c is None):
        raise ValueError("diag and c go together")
    if diag is not None:
        b, r, _ = idx.shape
        for name, t in (("diag", diag), ("c", c)):
            if t.shape != (b, r) or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous [B, R] = [{b}, {r}], got {tuple(t.shape)}")


def gather_mm(w: torch.Tensor, idx: torch.Tensor, v: torch.Tensor, diag: torch.Tensor | None = None,
              c: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Y = A·V -> [B, R, D] in ``out_dtype``, with A[r] = Σ_t w[r, t] e_{idx[r, t]} (+ diag[r] e_r
    + c[r] e_0 when given; then R must be V's N)."""
    _check_sparse(w, idx, v.shape[0])
    _check_rows(v, "V")
    _check_diag(diag, c, idx)
    bsz, r, k = idx.shape
    d = v.shape[2]
    if diag is not None and r != v.shape[1]:
        raise ValueError(f"diag needs one row per vertex: R={r}, N={v.shape[1]}")
    y = torch.empty(bsz, r, d, device=v.device, dtype=out_dtype)
    br, bd = configs.hgnn_rows_tile(r), configs.hgnn_feature_tile(d)
    grid = (bsz, triton.cdiv(r, br), triton.cdiv(d, bd))
    _gather_mm_kernel[grid](w, idx, diag if diag is not None else w, c if c is not None else w, v, y,
                            r, d, w.stride(0), w.stride(1), v.stride(0), v.stride(1),
                            y.stride(0), y.stride(1), K=k, HAS_DIAG=diag is not None,
                            BLOCK_R=br, BLOCK_D=bd)
    return y


def scatter_mm(w: torch.Tensor, idx: torch.Tensor, u: torch.Tensor, n: int,
               diag: torch.Tensor | None = None, c: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Z = Aᵀ·U -> [B, n, D] fp32 (the transpose of gather_mm; fp32 atomics). With ``out`` (fp32,
    contiguous) the products are added onto it in place and it is returned."""
    _check_sparse(w, idx, u.shape[0])
    _check_rows(u, "U")
    _check_diag(diag, c, idx)
    bsz, r, k = idx.shape
    if u.shape[1] != r:
        raise ValueError(f"U has {u.shape[1]} rows but idx {r}")
    if diag is not None and r != n:
        raise ValueError(f"diag needs one row per vertex: R={r}, N={n}")
    d = u.shape[2]
    if out is None:
        z = torch.zeros(bsz, n, d, device=u.device, dtype=torch.float32)
    else:
        if out.shape != (bsz, n, d) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous fp32 [{bsz}, {n}, {d}] tensor, got "
                             f"{out.dtype} {tuple(out.shape)}")
        z = out
    br, bd = configs.hgnn_rows_tile(r), configs.hgnn_feature_tile(d)
    grid = (bsz, triton.cdiv(r, br), triton.cdiv(d, bd))
    _scatter_mm_kernel[grid](w, idx, diag if diag is not None else w, c if c is not None else w, u, z,
                             r, d, w.stride(0), w.stride(1), u.stride(0), u.stride(1),
                             z.stride(0), z.stride(1), K=k, HAS_DIAG=diag is not None,
                             BLOCK_R=br, BLOCK_D=bd)
    return z


def sddmm(p: torch.Tensor, q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, r, t] = ⟨P[b, r], Q[b, idx[b, r, t]]⟩  ->  [B, R, K] fp32."""
    _check_sparse(None, idx, p.shape[0])
    _check_rows(p, "P")
    _check_rows(q, "Q")
    bsz, r, k = idx.shape
    d = p.shape[2]
    if p.shape[1] != r or q.shape[2] != d:
        raise ValueError(f"P {tuple(p.shape)} / Q {tuple(q.shape)} do not match idx {tuple(idx.shape)}")
    out = torch.empty(bsz, r, k, device=p.device, dtype=torch.float32)
    br, bd = configs.hgnn_rows_tile(r), configs.hgnn_sddmm_feature_tile()
    grid = (bsz, triton.cdiv(r, br))
    _sddmm_kernel[grid](p, q, idx, out, r, d, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
                        out.stride(0), out.stride(1), K=k, KPAD=max(2, triton.next_power_of_2(k)),
                        BLOCK_R=br, BLOCK_D=bd)
    return out
