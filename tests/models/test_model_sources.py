"""Where native open_clip models come from: QuiltNet- / BMC-CLIP-style folders and hf-hub names
resolved from the local Hugging Face cache, with the network blocked."""
import copy
import json
import socket

import pytest
import torch

import acelora
from acelora.models.factory import build_open_clip, create_base_model

from acelora.testing import TOY_OPEN_CLIP_CFG as NATIVE_CFG

PRE = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def write_folder(path, safetensors=False):
    """A folder in the schema of QuiltNet's (bin) or BMC-CLIP's (safetensors) hub repository."""
    torch.manual_seed(3)
    model = build_open_clip(copy.deepcopy(NATIVE_CFG))
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": NATIVE_CFG, "preprocess_cfg": PRE}))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file
        save_file(state, str(path / "open_clip_model.safetensors"))
    else:
        torch.save(state, path / "open_clip_pytorch_model.bin")
    return model


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("safetensors, prefix", [(False, ""), (True, "local-dir:")])
def test_native_folders_load_their_weights(tmp_path, no_network, safetensors, prefix):
    ref = write_folder(tmp_path / "m", safetensors)
    model = acelora.create_ace_lora(prefix + str(tmp_path / "m"))
    assert model.image_tower.name == "open_clip-vit" and model.text_tower.name == "open_clip-text"
    for k, v in ref.state_dict().items():
        assert torch.equal(model.base.state_dict()[k.replace("attn.in_proj_weight", "attn.in_proj.weight")
                                                   .replace("attn.in_proj_bias", "attn.in_proj.bias")], v), k
    assert model.preprocess is not None and model.image_size == 64
    with torch.no_grad():
        emb = model.encode_text(**model.tokenizer(["hyperplastic polyp"]))
    assert emb.shape == (1, 32)


def test_hf_hub_name_resolves_from_the_local_cache_only(tmp_path, no_network, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=f"not in the local Hugging Face cache \\({cache}"):
        create_base_model("hf-hub:acme/quilt-toy")
    repo = cache / "models--acme--quilt-toy"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    ref = write_folder(repo / "snapshots" / commit)
    model, tok, pre = create_base_model("hf-hub:acme/quilt-toy")
    assert torch.equal(model.visual.conv1.weight, ref.visual.conv1.weight)
    assert tok(["a"])["input_ids"].shape[0] == 1 and pre is not None


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_base_model("local-dir:" + str(tmp_path / "nowhere"))
    write_folder(tmp_path / "m")
    (tmp_path / "m" / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing: open_clip_pytorch_model.bin or open_clip_model.safetensors"):
        create_base_model(str(tmp_path / "m"))
    cfg = copy.deepcopy(NATIVE_CFG)
    cfg["vision_cfg"]["layers"] = [3, 4, 6, 3]
    (tmp_path / "m" / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    with pytest.raises(ValueError, match="ResNet image towers are not supported"):
        create_base_model(str(tmp_path / "m"))


def test_preprocessing_follows_the_models_own_config(tmp_path):
    """Training, evaluation and predict all normalise with the folder's mean/std (not BiomedCLIP's)."""
    from PIL import Image

    from acelora.eval.loading import dataset_transform
    from acelora.eval.predict import image_transform

    write_folder(tmp_path / "m")
    model = acelora.create_model(str(tmp_path / "m"))
    image = Image.new("RGB", (80, 70), (255, 0, 128))
    want = (torch.tensor([1.0, 0.0, 128 / 255])[:, None, None] - 0.5) / 0.25
    for transform in (model.image_transform(), dataset_transform(model), image_transform(model)):
        out = transform(image)
        assert out.shape == (3, 64, 64) and torch.allclose(out, want.expand(3, 64, 64), atol=1e-5)
    train = model.image_transform(train=True)(image)
    assert train.shape == (3, 64, 64) and torch.allclose(train, want.expand(3, 64, 64), atol=1e-5)
