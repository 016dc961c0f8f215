"""ACE-HGNN hypergraph convolution (DESIGN §5): incidence construction and message passing.

Per sample, with tokens X [N, D] (token 0 the global CLS token) and the CLS attention row a [N-1]:

    S[0, j] = a[j-1] (j ≥ 1)      S[i, j] = cos(x_i, x_j) (i, j ≥ 1)      S[i, i] = S[i, 0] = −∞ (i ≥ 1)
    A = softmax over the top-k of each row of S (ties to the lower index), 0 elsewhere
    A[i, i] = 1 (self loops);  A[j, 0] = A[0, j] for j ≥ 1 (the global node is symmetric)
    E = f_e(A X)    (row i of A is hyperedge i: vertex → hyperedge)
    Out = f_n(Aᵀ E) (hyperedge → vertex)

Padding (``key_padding_mask`` True at padded positions): a padded position is not a vertex: it is
never selected, has no row and no self loop, and its output row is 0.

Global-only path: Out[0] = f_n(E_0 + Σ_{j ∈ top-k(0)} A[0, j] E_j) needs only the rows
{0} ∪ top-k(0) of S and E: O(k·N·D) per sample instead of O(N²·D).

Backends: ``"reference"`` (eager PyTorch; dense N×N for the full output, gathers for the
global-only path; the CPU path and the test oracle) and ``"triton"`` (acelora.ops.hypergraph_triton
over acelora.kernels.hypergraph; no N×N tensor anywhere). The Triton backend keeps A sparse:

    A[i] = Σ_t w[i, t] e_{idx[i, t]} + real[i] e_i + c[i] e_0

with idx [B, N, k] from the tiled top-k kernel (selection is piecewise constant: no gradient), w the
softmax of the kept values (recomputed differentiably from sparse dots, [B, N, k], in torch), real
the self loops (0 at padding) and c[i] = A[0, i] the global node's symmetric column. A·X and Aᵀ·E
are gather/scatter kernels that take the self loops and c along; backward is the same kernels
transposed. The graph arithmetic is fp32 (also under autocast); the MLPs f_e/f_n are ordinary
torch callables and follow the caller's dtype/autocast.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from acelora.ops._backend import implementation, register

OP = "hypergraph_conv"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by every backend)

def check_hypergraph_args(tokens, cls_attn, topk, key_padding_mask=None) -> None:
    """Raise a clear error for inputs the hypergraph op cannot take (shapes, dtypes, devices, k)."""
    if not torch.is_tensor(tokens):
        raise TypeError(f"tokens must be a tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got shape {tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"tokens must be floating point, got {tokens.dtype}")
    b, n, d = tokens.shape
    if b == 0 or d == 0:
        raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
    if n < 3:
        raise ValueError(f"tokens need a global token and at least 2 local tokens, got N={n}")
    if not torch.is_tensor(cls_attn):
        raise TypeError(f"cls_attn must be a tensor, got {type(cls_attn).__name__}")
    if cls_attn.shape != (b, n - 1):
        raise ValueError(f"cls_attn must be [B, N-1] = [{b}, {n - 1}] (the CLS row over keys 1..N-1), "
                         f"got shape {tuple(cls_attn.shape)}")
    if not cls_attn.is_floating_point():
        raise TypeError(f"cls_attn must be floating point, got {cls_attn.dtype}")
    if cls_attn.device != tokens.device:
        raise ValueError(f"tokens are on {tokens.device} but cls_attn on {cls_attn.device}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if key_padding_mask is not None:
        if not torch.is_tensor(key_padding_mask):
            raise TypeError(f"key_padding_mask must be a tensor or None, got "
                            f"{type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (b, n):
            raise ValueError(f"key_padding_mask must be [B, N] = [{b}, {n}], got shape "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True at padding), got {key_padding_mask.dtype}")
        if key_padding_mask.device != tokens.device:
            raise ValueError(f"tokens are on {tokens.device} but key_padding_mask on "
                             f"{key_padding_mask.device}")
    _check_topk_fits(topk, n, key_padding_mask)


def _check_topk_fits(topk: int, n: int, key_padding_mask) -> None:
    # A local row chooses among the other local vertices: (vertices - 2) candidates.
    if topk > n - 2:  # static: padding can only lower the count
        raise ValueError(f"topk={topk} is larger than the number of candidates per row "
                         f"({n - 2} = N-2 local tokens besides the row's own, N={n})")
    if key_padding_mask is None:
        return
    real = (~key_padding_mask).sum(1)
    if key_padding_mask.device.type != "cpu" or torch.compiler.is_compiling():
        # No host sync in the hot path (a GPU stall every masked call) and no graph break: a
        # device-side assert (raises at the next sync on a GPU; RuntimeError on the CPU when
        # compiled). For the exact ValueError below, call once with the mask on the CPU.
        ok = (real.min() >= topk + 2) & ~key_padding_mask[:, 0].any()
        torch._assert_async(ok, f"hypergraph: topk={topk} is larger than the number of "
                                "candidates per row of some sample (vertices - 2), or "
                                "key_padding_mask marks position 0 (the global token) as padding")
        return
    # CPU tensors: one cheap host read; the number of vertices per sample and whether the global
    # token is padded.
    stats = torch.stack([real.min(), real.argmin(), key_padding_mask[:, 0].any().long()]).tolist()
    if stats[2]:
        raise ValueError("key_padding_mask marks position 0 (the global token) as padding")
    if topk > stats[0] - 2:
        raise ValueError(f"topk={topk} is larger than the number of candidates per row: sample "
                         f"{stats[1]} has {stats[0]} vertices (global + {stats[0] - 1} local), so only "
                         f"{stats[0] - 2} candidates; pad fewer positions or lower topk")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fp32_graph(device: torch.device):
    """The graph arithmetic (affinities, A·X, Aᵀ·E) stays in fp32+ under autocast; only the MLPs
    follow the caller's autocast (a bf16 affinity would change which tokens are selected)."""
    return torch.autocast(device.type, enabled=False)


def _topk_lower_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties to the lower index (torch.topk leaves ties unspecified)."""
    values, index = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], index[..., :k]


# ----------------------------------------------------------------------------------------------
# Reference: dense incidence

def hypergraph_affinity(tokens: torch.Tensor, cls_attn: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The affinity S [B, N, N] (step 1 of DESIGN §5), −∞ where a row may not select.

    Padded columns are −∞; rows of padded positions are computed but unused.
    """
    dtype = _compute_dtype(tokens.dtype)
    b, n, _ = tokens.shape
    with _fp32_graph(tokens.device):
        # dot x inverse norms, as the global-only path and the kernels: identical top-k on near-ties
        x = tokens.to(dtype)
        inv = x.norm(dim=-1).clamp_min(1e-12).reciprocal()                   # [B, N]
        local = (x[:, 1:] @ x.transpose(1, 2)) * (inv[:, 1:, None] * inv[:, None, :])  # [B, N-1, N]
    row0 = torch.cat([cls_attn.new_full((b, 1), NEG_INF).to(dtype), cls_attn.to(dtype)], 1)
    s = torch.cat([row0[:, None], local], 1)
    ar = torch.arange(n, device=tokens.device)
    blocked = (ar[:, None] == ar[None, :]) | ((ar[None, :] == 0) & (ar[:, None] > 0))
    blocked = blocked[None]
    if key_padding_mask is not None:
        blocked = blocked | key_padding_mask[:, None, :]
    return s.masked_fill(blocked, NEG_INF)


def hypergraph_incidence(tokens: torch.Tensor, cls_attn: torch.Tensor, topk: int = 5,
                         key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The dense incidence A [B, N, N] (steps 1-3 of DESIGN §5); differentiable in the kept values.

    Row i is hyperedge i. Rows and columns of padded positions are 0.
    """
    check_hypergraph_args(tokens, cls_attn, topk, key_padding_mask)
    return _incidence(tokens, cls_attn, topk, key_padding_mask)


def _incidence(tokens, cls_attn, topk, key_padding_mask):
    s = hypergraph_affinity(tokens, cls_attn, key_padding_mask)
    n = s.shape[-1]
    values, index = _topk_lower_index(s, topk)
    a = torch.zeros_like(s).scatter(-1, index, torch.softmax(values, -1))
    real = torch.ones_like(s[:, :, 0]) if key_padding_mask is None else (~key_padding_mask).to(s.dtype)
    a = a * real[:, :, None]                                     # padded positions have no row
    sym = a[:, 0, :] * (torch.arange(n, device=s.device) > 0)    # A[j, 0] := A[0, j] for j ≥ 1
    onehot0 = F.one_hot(torch.zeros((), dtype=torch.long, device=s.device), n).to(s.dtype)
    return a + torch.diag_embed(real) + sym[:, :, None] * onehot0


def _dense_forward(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask):
    a = _incidence(tokens, cls_attn, topk, key_padding_mask)
    with _fp32_graph(tokens.device):
        h = a @ tokens.to(a.dtype)
    e = edge_fn(h.to(tokens.dtype))                              # vertex → hyperedge
    with _fp32_graph(tokens.device):
        z = a.transpose(1, 2) @ e.to(a.dtype)
    out = node_fn(z.to(e.dtype))                                 # hyperedge → vertex
    if key_padding_mask is not None:
        out = out.masked_fill(key_padding_mask[:, :, None], 0.0)
    return out


# ----------------------------------------------------------------------------------------------
# Reference: global-only path (rows {0} ∪ top-k(0) only)

def _global_only_forward(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask):
    s0 = _row0_scores(tokens, cls_attn, key_padding_mask)
    i0, ir = _global_select_reference(tokens, s0, topk, key_padding_mask)
    return _global_tail(tokens, s0, i0, ir, edge_fn, node_fn)


def _row0_scores(tokens, cls_attn, key_padding_mask):
    s0 = cls_attn.to(_compute_dtype(tokens.dtype))
    if key_padding_mask is not None:
        s0 = s0.masked_fill(key_padding_mask[:, 1:], NEG_INF)
    return s0


@torch.no_grad()
def _global_select_reference(tokens, s0, k, key_padding_mask):
    """top-k(0) [B, k] (token positions) and the top-k of each of those rows [B, k, k]."""
    b, n, d = tokens.shape
    x = tokens.to(s0.dtype)
    _, i0 = _topk_lower_index(s0, k)
    i0 = i0 + 1
    inv = x.norm(dim=-1).clamp_min(1e-12).reciprocal()           # [B, N]
    x_sel = x.gather(1, i0[:, :, None].expand(b, k, d))
    with _fp32_graph(tokens.device):
        sr = (x_sel @ x.transpose(1, 2)) * (inv.gather(1, i0)[:, :, None] * inv[:, None, :])
    ar = torch.arange(n, device=tokens.device)
    blocked = (ar[None, None, :] == i0[:, :, None]) | (ar == 0)[None, None, :]
    if key_padding_mask is not None:
        blocked = blocked | key_padding_mask[:, None, :]
    _, ir = _topk_lower_index(sr.masked_fill(blocked, NEG_INF), k)
    return i0, ir


def _global_tail(tokens, s0, i0, ir, edge_fn, node_fn):
    """Out[0] from a fixed selection: one differentiable gather of the 1 + k + k² rows used, the
    kept values recomputed from them, so autograd touches nothing of size N·D but that gather."""
    dtype = s0.dtype
    b, _, d = tokens.shape
    k = i0.shape[1]
    x = tokens.to(dtype)
    rows = torch.cat([torch.zeros_like(i0[:, :1]), i0, ir.reshape(b, k * k)], 1)
    with _fp32_graph(tokens.device):  # small batched products, kept in fp32 under autocast
        xs = x.gather(1, rows[:, :, None].expand(b, rows.shape[1], d))     # [B, 1+k+k², D]
        inv = xs.norm(dim=-1).clamp_min(1e-12).reciprocal()
        x0, x_sel, x_nb = xs[:, 0], xs[:, 1:k + 1], xs[:, k + 1:].reshape(b, k, k, d)
        vr = (x_nb @ x_sel[..., None])[..., 0] * (inv[:, 1:k + 1, None] * inv[:, k + 1:].reshape(b, k, k))
        w0 = torch.softmax(s0.gather(1, i0 - 1), -1)                      # [B, k]
        wr = torch.softmax(vr, -1)                                        # [B, k, k]
        # Hyperedge inputs: h_0 = x_0 + Σ_t w0_t x_{i0_t};
        # h_t = x_{i0_t} + w0_t x_0 (global symmetry) + Σ_s wr_ts x_{ir_ts}.
        h0 = x0 + (w0[:, None, :] @ x_sel)[:, 0]
        hr = x_sel + w0[:, :, None] * x0[:, None] + (wr[:, :, None, :] @ x_nb)[:, :, 0]
        h = torch.cat([h0[:, None], hr], 1)                               # [B, k+1, D]
    e_raw = edge_fn(h.to(tokens.dtype))
    with _fp32_graph(tokens.device):
        e = e_raw.to(dtype)
        g = e[:, 0] + (w0[:, None, :] @ e[:, 1:])[:, 0]                   # column 0 of A: 1 and A[j, 0]
    return node_fn(g.to(e_raw.dtype))


def hypergraph_conv_reference(tokens: torch.Tensor, cls_attn: torch.Tensor,
                              edge_fn: Callable, node_fn: Callable, topk: int = 5,
                              key_padding_mask: torch.Tensor | None = None,
                              global_only: bool = False) -> torch.Tensor:
    """Eager PyTorch ACE-HGNN layer. The CPU path and the test oracle."""
    check_hypergraph_args(tokens, cls_attn, topk, key_padding_mask)
    return _reference_impl(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask, global_only)


def _reference_impl(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask, global_only):
    if global_only:
        return _global_only_forward(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask)
    return _dense_forward(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask)


# Registered implementations run after hypergraph_conv has checked the arguments.
register(OP, "reference", _reference_impl)


def hypergraph_conv(tokens: torch.Tensor, cls_attn: torch.Tensor, edge_fn: Callable,
                    node_fn: Callable, topk: int = 5, key_padding_mask: torch.Tensor | None = None,
                    global_only: bool = False, backend: str = "auto") -> torch.Tensor:
    """One ACE-HGNN layer (see the module docstring).

    Args:
        tokens: [B, N, D] tower output tokens (token 0 global); not normalised here.
        cls_attn: [B, N-1] CLS attention row of the last block (keys 1..N-1).
        edge_fn, node_fn: the hyperedge and node MLPs (callables on [..., D]).
        topk: hyperedge size k; at most the number of candidates per row (vertices - 2).
        key_padding_mask: [B, N] bool, True at padding (such positions are not vertices).
        global_only: return only Out[0] ([B, D]) via the rows {0} ∪ top-k(0).
        backend: "auto" | "reference" | "triton" (``TRITON_DTYPES`` tokens); see
            ``acelora.ops.use_backend``.
    Returns:
        [B, N, D] (padded rows 0) or [B, D].
    """
    check_hypergraph_args(tokens, cls_attn, topk, key_padding_mask)
    fn = implementation(OP, backend, tokens.device, tokens.dtype)
    return fn(tokens, cls_attn, edge_fn, node_fn, topk, key_padding_mask, global_only)
