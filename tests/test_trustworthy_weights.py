"""Issue 13, item 1: random weights only on request (``--random-weights``; the Python API warns
once), seeded random initialisation so train-then-eval works across processes, and provenance
(model source, base-weights hash, adapters + hash, preset, version, commit) in every report."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import acelora
from acelora.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(path)
    return str(path)


def _error(capsys):
    return capsys.readouterr().err


def test_builtin_without_weights_needs_random_weights(tmp_path, png, capsys):
    from acelora.models.official import import_official_checkpoint  # noqa: F401 (importable)

    refused = [
        ["predict", png, "--model", "tiny", "--classes", "a", "b"],
        ["predict", png, "--classes", "a", "b"],                       # the default: biomedclip
        ["eval", "zeroshot", "--model", "tiny", "--dataset", "csv", "--data-root", "x.csv",
         "--out", str(tmp_path / "o")],
        ["train", "--model", "tiny", "--output-dir", str(tmp_path / "run"), "--epochs", "1"],
        ["import-official", str(tmp_path / "ACE_LoRA.pt"), str(tmp_path / "ad"), "--model", "tiny"],
    ]
    for argv in refused:
        assert main(argv) == 2, argv
        err = _error(capsys)
        assert "--random-weights" in err and "random" in err, argv
    assert not (tmp_path / "run").exists()          # refused before anything was written
    # With the flag the command runs (and says that its numbers mean nothing).
    assert main(["predict", png, "--model", "tiny", "--random-weights", "--classes", "a", "b"]) == 0
    assert "random" in _error(capsys)


def test_bench_says_it_measures_random_weights(capsys, tmp_path):
    assert main(["bench", "--model", "tiny", "--batch", "2", "--device", "cpu", "--cases", "inference",
                 "--steps", "1", "--warmup", "0", "--out", ""]) == 0
    assert "random" in capsys.readouterr().out


def test_python_api_warns_once(monkeypatch):
    from acelora import provenance

    from acelora.eval.loading import load_model

    monkeypatch.setattr(provenance, "_warned_random", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model("tiny")
        load_model("tiny")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                and "randomly initialised" in str(w.message)]
    assert len(messages) == 1
    with warnings.catch_warnings(record=True) as caught:          # asked for: no warning
        warnings.simplefilter("always")
        monkeypatch.setattr(provenance, "_warned_random", set())
        load_model("tiny", random_weights=True)
    assert not [w for w in caught if "randomly initialised" in str(w.message)]


def test_base_hash_is_layout_independent_and_sensitive():
    from acelora import provenance

    base = acelora.create_model("tiny")
    ace = acelora.create_ace_lora("tiny")
    assert provenance.base_weights_sha256(base) == provenance.base_weights_sha256(ace)
    with torch.no_grad():
        next(p for n, p in ace.named_parameters() if n.endswith("lora_B")).normal_()
    assert provenance.base_weights_sha256(base) == provenance.base_weights_sha256(ace)  # adapters: no
    with torch.no_grad():
        base.base.visual.trunk.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    assert provenance.base_weights_sha256(base) != provenance.base_weights_sha256(ace)
    ace.merge()
    with pytest.raises(ValueError, match="before merging"):
        provenance.base_weights_sha256(ace)


def test_train_then_eval_across_processes_and_provenance(tmp_path, png):
    from acelora import provenance

    run = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--random-weights", "--output-dir", str(run), "--epochs", "1",
                 "--batch-size", "8", "--set", "synthetic_size=16", "--set", "val_size=8",
                 "--warmup-steps", "1", "--no-progress", "--no-tensorboard"]) == 0
    record = json.loads((run / "config.json").read_text())["provenance"]
    assert record["random_weights"] is True and record["model"] == "tiny"
    assert record["acelora_version"] == acelora.__version__ and record["preset"] == "paper"
    assert len(record["base_weights_sha256"]) == 64
    # Another process: the built-in random initialisation is seeded, so the adapters fit its base.
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "acelora", "predict", png, "--model", "tiny",
                          "--random-weights", "--adapters", str(run / "adapters"), "--classes", "a", "b",
                          "--json"], capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["predictions"][0]["prediction"] in ("a", "b")
    prov = report["provenance"]
    assert prov["base_weights_sha256"] == record["base_weights_sha256"]
    assert prov["adapters"]["path"] == str(run / "adapters")
    from safetensors.torch import load_file
    saved = load_file(str(run / "adapters" / "adapter_model.safetensors"))
    assert prov["adapters"]["sha256"] == provenance.tensors_sha256(saved.items())
    # The eval JSON report records the same.
    from acelora.data import synthetic
    synthetic.write_chexpert5x200(str(tmp_path / "cx"), n=2, seed=1)
    assert main(["eval", "zeroshot", "--model", "tiny", "--random-weights", "--adapters",
                 str(run / "adapters"), "--dataset", "chexpert5x200", "--data-root", str(tmp_path / "cx"),
                 "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "zeroshot_chexpert5x200.json").read_text())["provenance"]
    assert evaluated == {**prov, "git_commit": evaluated["git_commit"]}
    assert set(evaluated) >= {"model", "model_source", "base_weights_sha256", "adapters", "preset",
                              "acelora_version", "git_commit"}
