import copy

import pytest
import torch
import torch.nn.functional as F

from acelora.models import ACELoRAModel
from acelora.nn.lora import LoRAQKV
from acelora.testing import rel_err

def naive_cls_row(q, k, mode, keep=None):
    """float64 head-averaged CLS row from [B, N, H, d] q, k."""
    q, k = q.double(), k.double()
    logits = torch.einsum("bhd,bnhd->bhn", q[:, 0], k) / q.shape[-1] ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
    row = logits.softmax(-1) if mode == "probs" else logits
    return row.mean(1)[:, 1:]


def test_fresh_adapters_equal_the_base(tiny, make_ace, texts):
    images = torch.randn(2, 3, 64, 64)
    tok = tiny.tokenizer(texts)
    plain = make_ace(hgnn=False)
    with torch.no_grad():
        assert rel_err(plain.encode_image(images), tiny.encode_image(images)) < 1e-6
        assert rel_err(plain.encode_text(**tok), tiny.encode_text(**tok)) < 1e-6
        model = make_ace()
        assert rel_err(model.encode_image_tokens(images), tiny.encode_image_tokens(images)) < 1e-6
        valid = tok["attention_mask"].bool()
        assert rel_err(model.encode_text_tokens(**tok)[valid], tiny.encode_text_tokens(**tok)[valid]) < 1e-6
    # the base inside is really frozen and untouched
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.base.named_parameters())
    assert torch.equal(model.logit_scale, tiny.logit_scale)
    assert model.logit_scale is not model.base.logit_scale


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_cls_attention_equals_naive_from_the_base_blocks(tiny, preset, make_ace, texts):
    """The captured CLS rows equal a naive computation from the untouched base's last q, k."""
    base = copy.deepcopy(tiny.base)
    cap = {}
    base.visual.trunk.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: cap.setdefault("qkv", o))
    sa = base.text.transformer.encoder.layer[-1].attention.self
    sa.query.register_forward_hook(lambda m, i, o: cap.setdefault("q", o))
    sa.key.register_forward_hook(lambda m, i, o: cap.setdefault("k", o))
    images = torch.randn(2, 3, 64, 64)
    tok = tiny.tokenizer(texts)
    with torch.no_grad():
        base.encode_image(images)
        base.encode_text(tok["input_ids"])
    model = make_ace(preset)
    cfg = model.config
    with torch.no_grad():
        img_row = model.image_features(images, True).cls_attn
        txt_row = model.text_features(tok["input_ids"], tok["attention_mask"], True).cls_attn
    heads = base.visual.trunk.blocks[-1].attn.num_heads
    qkv = cap["qkv"].unflatten(-1, (3, heads, -1))
    ref = naive_cls_row(qkv[:, :, 0], qkv[:, :, 1], cfg.image_cls_attn)
    assert img_row.shape == (2, 16) and rel_err(img_row, ref) < 1e-5
    h = sa.num_attention_heads
    keep = tok["attention_mask"].bool()
    ref = naive_cls_row(cap["q"].unflatten(-1, (h, -1)), cap["k"].unflatten(-1, (h, -1)), cfg.text_cls_attn, keep)
    n = keep.shape[1] - 1  # official pads further, to the context length: those keys get 0 too
    assert txt_row.shape[1] == (n if preset == "paper" else model.context_length - 1)
    assert rel_err(txt_row[:, :n], ref) < 1e-5
    assert torch.all(txt_row[:, :n][~keep[:, 1:]] == 0) and torch.all(txt_row[:, n:] == 0)


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_global_embedding_is_refined_cls(tiny, preset, make_ace, randomize, texts):
    model = make_ace(preset)
    randomize(model)
    images = torch.randn(2, 3, 64, 64)
    tok = model.tokenizer(texts)
    with torch.no_grad():
        out = model.image_features(images, True)
        assert out.padding is None
        want = F.normalize(model.image_hgnn(F.normalize(out.tokens, dim=-1), out.cls_attn, None, global_only=True), dim=-1)
        assert rel_err(model.encode_image(images), want) < 1e-6
        ids, mask = model.text_tower.fit(tok["input_ids"], tok["attention_mask"])
        out = model.text_features(tok["input_ids"], tok["attention_mask"], True)
        tokens, row, kpm = out.tokens, out.cls_attn, out.padding
        if preset == "official":
            assert kpm is None
        else:  # padding is masked, except what the 3-token "edema" borrows to reach k + 2 vertices
            assert torch.equal(kpm[:2], mask[:2] == 0)
            assert (~kpm[2]).sum() == model.config.hgnn_topk + 2 and torch.equal(mask[2] == 0, kpm[2] | (mask[2] == 0))
        want = F.normalize(model.text_hgnn(F.normalize(tokens, dim=-1), row, kpm, global_only=True), dim=-1)
        assert rel_err(model.encode_text(**tok), want) < 1e-6
        # the refined token 0 of the full HGNN output is the same global embedding
        full = model.encode_image_tokens(images, refined=True)
        assert rel_err(full[:, 0], model.encode_image(images)) < 1e-5


def test_padding_policy_of_the_presets(tiny, make_ace, randomize, texts):
    """paper: padded text positions are not vertices; official: they are, and texts are padded to
    the context length as the released checkpoint saw them. Either way an embedding does not
    depend on the other texts of its batch."""
    long = "small left pleural effusion with adjacent atelectasis and mild cardiomegaly of the heart"
    short = texts[1]
    lengths = tiny.tokenizer([long, short])["attention_mask"].sum(1)
    assert lengths[0] > lengths[1] >= 7
    for preset in ("paper", "official"):
        model = make_ace(preset)
        randomize(model)
        with torch.no_grad():
            padded = model.encode_text(**tiny.tokenizer([short, long]))[0]
            unpadded = model.encode_text(**tiny.tokenizer([short]))[0]
            assert torch.allclose(padded, unpadded, atol=1e-5)
            out = model.text_features(**tiny.tokenizer([short]))
        if preset == "official":
            assert out.tokens.shape[1] == model.context_length and out.padding is None
        else:
            assert out.tokens.shape[1] == lengths[1] and not out.padding.any()


def test_very_short_texts_still_build_hyperedges(tiny, make_ace):
    for preset in ("paper", "official"):
        model = make_ace(preset)
        tok = tiny.tokenizer(["edema", "pneumonia"])  # 3 tokens each < topk + 2
        with torch.no_grad():
            emb = model.encode_text(**tok)
        assert emb.shape == (2, 64) and torch.isfinite(emb).all()


def test_training_step_grads_only_on_adapters(tiny, make_ace, texts):
    model = make_ace().train()
    tok = tiny.tokenizer(texts)
    labels = torch.zeros(3, 14)
    labels[0, 1] = labels[2, 1] = 1
    out = model(torch.randn(3, 3, 64, 64), tok["input_ids"], tok["attention_mask"], labels=labels)
    assert set(out) == {"loss", "image_emb", "text_emb", "logit_scale"}
    assert torch.allclose(out["logit_scale"], model.logit_scale.exp())
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    lora = model.lora_modules()
    assert len(lora) == 4 and all(m.weight.grad is None for m in lora)
    assert all(m.lora_B.grad.abs().sum() > 0 for m in lora)
    assert model.logit_scale.grad is not None and model.image_hgnn.edge_mlp.down.weight.grad.abs().sum() > 0


def test_label_guidance_changes_the_loss(tiny, make_ace, texts):
    model = make_ace()
    tok = tiny.tokenizer(texts)
    images = torch.randn(3, 3, 64, 64)
    ids = torch.tensor([0, 0, 1])
    multi_hot = torch.zeros(3, 14)
    multi_hot[2, 3] = 1
    with torch.no_grad():
        plain = model(images, **tok)["loss"]
        by_ids = model(images, **tok, labels=ids)["loss"]
        by_vec = model(images, **tok, labels=multi_hot)["loss"]
        model.config = model.config.replace(label_guided=False)
        off = model(images, **tok, labels=ids)["loss"]
    assert torch.allclose(by_ids, by_vec) and not torch.allclose(plain, by_ids)
    assert torch.allclose(off, plain)


def test_parameter_counts_and_report(tiny, make_ace):
    model = make_ace()
    d, r, h, D = 64, 4, 128, 64
    lora = 4 * 3 * (r * d + d * r)
    hgnn = 4 * (D * h + h + h * D + D)
    assert model.num_trainable_parameters() == lora + hgnn + 1
    report = model.trainable_parameter_report()
    assert f"trainable params: {lora + hgnn + 1:,d}" in report and "image LoRA" in report
    only_image = make_ace(lora_towers=("image",), hgnn=False)
    assert only_image.num_trainable_parameters() == lora // 2 + 1
    assert not any(isinstance(m.qkv, LoRAQKV) for m in only_image.layers.text)


def test_biomedclip_default_config_has_969217_trainable_parameters():
    from acelora.models.biomedclip import BIOMEDBERT_CONFIG, BIOMEDCLIP_CONFIG, build_model

    with torch.device("meta"):  # the real architecture, without allocating 196M parameters
        model = ACELoRAModel(build_model(BIOMEDCLIP_CONFIG, BIOMEDBERT_CONFIG), None, None, "paper")
    assert model.num_trainable_parameters() == 969_217
    parts = {k: sum(p.numel() for p in v) for k, v in model._parts().items()}
    assert parts["image LoRA"] + parts["text LoRA"] == 442_368
    assert parts["image HGNN"] + parts["text HGNN"] == 526_848
    assert parts["logit scale"] == 1
