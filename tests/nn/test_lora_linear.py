"""LoRALinear (one frozen Linear, n independent adapter blocks) against a float64 reference, and
the code it shares with LoRAQKV (BlockLoRA: init, delta, merge, the merged-layer guard)."""
import pytest
import torch

from acelora.nn.lora import BlockLoRA, LoRALinear, LoRAQKV
from acelora.testing import rel_err


def _reference(x, layer):
    r, d = layer.rank, layer.out_features
    delta = [(x @ layer.lora_A[g * r:(g + 1) * r].T) @ layer.lora_B[g * d:(g + 1) * d].T
             for g in range(layer.n_blocks)]
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias) + layer.scale * torch.cat(delta, -1)


@pytest.mark.parametrize("n_blocks,bias", [(1, False), (2, False), (2, True), (3, True)])
def test_forward_backward_merge(n_blocks, bias):
    torch.manual_seed(n_blocks)
    w = torch.randn(n_blocks * 12, 10, dtype=torch.float64)
    b = torch.randn(n_blocks * 12, dtype=torch.float64) if bias else None
    layer = LoRALinear(w, b, n_blocks=n_blocks, rank=3, scale=0.7)
    assert isinstance(layer, BlockLoRA) and not layer.weight.requires_grad
    x = torch.randn(4, 5, 10, dtype=torch.float64, requires_grad=True)
    assert rel_err(layer(x), x @ w.T + (0 if b is None else b)) < 1e-14   # B = 0 at init
    with torch.no_grad():
        layer.lora_B.normal_()
    out, ref = layer(x), _reference(x, layer)
    assert rel_err(out, ref) < 1e-12
    g = torch.randn_like(out)
    leaves = (x, layer.lora_A, layer.lora_B)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert rel_err(got, want) < 1e-12
    layer.eval()
    with torch.no_grad():
        layer.merge()
        assert rel_err(layer(x), ref) < 1e-12
        layer.unmerge()
    assert rel_err(layer.weight, w) < 1e-14
    layer.train()
    layer.merge()
    with pytest.raises(RuntimeError, match="LoRALinear is merged"):
        layer(x)


def test_independent_dropout_masks_per_block():
    # Two blocks with identical adapters: equal without dropout, different masks with it.
    layer = LoRALinear(torch.zeros(16, 6), None, n_blocks=2, rank=2, scale=1.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_A[2:].copy_(layer.lora_A[:2])
        layer.lora_B.fill_(1.0)
    x = torch.randn(64, 6)
    layer.eval()
    k, v = layer(x).chunk(2, -1)
    assert torch.equal(k, v)
    layer.train()
    torch.manual_seed(0)
    k, v = layer(x).chunk(2, -1)
    assert not torch.allclose(k, v)


def test_lora_qkv_shares_the_block_code():
    w = torch.randn(24, 8, dtype=torch.float64)
    qkv = LoRAQKV(w, None, rank=2, scale=0.5, backend="reference")
    lin = LoRALinear(w, None, n_blocks=3, rank=2, scale=0.5)
    with torch.no_grad():
        lin.lora_A.copy_(qkv.lora_A)
        qkv.lora_B.normal_()
        lin.lora_B.copy_(qkv.lora_B)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert rel_err(lin(x), qkv(x)) < 1e-12
    assert torch.equal(lin.delta_weight(), qkv.delta_weight())
    with pytest.raises(ValueError, match=r"weight must be \[2\*d_out, d_in\]"):
        LoRALinear(torch.zeros(5, 4), None, n_blocks=2)
