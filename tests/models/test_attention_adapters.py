"""Each attention adapter of the registry against a plain-PyTorch float64 reference of its
architecture's attention with LoRA on q/k/v: forward, input gradient and adapter gradients."""
import copy

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch import nn
from transformers import BertConfig, BertModel

from acelora.models.attention_adapters import (ATTENTION_ADAPTERS, AttentionAdapter, BertSelfAttentionAdapter,
                                               LoRASpec, MultiheadAttentionAdapter, TimmAttentionAdapter,
                                               find_attention_adapter, register_attention_adapter)
from acelora.testing import rel_err

SPEC = LoRASpec(rank=2, scale=0.7, dropout=0.0, backend="reference")


def reference(x, W, b, A, B, s, heads, keep=None, out_w=None, out_b=None):
    """softmax(q kᵀ/√d + mask) v with q|k|v = x Wᵀ + b + s·blockdiag(B)·A x, all float64."""
    Bsz, N, _ = x.shape
    r, d = A.shape[0] // 3, W.shape[0] // 3
    delta = torch.cat([(x @ A[g * r:(g + 1) * r].T) @ B[g * d:(g + 1) * d].T for g in range(3)], -1)
    qkv = x @ W.T + (0 if b is None else b) + s * delta
    q, k, v = (t.reshape(Bsz, N, heads, d // heads).transpose(1, 2) for t in qkv.split(d, -1))
    logits = q @ k.transpose(-2, -1) / (d // heads) ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(Bsz, N, d)
    return o if out_w is None else o @ out_w.T + out_b


def check_grads(new, x, out, ref):
    assert rel_err(out, ref) < 1e-10
    g = torch.randn_like(out)
    lora = [m for m in new.modules() if hasattr(m, "lora_A")][0]
    got = torch.autograd.grad(out, (x, lora.lora_A, lora.lora_B), g)
    want = torch.autograd.grad(ref, (x, lora.lora_A, lora.lora_B), g)
    for a, w in zip(got, want):
        assert rel_err(a, w) < 1e-10


def _randomized(new):
    lora = [m for m in new.modules() if hasattr(m, "lora_A")][0]
    with torch.no_grad():
        lora.lora_B.normal_()
    return lora


def test_timm_attention_adapter():
    attn = Attention(32, num_heads=4, qkv_bias=True).double().eval()
    assert find_attention_adapter(attn) is TimmAttentionAdapter
    new = TimmAttentionAdapter.inject(copy.deepcopy(attn), SPEC)
    lora = _randomized(new)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    ref = reference(x, attn.qkv.weight, attn.qkv.bias, lora.lora_A, lora.lora_B, SPEC.scale, 4,
                    out_w=attn.proj.weight, out_b=attn.proj.bias)
    check_grads(new, x, new(x), ref)


def test_bert_self_attention_adapter_with_padding():
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=40), add_pooling_layer=False).double().eval()
    sa = bert.encoder.layer[0].attention.self
    assert find_attention_adapter(sa) is BertSelfAttentionAdapter
    new = BertSelfAttentionAdapter.inject(copy.deepcopy(sa), SPEC)
    lora = _randomized(new)
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[1, 4:] = keep[2, 2:] = False
    mask = keep[:, None, None, :]
    W = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
    b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
    ref = reference(x, W, b, lora.lora_A, lora.lora_B, SPEC.scale, 4, keep=mask)
    check_grads(new, x, new(x, attention_mask=mask)[0], ref)


def test_multihead_attention_adapter_causal():
    mha = nn.MultiheadAttention(32, 4, batch_first=True).double().eval()
    assert find_attention_adapter(mha) is MultiheadAttentionAdapter
    new = MultiheadAttentionAdapter.inject(copy.deepcopy(mha), SPEC)
    lora = _randomized(new)
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    causal = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)   # open_clip's mask
    keep = torch.ones(6, 6, dtype=torch.bool).tril()
    ref = reference(x, mha.in_proj_weight, mha.in_proj_bias, lora.lora_A, lora.lora_B, SPEC.scale, 4,
                    keep=keep, out_w=mha.out_proj.weight, out_b=mha.out_proj.bias)
    out = new(x, x, x, need_weights=False, attn_mask=causal)[0]
    check_grads(new, x, out, ref)
    # without LoRA the replacement equals torch's own module
    plain = MultiheadAttentionAdapter.inject(copy.deepcopy(mha), None)
    assert rel_err(plain(x, x, x, attn_mask=causal)[0], mha(x, x, x, attn_mask=causal)[0]) < 1e-10


def test_registry_first_match_wins_and_unknown_is_refused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.num_heads, self.head_dim, self.proj = nn.Linear(8, 24), 2, 4, nn.Linear(8, 8)

    class CustomAdapter(AttentionAdapter):
        name = "custom"

        @staticmethod
        def matches(module):
            return isinstance(module, Custom)

    assert find_attention_adapter(Custom()) is TimmAttentionAdapter   # looks like timm's
    register_attention_adapter(CustomAdapter)
    try:
        assert find_attention_adapter(Custom()) is CustomAdapter        # registered first: wins
    finally:
        ATTENTION_ADAPTERS.remove(CustomAdapter)
    with pytest.raises(TypeError, match="no acelora attention adapter for .*Linear"):
        find_attention_adapter(nn.Linear(3, 3))
