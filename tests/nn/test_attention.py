import copy

import pytest
import torch
from timm.models.vision_transformer import Attention
from transformers import BertConfig, BertModel

from acelora.nn.attention import (BertQKVSelfAttention, MultiheadSelfAttention, ViTAttention,
                                  attention_row)
from acelora.nn.lora import LoRAQKV
from acelora.testing import rel_err


def cls_attention_row(q, k, scale, mode, mask=None):
    return attention_row(q, k, scale, mode, mask)[:, 1:]


def naive_cls_row(q, k, mode, keep=None, index=None):
    """float64, one head and one sample at a time; the query at ``index[b]`` (default 0)."""
    B, H, N, d = q.shape
    out = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        rows = []
        i = 0 if index is None else int(index[b])
        for h in range(H):
            logits = torch.stack([q[b, h, i].double() @ k[b, h, j].double() for j in range(N)]).detach()
            logits = logits / d ** 0.5
            if keep is not None:
                logits = logits.masked_fill(~keep[b], float("-inf"))
            rows.append(torch.softmax(logits, 0) if mode == "probs" else logits)
        row = torch.stack(rows).mean(0)
        out[b] = row[1:]
    return out


@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_cls_row_matches_naive(mode):
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    out = cls_attention_row(q, k, 8 ** -0.5, mode)
    assert out.shape == (2, 8)
    assert rel_err(out, naive_cls_row(q, k, mode)) < 1e-6


def test_cls_row_stays_fp32_under_autocast():
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cls_attention_row(q, k, 8 ** -0.5, "logits")
    assert out.dtype == torch.float32
    assert rel_err(out, naive_cls_row(q, k, "logits")) < 1e-6


def test_cls_row_respects_key_padding_bool_and_additive():
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[1, 4:] = False
    ref = naive_cls_row(q, k, "probs", keep)
    bool_mask = keep[:, None, None, :].expand(2, 1, 7, 7)
    additive = torch.zeros(2, 1, 1, 7).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    for mask in (bool_mask, additive):
        out = cls_attention_row(q, k, 8 ** -0.5, "probs", mask)
        assert rel_err(out, ref) < 1e-6
        assert torch.all(out[1, 3:] == 0)
    logits = cls_attention_row(q, k, 8 ** -0.5, "logits", bool_mask)
    unmasked = naive_cls_row(q, k, "logits")
    assert rel_err(logits[0], unmasked[0]) < 1e-6 and rel_err(logits[1, :3], unmasked[1, :3]) < 1e-6
    assert torch.all(logits[1, 3:] == torch.finfo(torch.float32).min)  # never selected, never nan
    with pytest.raises(ValueError, match="mode"):
        cls_attention_row(q, k, 1.0, "softmax")


def naive_vit_attention(x, layer, n_heads):
    """float64 softmax(q kᵀ/√d) v -> proj, from the layer's (LoRA) qkv output."""
    B, N, C = x.shape
    qkv = layer.qkv(x).double().reshape(B, N, 3, n_heads, C // n_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    att = torch.softmax(q @ k.transpose(-2, -1) / (C // n_heads) ** 0.5, -1)
    o = (att @ v).transpose(1, 2).reshape(B, N, C)
    return o @ layer.proj.weight.double().T + layer.proj.bias.double(), q, k


def test_vit_attention_equals_timm_at_init_and_naive_with_lora():
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 32)
    ref = attn(x)
    layer = ViTAttention(copy.deepcopy(attn), LoRAQKV.from_linear(attn.qkv, rank=2, scale=0.5)).eval()
    assert rel_err(layer(x), ref) < 1e-6
    with torch.no_grad():
        layer.qkv.lora_B.normal_()
    out, row = layer.forward_with_row(x, "probs")
    want, q, k = naive_vit_attention(x, layer, 4)
    assert rel_err(out, want) < 1e-5 and rel_err(layer(x), want) < 1e-5
    assert rel_err(out, ref) > 1e-3
    assert rel_err(row[:, 1:], naive_cls_row(q, k, "probs")) < 1e-5
    _, row = layer.forward_with_row(x, "logits")
    assert rel_err(row[:, 1:], naive_cls_row(q, k, "logits")) < 1e-5
    # The explicit (materialised-matrix) formulation gives the same output and row.
    layer.explicit = True
    out_e, row_e = layer.forward_with_row(x, "logits")
    assert rel_err(out_e, out) < 1e-5 and rel_err(row_e, row) < 1e-5


def small_bert(**kw):
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=16, **kw)
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_bert_self_attention_equals_hf_with_padding():
    bert = small_bert()
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    swapped = copy.deepcopy(bert)
    for layer in swapped.encoder.layer:
        sa = layer.attention.self
        layer.attention.self = BertQKVSelfAttention(
            sa, LoRAQKV.from_linears(sa.query, sa.key, sa.value, rank=2))
    last = swapped.encoder.layer[-1].attention.self
    out = swapped(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5
    # CLS row from this block's q, k; padded keys get zero attention.
    h = torch.randn(3, 9, 32)
    q, k, _ = last.qkv(h).reshape(3, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    _, row = last.forward_with_row(h, "probs", valid[:, None, None, :])
    assert rel_err(row[:, 1:], naive_cls_row(q, k, "probs", valid)) < 1e-5
    assert torch.all(row[2, 3:] == 0)
    # The swapped modules keep the mode of the ones they replaced.
    assert not last.training and not last.qkv.training


def test_eot_row_under_causal_mask_matches_naive():
    """The row of a query at a per-sample index (EOT) under a causal mask."""
    B, H, N, d = 3, 2, 7, 4
    q, k = torch.randn(B, H, N, d), torch.randn(B, H, N, d)
    index = torch.tensor([6, 2, 4])
    causal = torch.full((N, N), float("-inf")).triu(1)
    keep = torch.arange(N)[None] <= index[:, None]
    for mode in ("probs", "logits"):
        row = attention_row(q, k, d ** -0.5, mode, causal, index)
        ref = naive_cls_row(q, k, mode, keep, index)
        full = torch.cat([torch.zeros(B, 1, dtype=torch.float64), ref], 1)
        if mode == "probs":  # the naive row drops key 0; compare the kept keys
            assert rel_err(row[:, 1:], ref) < 1e-6
        else:
            assert rel_err(row[:, 1:][keep[:, 1:]], full[:, 1:][keep[:, 1:]]) < 1e-6
            assert torch.all(row[~keep] == torch.finfo(torch.float32).min)
    assert torch.all(attention_row(q, k, d ** -0.5, "probs", causal, index)[~keep] == 0)


def test_multihead_self_attention_equals_torch_mha():
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    ref = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
    mod = MultiheadSelfAttention(copy.deepcopy(mha), LoRAQKV(mha.in_proj_weight, mha.in_proj_bias, rank=2)).eval()
    assert rel_err(mod(x, x, x, need_weights=False, attn_mask=causal)[0], ref) < 1e-5
    with pytest.raises(ValueError, match="self-attention only"):
        mod(x, torch.randn(2, 6, 16), x)


def test_wrong_modules_are_refused():
    with pytest.raises(TypeError, match="timm ViT Attention"):
        ViTAttention(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="BERT self-attention"):
        BertQKVSelfAttention(torch.nn.Linear(3, 3), torch.nn.Linear(3, 9))
