"""The loop on the real (tiny) ACE-LoRA model: exact accumulation, gradient checkpointing, and
``acelora train`` end to end."""
import csv
import json

import pytest
import torch

import acelora
from acelora.cli import main
from acelora.config import get_config
from acelora.data.synthetic import SyntheticCXRPairs
from acelora.testing import rel_err
from acelora.data.collate import ImageTextCollator
from acelora.train.loop import Trainer
from acelora.train.settings import TrainConfig


@pytest.fixture(scope="module")
def data():
    return SyntheticCXRPairs(16, image_size=64, domain=1, seed=3, cache=True)


def _trainer(model, data, tmp_path, **run):
    cfg = TrainConfig(output_dir=str(tmp_path), progress=False, tensorboard=False,
                      **{**dict(batch_size=8, lr=1e-3, warmup_steps=0, epochs=1), **run})
    return Trainer(model, data, cfg)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_on_the_tiny_model(data, tmp_path):
    model = acelora.create_ace_lora("tiny", config=get_config("paper", lora_dropout=0.0))
    model.eval()  # every dropout off: 1 x B and 2 x B/2 see the same function
    batch = ImageTextCollator(model.tokenizer)([data[i] for i in range(8)])
    with torch.no_grad():  # LoRA B starts at zero; give it values so its A gets gradients too
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    loss1 = _trainer(model, data, tmp_path / "a").backward(batch)
    g1 = _grads(model)
    loss2 = _trainer(model, data, tmp_path / "b", grad_accum=2).backward(batch)
    g2 = _grads(model)
    assert abs(loss1.item() - loss2.item()) < 1e-5 * loss1.item()
    assert len(g1) == len([p for p in model.parameters() if p.requires_grad]) > 4
    for n in g1:
        assert g1[n].abs().sum() > 0, n
        assert rel_err(g2[n], g1[n]) < 1e-4, n
    assert all(p.grad is None for p in model.base.parameters() if not p.requires_grad)


def test_gradient_checkpointing_gives_the_same_gradients(data, tmp_path, monkeypatch):
    """open_clip's switch (model.set_grad_checkpointing) is the one mechanism; the towers
    recompute their blocks and the gradients do not change."""
    import acelora.models.towers as towers
    model = acelora.create_ace_lora("tiny", config="paper").train()  # dropout on
    batch = ImageTextCollator(model.tokenizer)([data[i] for i in range(8)])
    trainer = _trainer(model, data, tmp_path / "a")
    state = torch.get_rng_state()
    loss = trainer.backward(batch)
    plain = _grads(model)
    calls = []
    original = towers.checkpoint
    monkeypatch.setattr(towers, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    model.set_grad_checkpointing(True)
    torch.set_rng_state(state)
    loss_ckpt = trainer.backward(batch)
    assert calls, "the image tower did not checkpoint its blocks"
    layer = model.text_tower.bert.encoder.layer[0]
    assert getattr(layer, "gradient_checkpointing", None) or getattr(
        model.text_tower.bert, "is_gradient_checkpointing", False)
    assert torch.equal(loss, loss_ckpt)
    for n, g in _grads(model).items():
        assert rel_err(g, plain[n]) < 1e-5, n


def test_acelora_train_command(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: tiny\nrandom_weights: true\ndataset: synthetic\nsynthetic_size: 16\nval_size: 8\n"
                   f"output_dir: {out}\nbatch_size: 8\nwarmup_steps: 1\nseed: 5\n")
    rc = main(["train", "--config", str(cfg), "--epochs", "1", "--lr", "1e-3", "--no-progress",
               "--no-tensorboard", "--set", "grad_accum=2", "--set", "grad_checkpointing=true"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "trainable params" in text and "adapters:" in text
    for rel in ("adapters/adapter_config.json", "best/adapter_config.json", "checkpoints/last.pt",
                "logs/steps.csv", "logs/epochs.csv", "logs/training.png", "config.json"):
        assert (out / rel).is_file(), rel
    saved = json.loads((out / "config.json").read_text())
    assert saved["grad_accum"] == 2 and saved["epochs"] == 1 and saved["seed"] == 5
    with open(out / "logs" / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["accuracy"]) <= 1.0
    # The saved adapters load back into a fresh model on the same (seeded, random) tiny base.
    torch.manual_seed(5)
    model = acelora.create_ace_lora("tiny", adapters=str(out / "adapters"))
    assert model.num_trainable_parameters() > 0


def test_train_on_mimic_layout_with_chexpert_validation(tmp_path):
    from acelora.data.synthetic import write_chexpert5x200, write_mimic

    mimic, chexpert = tmp_path / "mimic", tmp_path / "chexpert"
    write_mimic(str(mimic), n=40, seed=1)
    write_chexpert5x200(str(chexpert), n=10, seed=2)
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "mimic", "--data-root", str(mimic), "--val", "chexpert5x200",
               "--val-root", str(chexpert), "--output-dir", str(out), "--epochs", "1",
               "--batch-size", "8", "--no-progress", "--no-tensorboard", "--random-weights"])
    assert rc == 0
    with open(out / "logs" / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert 0.0 <= float(rows[0]["accuracy"]) <= 1.0 and "macro_f1" in rows[0]
    assert (out / "adapters" / "adapter_config.json").is_file()
