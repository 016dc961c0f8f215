import math

import pytest
import torch
from torch import nn

from acelora.nn.lora import LoRAQKV
from acelora.testing import rel_err


def naive_lora_qkv(x, w, b, a, bb, scale):
    """float64: y = x Wᵀ + b + s · x Aᵀ blockdiag(B)ᵀ built explicitly."""
    x, w, b, a, bb = (t.detach().double() for t in (x, w, b, a, bb))
    r, d = a.shape[0] // 3, bb.shape[0] // 3
    block = torch.zeros(3 * d, 3 * r, dtype=torch.float64)
    for g in range(3):
        block[g * d:(g + 1) * d, g * r:(g + 1) * r] = bb[g * d:(g + 1) * d]
    return x @ w.T + b + scale * (x @ a.T) @ block.T


def make_layer(d_in=24, d_out=16, r=3, scale=0.7, dropout=0.0):
    w, b = torch.randn(3 * d_out, d_in), torch.randn(3 * d_out)
    layer = LoRAQKV(w, b, rank=r, scale=scale, dropout=dropout, backend="reference")
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_init_is_base_and_kaiming_per_block():
    d_in = 40
    w, b = torch.randn(30, d_in), torch.randn(30)
    layer = LoRAQKV(w, b, rank=4, scale=0.5)
    assert torch.count_nonzero(layer.lora_B) == 0
    x = torch.randn(5, d_in)
    assert torch.equal(layer(x), nn.functional.linear(x, w, b))
    bound = 1 / math.sqrt(d_in)  # kaiming-uniform(a=√5) bound for fan_in = d_in
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    blocks = layer.lora_A.chunk(3)
    assert not torch.equal(blocks[0], blocks[1]) and not torch.equal(blocks[1], blocks[2])
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert layer.weight.data_ptr() != w.data_ptr()  # a copy: the original is untouched


def test_forward_matches_naive_blockdiag():
    layer = make_layer()
    x = torch.randn(2, 7, layer.in_features)
    ref = naive_lora_qkv(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scale)
    assert rel_err(layer(x), ref) < 1e-6


def test_from_linears_concatenates_q_k_v():
    d = 12
    q, k, v = (nn.Linear(d, d) for _ in range(3))
    layer = LoRAQKV.from_linears(q, k, v, rank=2, scale=1.0)
    x = torch.randn(3, 5, d)
    out = layer(x)
    assert torch.allclose(out, torch.cat([q(x), k(x), v(x)], -1), atol=1e-6)
    with pytest.raises(ValueError, match="bias"):
        LoRAQKV.from_linears(nn.Linear(d, d, bias=False), k, v)


def test_base_gets_no_gradient_and_adapter_grads_match_reference():
    layer = make_layer()
    x = torch.randn(4, 6, layer.in_features)
    g = torch.randn(4, 6, 3 * layer.out_features)
    (layer(x) * g).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    a = layer.lora_A.detach().double().requires_grad_()
    bb = layer.lora_B.detach().double().requires_grad_()
    ref = naive_lora_qkv(x, layer.weight, layer.bias, torch.zeros_like(a), torch.zeros_like(bb), 0.0)
    r, d = layer.rank, layer.out_features
    up = torch.cat([(x.double() @ a[i * r:(i + 1) * r].T) @ bb[i * d:(i + 1) * d].T for i in range(3)], -1)
    ((ref + layer.scale * up) * g.double()).sum().backward()
    assert rel_err(layer.lora_A.grad, a.grad) < 1e-6
    assert rel_err(layer.lora_B.grad, bb.grad) < 1e-6


def test_merge_unmerge_round_trip():
    layer = make_layer().eval()
    w0 = layer.weight.detach().clone()
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), before) < 1e-6
    assert rel_err(layer.weight, w0) > 1e-3  # the adapter is really folded in
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    assert rel_err(layer.weight, w0) < 1e-6
    assert rel_err(layer(x), before) < 1e-6


def test_merged_refuses_training():
    layer = make_layer().train()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, layer.in_features))
    with torch.no_grad():
        layer(torch.randn(2, layer.in_features))  # inference in train mode is fine


def test_dropout_only_in_training_and_only_on_the_adapter():
    layer = make_layer(dropout=0.5)
    x = torch.randn(64, layer.in_features)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)
    # Dropout acts on the adapter input only: with B = 0 training output is the base output.
    with torch.no_grad():
        layer.lora_B.zero_()
    assert torch.allclose(layer(x), base, atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="3\\*d_out"):
        LoRAQKV(torch.randn(10, 4), None)
    with pytest.raises(ValueError, match="rank"):
        LoRAQKV(torch.randn(12, 4), None, rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAQKV(torch.randn(12, 4), None, dropout=1.0)
