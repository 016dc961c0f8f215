"""ACE-LoRA on open_clip's native ViT models (issue: towers): the tower interface, trainable
counts, equality with the un-injected model, merge, and the built-in configs."""
import copy

import pytest
import torch
import torch.nn.functional as F

import acelora
from acelora.models import ACELoRAModel, CLIPModel
from acelora.models.factory import build_open_clip, create_base_model, open_clip_model_names
from acelora.models.tokenizer import OpenCLIPTokenizer
from acelora.testing import TOY_OPEN_CLIP_CFG, rel_err

NATIVE_CFG = TOY_OPEN_CLIP_CFG
TEXTS = ["a photo of lung adenocarcinoma", "benign colonic tissue", "x"]


@pytest.fixture(scope="module")
def native():
    torch.manual_seed(0)
    base = build_open_clip(copy.deepcopy(NATIVE_CFG), name="toy-vit").eval()
    return base, OpenCLIPTokenizer(16)


def make(native, hgnn=True, randomize=False, **kw):
    base, tok = native
    model = ACELoRAModel(copy.deepcopy(base), tok, None, acelora.get_config("paper", hgnn=hgnn, **kw)).eval()
    if randomize:
        with torch.no_grad():
            for m in model.lora_modules():
                m.lora_B.normal_(0, 0.3)
    return model


def test_vit_b32_trainable_parameters():
    base, tok, _ = create_base_model("ViT-B-32", device="meta")
    model = ACELoRAModel(base, tok, None, "paper")
    want = (12 * 3 * (4 * 768 + 768 * 4) + 12 * 3 * (4 * 512 + 512 * 4)
            + 4 * (512 * 128 + 128 + 128 * 512 + 512) + 1)
    assert want == 895_489
    assert model.num_trainable_parameters() == want
    assert len(model.layers.image) == 12 and len(model.layers.text) == 12
    assert model.describe_architecture()["image_tower"] == "open_clip-vit"


def test_every_supported_config_builds_on_meta():
    names = open_clip_model_names()
    for must in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-B-32-quickgelu", "ViT-L-14-quickgelu"):
        assert must in names
    for name in names:
        base, tok, _ = create_base_model(name, device="meta")
        model = ACELoRAModel(base, tok, None, "paper")
        d_img, d_txt = model.image_tower.width, model.text_tower.width
        lora = 3 * 2 * 4 * (d_img * model.image_tower.depth + d_txt * model.text_tower.depth)
        hgnn = 4 * (2 * model.embed_dim * 128 + 128 + model.embed_dim)
        assert model.num_trainable_parameters() == lora + hgnn + 1, name


@pytest.mark.parametrize("name, why", [("RN50", "ResNet"), ("convnext_base", "not supported"),
                                       ("coca_ViT-B-32", "CoCa"), ("no-such-model", "unknown base model")])
def test_unsupported_models_are_refused_clearly(name, why):
    with pytest.raises(ValueError, match=why):
        create_base_model(name, device="meta")


def test_fresh_adapters_without_hgnn_equal_open_clip(native):
    base, tok = native
    model = make(native, hgnn=False)
    images = torch.randn(2, 3, 64, 64)
    batch = tok(TEXTS)
    full_ids = tok.tokenizer(TEXTS, context_length=16)   # open_clip's own fixed-length input
    with torch.no_grad():
        assert rel_err(model.encode_image(images), F.normalize(base.encode_image(images), dim=-1)) < 1e-6
        assert rel_err(model.encode_text(**batch), F.normalize(base.encode_text(full_ids), dim=-1)) < 1e-6
        plain = CLIPModel(copy.deepcopy(base), tok)
        assert rel_err(plain.encode_text(**batch), model.encode_text(**batch)) < 1e-6


def test_eot_token_is_moved_to_index_0(native):
    base, tok = native
    model = make(native, randomize=True)
    batch = tok(TEXTS)
    eot = batch["input_ids"].argmax(-1)
    with torch.no_grad():
        out = model.text_features(**batch, cls_attn="probs")
        unrefined = make(native, hgnn=False)
        unrefined.load_state_dict(model.state_dict(), strict=False)
        pooled = unrefined.encode_text(**batch, normalize=False)
    assert rel_err(out.tokens[:, 0], pooled) < 1e-6
    # the other real tokens follow in their order; positions after the EOT are padding
    n = batch["input_ids"].shape[1]
    for b in range(3):
        e = int(eot[b])
        need = model.text_tower.padding_policy.min_vertices   # a short text borrows padding
        assert torch.equal(out.padding[b], torch.arange(n) > max(e, need - 1))
        assert out.cls_attn.shape == (3, n - 1)
        assert torch.all(out.cls_attn[b, e:] == 0)            # future keys are masked (causal)
        assert abs(float(out.cls_attn[b].sum()) - 1) < 0.5     # its own key (dropped) had the rest


def test_training_step_reaches_only_adapters(native):
    model = make(native, randomize=True).train()
    batch = model.tokenizer(TEXTS)
    out = model(torch.randn(3, 3, 64, 64), **batch, labels=torch.tensor([0, 1, 1]))
    assert set(out) == {"loss", "image_emb", "text_emb", "logit_scale"}
    out["loss"].backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert name.endswith(("lora_A", "lora_B")) or "hgnn" in name or name == "logit_scale", name
        else:
            assert p.grad is None, name
    assert all(m.lora_B.grad.abs().sum() > 0 for m in model.lora_modules())
    with torch.no_grad():
        emb = model.eval().encode_image(torch.randn(2, 3, 64, 64))
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2))


def test_merge_gives_the_unmerged_outputs(native):
    model = make(native, randomize=True)
    images, batch = torch.randn(2, 3, 64, 64), model.tokenizer(TEXTS)
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(**batch)
        model.merge()
        assert rel_err(model.encode_image(images), img) < 1e-5
        assert rel_err(model.encode_text(**batch), txt) < 1e-5
        model.unmerge()
        assert rel_err(model.encode_image(images), img) < 1e-5


def test_adapters_round_trip_on_a_native_model(native, tmp_path):
    model = make(native, randomize=True)
    model.save_adapters(tmp_path / "ad")
    fresh = make(native)
    fresh.load_adapters(tmp_path / "ad")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))
    other = make(native)
    with torch.no_grad():
        other.base.visual.conv1.weight.mul_(2)
    with pytest.raises(ValueError, match="weights"):
        other.load_adapters(tmp_path / "ad")


def test_random_init_is_seeded_and_deterministic():
    a, _, _ = create_base_model("tiny")
    torch.manual_seed(123)                 # the caller's RNG does not matter ...
    b, _, _ = create_base_model("tiny")
    c, _, _ = create_base_model("tiny", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)  # ... the seed does
