import os

import pytest
import torch
from PIL import Image

import acelora
from acelora.models import save_base_model
from acelora.models.biomedclip import BIOMEDCLIP_CONFIG


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return acelora.create_model("tiny")


def test_interface_shapes(tiny):
    assert (tiny.image_size, tiny.patch_size, tiny.embed_dim, tiny.context_length) == (64, 16, 64, 64)
    tok = tiny.tokenizer(["a chest x-ray image of cardiomegaly.", "no acute process"])
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape
    assert ids.shape[1] == int(mask.sum(1).max())  # padded to the longest text
    assert torch.all(ids[:, 0] == tiny.tokenizer.hf_tokenizer.cls_token_id)
    assert tiny.tokenizer(["word " * 200])["input_ids"].shape[1] == tiny.context_length
    assert tiny.tokenizer(["word " * 200], context_length=10)["input_ids"].shape[1] == 10
    images = torch.randn(3, 3, 64, 64)
    img, txt = tiny.encode_image(images), tiny.encode_text(ids, mask)
    assert img.shape == (3, 64) and txt.shape == (2, 64)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = tiny.encode_image_tokens(images)
    assert tokens.shape == (3, 1 + 16, 64)
    assert torch.allclose(tokens[:, 0], img, atol=1e-5)  # token 0 is the CLS embedding
    assert torch.allclose(tiny.encode_text_tokens(ids, mask)[:, 0], txt, atol=1e-5)
    assert isinstance(tiny.logit_scale, torch.nn.Parameter)
    x = tiny.preprocess(Image.new("RGB", (100, 80), (120, 60, 30)))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32


def test_matches_open_clip_paths(tiny):
    """Our encoders equal open_clip's own encode_image / encode_text."""
    images = torch.randn(2, 3, 64, 64)
    tok = tiny.tokenizer(["pleural effusion on the left", "normal heart size"])
    with torch.no_grad():
        assert torch.allclose(tiny.encode_image(images), tiny.base.encode_image(images, normalize=True), atol=1e-6)
        assert torch.allclose(tiny.encode_text(**tok), tiny.base.encode_text(tok["input_ids"], normalize=True),
                              atol=1e-6)
        # attention_mask defaults to input_ids != pad
        assert torch.equal(tiny.encode_text(tok["input_ids"]), tiny.encode_text(**tok))


def test_forward_loss(tiny):
    tok = tiny.tokenizer(["a", "b c", "d e f"])
    out = tiny(torch.randn(3, 3, 64, 64), tok["input_ids"], tok["attention_mask"])
    assert set(out) == {"loss", "image_emb", "text_emb", "logit_scale"}
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert torch.allclose(out["logit_scale"], tiny.logit_scale.exp())


@pytest.mark.parametrize("safetensors", [False, True])
def test_folder_round_trip(tiny, tmp_path, safetensors):
    save_base_model(tiny.base, tiny.tokenizer, tmp_path, safetensors=safetensors)
    for name in (str(tmp_path), f"local-dir:{tmp_path}"):
        loaded = acelora.create_model(name)
        a, b = tiny.base.state_dict(), loaded.base.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        texts = ["small left pleural effusion", "no pneumothorax"]
        assert torch.equal(loaded.tokenizer(texts)["input_ids"], tiny.tokenizer(texts)["input_ids"])
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(loaded.encode_image(images), tiny.encode_image(images))
            assert torch.equal(loaded.encode_text(**loaded.tokenizer(texts)),
                               tiny.encode_text(**tiny.tokenizer(texts)))


def test_missing_files_are_each_named(tiny, tmp_path):
    save_base_model(tiny.base, tiny.tokenizer, tmp_path)
    os.remove(tmp_path / "open_clip_pytorch_model.bin")
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError) as err:
        acelora.create_model(str(tmp_path))
    msg = str(err.value)
    assert "open_clip_pytorch_model.bin" in msg and "config.json" in msg
    assert "open_clip_config.json;" not in msg and "vocab.txt" not in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        acelora.create_model(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="unknown base model"):
        acelora.create_model("vit-huge-from-the-hub")


def test_mismatched_weights_are_refused(tiny, tmp_path):
    save_base_model(tiny.base, tiny.tokenizer, tmp_path)
    state = torch.load(tmp_path / "open_clip_pytorch_model.bin", weights_only=True)
    state.pop("visual.head.proj.weight")
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(ValueError, match="visual.head.proj.weight"):
        acelora.create_model(str(tmp_path))


def test_biomedclip_architecture_on_meta():
    """The built-in BiomedCLIP config has the published architecture (built without memory)."""
    from acelora.models.biomedclip import BIOMEDBERT_CONFIG, build_model

    with torch.device("meta"):
        base = build_model(BIOMEDCLIP_CONFIG, BIOMEDBERT_CONFIG)
    n = sum(p.numel() for p in base.parameters())
    assert 190e6 < n < 200e6
    assert base.visual.head.proj.weight.shape == (512, 768) and base.visual.head.proj.bias is None
    proj = base.text.proj
    assert [tuple(m.weight.shape) for m in proj if hasattr(m, "weight")] == [(640, 768), (512, 640)]
    assert base.context_length == 256 and len(base.visual.trunk.blocks) == 12


def test_biomedclip_hub_folder_needs_no_bert_config(tmp_path):
    """BiomedCLIP's own folder has no BERT config.json; the built-in one stands in for it."""
    import json

    from acelora.models.biomedclip import BIOMEDBERT_CONFIG, _known_text_tower, check_model_dir

    (tmp_path / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CONFIG))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"")
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    files = check_model_dir(tmp_path)
    assert "bert_config" not in files and _known_text_tower(tmp_path) == BIOMEDBERT_CONFIG
    other = json.loads(json.dumps(BIOMEDCLIP_CONFIG))
    other["model_cfg"]["text_cfg"]["hf_model_name"] = "someone/other-bert"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(other))
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_model_dir(tmp_path)
