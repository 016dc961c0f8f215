"""``acelora train`` on a plain image–caption CSV (``dataset: captions``), validated zero-shot on
MHIST, from the example config with the tiny model."""
import csv
import pathlib
from types import SimpleNamespace

import pytest

from acelora.cli import main
from acelora.data.collate import ImageTextCollator
from acelora.data.synthetic_pathology import write_caption_csv, write_mhist
from acelora.train.run import build_train_dataset
from acelora.train.settings import load_train_config

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "pathology-captions.yaml"


def test_example_config_resolves():
    cfg = load_train_config(str(EXAMPLE))
    assert cfg.dataset == "captions" and cfg.val == "mhist"
    assert (cfg.image_column, cfg.caption_column, cfg.label_columns) == ("image_path", "caption", None)
    with pytest.raises(ValueError, match="captions.*data_root"):
        load_train_config(overrides={"dataset": "captions"})
    with pytest.raises(ValueError, match="val_root"):
        load_train_config(overrides={"val": "lc25000-lung"})


def test_caption_items_carry_labels_into_the_batch(tmp_path):
    truth = write_caption_csv(str(tmp_path), n=6, seed=3, image_size=32)
    cfg = load_train_config(overrides={"dataset": "captions", "data_root": truth["csv"],
                                       "label_columns": "label"})
    from acelora.data.transforms import biomedclip_transform
    model = SimpleNamespace(image_size=64, image_transform=lambda train=False: biomedclip_transform(64, train))
    data = build_train_dataset(cfg, model)
    assert len(data) == 6 and data[0]["image"].shape == (3, 64, 64)

    def tokenizer(texts):
        import torch
        ids = torch.ones(len(texts), 4, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ids}

    batch = ImageTextCollator(tokenizer)([data[i] for i in range(6)])
    assert batch["labels"].shape == (6, len(data.classes))
    assert batch["labels"].sum(1).tolist() == [1.0] * 6


def test_train_on_caption_csv_with_mhist_validation(tmp_path, capsys):
    captions = write_caption_csv(str(tmp_path / "captions"), n=24, seed=1, image_size=32)
    mhist = write_mhist(str(tmp_path / "mhist"), n=10, seed=2, image_size=32)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(EXAMPLE), "--model", "tiny", "--random-weights", "--device", "cpu",
               "--data-root", captions["csv"], "--val-root", mhist["root"],
               "--set", "image_column=image", "--set", "label_columns=label",
               "--output-dir", str(out), "--epochs", "1", "--batch-size", "8",
               "--warmup-steps", "1", "--no-progress", "--no-tensorboard"])
    assert rc == 0
    assert "trained 3 step(s)" in capsys.readouterr().out  # 24 pairs / batch 8
    with open(out / "logs" / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["accuracy"]) <= 1.0 and "auroc" in rows[0]
    assert (out / "adapters" / "adapter_config.json").is_file()
