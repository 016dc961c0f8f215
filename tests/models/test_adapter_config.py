"""What an adapter folder stores: the method config only; folders of the 0.1.0 format (which also
recorded run settings) still load, with a note of what was dropped."""
import dataclasses
import json
import logging

import pytest
import torch

import acelora
from acelora.config import LEGACY_RUN_FIELDS
from acelora.models import adapters as A
from acelora.train.settings import RUN_FIELDS


def test_adapter_folder_holds_no_run_field(make_ace, tmp_path):
    make_ace("official", lora_rank=2).save_adapters(tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / A.ADAPTER_CONFIG_FILE).read_text())
    saved = set(meta["config"])
    assert saved == {f.name for f in dataclasses.fields(acelora.ACELoRAConfig)}
    assert not saved & (set(RUN_FIELDS) | set(LEGACY_RUN_FIELDS))
    assert meta["config"]["preset"] == "official" and meta["config"]["lora_rank"] == 2
    assert meta["version"] == A.FORMAT_VERSION


def _write_v1_folder(model, directory, config):
    """An adapter folder exactly as acelora 0.1.0 wrote it (run fields inside "config")."""
    model.save_adapters(directory)
    meta = json.loads((directory / A.ADAPTER_CONFIG_FILE).read_text())
    meta["version"] = 1
    meta["acelora_version"] = "0.1.0"
    meta["config"] = config
    (directory / A.ADAPTER_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


V1_OFFICIAL_CONFIG = {  # what `acelora demo` / import-official wrote with acelora 0.1.0
    "backend": "auto", "batch_size": 64, "blank_label": 0, "epochs": 10, "extra": {},
    "grad_accum": 1, "grad_checkpointing": False, "hgnn": True, "hgnn_hidden": 128,
    "hgnn_negative_slope": 0.2, "hgnn_topk": 5, "image_cls_attn": "logits", "label_guided": True,
    "lora_alpha": 1.0, "lora_dropout": 0.1, "lora_rank": 4, "lora_scaling": "rslora",
    "lora_towers": ["image", "text"], "lr": 0.0001, "precision": "auto", "seed": 0,
    "text_cls_attn": "probs", "text_padding_as_vertices": True, "uncertain_label": 0,
    "warmup_steps": 100, "weight_decay": 0.1,
}


def test_version_1_folder_loads_and_names_the_dropped_run_fields(make_ace, randomize, tmp_path, caplog):
    model = make_ace("official")
    randomize(model)
    _write_v1_folder(model, tmp_path / "old", dict(V1_OFFICIAL_CONFIG))
    with caplog.at_level(logging.WARNING, logger="acelora.models"):
        meta = A.read_adapter_config(tmp_path / "old")
    assert meta["config"] == acelora.get_config("official")  # preset recovered from the fields
    assert set(meta["dropped_run_fields"]) == set(LEGACY_RUN_FIELDS)
    assert meta["dropped_run_fields"]["lr"] == pytest.approx(1e-4)
    note = " ".join(r.getMessage() for r in caplog.records)
    for name in ("lr=0.0001", "epochs=10", "batch_size=64", "seed=0", "extra={}"):
        assert name in note
    # ... and the adapters themselves load and compute what the model that wrote them does
    fresh = make_ace("official")
    fresh.load_adapters(tmp_path / "old")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.encode_image(images), model.encode_image(images))


def test_version_1_paper_folder_and_strictness_of_version_2(make_ace, tmp_path):
    old = dict(V1_OFFICIAL_CONFIG, text_padding_as_vertices=False, image_cls_attn="probs")
    _write_v1_folder(make_ace(), tmp_path / "old", old)
    assert A.read_adapter_config(tmp_path / "old")["config"] == acelora.get_config("paper")
    # In the current format a run field in "config" is an error that says where it belongs.
    make_ace().save_adapters(tmp_path / "new")
    path = tmp_path / "new" / A.ADAPTER_CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["config"]["lr"] = 1e-3
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\['lr'\] are run settings"):
        A.read_adapter_config(tmp_path / "new")


def test_method_config_refuses_run_fields():
    with pytest.raises(ValueError, match="run settings"):
        acelora.get_config("paper", lr=1e-3)
    with pytest.raises(ValueError, match="run settings"):
        acelora.ACELoRAConfig.from_dict({"epochs": 3})
    assert acelora.get_config("official").preset == "official"
    assert acelora.get_config("official").replace(lora_rank=8).preset == "official"
