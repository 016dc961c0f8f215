"""Fused label-guided InfoNCE: tiled log-sum-exp forward and recomputing backward.

With S = s · A Bᵀ ([N, N], never materialised) and the label mask
M[i, j] = (i ≠ j) and ids[i] == ids[j], the two kernels here work on the *rows* of S:

* ``infonce_lse(A, B)``: lse[i] = log Σ_{j ∉ M[i]} exp(S[i, j]) and the diagonal dot ⟨A_i, B_i⟩.
* ``infonce_grad(A, B, lse_a, lse_b)``: dA[i] = c_p · Σ_j P[i, j] B_j + c_d · B_i with
  P[i, j] = exp(S[i, j] − lse_a[i]) + exp(S[i, j] − lse_b[j]) off the mask (0 on it), plus the
  per-row Σ_j P[i, j] ⟨A_i, B_j⟩ that the gradient of s needs.

The mask is symmetric, so the column (text→image) quantities are the row quantities of the
transposed problem: callers run each kernel twice with A and B swapped. Tiles of S live in
registers only; the feature dimension is walked in BLOCK_K chunks. Accumulation is fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2 e): logits are kept in base-2 units


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, N, D, stride_a, stride_b,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """⟨A_i, B_j⟩ for a BLOCK_M × BLOCK_N tile, fp32 accumulation over D in BLOCK_K chunks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ok = rows[:, None] < N
    col_ok = cols[:, None] < N
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks[None, :] < D
        a = tl.load(a_rows + ks[None, :], mask=row_ok & k_ok, other=0.0)
        b = tl.load(b_rows + ks[None, :], mask=col_ok & k_ok, other=0.0)
        if UPCAST:  # interpreter / fp32 without TF32: compute in true fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _keep_mask(ids_ptr, rows, cols, row_ids, N, HAS_LABELS: tl.constexpr):
    """Entries that stay in the softmax: real columns, minus same-label off-diagonal pairs."""
    keep = (cols[None, :] < N) & (rows[:, None] >= 0)
    if HAS_LABELS:
        col_ids = tl.load(ids_ptr + cols, mask=cols < N, other=0)
        same = (row_ids[:, None] == col_ids[None, :]) & (rows[:, None] != cols[None, :])
        keep = keep & (same == 0)
    return keep


@triton.jit
def _infonce_lse_kernel(a_ptr, b_ptr, ids_ptr, scale_ptr, lse_ptr, diag_ptr,
                        N, D, stride_a, stride_b,
                        HAS_LABELS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    row_ids = rows
    if HAS_LABELS:
        row_ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    # A finite start keeps exp2(m_old - m_new) well defined when a whole tile is masked.
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dots = _dot_tile(a_ptr, b_ptr, rows, cols, N, D, stride_a, stride_b,
                         UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], dots, 0.0), axis=1)
        keep = _keep_mask(ids_ptr, rows, cols, row_ids, N, HAS_LABELS)
        s2 = tl.where(keep, dots * scale2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m = m_new
    l = tl.where(row_ok, l, 1.0)  # padding rows may have every entry masked
    lse = (m + tl.log2(l)) / 1.4426950408889634
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(diag_ptr + rows, diag, mask=row_ok)


@triton.jit
def _infonce_grad_kernel(a_ptr, b_ptr, ids_ptr, scale_ptr, coef_ptr, lse_a_ptr, lse_b_ptr,
                         da_ptr, dscale_rows_ptr,
                         N, D, stride_a, stride_b, stride_da,
                         HAS_LABELS: tl.constexpr, WITH_DSCALE: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dcol_ok = dcols < D
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    lse_a2 = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    row_ids = rows
    if HAS_LABELS:
        row_ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        dots = _dot_tile(a_ptr, b_ptr, rows, cols, N, D, stride_a, stride_b,
                         UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        keep = _keep_mask(ids_ptr, rows, cols, row_ids, N, HAS_LABELS) & row_ok[:, None]
        s2 = dots * scale2
        lse_b2 = tl.load(lse_b_ptr + cols, mask=col_ok, other=0.0) * 1.4426950408889634
        # Row softmax (this direction) plus column softmax (the other direction).
        p = tl.exp2(s2 - lse_a2[:, None]) + tl.exp2(s2 - lse_b2[None, :])
        p = tl.where(keep, p, 0.0)
        if WITH_DSCALE:
            dscale += tl.sum(p * dots, axis=1)
        b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        acc = tl.dot(p.to(b.dtype), b, acc, input_precision=PRECISION)
    coef_p = tl.load(coef_ptr)
    coef_d = tl.load(coef_ptr + 1)
    out_mask = row_ok[:, None] & dcol_ok[None, :]
    b_own = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=out_mask, other=0.0).to(tl.float32)
    da = coef_p * acc + coef_d * b_own
    tl.store(da_ptr + rows.to(tl.int64)[:, None] * stride_da + dcols[None, :],
             da.to(da_ptr.dtype.element_ty), mask=out_mask)
    if WITH_DSCALE:
        tl.store(dscale_rows_ptr + rows, dscale, mask=row_ok & (pid_d == 0))


# ----------------------------------------------------------------------------------------------
# Launch configuration: fixed small tiles in the interpreter, autotuned tiles on a GPU.

def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_LSE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 64, 64, 8, 3),
                              (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
                              (32, 64, 64, 4, 3), (64, 64, 128, 4, 2)]
]
_GRAD_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd},
                  num_warps=w, num_stages=st)
    for bm, bn, bk, bd, w, st in [(64, 64, 64, 128, 4, 3), (64, 64, 64, 256, 8, 3),
                                  (128, 64, 64, 128, 8, 3), (128, 64, 64, 256, 8, 2),
                                  (64, 128, 64, 128, 8, 3), (32, 64, 64, 256, 4, 3),
                                  (64, 64, 32, 512, 8, 2), (128, 128, 64, 128, 8, 3)]
]
# Interpreter tiles: small so that ragged edges are exercised at test sizes.
INTERPRETER_TILES = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}

_lse_tuned = triton.autotune(_LSE_CONFIGS, key=["N", "D", "HAS_LABELS", "UPCAST"])(
    _infonce_lse_kernel)
_grad_tuned = triton.autotune(_GRAD_CONFIGS, key=["N", "D", "HAS_LABELS", "UPCAST"])(
    _infonce_grad_kernel)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION): fp32 inputs follow torch's TF32 switch; half inputs use tensor cores."""
    if _interpreted():
        return True, "ieee"
    if dtype == torch.float32:
        if torch.backends.cuda.matmul.allow_tf32:
            return False, "tf32"
        return True, "ieee"
    return False, "tf32"  # ignored for bf16/fp16 operands


def _check(a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor | None):
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16) or a.dtype != b.dtype:
        raise TypeError(f"infonce kernels take float32/bfloat16/float16 inputs of one dtype, "
                        f"got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"infonce kernels need two [N, D] inputs of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.stride(-1) != 1 or b.stride(-1) != 1:
        raise ValueError("infonce kernels need a unit stride along the feature dimension")
    if ids is not None and (ids.shape != (a.shape[0],) or ids.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"ids must be int32/int64 of shape [{a.shape[0]}], got "
                         f"{ids.dtype} {tuple(ids.shape)}")


def infonce_lse(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked row log-sum-exp of s·A Bᵀ ([N] fp32) and the diagonal dots ⟨A_i, B_i⟩ ([N] fp32).

    ``scale`` is a one-element fp32 tensor on the inputs' device (read by the kernel, no sync).
    """
    _check(a, b, ids)
    n, d = a.shape
    lse = torch.empty(n, device=a.device, dtype=torch.float32)
    diag = torch.empty(n, device=a.device, dtype=torch.float32)
    upcast, precision = _precision(a.dtype)
    ids_arg = ids if ids is not None else lse  # never read when HAS_LABELS is false
    args = (a, b, ids_arg, scale, lse, diag, n, d, a.stride(0), b.stride(0))
    flags = dict(HAS_LABELS=ids is not None, UPCAST=upcast, PRECISION=precision)
    if _interpreted():
        tiles = {k: INTERPRETER_TILES[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        _infonce_lse_kernel[(triton.cdiv(n, tiles["BLOCK_M"]),)](*args, **flags, **tiles)
    else:
        _lse_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)](*args, **flags)
    return lse, diag


def infonce_grad(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                 lse_a: torch.Tensor, lse_b: torch.Tensor, ids: torch.Tensor | None = None,
                 with_dscale: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dA = coef[0] · P B + coef[1] · B (in A's dtype) and, if asked, the per-row Σ_j P ∘ ⟨A_i, B_j⟩.

    P[i, j] = exp(S[i, j] − lse_a[i]) + exp(S[i, j] − lse_b[j]) off the mask, S = s·A Bᵀ.
    ``coef`` is a two-element fp32 tensor on the device.
    """
    _check(a, b, ids)
    n, d = a.shape
    da = torch.empty_like(a, memory_format=torch.contiguous_format)
    dscale_rows = torch.empty(n, device=a.device, dtype=torch.float32) if with_dscale else None
    upcast, precision = _precision(a.dtype)
    ids_arg = ids if ids is not None else lse_a
    args = (a, b, ids_arg, scale, coef, lse_a, lse_b, da,
            dscale_rows if with_dscale else lse_a, n, d, a.stride(0), b.stride(0), da.stride(0))
    flags = dict(HAS_LABELS=ids is not None, WITH_DSCALE=with_dscale, UPCAST=upcast,
                 PRECISION=precision)
    if _interpreted():
        tiles = INTERPRETER_TILES
        grid = (triton.cdiv(n, tiles["BLOCK_M"]), triton.cdiv(d, tiles["BLOCK_D"]))
        _infonce_grad_kernel[grid](*args, **flags, **tiles)
    else:
        _grad_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]))](
            *args, **flags)
    return da, dscale_rows
