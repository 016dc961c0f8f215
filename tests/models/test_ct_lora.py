"""MedCT-VLM: LoRA on both towers of CT-CLIP (DESIGN §13).

The CTViT attention adapter against a float64 reference of CT-CLIP's cosine attention with LoRA on
``to_q`` / ``to_kv``; the ``medct`` preset's trainable count at v2 size (meta device) and on
ct-clip-tiny; fresh adapters, merge, the frozen quantiser, the gradient through the
straight-through estimator, the bypass option, per-tower ranks, checkpointing and adapter files.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import acelora
from acelora.models.ace_lora import ACELoRAModel
from acelora.models.attention_adapters import (CTViTAttentionAdapter, LoRASpec,
                                               find_attention_adapter)
from acelora.models.ctclip import build_ctclip
from acelora.models.ctvit import CosineAttention
from acelora.models.tokenizer import TextTokenizer
from acelora.models.tower_ct import CTViTTower
from acelora.nn.lora import LoRALinear
from acelora.testing import rel_err

TEXTS = ["Pleural effusion is present.", "Lung nodule is not present. Heart size is normal."]
VOLUME = (16, 48, 48)


def _reference_attention(x, attn, lq, lkv, bias):
    """CT-CLIP's cosine attention written out in float64, LoRA added to to_q / to_kv:
    q = Wq n + s·Bq·Aq n (n = LayerNorm(x)), k|v = Wkv x + s·[Bk Ak x | Bv Av x]; q, k
    l2-normalised times the learned scales; softmax(8 q kᵀ + bias) v; to_out."""
    h, dh = attn.heads, attn.dim_head
    n = F.layer_norm(x, x.shape[-1:], attn.norm.gamma, attn.norm.beta)
    q = n @ lq.weight.T + lq.scale * (n @ lq.lora_A.T) @ lq.lora_B.T
    r, d = lkv.rank, lkv.out_features
    delta = [(x @ lkv.lora_A[g * r:(g + 1) * r].T) @ lkv.lora_B[g * d:(g + 1) * d].T for g in range(2)]
    kv = x @ lkv.weight.T + lkv.scale * torch.cat(delta, -1)
    k, v = kv[..., :d], kv[..., d:]
    split = lambda t: t.reshape(*t.shape[:2], h, dh).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    q = q / q.norm(dim=-1, keepdim=True) * attn.q_scale
    k = k / k.norm(dim=-1, keepdim=True) * attn.k_scale
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * 8.0 + bias
    out = torch.einsum("bhij,bhjd->bhid", sim.softmax(-1), v)
    return out.transpose(1, 2).reshape(*x.shape[:2], h * dh) @ attn.to_out.weight.T


def test_ctvit_adapter_matches_float64_reference():
    torch.manual_seed(0)
    attn = CosineAttention(32, heads=4, dim_head=8).double().eval()
    with torch.no_grad():
        attn.q_scale.uniform_(0.5, 1.5)
        attn.k_scale.uniform_(0.5, 1.5)
        attn.norm.gamma.uniform_(0.5, 1.5)
    assert find_attention_adapter(attn) is CTViTAttentionAdapter
    new = CTViTAttentionAdapter.inject(copy.deepcopy(attn), LoRASpec(rank=3, scale=0.6))
    lq, lkv = new.to_q, new.to_kv
    assert isinstance(lq, LoRALinear) and (lq.n_blocks, lkv.n_blocks) == (1, 2)
    assert tuple(lkv.lora_A.shape) == (6, 32) and tuple(lkv.lora_B.shape) == (64, 3)
    with torch.no_grad():
        for m in (lq, lkv):
            m.lora_B.normal_()
    x = torch.randn(3, 10, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, 10, 10, dtype=torch.float64)
    out = new(x, bias)
    ref = _reference_attention(x, attn, lq, lkv, bias)
    assert rel_err(out, ref) < 1e-10
    g = torch.randn_like(out)
    leaves = (x, lq.lora_A, lq.lora_B, lkv.lora_A, lkv.lora_B)
    for got, want in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert rel_err(got, want) < 1e-10
    with pytest.raises(ValueError, match="injected twice"):
        CTViTAttentionAdapter.inject(new, LoRASpec(rank=3, scale=0.6))


@pytest.fixture(scope="module")
def tiny_base():
    model, tokenizer, preprocess = acelora.create_base_model("ct-clip-tiny")
    return model, tokenizer, preprocess


def _medct(tiny_base, **overrides):
    base, tokenizer, preprocess = tiny_base
    return ACELoRAModel(copy.deepcopy(base), tokenizer, preprocess,
                        acelora.get_config("medct", **overrides)).eval()


def _inputs(tokenizer, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    volumes = torch.rand(n, 1, *VOLUME, generator=g) * 2 - 1
    return volumes, tokenizer(TEXTS[:n])


def _randomize(model, std=0.3):
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.normal_(0, std)


def test_medct_trainable_count_v2_on_meta():
    base = build_ctclip("ct-clip-v2", device="meta")
    model = ACELoRAModel(base, TextTokenizer.generated(512), None, "medct")
    image = [p for m in model.layers.image for n, p in m.named_parameters() if "lora_" in n]
    text = [p for m in model.layers.text for n, p in m.named_parameters() if "lora_" in n]
    # q/k/v LoRA: 8 CTViT layers x (r·512 + 256·r + 2·(r·512 + 256·r)) + 12 BERT layers x
    # 3·(r·768 + 768·r), r = 23, + the logit scale.
    assert sum(p.numel() for p in image) == 8 * 2304 * 23 == 423_936
    assert sum(p.numel() for p in text) == 12 * 4608 * 23 == 1_271_808
    assert model.num_trainable_parameters() == 73_728 * 23 + 1 == 1_695_745
    assert abs(model.num_trainable_parameters() - 1.67e6) < abs(73_728 * 22 - 1.67e6)


def test_medct_tiny_count_and_fresh_adapters_equal_base(tiny_base):
    base, tokenizer, _ = tiny_base
    model = _medct(tiny_base)
    # CTViT-tiny: 4 layers x 23·(32+32 + 2·(32+32)); BERT-tiny: 2 layers x 3·23·(64+64).
    assert model.num_trainable_parameters() == 4 * 192 * 23 + 2 * 384 * 23 + 1 == 35_329
    assert model.image_hgnn is None and model.config.label_guided
    volumes, tokens = _inputs(tokenizer)
    with torch.no_grad():
        assert rel_err(model.encode_image(volumes), base.encode_image(volumes)) < 1e-6
        assert rel_err(model.encode_text(**tokens), base.encode_text(**tokens)) < 1e-6
        out = model.image_features(volumes)
    assert out.tokens.shape == (2, 1, 32) and out.cls_attn is None
    assert model.volume_shape == VOLUME and model.context_length == 512
    with pytest.raises(ValueError, match="no global token"):
        model.image_features(volumes, cls_attn="probs")
    with pytest.raises(ValueError, match=r"\[B, 1, D, H, W\]"):
        model.encode_image(torch.zeros(2, 3, 48, 48))
    with pytest.raises(ValueError, match="CTPreprocess"):
        model.encode_image(torch.zeros(1, 1, 8, 48, 48))


def test_hgnn_and_quantizer_option_refused_where_they_do_not_apply(tiny_base):
    base, tokenizer, preprocess = tiny_base
    with pytest.raises(ValueError, match="no global token"):
        ACELoRAModel(copy.deepcopy(base), tokenizer, preprocess, "paper")
    with pytest.raises(ValueError, match="ct_quantizer must be one of"):
        acelora.get_config("medct", ct_quantizer="off")
    with pytest.raises(ValueError, match="no vector quantiser"):
        acelora.create_ace_lora("tiny", config="medct", ct_quantizer="bypass")


def test_merge_equals_unmerged(tiny_base):
    model = _medct(tiny_base, ct_quantizer="bypass")   # continuous latents: merge error visible
    _randomize(model)
    volumes, tokens = _inputs(tiny_base[1])
    with torch.no_grad():
        image, text = model.encode_image(volumes), model.encode_text(**tokens)
        model.merge()
        assert model.merged
        assert rel_err(model.encode_image(volumes), image) < 1e-5
        assert rel_err(model.encode_text(**tokens), text) < 1e-5
        model.unmerge()
        assert rel_err(model.encode_image(volumes), image) < 1e-6


def test_quantizer_frozen_and_straight_through_gradient(tiny_base):
    model = _medct(tiny_base)
    _randomize(model, 0.05)
    vq = model.base.visual_transformer.vq
    buffers = {n: b.clone() for n, b in vq.named_buffers()}
    assert not list(vq.parameters())
    volumes, tokens = _inputs(tiny_base[1], n=2)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image_lora = [p for m in model.layers.image for n, p in m.named_parameters() if n.endswith("lora_A")]
    # Eval mode: the latent is piecewise constant in the LoRA weights (codes only): no gradient.
    out = model(volumes, tokens["input_ids"], tokens["attention_mask"], labels=labels)
    grads = torch.autograd.grad(out["loss"], image_lora, allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # Training mode: straight through the quantiser to every CTViT layer's adapters.
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(volumes, tokens["input_ids"], tokens["attention_mask"], labels=labels)
        optimizer.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in image_lora)
        optimizer.step()
    for name, value in vq.named_buffers():   # never an EMA update
        assert torch.equal(value, buffers[name]), name
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert frozen == ["logit_scale"]


def test_bypass_pools_the_continuous_tokens(tiny_base):
    base = tiny_base[0]
    model = _medct(tiny_base, ct_quantizer="bypass")
    volumes, _ = _inputs(tiny_base[1])
    with torch.no_grad():
        want = base.to_visual_latent(base.pool(base.visual_transformer.forward_features(volumes)))
        got = model.encode_image(volumes, normalize=False)
        quantised = base.encode_image(volumes, normalize=False)
    assert rel_err(got, want) < 1e-6 and rel_err(got, quantised) > 1e-3
    assert model.image_tower.quantizer == "bypass"
    with pytest.raises(ValueError, match="ct_quantizer"):
        CTViTTower(base, quantizer="skip")


def test_ranks_per_tower_and_adapter_files(tiny_base, tmp_path):
    model = _medct(tiny_base, lora_rank_image=2, lora_rank_text=5)
    image_lora = [m for layer in model.layers.image for m in layer.modules() if hasattr(m, "lora_A")]
    text_lora = [m for layer in model.layers.text for m in layer.modules() if hasattr(m, "lora_A")]
    assert {m.rank for m in image_lora} == {2} and {m.rank for m in text_lora} == {5}
    assert model.num_trainable_parameters() == 4 * 192 * 2 + 2 * 384 * 5 + 1
    scales = {m.scale for m in model.lora_modules()}
    assert scales == {1 / math.sqrt(2), 1 / math.sqrt(5)}          # rs-LoRA per tower
    _randomize(model)
    model.save_adapters(tmp_path / "ad")
    loaded = acelora.create_ace_lora("ct-clip-tiny", adapters=tmp_path / "ad")
    volumes, tokens = _inputs(tiny_base[1])
    with torch.no_grad():
        for a, b in ((model.encode_image(volumes), loaded.encode_image(volumes)),
                     (model.encode_text(**tokens), loaded.encode_text(**tokens))):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"lora_rank \(image tower\): saved 2, model 23"):
        acelora.create_ace_lora("ct-clip-tiny", config="medct", lora_rank_text=5,
                                adapters=tmp_path / "ad")
    other = acelora.create_ace_lora("tiny", config=acelora.get_config(
        "paper", hgnn=False, lora_rank_image=2, lora_rank_text=5))
    with pytest.raises(ValueError, match="do not match this base.*image_tower: adapters were "
                                         "made for ctvit"):
        other.load_adapters(tmp_path / "ad")


def test_gradient_checkpointing_same_gradients(tiny_base):
    volumes, tokens = _inputs(tiny_base[1])
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)   # same adapters both times
        model = _medct(tiny_base, lora_dropout=0.0, ct_quantizer="bypass")
        _randomize(model)
        model.base.text_transformer.eval()   # BERT's own dropout off: same function both times
        model.set_grad_checkpointing(checkpointed)   # the trainer's switch (grad_checkpointing)
        vit = model.base.visual_transformer
        assert vit.enc_spatial_transformer.grad_checkpointing is checkpointed
        loss = model(volumes, tokens["input_ids"], tokens["attention_mask"])["loss"]
        params = [p for p in model.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-6
