"""acelora.ops.hypergraph reference: affinity and incidence rules (DESIGN §5), dispatch."""
import pytest
import torch
import torch.nn.functional as F

import acelora
from acelora.ops import hypergraph as hg
from acelora.testing import rel_err


def _inputs(b, n, d, dtype=torch.float64):
    return torch.randn(b, n, d, dtype=dtype), torch.rand(b, n - 1, dtype=dtype)


def naive_incidence(x, a, k, mask=None):
    b_, n, _ = x.shape
    out = torch.zeros(b_, n, n, dtype=torch.float64)
    for b in range(b_):
        real = [True] * n if mask is None else [not bool(m) for m in mask[b]]
        for i in range(n):
            if not real[i]:
                continue
            cands = []
            for j in range(1, n):
                if j != i and real[j]:
                    v = a[b, j - 1] if i == 0 else F.cosine_similarity(x[b, i], x[b, j], 0)
                    cands.append((float(v), j))
            kept = sorted(cands, key=lambda c: (-c[0], c[1]))[:k]
            w = torch.softmax(torch.tensor([v for v, _ in kept], dtype=torch.float64), 0)
            for wj, (_, j) in zip(w, kept):
                out[b, i, j] = wj
                if i == 0:
                    out[b, j, 0] = wj
            out[b, i, i] = 1.0
    return out


def test_affinity_rules():
    x, a = _inputs(2, 7, 5)
    s = hg.hypergraph_affinity(x, a)
    assert s.shape == (2, 7, 7)
    assert torch.isneginf(s.diagonal(dim1=1, dim2=2)).all()
    assert torch.isneginf(s[:, 1:, 0]).all()
    assert torch.equal(s[:, 0, 1:], a)
    cos = F.cosine_similarity(x[:, :, None], x[:, None], dim=-1)
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.allclose(s[:, 1:, 1:][:, off], cos[:, 1:, 1:][:, off])
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    sm = hg.hypergraph_affinity(x, a, mask)
    assert torch.isneginf(sm[1, :, 5:]).all() and not torch.isneginf(sm[0, 0, 5:]).any()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_incidence_matches_naive(k):
    x, a = _inputs(3, 8, 6)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[2, 7:] = True
    for m in (None, mask):
        got = acelora.ops.hypergraph_incidence(x, a, topk=k, key_padding_mask=m)
        assert rel_err(got, naive_incidence(x, a, k, m)) < 1e-12
    got = acelora.ops.hypergraph_incidence(x, a, topk=k)
    # structure: row 0 = self + softmax, column 0 mirrors row 0, k + 1 (+1) nonzeros per row
    assert torch.allclose(got[:, 0].sum(-1), torch.full((3,), 2.0, dtype=torch.float64))
    assert torch.equal(got[:, 1:, 0], got[:, 0, 1:])
    nnz = (got[:, 1:] != 0).sum(-1)
    assert ((nnz == k + 1) | (nnz == k + 2)).all()


def test_conv_with_identity_mlps_is_AtAX():
    x, a = _inputs(2, 9, 4)
    inc = acelora.ops.hypergraph_incidence(x, a, topk=3)
    out = acelora.ops.hypergraph_conv(x, a, lambda t: t, lambda t: t, topk=3)
    ref = inc.transpose(1, 2) @ (inc @ x)
    assert rel_err(out, ref) < 1e-12
    g = acelora.ops.hypergraph_conv(x, a, lambda t: t, lambda t: t, topk=3, global_only=True)
    assert rel_err(g, ref[:, 0]) < 1e-12


def test_largest_legal_k_and_k1():
    x, a = _inputs(2, 6, 4)
    for k in (1, 4):
        out = hg.hypergraph_conv_reference(x, a, torch.tanh, torch.tanh, topk=k)
        g = hg.hypergraph_conv_reference(x, a, torch.tanh, torch.tanh, topk=k, global_only=True)
        assert rel_err(g, out[:, 0]) < 1e-12
    with pytest.raises(ValueError, match="candidates"):
        hg.hypergraph_conv_reference(x, a, torch.tanh, torch.tanh, topk=5)
    with pytest.raises(ValueError, match="candidates"):
        acelora.ops.hypergraph_incidence(x, a, topk=5)


def test_dispatch():
    x, a = _inputs(1, 6, 4)
    ref = hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=2, backend="reference")
    assert torch.equal(hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=2), ref)
    with pytest.raises(ValueError, match="backend"):
        hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=2, backend="nope")
    with pytest.raises(RuntimeError, match="cuda"):
        hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=2, backend="cuda")
    with pytest.raises(ValueError, match="topk"):
        hg.hypergraph_conv(x, a, torch.tanh, torch.tanh, topk=True)
    with pytest.raises(ValueError, match="at least 2 local"):
        hg.hypergraph_conv(x[:, :2], a[:, :1], torch.tanh, torch.tanh, topk=1)


def test_global_only_touches_only_the_rows_it_needs():
    # Out[0] depends on rows {0} ∪ top-k(0) of E, hence on at most 1 + k + k² tokens and on the
    # k attention entries that were kept.
    k = 3
    x, a = _inputs(2, 40, 8)
    x.requires_grad_()
    a.requires_grad_()
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(4, 8)).double()
    out = hg.hypergraph_conv(x, a, mlp, mlp, topk=k, global_only=True)
    out.sum().backward()
    touched = (x.grad.abs().sum(-1) > 0).sum(1)
    assert (touched <= 1 + k + k * k).all() and (touched >= 1 + k).all()
    assert ((a.grad != 0).sum(1) == k).all()
    kept = a.detach().topk(k, dim=1).indices
    assert (a.grad.gather(1, kept) != 0).all()
