"""Config files, command-line overrides and their errors."""
import json

import pytest

from acelora.cli import build_parser, main
from acelora.train.commands import resolve_train_config
from acelora.train.settings import (TrainConfig, config_from_dict, load_train_config, parse_set_overrides,
                                    parse_value)


def _parse(argv):
    return build_parser().parse_args(argv)


def test_yaml_file_and_overrides_precedence(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\npreset: official\nepochs: 3\nlr: 2.0e-4\nbatch_size: 16\n"
                    "output_dir: out\nlora_rank: 8\n")
    cfg = resolve_train_config(_parse(["train", "--config", str(path), "--epochs", "5",
                                       "--set", "hgnn_topk=3", "--set", "lora_towers=[text]",
                                       "--grad-checkpointing"]))
    assert isinstance(cfg, TrainConfig)
    m = cfg.method
    assert (cfg.epochs, cfg.lr, cfg.batch_size, m.lora_rank, m.hgnn_topk) == (5, 2e-4, 16, 8, 3)
    assert m.lora_towers == ("text",) and cfg.grad_checkpointing is True
    # The preset fills what the file leaves out ("official" keeps text padding as vertices).
    assert cfg.preset == "official" and m.text_padding_as_vertices is True
    assert m.image_cls_attn == "logits"
    # --preset on the command line wins over the file's.
    cfg = resolve_train_config(_parse(["train", "--config", str(path), "--preset", "paper"]))
    assert cfg.preset == "paper" and cfg.method.text_padding_as_vertices is False
    assert cfg.method.lora_rank == 8


def test_json_file_round_trip(tmp_path):
    cfg = config_from_dict({"model": "tiny", "epochs": 2, "val": "none", "max_steps": 7})
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    again = load_train_config(str(path))
    assert again.to_dict() == cfg.to_dict()
    assert again.max_steps == 7 and again.epochs == 2


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\nbatchsize: 4\n")
    with pytest.raises(ValueError) as info:
        load_train_config(str(path))
    msg = str(info.value)
    assert "learning_rate" in msg and "batchsize" in msg and "did you mean 'batch_size'" in msg
    with pytest.raises(ValueError, match="lora_rnk.*did you mean 'lora_rank'"):
        resolve_train_config(_parse(["train", "--set", "lora_rnk=2"]))


@pytest.mark.parametrize("values,match", [
    ({"dataset": "imagenet"}, "dataset must be one of"),
    ({"dataset": "mimic"}, "needs data_root"),
    ({"preset": "nope"}, "unknown preset"),
    ({"nan_policy": "ignore"}, "nan_policy"),
    ({"lora_scaling": "weird"}, "lora_scaling"),
    ({"precision": "fp16"}, "precision"),
    ({"epochs": 0}, "epochs"),
    ({"backend": "gpu"}, "backend must be one of"),
    ({"val": "chexpert5x200"}, "needs val_root"),
])
def test_bad_values_give_clear_errors(values, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(values)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_train_config(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_train_config(str(broken))
    other = tmp_path / "cfg.toml"
    other.write_text("a = 1")
    with pytest.raises(ValueError, match="extension"):
        load_train_config(str(other))


def test_value_parsing():
    assert parse_value("2") == 2 and parse_value("1e-4") == pytest.approx(1e-4)
    assert parse_value("true") is True and parse_value("null") is None
    assert parse_value("[image, text]") == ["image", "text"]
    assert parse_value("runs/a:b") == "runs/a:b"
    assert parse_set_overrides(["lr=0.5", "output-dir=x"]) == {"lr": 0.5, "output_dir": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set_overrides(["lr"])


def test_cli_print_config_and_error_exit(capsys):
    assert main(["train", "--print-config", "--lr", "0.25", "--set", "hgnn=false"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lr"] == 0.25 and out["hgnn"] is False and out["model"] == "tiny"
    assert main(["train", "--set", "nonsense=1", "--print-config"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_types_are_coerced_and_checked(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("lr: 1e-4\nepochs: 2.0\ngrad_checkpointing: 'true'\n")
    cfg = load_train_config(str(path))
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int)
    assert cfg.grad_checkpointing is True
    with pytest.raises(ValueError, match="epochs must be a int"):
        config_from_dict({"epochs": "many"})


def test_run_fields_live_in_the_run_config_and_the_method_in_method():
    cfg = config_from_dict({"preset": "official", "lr": 3e-4, "seed": 5, "backend": "reference",
                            "lora_rank": 2})
    assert (cfg.lr, cfg.seed, cfg.backend, cfg.method.lora_rank) == (3e-4, 5, "reference", 2)
    assert cfg.preset == cfg.method.preset == "official"
    method = cfg.method.to_dict()
    for run_field in ("lr", "epochs", "batch_size", "seed", "precision", "backend", "extra"):
        assert run_field not in method
    flat = cfg.to_dict()  # what the run records (config.json, checkpoints): both halves
    assert flat["lr"] == 3e-4 and flat["lora_rank"] == 2 and flat["preset"] == "official"
