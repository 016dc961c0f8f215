"""The LoRA-QKV reference op, the public dispatching op and the merge helper, against an
independent float64 formulation (one projection per q/k/v, written out naively)."""
import importlib

import pytest
import torch

import acelora
from acelora.ops import _backend, _extension
lq = importlib.import_module("acelora.ops.lora_qkv")


def naive(x, weight, bias, A, B, scale, masks=None, p=0.0):
    """y_g = x W_gᵀ + b_g + s·(m_g/(1-p) ⊙ x) A_gᵀ B_gᵀ, in float64, per group."""
    x, weight, A, B = (t.double() for t in (x, weight, A, B))
    r, d_out = A.shape[0] // 3, weight.shape[0] // 3
    outs = []
    for g in range(3):
        xg = x if masks is None else x * masks[g].double() / (1 - p)
        y = x @ weight[g * d_out:(g + 1) * d_out].T
        if bias is not None:
            y = y + bias.double()[g * d_out:(g + 1) * d_out]
        y = y + scale * (xg @ A[g * r:(g + 1) * r].T) @ B[g * d_out:(g + 1) * d_out].T
        outs.append(y)
    return torch.cat(outs, -1)


def make(lead=(2, 7), d_in=24, d_out=16, r=4, dtype=torch.float32, bias=True, grad=False):
    x = torch.randn(*lead, d_in, dtype=dtype)
    w = torch.randn(3 * d_out, d_in, dtype=dtype) / d_in ** 0.5
    b = torch.randn(3 * d_out, dtype=dtype) if bias else None
    A = torch.randn(3 * r, d_in, dtype=dtype) / d_in ** 0.5
    B = torch.randn(3 * d_out, r, dtype=dtype)
    if grad:
        for t in (x, A, B):
            t.requires_grad_(True)
    return x, w, b, A, B


def rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("lead,r,bias", [((2, 7), 4, True), ((13,), 1, False), ((2, 3, 5), 5, True)])
def test_reference_matches_naive(lead, r, bias):
    x, w, b, A, B = make(lead, r=r, bias=bias, dtype=torch.float64)
    out = lq.lora_qkv_reference(x, w, b, A, B, 0.7)
    assert out.shape == (*lead, 48)
    assert rel(out, naive(x, w, b, A, B, 0.7)) < 1e-12


def test_reference_gradients_include_frozen_base_when_asked():
    x, w, b, A, B = make(dtype=torch.float64, grad=True)
    w.requires_grad_(True)
    g = torch.randn(2, 7, 48, dtype=torch.float64)
    grads = torch.autograd.grad(lq.lora_qkv_reference(x, w, b, A, B, 0.5), (x, w, A, B), g)
    refs = torch.autograd.grad(naive(x, w, b, A, B, 0.5), (x, w, A, B), g)
    for out, ref in zip(grads, refs):
        assert rel(out, ref) < 1e-12


def test_reference_replays_given_masks():
    x, w, b, A, B = make(dtype=torch.float64)
    masks = torch.rand(3, *x.shape) > 0.3
    out = lq.lora_qkv_reference(x, w, b, A, B, 0.5, 0.3, True, masks=masks)
    assert rel(out, naive(x, w, b, A, B, 0.5, masks, 0.3)) < 1e-12
    with pytest.raises(ValueError, match="masks must be"):
        lq.lora_qkv_reference(x, w, b, A, B, 0.5, 0.3, True, masks=masks[:2])


def test_reference_dropout_only_in_training_and_independent_per_group():
    x, w, b, A, B = make(lead=(64,), dtype=torch.float64)
    no_drop = naive(x, w, b, A, B, 1.0)
    assert rel(lq.lora_qkv_reference(x, w, b, A, B, 1.0, 0.5, training=False), no_drop) < 1e-12
    out = lq.lora_qkv_reference(x, w, b, A, B, 1.0, 0.5, training=True)
    assert rel(out, no_drop) > 1e-3
    # Identical A/B blocks per group: with one shared mask the three blocks would be equal.
    A3, B3 = A[:4].repeat(3, 1), B[:16].repeat(3, 1)
    y = lq.lora_qkv_reference(x, w * 0, None, A3, B3, 1.0, 0.5, training=True).view(64, 3, 16)
    assert not torch.allclose(y[:, 0], y[:, 1]) and not torch.allclose(y[:, 1], y[:, 2])


def test_merge_helper_folds_the_adapter():
    x, w, b, A, B = make(dtype=torch.float64)
    merged = lq.merge_lora_qkv_weight(w, A, B, 0.5)
    assert rel(torch.nn.functional.linear(x, merged, b), naive(x, w, b, A, B, 0.5)) < 1e-12
    assert rel(lq.merge_lora_qkv_weight(merged, A, B, 0.5, sign=-1.0), w) < 1e-14
    w32 = w.float()
    assert lq.merge_lora_qkv_weight(w32, A.float(), B.float(), 0.5).dtype == torch.float32


@pytest.mark.parametrize("bad,match", [
    (dict(w=torch.randn(47, 24)), "weight must be"),
    (dict(x=torch.randn(5, 23)), "features"),
    (dict(b=torch.randn(47)), "bias must be"),
    (dict(A=torch.randn(11, 24)), "lora_A must be"),
    (dict(B=torch.randn(48, 3)), "lora_B must be"),
    (dict(x=torch.randn(5, 24, device="meta")), "one device"),
])
def test_bad_input_is_named(bad, match):
    x, w, b, A, B = make()
    args = dict(x=x, w=w, b=b, A=A, B=B)
    args.update(bad)
    for backend in ("reference", "auto"):
        with pytest.raises(ValueError, match=match):
            acelora.ops.lora_qkv(args["x"], args["w"], args["b"], args["A"], args["B"], 0.5, backend=backend)


def test_bad_dropout_and_backend():
    x, w, b, A, B = make()
    with pytest.raises(ValueError, match="dropout_p"):
        lq.lora_qkv_reference(x, w, b, A, B, 0.5, 1.0, True)
    with pytest.raises(ValueError, match="backend must be"):
        acelora.ops.lora_qkv(x, w, b, A, B, 0.5, backend="fast")
    with pytest.raises(RuntimeError, match="cannot run"):
        acelora.ops.lora_qkv(x, w, b, A, B, 0.5, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_public_op_matches_naive_forward_and_backward(backend):
    x, w, b, A, B = make(grad=True)
    g = torch.randn(2, 7, 48)
    out = acelora.ops.lora_qkv(x, w, b, A, B, 0.5, dropout_p=0.1, training=False, backend=backend)
    ref = naive(x, w, b, A, B, 0.5)
    assert out.dtype == torch.float32 and rel(out, ref) < 1e-6
    grads = torch.autograd.grad(out, (x, A, B), g)
    xd, Ad, Bd = (t.detach().double().requires_grad_() for t in (x, A, B))
    refs = torch.autograd.grad(naive(xd, w, b, Ad, Bd, 0.5), (xd, Ad, Bd), g.double())
    for o, r_ in zip(grads, refs):
        assert rel(o, r_) < 1e-5


def test_auto_trains_unfrozen_base_through_the_reference():
    x, w, b, A, B = make(grad=True)
    w.requires_grad_(True)
    out = acelora.ops.lora_qkv(x, w, b, A, B, 0.5, backend="auto")
    (gw,) = torch.autograd.grad(out.sum(), (w,))
    assert gw.abs().sum() > 0
    if _extension.cpu_ops_available():
        with pytest.raises(ValueError, match="frozen"):
            acelora.ops.lora_qkv(x, w, b, A, B, 0.5, backend="cuda")


def test_fallback_warns_once_without_the_extension(monkeypatch):
    if "cuda" not in _backend.auto_order(lq.OP, "cpu"):
        pytest.skip("auto on the CPU does not prefer the extension")
    monkeypatch.setattr(_extension, "cpu_ops_available", lambda: False)
    lq._WARNED.clear()
    x, w, b, A, B = make()
    with pytest.warns(UserWarning, match="uses the PyTorch reference") as record:
        acelora.ops.lora_qkv(x, w, b, A, B, 0.5)
        acelora.ops.lora_qkv(x, w, b, A, B, 0.5)
    assert sum("uses the PyTorch reference" in str(r.message) for r in record) == 1
    lq._WARNED.clear()
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run lora_qkv on cpu"):
        acelora.ops.lora_qkv(x, w, b, A, B, 0.5, backend="cuda")

