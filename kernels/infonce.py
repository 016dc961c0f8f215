"""Fused label-guided InfoNCE: one tiled forward for both directions, recomputing backward.

With S = s · A Bᵀ ([N, N], never materialised) and the label mask
M[i, j] = (i ≠ j) and ids[i] == ids[j]:

* ``infonce_fwd(A, B)``: in one pass over the tiles of S, the row log-sum-exps
  lse_r[i] = log Σ_{j ∉ M[i]} exp S[i, j] (online, in registers), the column ones
  lse_c[j] = log Σ_{i ∉ M[:, j]} exp S[i, j] and the diagonal dots ⟨A_i, B_i⟩. Each program
  (row block × column chunk) writes one partial log-sum-exp per column of its chunk and one per
  row ([N/BLOCK_M + chunks, N] fp32 in all, ≈ 128 MiB at N = 65,536); a small kernel folds them.
  Nothing of size N×N exists.
* ``infonce_grad(A, B, lse_a, lse_b)``: dA[i] = c_p · Σ_j P[i, j] B_j + c_d · B_i with
  P[i, j] = exp(S[i, j] − lse_a[i]) + exp(S[i, j] − lse_b[j]) off the mask (0 on it), plus the
  per-row Σ_j P[i, j] ⟨A_i, B_j⟩ that the gradient of s needs. The mask is symmetric, so the
  gradient of B is the same kernel on the transposed problem (A and B, lse_a and lse_b swapped).
  S is recomputed tile by tile (a B×B of P is never stored); at small N the columns are split
  into chunks so that the grid fills the GPU, their fp32 partials summed by the wrapper.

Tiles of S live in registers only; the feature dimension is walked in BLOCK_K chunks; logits are
kept in base-2 units (exp2/log2); accumulation is fp32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs

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
        if UPCAST:  # the interpreter: compute in true fp32
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
def _infonce_fwd_kernel(a_ptr, b_ptr, ids_ptr, scale_ptr, diag_ptr, row_part_ptr, col_part_ptr,
                        N, D, stride_a, stride_b, CHUNK,
                        HAS_LABELS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row block ``pid_m`` of S against the column tiles of chunk ``pid_s`` (CHUNK columns, a
    multiple of BLOCK_M and BLOCK_N), both directions from the same tile: the rows' log-sum-exp
    over the chunk, online in registers, to row_part[pid_s, rows]; each column's log-sum-exp over
    the block's rows to col_part[pid_m, cols]. Partials are base 2; ``_lse_reduce_kernel`` folds
    them. Chunks keep the grid wide when N/BLOCK_M alone would leave SMs idle."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_start = pid_s * CHUNK
    col_end = tl.minimum(col_start + CHUNK, N)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    row_ids = rows
    if HAS_LABELS:
        row_ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    # A finite start keeps exp2(m_old - m_new) well defined when a whole tile is masked.
    m = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_part_row = col_part_ptr + pid_m.to(tl.int64) * N
    for n0 in range(col_start, col_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        dots = _dot_tile(a_ptr, b_ptr, rows, cols, N, D, stride_a, stride_b,
                         UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        diag += tl.sum(tl.where(rows[:, None] == cols[None, :], dots, 0.0), axis=1)
        keep = _keep_mask(ids_ptr, rows, cols, row_ids, N, HAS_LABELS) & row_ok[:, None]
        s2 = tl.where(keep, dots * scale2, float("-inf"))
        # image→text: online over the column tiles.
        m_new = tl.maximum(m, tl.max(s2, axis=1))
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), axis=1)
        m = m_new
        # text→image: this tile's share of each column (a column may be masked here entirely).
        cm = tl.max(s2, axis=0)
        cm = tl.where(cm == float("-inf"), 0.0, cm)
        cl = tl.sum(tl.exp2(s2 - cm[None, :]), axis=0)  # 0, or >= 1 (its max term is 1)
        part = tl.where(cl > 0.0, cm + tl.log2(tl.maximum(cl, 1.0)), float("-inf"))
        tl.store(col_part_row + cols, part, mask=cols < N)
    # l is 0 (every entry of the chunk masked) or >= 1.
    row_part = tl.where(l > 0.0, m + tl.log2(tl.maximum(l, 1.0)), float("-inf"))
    tl.store(row_part_ptr + pid_s.to(tl.int64) * N + rows, row_part, mask=row_ok)
    # The block's diagonal lies in exactly one chunk (CHUNK is a multiple of BLOCK_M).
    own = (pid_m * BLOCK_M >= col_start) & (pid_m * BLOCK_M < col_end)
    tl.store(diag_ptr + rows, diag, mask=row_ok & own)


@triton.jit
def _lse_reduce_kernel(part_ptr, lse_ptr, N, NUM_PARTS, BLOCK: tl.constexpr):
    """lse[j] = log-sum-exp over the partials part[:, j] (base 2 in, natural log out)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < N
    m = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
    l = tl.zeros((BLOCK,), dtype=tl.float32)
    part_ptr = part_ptr + cols
    for _ in range(0, NUM_PARTS):
        part = tl.load(part_ptr, mask=col_ok, other=float("-inf"))
        part_ptr += N  # pointer arithmetic is 64-bit: NUM_PARTS·N may exceed int32
        m_new = tl.maximum(m, part)
        l = l * tl.exp2(m - m_new) + tl.exp2(part - m_new)
        m = m_new
    l = tl.where(col_ok, l, 1.0)
    tl.store(lse_ptr + cols, (m + tl.log2(l)) / 1.4426950408889634, mask=col_ok)


@triton.jit
def _infonce_grad_kernel(a_ptr, b_ptr, ids_ptr, scale_ptr, coef_ptr, lse_a_ptr, lse_b_ptr,
                         da_ptr, dscale_rows_ptr,
                         N, D, stride_a, stride_b, stride_da, stride_split, CHUNK,
                         HAS_LABELS: tl.constexpr, WITH_DSCALE: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """dA for row block ``pid_m``, feature block ``pid_d``, from the columns of chunk ``pid_s``
    (CHUNK a multiple of BLOCK_M and BLOCK_N): written to da[pid_s] (the wrapper sums the chunks
    when there is more than one) together with the per-row Σ_j P ∘ ⟨A_i, B_j⟩."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dcol_ok = dcols < D
    col_start = pid_s * CHUNK
    col_end = tl.minimum(col_start + CHUNK, N)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    lse_a2 = tl.load(lse_a_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    row_ids = rows
    if HAS_LABELS:
        row_ids = tl.load(ids_ptr + rows, mask=row_ok, other=0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dscale = tl.zeros((BLOCK_M,), dtype=tl.float32)
    p_diag = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_start, col_end, BLOCK_N):
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
        # The diagonal goes through fp32, not the (possibly bf16) product below: its term
        # (coef_p·P_ii + coef_d)·B_i nearly cancels once the pairs are learned.
        on_diag = rows[:, None] == cols[None, :]
        p_diag += tl.sum(tl.where(on_diag, p, 0.0), axis=1)
        p = tl.where(on_diag, 0.0, p)
        b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        acc = tl.dot(p.to(b.dtype), b, acc, input_precision=PRECISION)
    coef_p = tl.load(coef_ptr)
    coef_d = tl.load(coef_ptr + 1)
    out_mask = row_ok[:, None] & dcol_ok[None, :]
    # The block's diagonal lies in exactly one chunk; that chunk adds the c_d · B_i term.
    own = (pid_m * BLOCK_M >= col_start) & (pid_m * BLOCK_M < col_end)
    b_own = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_b + dcols[None, :],
                    mask=out_mask & own, other=0.0).to(tl.float32)
    da = coef_p * acc + (coef_p * p_diag + coef_d)[:, None] * b_own
    da_block = da_ptr + pid_s.to(tl.int64) * stride_split
    tl.store(da_block + rows.to(tl.int64)[:, None] * stride_da + dcols[None, :],
             da.to(da_ptr.dtype.element_ty), mask=out_mask)
    if WITH_DSCALE:
        tl.store(dscale_rows_ptr + pid_s.to(tl.int64) * N + rows, dscale,
                 mask=row_ok & (pid_d == 0))


# ----------------------------------------------------------------------------------------------
# Launch wrappers: autotuned tiles on a GPU, fixed small ones in the interpreter (kernels/configs.py)

FWD_BLOCK_M = configs.INFONCE_FWD_BLOCK_M


def _autotuned(kernel, candidates):
    return triton.autotune(candidates, key=["N", "D", "HAS_LABELS", "UPCAST", "PRECISION"],
                           prune_configs_by={"early_config_prune": configs.infonce_prune})(kernel)


_fwd_tuned = _autotuned(_infonce_fwd_kernel, configs.INFONCE_FWD_AUTOTUNE)
_grad_tuned = _autotuned(_infonce_grad_kernel, configs.INFONCE_GRAD_AUTOTUNE)


def _precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) of the tile products.

    fp32 inputs follow torch's TF32 switch: TF32 when it is on, else 3×TF32 (split operands on
    tensor cores, fp32-level accuracy at a fraction of the FMA path's cost). Half inputs run on
    tensor cores as they are. The interpreter computes in true fp32 (its bf16 arithmetic is wrong).
    """
    if configs.interpreted():
        return True, "ieee"
    if dtype == torch.float32:
        return False, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
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


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _column_chunks(n: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(number of column chunks, columns per chunk) so that row blocks × chunks fill the GPU
    about twice; chunks are whole row blocks so that each block's diagonal sits in one chunk."""
    num_blocks = triton.cdiv(n, block_m)
    if configs.interpreted():
        want = configs.INFONCE_INTERPRETER_CHUNKS
    else:
        want = triton.cdiv(2 * _num_sms(device), num_blocks)
    want = max(1, min(want, num_blocks))
    chunk = triton.cdiv(num_blocks, want) * block_m
    return triton.cdiv(n, chunk), chunk


def infonce_fwd(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked row and column log-sum-exps of s·A Bᵀ and the diagonal dots ⟨A_i, B_i⟩ ([N] fp32 each).

    ``scale`` is a one-element fp32 tensor on the inputs' device (read by the kernel, no sync).
    Extra memory: the partials, (N/BLOCK_M + chunks) × N fp32 (≈ 128 MiB at N = 65,536).
    """
    _check(a, b, ids)
    n, d = a.shape
    block_m = configs.infonce_fwd_block_m()
    num_blocks = triton.cdiv(n, block_m)
    num_chunks, chunk = _column_chunks(n, block_m, a.device)
    lse_rows = torch.empty(n, device=a.device, dtype=torch.float32)
    lse_cols = torch.empty(n, device=a.device, dtype=torch.float32)
    diag = torch.empty(n, device=a.device, dtype=torch.float32)
    row_part = torch.empty(num_chunks, n, device=a.device, dtype=torch.float32)
    col_part = torch.empty(num_blocks, n, device=a.device, dtype=torch.float32)
    upcast, precision = _precision(a.dtype)
    ids_arg = ids if ids is not None else diag  # never read when HAS_LABELS is false
    args = (a, b, ids_arg, scale, diag, row_part, col_part, n, d, a.stride(0), b.stride(0), chunk)
    flags = dict(HAS_LABELS=ids is not None, UPCAST=upcast, PRECISION=precision, BLOCK_M=block_m)
    grid = (num_blocks, num_chunks)
    if configs.interpreted():
        _infonce_fwd_kernel[grid](*args, **flags, **configs.infonce_fwd_interpreter().kwargs())
    else:
        _fwd_tuned[grid](*args, **flags)
    reduce_block = configs.infonce_reduce_block()
    for part, lse in ((row_part, lse_rows), (col_part, lse_cols)):
        _lse_reduce_kernel[(triton.cdiv(n, reduce_block),)](part, lse, n, part.shape[0],
                                                            BLOCK=reduce_block)
    return lse_rows, lse_cols, diag


def infonce_grad(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
                 lse_a: torch.Tensor, lse_b: torch.Tensor, ids: torch.Tensor | None = None,
                 with_dscale: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dA = coef[0] · P B + coef[1] · B (in A's dtype) and, if asked, the per-row Σ_j P ∘ ⟨A_i, B_j⟩.

    P[i, j] = exp(S[i, j] − lse_a[i]) + exp(S[i, j] − lse_b[j]) off the mask, S = s·A Bᵀ.
    ``coef`` is a two-element fp32 tensor on the device. At small N the columns are split into
    chunks (more programs than row blocks alone give) whose fp32 partials are summed here.
    """
    _check(a, b, ids)
    n, d = a.shape
    granule = configs.infonce_grad_granule()
    if configs.interpreted():
        want = configs.INFONCE_INTERPRETER_CHUNKS
    else:
        want = triton.cdiv(2 * _num_sms(a.device), triton.cdiv(n, 64))
    num_granules = triton.cdiv(n, granule)
    want = max(1, min(want, num_granules))
    chunk = triton.cdiv(num_granules, want) * granule
    num_chunks = triton.cdiv(n, chunk)
    # One chunk: the kernel writes dA itself. Several: fp32 partials [chunks, N, D], summed below.
    if num_chunks == 1:
        da = torch.empty((n, d), device=a.device, dtype=a.dtype)
        row_stride, split_stride = da.stride(0), 0
    else:
        da = torch.empty((num_chunks, n, d), device=a.device, dtype=torch.float32)
        row_stride, split_stride = da.stride(1), da.stride(0)
    dscale_rows = (torch.empty(num_chunks, n, device=a.device, dtype=torch.float32)
                   if with_dscale else None)
    upcast, precision = _precision(a.dtype)
    ids_arg = ids if ids is not None else lse_a
    args = (a, b, ids_arg, scale, coef, lse_a, lse_b, da,
            dscale_rows if with_dscale else lse_a, n, d, a.stride(0), b.stride(0), row_stride,
            split_stride, chunk)
    flags = dict(HAS_LABELS=ids is not None, WITH_DSCALE=with_dscale, UPCAST=upcast,
                 PRECISION=precision)
    if configs.interpreted():
        tiles = configs.INFONCE_INTERPRETER.tiles
        grid = (triton.cdiv(n, tiles["BLOCK_M"]), triton.cdiv(d, tiles["BLOCK_D"]), num_chunks)
        _infonce_grad_kernel[grid](*args, **flags, **configs.INFONCE_INTERPRETER.kwargs())
    else:
        _grad_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_D"]),
                                  num_chunks)](*args, **flags)
    if with_dscale:
        dscale_rows = dscale_rows.sum(0)
    if num_chunks == 1:
        return da, dscale_rows
    return da.sum(0).to(a.dtype), dscale_rows
