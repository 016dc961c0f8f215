import json

import pytest
import torch

import acelora
from acelora.models import save_base_model
from acelora.testing import rel_err

def test_merge_unmerge_round_trip(tiny, make_ace, randomize, texts):
    model = make_ace()
    randomize(model)
    w0 = {n: p.detach().clone() for n, p in model.base.named_parameters()}
    images, tok = torch.randn(2, 3, 64, 64), tiny.tokenizer(texts)
    with torch.no_grad():
        a, b = model.encode_image(images), model.encode_text(**tok)
        model.merge()
        assert model.merged
        assert rel_err(model.encode_image(images), a) < 1e-5
        assert rel_err(model.encode_text(**tok), b) < 1e-5
        model.unmerge()
    assert not model.merged
    for n, p in model.base.named_parameters():
        assert rel_err(p, w0[n]) < 1e-6, n
    with torch.no_grad():
        assert rel_err(model.encode_image(images), a) < 1e-6




def test_adapters_round_trip_and_refusals(tiny, tmp_path, make_ace, randomize):
    model = make_ace()
    randomize(model)
    with torch.no_grad():
        for p in model.image_hgnn.parameters():
            p.add_(0.01)
    model.save_adapters(tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = make_ace().requires_grad_(False)  # frozen for evaluation: adapters still load
    fresh.load_adapters(tmp_path / "ad")
    a, b = model.adapter_state_dict(), fresh.adapter_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))

    # loading into a merged model keeps it merged, with the new adapters folded in
    merged = make_ace()
    merged.merge()
    merged.load_adapters(tmp_path / "ad")
    assert merged.merged
    merged.save_adapters(tmp_path / "ad2")  # saving merged writes the same adapters
    again = make_ace()
    again.load_adapters(tmp_path / "ad2")
    assert all(torch.equal(again.adapter_state_dict()[k], v) for k, v in model.adapter_state_dict().items())
    with torch.no_grad():
        assert rel_err(merged.encode_image(images), model.encode_image(images)) < 1e-5

    # another base (different weights) is refused; random init itself is seeded, so
    # two processes building "tiny" get the same base
    other = acelora.create_ace_lora("tiny")
    assert torch.equal(other.base.visual.trunk.patch_embed.proj.weight,
                       model.base.visual.trunk.patch_embed.proj.weight)
    with torch.no_grad():
        other.base.visual.trunk.patch_embed.proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="weights"):
        other.load_adapters(tmp_path / "ad")
    # another structure is refused
    with pytest.raises(ValueError, match="lora_rank"):
        make_ace(lora_rank=2).load_adapters(tmp_path / "ad")
    # another architecture is refused, naming the difference
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    meta["base"]["architecture"]["vision_depth"] = 12
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="vision_depth: adapters were made for 12, this base has 2"):
        fresh.load_adapters(tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        fresh.load_adapters(tmp_path)




def test_create_ace_lora_from_folder_with_adapters(tiny, tmp_path, randomize, texts):
    save_base_model(tiny.base, tiny.tokenizer, tmp_path / "base")
    model = acelora.create_ace_lora(str(tmp_path / "base"), config="official")
    randomize(model)
    model.save_adapters(tmp_path / "ad")
    again = acelora.create_ace_lora(f"local-dir:{tmp_path / 'base'}", adapters=tmp_path / "ad")
    assert again.config == model.config and again.config.text_padding_as_vertices
    assert not again.training
    tok = again.tokenizer(texts)
    with torch.no_grad():
        assert torch.equal(again.encode_text(**tok), model.encode_text(**tok))




def _adapter_grads(model, images, tok):
    model.train()
    for m in model.modules():  # deterministic: no dropout anywhere
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for m in model.lora_modules():
        m.dropout = 0.0
    model(images, **tok)["loss"].backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_grad_checkpointing_gives_the_same_gradients(make_ace, randomize, texts):
    images, model = torch.randn(2, 3, 64, 64), make_ace()
    randomize(model)
    ckpt = make_ace()
    ckpt.set_grad_checkpointing(True)
    ckpt.load_state_dict(model.state_dict())
    tok = model.tokenizer(texts[:2])
    ref, got = _adapter_grads(model, images, tok), _adapter_grads(ckpt, images, tok)
    assert ref.keys() == got.keys()
    for name in ref:
        assert rel_err(got[name], ref[name]) < 1e-5, name


def test_bf16_autocast_training_step_on_cpu(make_ace, texts):
    model = make_ace().train()
    tok = model.tokenizer(texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(3, 3, 64, 64), **tok, labels=torch.tensor([0, 1, 1]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_training_step(make_ace, texts):
    model = make_ace().cuda().train()
    tok = model.tokenizer(texts)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(torch.randn(3, 3, 64, 64, device="cuda"), **tok, labels=torch.tensor([0, 1, 1]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval().merge()
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(torch.randn(2, 3, 64, 64, device="cuda"))).all()
