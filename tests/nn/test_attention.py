import copy

import pytest
import torch
from timm.models.vision_transformer import Attention
from transformers import BertConfig, BertModel

from acelora.nn.attention import BertQKVSelfAttention, ViTAttention, cls_attention_row
from acelora.nn.lora import LoRAQKV
from acelora.testing import rel_err


def naive_cls_row(q, k, mode, keep=None):
    """float64, one head and one sample at a time."""
    B, H, N, d = q.shape
    out = torch.zeros(B, N - 1, dtype=torch.float64)
    for b in range(B):
        rows = []
        for h in range(H):
            logits = torch.stack([q[b, h, 0].double() @ k[b, h, j].double() for j in range(N)]).detach()
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
    layer.capture_cls_attention("probs")
    out = layer(x)
    want, q, k = naive_vit_attention(x, layer, 4)
    assert rel_err(out, want) < 1e-5
    assert rel_err(out, ref) > 1e-3
    assert rel_err(layer.pop_cls_attn(), naive_cls_row(q, k, "probs")) < 1e-5
    with pytest.raises(RuntimeError, match="no CLS attention"):
        layer.pop_cls_attn()
    layer.capture_cls_attention("logits")
    layer(x)
    assert rel_err(layer.pop_cls_attn(), naive_cls_row(q, k, "logits")) < 1e-5


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
    last.capture_cls_attention("probs")
    qk = {}
    last.qkv.register_forward_hook(lambda m, i, o: qk.setdefault("qkv", o))
    out = swapped(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5
    # CLS row from this block's q, k; padded keys get zero attention.
    q, k, _ = qk["qkv"].reshape(3, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    row = last.pop_cls_attn()
    assert rel_err(row, naive_cls_row(q, k, "probs", valid)) < 1e-5
    assert torch.all(row[2, 2:] == 0)
    # The swapped modules keep the mode of the ones they replaced.
    assert not last.training and not last.qkv.training


def test_wrong_modules_are_refused():
    with pytest.raises(TypeError, match="timm ViT Attention"):
        ViTAttention(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="BERT self-attention"):
        BertQKVSelfAttention(torch.nn.Linear(3, 3), torch.nn.Linear(3, 9))
