"""`acelora train` and `acelora eval zeroshot` with open_clip's ViT-B-32 (random weights, on
purpose) on synthetic data: the whole path of a native open_clip model through the CLI."""
import json
import os

import pytest

from acelora.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vitb32") / "run"
    assert main(["train", "--model", "ViT-B-32", "--random-weights", "--epochs", "1", "--batch-size", "4",
                 "--warmup-steps", "1", "--lr", "1e-3", "--set", "synthetic_size=4", "--set", "val_size=2",
                 "--output-dir", str(out), "--no-tensorboard", "--no-progress"]) == 0
    return out


def test_train_writes_native_adapters(trained):
    adapters = trained / "adapters"
    meta = json.loads((adapters / "adapter_config.json").read_text())
    arch = meta["base"]["architecture"]
    assert arch["image_tower"] == "open_clip-vit" and arch["text_tower"] == "open_clip-text"
    assert arch["vision_width"] == 768 and arch["text_width"] == 512 and arch["patch_size"] == 32


def test_eval_zeroshot_with_the_trained_adapters(trained, tmp_path):
    from acelora.data.synthetic import write_chexpert5x200
    root = tmp_path / "chexpert"
    write_chexpert5x200(str(root), n=1, image_size=224)
    report = tmp_path / "report"
    assert main(["eval", "zeroshot", "--model", "ViT-B-32", "--random-weights", "--adapters",
                 str(trained / "adapters"), "--dataset", "chexpert5x200", "--data-root", str(root),
                 "--out", str(report)]) == 0
    result = json.loads((report / "zeroshot_chexpert5x200.json").read_text())
    assert result["n"] == 5 and 0.0 <= result["accuracy"] <= 1.0
    assert os.path.getsize(result["files"]["roc"]) > 0
