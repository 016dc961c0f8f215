import math

import pytest
import torch
from safetensors.torch import load_file

import acelora
from acelora.models.adapters import read_adapter_config
from acelora.models.official import import_official_checkpoint


def official_checkpoint(text_depth, vision_depth, d_text, d_vision, r=4, dim=512, hidden=128, scale=33.3):
    """A synthetic file in the released layout (DESIGN §7): layers 0.. text, then the ViT."""
    weights = {}
    for i in range(text_depth + vision_depth):
        d = d_text if i < text_depth else d_vision
        weights[f"layer_{i}"] = {p: {"w_lora_A": torch.randn(r, d), "w_lora_B": torch.randn(d, r)}
                                 for p in ("q_proj", "k_proj", "v_proj")}
    for tower in ("img", "text"):
        for part in ("edge", "node"):
            weights[f"{tower}_{part}_adapter"] = {
                "down.weight": torch.randn(hidden, dim), "down.bias": torch.randn(hidden),
                "up.weight": torch.randn(dim, hidden), "up.bias": torch.randn(dim)}
    weights["logit_scale"] = torch.tensor(scale)
    return {"weights": weights, "metadata": {"r": r, "topk": 5, "params": 969217, "position": "all"}}


class _Evil:
    pass


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return acelora.create_model("tiny")


def test_import_lands_every_tensor_in_place(tiny, tmp_path):
    ckpt = official_checkpoint(2, 2, 64, 64, dim=64)
    torch.save(ckpt, tmp_path / "ACE_LoRA.pt")
    out = import_official_checkpoint(tmp_path / "ACE_LoRA.pt", tmp_path / "ad", base=tiny)
    meta = read_adapter_config(out)
    assert meta["config"] == acelora.get_config("official")
    assert meta["source"]["metadata"]["position"] == "all"

    from acelora.models import ACELoRAModel
    import copy
    model = ACELoRAModel(copy.deepcopy(tiny.base), tiny.tokenizer, tiny.preprocess, "official")
    model.load_adapters(out)
    w = ckpt["weights"]
    text, image = model.layers.text, model.layers.image
    for i in range(4):
        qkv = (text[i] if i < 2 else image[i - 2]).qkv   # official layer 2 = ViT block 0
        for g, p in enumerate(("q_proj", "k_proj", "v_proj")):
            assert torch.equal(qkv.lora_A[4 * g:4 * (g + 1)], w[f"layer_{i}"][p]["w_lora_A"])
            assert torch.equal(qkv.lora_B[64 * g:64 * (g + 1)], w[f"layer_{i}"][p]["w_lora_B"])
    for tower, hgnn in (("img", model.image_hgnn), ("text", model.text_hgnn)):
        for part, mlp in (("edge", hgnn.edge_mlp), ("node", hgnn.node_mlp)):
            src = w[f"{tower}_{part}_adapter"]
            assert torch.equal(mlp.down.weight, src["down.weight"]) and torch.equal(mlp.up.bias, src["up.bias"])
    assert math.isclose(model.logit_scale.item(), math.log(33.3), rel_tol=1e-6)  # multiplier -> log
    assert math.isclose(model(torch.randn(2, 3, 64, 64), **model.tokenizer(["a b c d e f", "g"]))
                        ["logit_scale"].item(), 33.3, rel_tol=1e-5)
    # also through the factory (its config comes from the adapter folder); another base is refused
    other = tmp_path / "other.pt"
    state = {k: v.clone() for k, v in tiny.base.state_dict().items()}
    state["visual.trunk.patch_embed.proj.weight"].mul_(1.5)
    torch.save(state, other)
    with pytest.raises(ValueError, match="weights"):
        acelora.create_ace_lora("tiny", adapters=out, pretrained=other)


def test_import_for_biomedclip_architecture(tmp_path):
    """Layers 0-11 are BERT and 12-23 the ViT (12 -> block 0); no base weights needed."""
    ckpt = official_checkpoint(12, 12, 768, 768)
    torch.save(ckpt, tmp_path / "ACE_LoRA.pt")
    out = import_official_checkpoint(tmp_path / "ACE_LoRA.pt", tmp_path / "ad", base="biomedclip")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 24 * 2 + 4 * 4 + 1
    a = tensors["base.visual.trunk.blocks.0.attn.qkv.lora_A"]
    assert torch.equal(a[:4], ckpt["weights"]["layer_12"]["q_proj"]["w_lora_A"])
    b = tensors["base.text.transformer.encoder.layer.11.attention.self.qkv.lora_B"]
    assert torch.equal(b[768:1536], ckpt["weights"]["layer_11"]["k_proj"]["w_lora_B"])
    assert sum(t.numel() for t in tensors.values()) == 969_217
    meta = read_adapter_config(out)
    assert meta["base"]["architecture"]["vision_depth"] == 12 and "weights_sha256" not in meta["base"]


def test_bad_checkpoints_are_refused(tmp_path):
    ckpt = official_checkpoint(2, 2, 64, 64, dim=64)
    del ckpt["weights"]["layer_3"]
    torch.save(ckpt, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="layer_3"):
        import_official_checkpoint(tmp_path / "a.pt", tmp_path / "out", base="tiny")
    ckpt = official_checkpoint(2, 2, 64, 64, dim=64)
    ckpt["metadata"]["r"] = 8
    torch.save(ckpt, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="r=8"):
        import_official_checkpoint(tmp_path / "b.pt", tmp_path / "out", base="tiny")
    ckpt = official_checkpoint(2, 2, 64, 64, dim=512)  # HGNN of the wrong width for tiny
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="do not fit"):
        import_official_checkpoint(tmp_path / "c.pt", tmp_path / "out", base="tiny")
    torch.save({"weights": {"x": _Evil()}}, tmp_path / "d.pt")  # arbitrary objects are never unpickled
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        import_official_checkpoint(tmp_path / "d.pt", tmp_path / "out", base="tiny")
    with pytest.raises(FileNotFoundError):
        import_official_checkpoint(tmp_path / "missing.pt", tmp_path / "out")


def test_import_official_command(tmp_path, capsys):
    from acelora.cli import main
    torch.save(official_checkpoint(2, 2, 64, 64, dim=64), tmp_path / "ACE_LoRA.pt")
    assert main(["import-official", str(tmp_path / "ACE_LoRA.pt"), str(tmp_path / "ad"),
                 "--model", "tiny", "--random-weights"]) == 0
    assert "wrote adapters" in capsys.readouterr().out
    model = acelora.create_ace_lora("tiny", config="official", adapters=tmp_path / "ad")
    assert model.config.image_cls_attn == "logits"
    assert main(["import-official", str(tmp_path / "missing.pt"), str(tmp_path / "ad2"),
                 "--model", "tiny", "--random-weights"]) == 2
    assert "missing.pt" in capsys.readouterr().err
