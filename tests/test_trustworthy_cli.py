"""Issue 13, items 7 and 8 (CLI part): user errors are one line ``acelora: error: ...`` with exit
status 2 (``--debug``: the traceback), a full disk and truncated weights files name the path, one
name for one thing (``--data-root``), ``acelora --version`` and help texts with real names and
defaults."""
import argparse
import errno
import os

import numpy as np
import pytest
import torch

import acelora
from acelora.cli import build_parser, main


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapters on the built-in tiny architecture's seeded random weights."""
    model = acelora.create_ace_lora("tiny")
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("adapters")
    model.save_adapters(str(path))
    return str(path)


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("acelora: note:")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("acelora: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_user_errors_are_one_line_with_exit_2(tmp_path, png, adapters, capsys):
    other_base = tmp_path / "other_base"                     # a folder whose weights differ
    from acelora.models import create_base_model, save_base_model
    model, tokenizer, _ = create_base_model("tiny")
    with torch.no_grad():
        model.visual.trunk.patch_embed.proj.weight.add_(1.0)
    save_base_model(model, tokenizer, str(other_base))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_text((other_base / "open_clip_config.json").read_text())
    tiny = ["--model", "tiny", "--random-weights"]
    cases = {
        "model folder": (["predict", png, "--model", str(tmp_path / "nope"), "--classes", "a", "b"], "nope"),
        "weights missing": (["predict", png, "--model", str(no_weights), "--classes", "a", "b"],
                            "open_clip_pytorch_model.bin"),
        "wrong base": (["predict", png, "--model", str(other_base), "--adapters", adapters,
                        "--classes", "a", "b"], "do not match"),
        "one class": (["predict", png, *tiny, "--classes", "a"], "two classes"),
        "no data root": (["eval", "zeroshot", *tiny, "--dataset", "csv", "--out", str(tmp_path / "o")],
                         "--data-root"),
        "missing data": (["eval", "zeroshot", *tiny, "--dataset", "rsna", "--data-root",
                          str(tmp_path / "none"), "--out", str(tmp_path / "o")], "none"),
        "config file": (["train", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        "bad key": (["train", "--set", "lrr=1", "--print-config"], "lrr"),
    }
    if not torch.cuda.is_available():
        cases["no gpu"] = (["predict", png, *tiny, "--classes", "a", "b", "--device", "cuda"], "CUDA")
    for name, (argv, needle) in cases.items():
        line = _one_line_error(capsys, main(argv))
        assert needle in line, (name, line)


def test_debug_shows_the_traceback(png):
    argv = ["predict", png, "--model", "tiny", "--random-weights", "--classes", "a"]
    with pytest.raises(ValueError, match="two classes"):
        main(["--debug", *argv])
    with pytest.raises(ValueError, match="two classes"):
        main([*argv, "--debug"])


def test_disk_full_names_the_path(tmp_path, monkeypatch, capsys):
    from acelora.errors import UserError
    from acelora.train.checkpoint import atomic_torch_save

    target = tmp_path / "ck" / "last.pt"

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left.*last.pt"):
        atomic_torch_save({"a": torch.ones(2)}, str(target))
    assert not target.exists() and os.listdir(target.parent) == []   # no temporary file left

    def stream_writer(obj, f, *args, **kwargs):  # how torch.save reports it in the zip writer
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", stream_writer)
    with pytest.raises(UserError, match="last.pt.*inline_container.*disk full"):
        atomic_torch_save({"a": torch.ones(2)}, str(target))

    def other_bug(obj, f, *args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", other_bug)
    with pytest.raises(RuntimeError, match="something else"):   # not a write error: unchanged
        atomic_torch_save({"a": torch.ones(2)}, str(target))

    def write_failed(obj, f, *args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", write_failed)
    with pytest.raises(UserError, match="last.pt.*disk full"):
        atomic_torch_save({"a": torch.ones(2)}, str(target))

    # Through the command: one line naming the checkpoint.
    monkeypatch.setattr(torch, "save", full_disk)
    rc = main(["train", "--model", "tiny", "--random-weights", "--output-dir", str(tmp_path / "run"),
               "--epochs", "1", "--batch-size", "8", "--set", "synthetic_size=8", "--val", "none",
               "--no-progress", "--no-tensorboard"])
    line = _one_line_error(capsys, rc)
    assert "no space left" in line and "last.pt" in line


def test_truncated_weights_files_are_named(tmp_path, png, adapters, capsys):
    import shutil

    from acelora.errors import UserError
    from acelora.eval.loading import load_model
    from acelora.models import create_base_model, save_base_model

    bad = tmp_path / "adapters"
    shutil.copytree(adapters, bad)
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="adapter_model.safetensors.*truncated"):
        load_model("tiny", adapters=str(bad), random_weights=True)
    line = _one_line_error(capsys, main(["predict", png, "--model", "tiny", "--random-weights",
                                         "--adapters", str(bad), "--classes", "a", "b"]))
    assert str(weights) in line

    model, tokenizer, _ = create_base_model("tiny")
    folder = save_base_model(model, tokenizer, str(tmp_path / "base"))
    state = folder / "open_clip_pytorch_model.bin"
    state.write_bytes(state.read_bytes()[:-100])
    line = _one_line_error(capsys, main(["predict", png, "--model", str(folder), "--classes", "a", "b"]))
    assert str(state) in line and "truncated" in line


def _subparser(parser, *names):
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_one_name_for_the_data_folder(tmp_path, capsys):
    parser = build_parser()
    for path in (("train",), ("eval", "zeroshot"), ("eval", "multilabel"), ("eval", "segment"),
                 ("eval", "detect")):
        help_text = _subparser(parser, *path).format_help()
        assert "--data-root" in help_text and "--root " not in help_text, path
    args = parser.parse_args(["eval", "zeroshot", "--dataset", "csv", "--root", "d.csv", "--out", "o"])
    assert args.root == "d.csv" and "deprecated" in capsys.readouterr().err   # hidden old spelling
    args = parser.parse_args(["eval", "zeroshot", "--dataset", "csv", "--data-root", "d.csv",
                              "--output-dir", "o", "--preset", "official"])
    assert (args.root, args.out, args.config) == ("d.csv", "o", "official")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"acelora {acelora.__version__}"


def test_help_texts_have_real_names_and_defaults():
    parser = build_parser()
    commands = [("train",), ("demo",), ("predict",), ("import-official",), ("eval", "zeroshot"),
                ("eval", "multilabel"), ("eval", "segment"), ("eval", "detect")]
    for path in commands:
        p = _subparser(parser, *path)
        text = p.format_help()
        assert "default: None" not in text and "(default: None)" not in text, path
        assert "OV_" not in text and "SET_" not in text, path
        for action in p._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                assert action.help, (path, action.option_strings)
    train = _subparser(parser, "train")
    helps = {a.option_strings[0]: a.help for a in train._actions if a.option_strings}
    from acelora.train.settings import TrainConfig
    defaults = TrainConfig()
    assert f"default {defaults.lr}" in helps["--lr"]
    assert f"default {defaults.batch_size}" in helps["--batch-size"]
    assert f"default {defaults.epochs}" in helps["--epochs"]
    assert {a.metavar for a in train._actions if a.option_strings and a.metavar} >= {"N", "DIR", "LR"}
