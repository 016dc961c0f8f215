"""Triton ACE-HGNN kernels (TRITON_INTERPRET=1 on the CPU) against the float64 reference."""
import os

import pytest
import torch
import torch.nn.functional as F

from acelora.nn.hgnn import ACEHGNN
from acelora.ops import hypergraph as hg
from acelora.ops._backend import backend_available
from acelora.testing import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not backend_available("hypergraph_conv", "triton", torch.device(DEVICE))[0], reason="triton cannot run here")


def _inv(x):
    return x.float().norm(dim=-1).reciprocal()


def _kernels():
    from acelora.kernels import hypergraph
    return hypergraph


def _inputs(b, n, d, dtype=torch.float32, pad=None):
    x = F.normalize(torch.randn(b, n, d), dim=-1).to(DEVICE, dtype)
    attn = torch.rand(b, n - 1).softmax(-1).to(DEVICE)
    mask = None
    if pad is not None:
        mask = torch.zeros(b, n, dtype=torch.bool, device=DEVICE)
        for i, p in enumerate(pad):
            if p:
                mask[i, n - p:] = True
    return x, attn, mask


def _run(hgnn, x, attn, mask, global_only, backend, dtype=None):
    """Output and gradients (tokens, cls_attn, parameters) of one fwd+bwd."""
    hgnn.backend = backend
    hgnn.zero_grad()
    x = x.detach().clone().requires_grad_()
    attn = attn.detach().clone().requires_grad_()
    out = hgnn(x, attn, mask, global_only=global_only)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device, out.dtype)
    (out * w).sum().backward()
    return [out, x.grad, attn.grad] + [p.grad.clone() for p in hgnn.parameters()]


def _compare(x, attn, mask, k, global_only, dtype=torch.float32, tol=1e-5, dim=None):
    d = x.shape[-1]
    hgnn = ACEHGNN(dim=d, hidden=8, topk=k).to(DEVICE)
    ref64 = ACEHGNN(dim=d, hidden=8, topk=k).to(DEVICE).double()
    ref64.load_state_dict({n: v.double() for n, v in hgnn.state_dict().items()})
    hgnn.to(dtype)
    got = _run(hgnn, x, attn, mask, global_only, "triton")
    # float64 reference on the same (rounded) inputs and weights
    ref = _run(ref64, x.double(), attn.double(), mask, global_only, "reference")
    names = ["out", "d_tokens", "d_cls_attn"] + [n for n, _ in hgnn.named_parameters()]
    for name, g, r in zip(names, got, ref):
        assert g is not None, name
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


@pytest.mark.parametrize("global_only", [False, True])
@pytest.mark.parametrize("b,n,d,k,pad", [(2, 13, 16, 3, None), (2, 19, 32, 5, (0, 6)),
                                         (1, 11, 24, 1, None), (2, 9, 16, 7, None),
                                         (1, 20, 16, 4, (3,))])
def test_matches_reference_fp32(b, n, d, k, pad, global_only):
    x, attn, mask = _inputs(b, n, d, pad=pad)
    _compare(x, attn, mask, k, global_only)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("global_only", [False, True])
def test_matches_reference_half(dtype, global_only):
    x, attn, mask = _inputs(2, 14, 16, dtype, pad=(0, 3))
    _compare(x, attn, mask, 3, global_only, dtype=dtype, tol=3e-2)


def test_ties_duplicate_tokens():
    # Entries ±1/2 with four nonzeros: unit norm and exact dot products, so the ties are exact.
    base = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1],
                         [1, -1, 1, -1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.float32) / 2
    order = [0, 1, 1, 2, 3, 1, 0, 2, 3, 3, 1, 0]
    x = torch.cat([base[order], torch.zeros(12, 8)], 1)[None].repeat(2, 1, 1).to(DEVICE)
    attn = torch.tensor([0.2, 0.5, 0.5, 0.1, 0.5, 0.2, 0.5, 0.1, 0.3, 0.5, 0.2],
                        device=DEVICE)[None].repeat(2, 1)
    for k in (2, 4):
        _compare(x, attn, None, k, False)
        _compare(x, attn, None, k, True)
    rows = torch.arange(12, dtype=torch.int32, device=DEVICE).expand(2, 12).contiguous()
    idx = _kernels().topk_incidence(x, _inv(x), attn, rows, 4)
    s = hg.hypergraph_affinity(x, attn)
    _, want = torch.sort(s, dim=-1, descending=True, stable=True)
    assert torch.equal(idx.long(), want[..., :4])


def test_topk_negative_zero_ties_with_zero():
    # Row 0 scores are the attention values as given: −0.0 must tie with +0.0 (lower index wins).
    x, attn, _ = _inputs(1, 8, 16)
    attn = torch.tensor([[-1.0, -0.0, 0.0, -0.0, -2.0, 0.0, -3.0]], device=DEVICE)
    rows = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    idx = _kernels().topk_incidence(x, _inv(x), attn, rows, 4)
    assert idx[0, 0].tolist() == [2, 3, 4, 6]


def test_topk_incidence_rows_and_padding():
    x, attn, mask = _inputs(2, 20, 16, pad=(0, 7))
    s = hg.hypergraph_affinity(x, attn, mask)
    _, want = torch.sort(s, dim=-1, descending=True, stable=True)
    rows = torch.tensor([[0, 5, 19], [12, 0, 3]], dtype=torch.int32, device=DEVICE)
    idx = _kernels().topk_incidence(x, _inv(x), attn, rows, 5, mask)
    assert idx.shape == (2, 3, 5) and idx.dtype == torch.int32
    assert torch.equal(idx.long(), want.gather(1, rows.long()[:, :, None].expand(2, 3, 20))[..., :5])
    assert (idx[1] < 13).all()                                # padded columns never selected


def test_sparse_products_match_dense():
    k = _kernels()
    b, r, n, d, kk = 2, 7, 11, 20, 3
    idx = torch.randint(0, n, (b, r, kk), dtype=torch.int32, device=DEVICE)
    idx[0, 0] = 4                                             # duplicates: atomics must add up
    w = torch.randn(b, r, kk, device=DEVICE)
    v = torch.randn(b, n, d, device=DEVICE)
    u = torch.randn(b, r, d, device=DEVICE)
    dense = torch.zeros(b, r, n, dtype=torch.float64, device=DEVICE)
    dense.scatter_add_(2, idx.long(), w.double())
    assert rel_err(k.gather_mm(w, idx, v), dense @ v.double()) < 1e-6
    assert rel_err(k.scatter_mm(w, idx, u, n), dense.transpose(1, 2) @ u.double()) < 1e-6
    gathered = v.double()[torch.arange(b, device=DEVICE)[:, None, None], idx.long()]   # [B, R, K, D]
    want = torch.einsum("brd,brkd->brk", u.double(), gathered)
    assert rel_err(k.sddmm(u, v, idx), want) < 1e-6
    # bf16 operands: loaded, upcast, fp32 results (or stored in the dtype asked for)
    assert rel_err(k.gather_mm(w, idx, v.bfloat16()), dense @ v.bfloat16().double()) < 1e-6
    y16 = k.gather_mm(w, idx, v.bfloat16(), out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, dense @ v.bfloat16().double()) < 1e-2
    # with self loops (diag) and the global node's column (c): square A over the N vertices
    idx_n = torch.randint(0, n, (b, n, kk), dtype=torch.int32, device=DEVICE)
    w_n = torch.randn(b, n, kk, device=DEVICE)
    diag = (torch.rand(b, n, device=DEVICE) > 0.3).float()
    c = torch.randn(b, n, device=DEVICE)
    a = torch.zeros(b, n, n, dtype=torch.float64, device=DEVICE).scatter_add_(2, idx_n.long(), w_n.double())
    a = a + torch.diag_embed(diag.double())
    a[:, :, 0] += c.double()
    assert rel_err(k.gather_mm(w_n, idx_n, v, diag, c), a @ v.double()) < 1e-6
    assert rel_err(k.scatter_mm(w_n, idx_n, v, n, diag, c), a.transpose(1, 2) @ v.double()) < 1e-6


def test_non_contiguous_and_bad_inputs():
    x, attn, _ = _inputs(2, 10, 16)
    hgnn = ACEHGNN(dim=16, hidden=8, topk=3, backend="triton").to(DEVICE)
    ref = hgnn(x, attn)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.allclose(hgnn(xt, attn.t().contiguous().t()), ref, atol=1e-6)
    xs = torch.randn(2, 10, 32, device=DEVICE)[..., ::2]     # strided along D
    ref_s = ACEHGNN(dim=16, hidden=8, topk=3).to(DEVICE)
    ref_s.load_state_dict(hgnn.state_dict())
    assert rel_err(hgnn(xs, attn), ref_s(xs.contiguous(), attn)) < 1e-5
    with pytest.raises(TypeError, match="triton"):
        hgnn(x.double(), attn.double())
    with pytest.raises(ValueError, match="candidates"):
        ACEHGNN(dim=16, hidden=8, topk=9, backend="triton").to(DEVICE)(x, attn)
    k = _kernels()
    idx = torch.zeros(2, 3, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="int32"):
        k.gather_mm(torch.zeros(2, 3, 2, device=DEVICE), idx, x)
    with pytest.raises(ValueError, match="unit stride"):
        k.gather_mm(torch.zeros(2, 3, 2, device=DEVICE), idx.int(), x.transpose(1, 2))


def test_scatter_accumulates_into_out():
    k = _kernels()
    idx = torch.randint(0, 6, (2, 6, 2), dtype=torch.int32, device=DEVICE)
    w = torch.randn(2, 6, 2, device=DEVICE)
    u = torch.randn(2, 6, 20, device=DEVICE)
    base = torch.randn(2, 6, 20, device=DEVICE)
    out = k.scatter_mm(w, idx, u, 6, out=base.clone())
    assert rel_err(out, base + k.scatter_mm(w, idx, u, 6)) < 1e-6
    with pytest.raises(ValueError, match="fp32"):
        k.scatter_mm(w, idx, u, 6, out=base.double())


_AOT_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import acelora  # noqa: F401  (exposes acelora.kernels)
from acelora.kernels import hypergraph as hk

i32 = "i32"
def build(fn, sig, consts):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32))

strides = lambda *names: {n: i32 for n in names}
build(hk._topk_kernel, dict(x_ptr="*bf16", inv_ptr="*fp32", attn_ptr="*fp32", rows_ptr="*i32",
      mask_ptr="*u8", idx_ptr="*i32", **strides("N", "D", "R", "stride_xb", "stride_xn", "stride_nb",
      "stride_ab", "stride_rb", "stride_mb", "stride_ib", "stride_ir")),
      dict(K=5, KPAD=8, HAS_MASK=True, PRECISION="ieee", BLOCK_R=32, BLOCK_N=64, BLOCK_K=32))
for name, io in (("_gather_mm_kernel", ("v_ptr", "y_ptr")), ("_scatter_mm_kernel", ("u_ptr", "z_ptr"))):
    s = "v" if io[0] == "v_ptr" else "u"
    o = "y" if io[1] == "y_ptr" else "z"
    build(getattr(hk, name), dict(w_ptr="*fp32", idx_ptr="*i32", diag_ptr="*fp32", c_ptr="*fp32",
          **{io[0]: "*bf16", io[1]: "*bf16" if o == "y" else "*fp32"},
          **strides("R", "D", "stride_wb", "stride_wr", f"stride_{s}b", f"stride_{s}{'n' if s == 'v' else 'r'}",
                    f"stride_{o}b", f"stride_{o}{'r' if o == 'y' else 'n'}")),
          dict(K=5, HAS_DIAG=True, BLOCK_R=16, BLOCK_D=256))
build(hk._sddmm_kernel, dict(p_ptr="*bf16", q_ptr="*fp32", idx_ptr="*i32", out_ptr="*fp32",
      **strides("R", "D", "stride_pb", "stride_pr", "stride_qb", "stride_qn", "stride_ib", "stride_ir")),
      dict(K=5, KPAD=8, BLOCK_R=16, BLOCK_D=64))
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above compile the kernels")
def test_kernels_compile_for_a_gpu():
    # The interpreter does not type-check like the compiler: build the GPU code (sm_90) here too.
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0 and ("ptxas" in proc.stderr.lower() or "nvidia" in proc.stderr.lower()
                                 and "not found" in proc.stderr.lower()):
        pytest.skip(f"no CUDA toolchain for triton: {proc.stderr[-300:]}")
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
