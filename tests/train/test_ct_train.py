"""``acelora train`` on CT-RATE (synthetic, in the released layout) with ct-clip-tiny and the
medct preset: Findings + Impressions as text, the 18 labels for the loss, CT-CLIP's zero-shot mean
AUROC on the valid split as validation."""
import json

import pytest
import torch

import acelora
from acelora.cli import main
from acelora.data.synthetic_ct import write_ct_rate
from acelora.train.settings import config_from_dict


@pytest.fixture(scope="module")
def ct_rate(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct-rate")
    # ct-clip-tiny takes 16 x 48 x 48 voxels at 22.5 / 7.5 / 7.5 mm: write volumes of that grid.
    write_ct_rate(str(root), patients={"train": 4, "valid": 3}, shape=(16, 48, 48), z_spacing=22.5,
                  xy_spacing=7.5, seed=2, releases=("fixed",), finding_rate=0.5)
    return root


def test_ct_rate_settings():
    with pytest.raises(ValueError, match="ct-rate' needs data_root"):
        config_from_dict({"dataset": "ct-rate"})
    cfg = config_from_dict({"dataset": "ct-rate", "data_root": "x", "val": "ct-rate",
                            "preset": "medct"})
    assert cfg.method.hgnn is False and cfg.method.lora_rank == 23 and cfg.with_impressions


def test_train_ct_clip_tiny_on_ct_rate(ct_rate, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "ct-clip-tiny", "--random-weights", "--preset", "medct",
            "--dataset", "ct-rate", "--data-root", str(ct_rate), "--output-dir", str(out),
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1",
            "--no-progress", "--no-tensorboard", "--set", "lora_rank=4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "trainable params: 6,145" in text      # (4·192 + 2·384)·4 + logit scale
    record = json.loads((out / "config.json").read_text())
    assert record["dataset"] == "ct-rate" and record["preset"] == "medct"
    epochs = (out / "logs" / "epochs.csv").read_text().splitlines()
    assert "mean_auroc" in epochs[0].split(",") and len(epochs) == 3
    model = acelora.create_ace_lora("ct-clip-tiny", adapters=out / "adapters")
    assert model.config.preset == "medct" and model.config.lora_rank == 4
    assert any(m.lora_B.abs().sum() > 0 for m in model.lora_modules())   # the adapters trained
    assert (out / "best" / "adapter_model.safetensors").is_file()
