"""ACEHGNN (DESIGN §5) against an independent per-sample python-loop reference in float64."""
import pytest
import torch
import torch.nn.functional as F

import acelora
from acelora.nn.hgnn import ACEHGNN
from acelora.testing import rel_err


def _mlp(x, mlp):
    w1, b1 = mlp.down.weight.double(), mlp.down.bias.double()
    w2, b2 = mlp.up.weight.double(), mlp.up.bias.double()
    return F.leaky_relu(x @ w1.T + b1, mlp.act.negative_slope) @ w2.T + b2


def naive_hgnn(hgnn, tokens, cls_attn, mask=None):
    """Per-sample loops: candidates listed explicitly, ties to the lower index, float64."""
    x_all, a_all = tokens.double(), cls_attn.double()
    b_, n, _ = x_all.shape
    k = hgnn.topk
    eye = torch.eye(n, dtype=torch.float64)
    outs = []
    for b in range(b_):
        x = x_all[b]
        real = [True] * n if mask is None else [not bool(m) for m in mask[b]]
        rows = []
        for i in range(n):
            if not real[i]:
                rows.append(torch.zeros(n, dtype=torch.float64))
                continue
            cands = []
            for j in range(n):
                if j == i or not real[j]:
                    continue
                if i == 0:
                    cands.append((a_all[b, j - 1], j))
                elif j != 0:
                    cands.append(((x[i] @ x[j]) / (x[i].norm() * x[j].norm()), j))
            cands.sort(key=lambda c: (-c[0].item(), c[1]))
            kept = cands[:k]
            w = torch.softmax(torch.stack([v for v, _ in kept]), 0)
            row = eye[i].clone()
            for wj, (_, j) in zip(w, kept):
                row = row + wj * eye[j]
            rows.append(row)
        a = torch.stack(rows)
        sym = a[0] * (torch.arange(n) > 0)
        a = a + sym[:, None] * eye[0][None, :]
        e = _mlp(a @ x, hgnn.edge_mlp)
        out = _mlp(a.T @ e, hgnn.node_mlp)
        out = out * torch.tensor(real, dtype=torch.float64)[:, None]
        outs.append(out)
    return torch.stack(outs)


def _inputs(b, n, d, dtype=torch.float32, normalize=True):
    x = torch.randn(b, n, d, dtype=dtype)
    if normalize:
        x = F.normalize(x, dim=-1)
    attn = torch.rand(b, n - 1, dtype=dtype).softmax(-1)
    return x, attn


def test_parameter_count_and_init():
    hgnn = ACEHGNN()
    assert sum(p.numel() for p in hgnn.parameters()) == 263_424
    assert 2 * sum(p.numel() for p in hgnn.parameters()) == 526_848
    for mlp in (hgnn.edge_mlp, hgnn.node_mlp):
        assert mlp.down.weight.shape == (128, 512) and mlp.up.weight.shape == (512, 128)
        # kaiming-normal (fan_in, gain √2): std √(2 / fan_in)
        for layer in (mlp.down, mlp.up):
            std = layer.weight.std().item()
            assert abs(std / (2.0 / layer.in_features) ** 0.5 - 1) < 0.05
            assert layer.bias.abs().max() <= 1 / layer.in_features ** 0.5
    assert not torch.equal(hgnn.edge_mlp.down.weight, hgnn.node_mlp.down.weight)


@pytest.mark.parametrize("normalize,logits", [(True, False), (False, False), (True, True)])
def test_matches_naive_loop(normalize, logits):
    hgnn = ACEHGNN(dim=16, hidden=8, topk=3).double()
    x, attn = _inputs(3, 9, 16, torch.float64, normalize)
    if logits:  # official preset, image tower: pre-softmax scaled logits (any sign)
        attn = 3 * torch.randn_like(attn)
    out = hgnn(x, attn)
    ref = naive_hgnn(hgnn, x, attn)
    assert out.shape == (3, 9, 16)
    assert rel_err(out, ref) < 1e-12
    g = hgnn(x, attn, global_only=True)
    assert g.shape == (3, 16)
    assert rel_err(g, ref[:, 0]) < 1e-12


def test_matches_naive_loop_with_padding():
    hgnn = ACEHGNN(dim=12, hidden=6, topk=2).double()
    x, attn = _inputs(3, 10, 12, torch.float64)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 6:] = True
    mask[2, 8:] = True
    out = hgnn(x, attn, mask)
    ref = naive_hgnn(hgnn, x, attn, mask)
    assert rel_err(out, ref) < 1e-12
    assert out[0, 6:].abs().max() == 0
    assert rel_err(hgnn(x, attn, mask, global_only=True), ref[:, 0]) < 1e-12


def test_gradients_match_naive_loop():
    hgnn = ACEHGNN(dim=8, hidden=4, topk=2).double()
    x, attn = _inputs(2, 7, 8, torch.float64)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    for global_only in (False, True):
        grads = []
        for fn in (lambda xx, aa: hgnn(xx, aa, mask, global_only=global_only),
                   lambda xx, aa: naive_hgnn(hgnn, xx, aa, mask)[:, 0] if global_only
                   else naive_hgnn(hgnn, xx, aa, mask)):
            xx, aa = x.clone().requires_grad_(), attn.clone().requires_grad_()
            hgnn.zero_grad()
            out = fn(xx, aa)
            w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
            (out * w).sum().backward()
            grads.append([xx.grad, aa.grad] + [p.grad.clone() for p in hgnn.parameters()])
        for got, want in zip(*grads):
            assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("global_only", [False, True])
def test_gradcheck(global_only):
    hgnn = ACEHGNN(dim=6, hidden=3, topk=2).double()
    x, attn = _inputs(2, 6, 6, torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 5] = True
    x.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(lambda xx, aa: hgnn(xx, aa, mask, global_only=global_only),
                                    (x, attn), eps=1e-6, atol=1e-6)


def test_global_only_equals_full_row0_float32():
    hgnn = ACEHGNN(dim=64, hidden=16, topk=5)
    x, attn = _inputs(4, 40, 64)
    mask = torch.zeros(4, 40, dtype=torch.bool)
    mask[1, 25:] = True
    mask[3, 12:] = True
    full = hgnn(x, attn, mask)
    g = hgnn(x, attn, mask, global_only=True)
    assert rel_err(g, full[:, 0]) < 1e-5


def test_padding_changes_nothing():
    hgnn = ACEHGNN(dim=16, hidden=8, topk=3)
    x, attn = _inputs(2, 12, 16)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 8:] = True
    mask[1, 10:] = True
    out = hgnn(x, attn, mask)
    g = hgnn(x, attn, mask, global_only=True)
    # Alter the padded tokens (even make them copies of real ones) and their attention.
    x2, attn2 = x.clone(), attn.clone()
    x2[0, 8:] = x[0, 1:5] * 3
    x2[1, 10:] = torch.randn(2, 16)
    attn2[0, 7:] = 10.0
    attn2[1, 9:] = 10.0
    out2 = hgnn(x2, attn2, mask)
    assert torch.allclose(out2[~mask], out[~mask], atol=1e-6)
    assert out2[mask].abs().max() == 0
    assert torch.allclose(hgnn(x2, attn2, mask, global_only=True), g, atol=1e-6)
    # Dropping the padded positions entirely gives the same real rows.
    short = hgnn(x[:1, :8], attn[:1, :7])
    assert torch.allclose(short, out[:1, :8], atol=1e-6)


def test_ties_go_to_the_lower_index():
    # Duplicate local tokens and duplicate attention values: exact ties everywhere.
    hgnn = ACEHGNN(dim=8, hidden=4, topk=2).double()
    base = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1],
                         [1, -1, 1, -1, 0, 0, 0, 0]], dtype=torch.float64) / 2
    x = torch.stack([base[0], base[1], base[1], base[2], base[1], base[0], base[2]])[None]
    attn = torch.tensor([[0.1, 0.3, 0.3, 0.1, 0.3, 0.2]], dtype=torch.float64)
    ref = naive_hgnn(hgnn, x, attn)
    assert rel_err(hgnn(x, attn), ref) < 1e-12
    assert rel_err(hgnn(x, attn, global_only=True), ref[:, 0]) < 1e-12
    a = acelora.ops.hypergraph_incidence(x, attn, topk=2)[0]
    assert a[0, 2] > 0 and a[0, 3] > 0 and a[0, 5] == 0     # attention ties: positions 2, 3 (not 5)


def test_topk_too_large_raises():
    x, attn = _inputs(2, 8, 16)
    hgnn = ACEHGNN(dim=16, hidden=4, topk=6)
    hgnn(x, attn)                                           # N - 2 = 6 candidates: fine
    hgnn(x, attn, global_only=True)
    with pytest.raises(ValueError, match="topk=7"):
        ACEHGNN(dim=16, hidden=4, topk=7)(x, attn)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[1, 7:] = True
    with pytest.raises(ValueError, match="sample 1"):
        hgnn(x, attn, mask)
    with pytest.raises(ValueError, match="sample 1"):
        hgnn(x, attn, mask, global_only=True)
    with pytest.raises(ValueError, match="positive"):
        ACEHGNN(topk=0)


def test_bad_inputs():
    hgnn = ACEHGNN(dim=16, hidden=4, topk=2)
    x, attn = _inputs(2, 8, 16)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        hgnn(x[0], attn)
    with pytest.raises(ValueError, match="N-1"):
        hgnn(x, attn[:, :-1])
    with pytest.raises(ValueError, match="width"):
        hgnn(x[..., :8], attn)
    with pytest.raises(TypeError, match="floating"):
        hgnn(x.long(), attn)
    with pytest.raises(TypeError, match="floating"):
        hgnn(x, (attn > 0).long())
    with pytest.raises(TypeError, match="bool"):
        hgnn(x, attn, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="key_padding_mask"):
        hgnn(x, attn, torch.zeros(2, 7, dtype=torch.bool))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="global token"):
        hgnn(x, attn, mask)
    with pytest.raises(ValueError, match="meta"):
        hgnn(x, attn.to("meta"))
    with pytest.raises(ValueError, match="backend"):
        ACEHGNN(dim=16, hidden=4, topk=2, backend="bogus")(x, attn)


def test_non_contiguous_and_half_inputs():
    hgnn = ACEHGNN(dim=16, hidden=8, topk=3)
    x, attn = _inputs(3, 10, 16)
    ref = hgnn(x, attn)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)     # same values, permuted strides
    at = attn.t().contiguous().t()
    assert not xt.is_contiguous() and not at.is_contiguous()
    assert torch.allclose(hgnn(xt, at), ref, atol=1e-6)
    # bf16 tokens, fp32 attention: runs (graph arithmetic in fp32) and stays close.
    hb = ACEHGNN(dim=16, hidden=8, topk=3).to(torch.bfloat16)
    hb.load_state_dict({k: v.to(torch.bfloat16) for k, v in hgnn.state_dict().items()})
    out = hb(x.to(torch.bfloat16), attn)
    assert out.dtype == torch.bfloat16
    # Same selection as fp32 on the bf16-rounded inputs and weights; only the MLP rounding differs.
    ref_b = hb.float()(x.to(torch.bfloat16).float(), attn)
    assert rel_err(out, ref_b) < 0.03


@pytest.mark.parametrize("global_only", [False, True])
def test_autocast_keeps_graph_in_fp32(global_only):
    # Under bf16 autocast only the MLPs run in bf16: same selection as fp32, small MLP rounding.
    hgnn = ACEHGNN(dim=32, hidden=8, topk=4)
    x, attn = _inputs(2, 24, 32)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[1, 15:] = True
    ref = hgnn(x, attn, mask, global_only=global_only)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = hgnn(x, attn, mask, global_only=global_only)
        full = hgnn(x, attn, mask)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2
    if global_only:
        assert rel_err(out, full[:, 0]) < 2e-2


def test_autocast_does_not_change_the_selection():
    # Near-duplicate tokens: cosines differ by ~1e-6, far below bf16 resolution.
    base = F.normalize(torch.randn(1, 1, 64), dim=-1)
    x = base + 1e-3 * torch.randn(2, 30, 64)
    attn = torch.rand(2, 29)
    ref = acelora.ops.hypergraph_incidence(x, attn, topk=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = acelora.ops.hypergraph_incidence(x, attn, topk=5)
    assert torch.equal(got != 0, ref != 0)
    assert got.dtype == torch.float32
