"""CT-CLIP in acelora against an independent float64 reference of CT-CLIP's computation
(tests/models/ctclip_reference.py), checkpoints in CT-CLIP's key layout, the frozen quantiser."""
import importlib.util
import os
import sys
from dataclasses import replace

import pytest
import torch

from acelora.models.ctclip import (CTCLIP, CTCLIP_CONFIGS, CTCLIPConfig, build_ctclip,
                                   create_ctclip, load_ctclip_weights, read_ctclip_checkpoint,
                                   save_ctclip)
from acelora.models.ctvit import CTViT, CTViTConfig

_spec = importlib.util.spec_from_file_location(
    "ctclip_reference", os.path.join(os.path.dirname(__file__), "ctclip_reference.py"))
ref = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("ctclip_reference", ref)
_spec.loader.exec_module(ref)

TINY = CTCLIP_CONFIGS["ct-clip-tiny"]
TEXTS = ["lung nodule is present.", "pleural effusion is not present. small atelectasis"]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_state(config: CTCLIPConfig, seed=0, device=None):
    return ref.random_ctclip_state_dict(ref.RefSpec.of(config.vision), config.text,
                                        config.dim_image, config.dim_latent, seed, device)


def as_double(state):
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint written with the reference's (CT-CLIP's) key names, every key it stores."""
    state = reference_state(TINY, seed=1)
    path = tmp_path_factory.mktemp("ctclip") / "CT-CLIP_tiny.pt"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def tiny_loaded(tiny_checkpoint):
    model, tokenizer, _ = create_ctclip("ct-clip-tiny", pretrained=tiny_checkpoint[0])
    return model, tokenizer


def volumes(config, batch=2, seed=0, depth=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, depth or config.depth, *config.vision.image_size, generator=g)


# --------------------------------------------------------------------------- numerics vs reference

def test_tokens_and_codes_match_reference_fp32(tiny_checkpoint, tiny_loaded):
    model, _ = tiny_loaded
    state = tiny_checkpoint[1]
    x = volumes(TINY)
    with torch.no_grad():
        tokens, codes = model.visual_transformer(x, return_codes=True)
        pre = model.visual_transformer.forward_features(x)
        ref_pre = ref.ctvit_tokens(state, ref.RefSpec.of(TINY.vision), x)
        ref_q, ref_codes = ref.quantize(state, ref_pre)
    assert pre.shape == (2, 4, 6, 6, 32)
    assert rel_err(pre, ref_pre) < 1e-5
    assert torch.equal(codes, ref_codes)
    assert len(codes.unique()) > 4  # the comparison is not of one repeated code
    assert torch.equal(tokens, ref_q)  # eval mode: the stored code vectors themselves


@pytest.mark.parametrize("use_quantizer", [True, False])
def test_latents_match_reference_float64(tiny_checkpoint, tiny_loaded, use_quantizer):
    model, tokenizer = tiny_loaded
    model = CTCLIP(TINY, name="ct-clip-tiny")
    load_ctclip_weights(model, read_ctclip_checkpoint(tiny_checkpoint[0]))
    model = model.double().eval()
    model.visual_transformer.use_quantizer = use_quantizer
    state = as_double(tiny_checkpoint[1])
    x = volumes(TINY).double()
    tok = tokenizer(TEXTS)
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(tok["input_ids"], tok["attention_mask"])
    ref_img = ref.encode_image(state, ref.RefSpec.of(TINY.vision), x, use_quantizer=use_quantizer)
    ref_txt = ref.encode_text(state, TINY.text, tok["input_ids"], tok["attention_mask"])
    assert img.dtype == txt.dtype == torch.float64 and img.shape == (2, 32) and txt.shape == (2, 32)
    assert rel_err(img, ref_img) < 1e-6
    assert rel_err(txt, ref_txt) < 1e-6
    assert torch.allclose(img.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    assert model.logit_scale is model.temperature
    assert model.logit_scale.item() == pytest.approx(0.3)


def test_flatten_pooling_non_square_grid_matches_reference():
    """v1-style pooling on a grid with T, h, w all different (catches axis mix-ups)."""
    vision = replace(TINY.vision, image_size=(40, 48), temporal_patch_size=3)
    config = replace(TINY, vision=vision, depth=9, pooling="flatten")  # grid 3 x 5 x 6
    state = reference_state(config, seed=2)
    model = CTCLIP(config)
    load_ctclip_weights(model, state)
    model = model.double().eval()
    x = volumes(config, batch=1).double()
    with torch.no_grad():
        img = model.encode_image(x)
        pre = model.visual_transformer.forward_features(x)
    state = as_double(state)
    spec = ref.RefSpec.of(vision)
    assert pre.shape == (1, 3, 5, 6, 32)
    assert rel_err(pre, ref.ctvit_tokens(state, spec, x)) < 1e-10
    assert rel_err(img, ref.encode_image(state, spec, x, pooling="flatten")) < 1e-6


def test_position_bias_cached_while_frozen_and_recomputed_when_trained():
    torch.manual_seed(0)
    vit = CTViT(TINY.vision)
    cpb = vit.spatial_rel_pos_bias
    spec = ref.RefSpec.of(TINY.vision)
    sd = {"visual_transformer." + k: v.detach() for k, v in vit.state_dict().items()}
    expected = ref.continuous_position_bias(sd, spec, 6, 6, torch.float32)
    with torch.no_grad():
        first = cpb(6, 6)
        assert cpb(6, 6) is first                     # cached
    assert rel_err(first, expected) < 1e-6
    cpb.requires_grad_(False)
    assert cpb(6, 6) is first                          # frozen: cached with grad enabled too
    with torch.no_grad():
        cpb.net[0][0].bias.add_(0.5)                   # an in-place update invalidates the cache
    moved = cpb(6, 6)
    assert moved is not first and not torch.equal(moved, first)
    cpb.requires_grad_(True)
    cpb(6, 6).sum().backward()                         # trainable: recomputed, with gradients
    assert cpb.net[0][0].weight.grad is not None and cpb.net[0][0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- quantiser

def test_quantizer_frozen_and_straight_through_in_train_mode():
    model, _, _ = create_ctclip("ct-clip-tiny")
    vq = model.visual_transformer.vq
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    model.train()
    x = volumes(TINY).requires_grad_()
    img = model.encode_image(x)
    img.pow(3).sum().backward()
    for k, v in vq.state_dict().items():
        assert torch.equal(v, before[k]), f"quantiser buffer {k} changed in train mode"
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # the quantiser's own Jacobian is the identity in training; eval returns the stored codes
    t = torch.randn(3, 7, 32, requires_grad=True)
    upstream = torch.randn(3, 7, 32)
    q, ind = vq(t)
    (q * upstream).sum().backward()
    assert torch.equal(t.grad, upstream)
    assert torch.allclose(q, vq.codebook[ind], atol=1e-6)
    vq.eval()
    assert torch.equal(vq(t)[0], vq.codebook[vq.codes(t)])


def test_bypassing_the_quantizer_pools_continuous_tokens():
    model, _, _ = create_ctclip("ct-clip-tiny")
    x = volumes(TINY, batch=1)
    with torch.no_grad():
        quantized = model.encode_image(x)
        model.visual_transformer.use_quantizer = False
        bypassed = model.encode_image(x)
        direct = model.to_visual_latent(model.pool(model.visual_transformer.forward_features(x)))
    assert torch.allclose(bypassed, torch.nn.functional.normalize(direct, dim=-1), atol=1e-6)
    assert not torch.allclose(bypassed, quantized, atol=1e-3)


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_in_ctclip_layout(tmp_path, tiny_loaded):
    model, tokenizer = tiny_loaded
    path = save_ctclip(model, tmp_path / "saved.pt")
    keys = set(torch.load(path, weights_only=True))
    assert "visual_transformer.vq._codebook.embed" in keys and "temperature" in keys
    again, _, _ = create_ctclip("ct-clip-tiny", pretrained=path)
    x, tok = volumes(TINY), tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))
        assert torch.equal(model.encode_text(**tok), again.encode_text(**tok))
    # the trainer's {"model": ...} package with DDP's "module." prefix loads too
    torch.save({"model": {"module." + k: v for k, v in torch.load(path).items()}}, tmp_path / "p.pt")
    load_ctclip_weights(again, read_ctclip_checkpoint(tmp_path / "p.pt"))


def test_keep_unused_writes_every_ctclip_key(tmp_path, tiny_checkpoint):
    full, _, _ = create_ctclip("ct-clip-tiny", pretrained=tiny_checkpoint[0], keep_unused=True)
    expected = set(tiny_checkpoint[1]) - {"text_transformer.embeddings.position_ids"}
    assert set(full.state_dict()) == expected
    saved = torch.load(save_ctclip(full, tmp_path / "full.pt"), weights_only=True)
    assert torch.equal(saved["to_visual_latent_extra.weight"],
                       tiny_checkpoint[1]["to_visual_latent_extra.weight"])


def test_load_errors_name_the_keys(tmp_path, tiny_checkpoint):
    state = dict(tiny_checkpoint[1])
    model = build_ctclip("ct-clip-tiny")
    broken = {k: v for k, v in state.items() if k != "visual_transformer.enc_temporal_transformer.layers.1.1.k_scale"}
    with pytest.raises(ValueError, match=r"missing 1 key\(s\) \[visual_transformer\.enc_temporal_transformer\.layers\.1\.1\.k_scale\]"):
        load_ctclip_weights(model, broken)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\) \[visual_transformer\.extra_head\.weight\]"):
        load_ctclip_weights(model, {**state, "visual_transformer.extra_head.weight": torch.zeros(1)})
    wrong = {**state, "to_visual_latent.weight": torch.zeros(32, 7)}
    with pytest.raises(ValueError, match=r"to_visual_latent\.weight: file \(32, 7\) vs model \(32, 1152\)"):
        load_ctclip_weights(model, wrong)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a CT-CLIP state dict"):
        read_ctclip_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_ctclip("ct-clip-tiny", pretrained=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="tokenizer_dir"):
        create_ctclip("ct-clip-v2", pretrained=tmp_path / "list.pt")


def test_tokenizer_from_local_folder(tmp_path, tiny_checkpoint):
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "nodule", "is", "present", "."]) + "\n")
    model, tokenizer, _ = create_ctclip("ct-clip-tiny", pretrained=tiny_checkpoint[0],
                                        tokenizer_dir=tmp_path)
    enc = tokenizer(["Lung nodule is present."])
    assert enc["input_ids"].tolist() == [[2, 5, 6, 7, 8, 9, 3]]
    assert tokenizer.context_length == 512
    with pytest.raises(FileNotFoundError, match="no vocab.txt"):
        create_ctclip("ct-clip-tiny", tokenizer_dir=tmp_path / "nothing")


# --------------------------------------------------------------------------- construction

def test_random_init_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_ctclip("ct-clip-tiny", seed=3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = build_ctclip("ct-clip-tiny", seed=3).state_dict()
    c = build_ctclip("ct-clip-tiny", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["to_visual_latent.weight"], c["to_visual_latent.weight"])


@pytest.mark.parametrize("name", ["ct-clip-v2", "ct-clip-v1"])
def test_full_size_layout_on_meta(name):
    """Keys and shapes of the full models equal the reference's CT-CLIP checkpoint layout."""
    config = CTCLIP_CONFIGS[name]
    model = build_ctclip(name, device="meta", keep_unused=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference_state(config, device="meta").items()
              if k != "text_transformer.embeddings.position_ids"}
    assert ours == theirs
    count = sum(p.numel() for p in model.parameters())
    grid = config.vision.grid(240)
    if name == "ct-clip-v2":
        assert grid == (24, 24, 24) and ours["to_visual_latent.weight"] == (512, 24 * 24 * 512)
        assert 430e6 < count < 450e6  # "~440 M counting the two unused *_extra projections"
    else:
        assert grid == (16, 16, 16) and ours["to_visual_latent.weight"] == (512, 16 ** 3 * 512)
        assert model.to_visual_latent.weight.numel() > 1.07e9


def test_input_checks():
    model, _, _ = create_ctclip("ct-clip-tiny")
    with pytest.raises(ValueError, match=r"slices are \(40, 48\)"):
        model.encode_image(torch.zeros(1, 1, 16, 40, 48))
    with pytest.raises(ValueError, match="depth 15 is not a positive multiple"):
        model.encode_image(torch.zeros(1, 1, 15, 48, 48))
    with pytest.raises(ValueError, match="expects volumes"):
        model.encode_image(torch.zeros(1, 16, 48, 48))
    flat = CTCLIP(replace(TINY, pooling="flatten"))  # flatten pooling fixes the depth
    with pytest.raises(ValueError, match=r"2304 pooled features, to_visual_latent takes 4608"):
        flat.encode_image(torch.zeros(1, 1, 8, 48, 48))
    with pytest.raises(ValueError, match="unknown CT-CLIP configuration"):
        build_ctclip("ct-clip-v3")


# --------------------------------------------------------------------------- full size (opt-in)

@pytest.mark.slow
def test_full_size_v2_two_depth_slabs_float64(tmp_path, request):
    """480 x 480 slices, two depth slabs (D = 20), the v2 CTViT and CXR-BERT sizes, float64.
    Opt-in (minutes; ~11 GB peak memory): ``pytest -m slow`` or ``ACELORA_SLOW=1``."""
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("ACELORA_SLOW"):
        pytest.skip("opt-in full-size test: run with -m slow or ACELORA_SLOW=1")
    config = CTCLIP_CONFIGS["ct-clip-v2"]
    state = reference_state(config, seed=5)
    path = tmp_path / "v2.pt"
    torch.save(state, path)
    model = CTCLIP(config, name="ct-clip-v2")
    load_ctclip_weights(model, read_ctclip_checkpoint(path))
    model = model.double().eval()
    state = as_double(state)
    x = volumes(config, batch=1, depth=20).double()
    ids = torch.tensor([[2, 1037, 2003, 2556, 1012, 3, 0, 0], [2, 4, 5, 6, 7, 8, 9, 3]])
    mask = (ids != 0).long()
    spec = ref.RefSpec.of(config.vision)
    with torch.no_grad():
        pre = model.visual_transformer.forward_features(x)
        ref_pre = ref.ctvit_tokens(state, spec, x)
        assert pre.shape == (1, 2, 24, 24, 512)
        assert rel_err(pre, ref_pre) < 1e-6
        img = model.encode_image(x)
        txt = model.encode_text(ids, mask)
    assert rel_err(img, ref.encode_image(state, spec, x)) < 1e-6
    assert rel_err(txt, ref.encode_text(state, config.text, ids, mask)) < 1e-6
