"""End to end on the tiny model and the synthetic official-format data sets, through the CLI."""
import json
import os
import re

import numpy as np
import pytest
import torch

import acelora
from acelora.cli import main
from acelora.data import synthetic
from acelora.eval.loading import build_zeroshot_dataset, dataset_transform, load_model
from acelora.eval.predict import predict
from acelora.eval.zeroshot import zero_shot_evaluate
from acelora.testing import rel_err

TINY = ["--model", "tiny", "--random-weights"]   # the built-in tiny architecture, seeded weights


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny base model saved as a model folder: adapters are tied to its (random) weights."""
    from acelora.models import create_base_model, save_base_model

    torch.manual_seed(0)
    model, tokenizer, _ = create_base_model("tiny")
    return str(save_base_model(model, tokenizer, str(tmp_path_factory.mktemp("tiny_base"))))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_dir):
    """A folder of tiny ACE-LoRA adapters whose LoRA is not zero (so merging changes W)."""
    torch.manual_seed(0)
    model = acelora.create_ace_lora(base_dir)
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("adapters")
    model.save_adapters(str(path))
    return str(path)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("chexpert")
    synthetic.write_chexpert5x200(str(root), n=4, seed=1)
    return str(root)


def _read(path):
    with open(path) as f:
        return json.load(f)


def _check_classification(report, n):
    assert report["n"] == n
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert 0.0 <= report[key] <= 1.0, key


def test_zeroshot_cli_base_and_adapters(chexpert, base_dir, adapters, tmp_path, capsys):
    assert main(["eval", "zeroshot", *TINY, "--dataset", "chexpert5x200", "--data-root", chexpert,
                 "--out", str(tmp_path / "base"), "--batch-size", "8"]) == 0
    base = _read(tmp_path / "base" / "zeroshot_chexpert5x200.json")
    _check_classification(base, 20)
    assert base["classnames"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    assert os.path.getsize(base["files"]["confusion_matrix"]) > 0
    assert os.path.getsize(base["files"]["roc"]) > 0
    assert "accuracy" in capsys.readouterr().out

    assert main(["eval", "zeroshot", "--model", base_dir, "--adapters", adapters, "--dataset",
                 "chexpert5x200", "--data-root", chexpert, "--out", str(tmp_path / "ada"),
                 "--classes", "atelectasis", "cardiomegaly", "consolidation", "edema", "effusion",
                 "--templates", "{c}", "there is {c}"]) == 0
    ada = _read(tmp_path / "ada" / "zeroshot_chexpert5x200.json")
    _check_classification(ada, 20)
    assert ada["templates"] == ["{c}", "there is {c}"]


def test_merged_equals_unmerged_and_skips_lora(chexpert, base_dir, adapters, monkeypatch):
    import acelora.nn.lora as lora_mod

    model = load_model(base_dir, adapters=adapters)
    ds = build_zeroshot_dataset("chexpert5x200", chexpert, dataset_transform(model))
    calls = []
    real = lora_mod.lora_qkv
    monkeypatch.setattr(lora_mod, "lora_qkv", lambda *a, **k: calls.append(1) or real(*a, **k))
    unmerged = zero_shot_evaluate(model, ds, merge=False)
    assert calls, "the unmerged model runs the LoRA branch"
    calls.clear()
    merged = zero_shot_evaluate(model, ds, merge=True)
    assert not calls, "a merged model must run no LoRA branch"
    assert not model.merged                                   # unmerged again afterwards
    assert merged["accuracy"] == unmerged["accuracy"]
    assert merged["auroc"] == pytest.approx(unmerged["auroc"], abs=1e-4)


def test_mismatched_adapters_refused(tmp_path, adapters):
    from acelora.models import create_base_model, save_base_model

    model, tokenizer, _ = create_base_model("tiny")
    with torch.no_grad():
        model.visual.trunk.patch_embed.proj.weight.add_(0.5)      # another tiny base
    other = save_base_model(model, tokenizer, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="do not match"):
        load_model(str(other), adapters=adapters)
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        load_model("tiny", adapters=str(tmp_path / "nope"))


def _official_checkpoint(path, seed=0):
    """A checkpoint in the released file's layout (DESIGN §7), sized for the tiny model."""
    g = torch.Generator().manual_seed(seed)
    width, dim, hidden, r = 64, 64, 128, 4
    weights = {f"layer_{i}": {p: {"w_lora_A": torch.randn(r, width, generator=g) * 0.1,
                                  "w_lora_B": torch.randn(width, r, generator=g) * 0.1}
                              for p in ("q_proj", "k_proj", "v_proj")} for i in range(4)}
    for tower in ("img", "text"):
        for part in ("edge", "node"):
            weights[f"{tower}_{part}_adapter"] = {
                "down.weight": torch.randn(hidden, dim, generator=g) * 0.1, "down.bias": torch.zeros(hidden),
                "up.weight": torch.randn(dim, hidden, generator=g) * 0.1, "up.bias": torch.zeros(dim)}
    weights["logit_scale"] = torch.tensor(50.0)
    torch.save({"weights": weights, "metadata": {"r": r, "topk": 5}}, path)


def test_zeroshot_official_checkpoint(chexpert, tmp_path):
    ckpt = tmp_path / "ACE_LoRA.pt"
    _official_checkpoint(ckpt)
    assert main(["eval", "zeroshot", *TINY, "--official", str(ckpt), "--dataset",
                 "chexpert5x200", "--data-root", chexpert, "--out", str(tmp_path / "off"),
                 "--logit-scale", "checkpoint"]) == 0      # the official default is the base's
    report = _read(tmp_path / "off" / "zeroshot_chexpert5x200.json")
    _check_classification(report, 20)
    assert report["logit_scale"] == pytest.approx(50.0, rel=1e-5)   # stored as the multiplier


def test_zeroshot_rsna_siim_binary(tmp_path):
    synthetic.write_rsna(str(tmp_path / "rsna"), n=16, seed=2, image_size=64)
    synthetic.write_siim(str(tmp_path / "siim"), n=12, seed=3, image_size=64)
    for name, classes in (("rsna", ["No Finding", "pneumonia"]), ("siim", ["No Finding", "pneumothorax"])):
        assert main(["eval", "zeroshot", *TINY, "--dataset", name, "--data-root",
                     str(tmp_path / name), "--split", "all", "--out", str(tmp_path / f"out_{name}")]) == 0
        report = _read(tmp_path / f"out_{name}" / f"zeroshot_{name}.json")
        assert report["classnames"] == classes
        assert report["n"] in (12, 16) and report["skipped"] == 0


def test_zeroshot_folder_and_csv_and_multilabel_csv(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, ml_rows = [["file", "diagnosis"]], [["path", "Edema", "Pleural_Effusion"]]
    for i in range(8):
        cls = ["edema", "normal"][i % 2]
        (tmp_path / "folder" / cls).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8))
        img.save(tmp_path / "folder" / cls / f"{i}.png")
        img.save(tmp_path / f"{i}.png")
        rows.append([f"{i}.png", cls])
        ml_rows.append([f"{i}.png", str(i % 2), ["1", "0", "-1", ""][i % 4]])
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("\n".join(",".join(r) for r in rows))
    with open(tmp_path / "multi.csv", "w") as f:
        f.write("\n".join(",".join(r) for r in ml_rows))

    assert main(["eval", "zeroshot", *TINY, "--dataset", "folder", "--data-root", str(tmp_path / "folder"),
                 "--out", str(tmp_path / "o1")]) == 0
    report = _read(tmp_path / "o1" / "zeroshot_folder.json")
    assert report["classnames"] == ["edema", "normal"] and report["n"] == 8
    # csv: --classes names the classes *and* fixes their order
    assert main(["eval", "zeroshot", *TINY, "--dataset", "csv", "--data-root", str(tmp_path / "labels.csv"),
                 "--label-col", "diagnosis", "--image-col", "file", "--classes", "normal", "edema",
                 "--out", str(tmp_path / "o2")]) == 0
    report = _read(tmp_path / "o2" / "zeroshot_csv.json")
    assert report["classnames"] == ["normal", "edema"]
    assert report["per_class"]["normal"]["support"] == 4
    assert main(["eval", "multilabel", *TINY, "--dataset", "csv", "--data-root", str(tmp_path / "multi.csv"),
                 "--out", str(tmp_path / "o3")]) == 0
    report = _read(tmp_path / "o3" / "multilabel_csv.json")
    assert report["findings"] == ["Edema", "Pleural Effusion"]
    assert report["per_finding"]["Pleural Effusion"]["positives"] == 2


def test_multilabel_cli_nih(tmp_path):
    synthetic.write_nih(str(tmp_path / "nih"), n=24, seed=4)
    assert main(["eval", "multilabel", *TINY, "--dataset", "nih", "--data-root", str(tmp_path / "nih"),
                 "--split", "all", "--out", str(tmp_path / "out")]) == 0
    report = _read(tmp_path / "out" / "multilabel_nih.json")
    assert report["n"] == 24 and len(report["per_finding"]) == 14
    assert "Pleural Thickening" in report["per_finding"]
    assert 0.0 <= report["mean_accuracy"] <= 1.0
    assert report["mean_auroc"] is None or 0.0 <= report["mean_auroc"] <= 1.0


def test_predict_png_dicom_and_bad_file(tmp_path, base_dir, adapters, capsys):
    synthetic.write_rsna(str(tmp_path / "rsna"), n=2, seed=5, image_size=64)
    dcm = sorted(str(p) for p in (tmp_path / "rsna").rglob("*.dcm"))[0]
    from PIL import Image
    png = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((48, 40)) * 255).astype(np.uint8)).save(png)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")

    model = load_model(base_dir, adapters=adapters)
    results = predict(model, [dcm, str(png), str(bad)], ["No Finding", "pneumonia"])
    assert [("probs" in r) for r in results] == [True, True, False]
    assert "broken.jpg" in results[2]["error"]
    for r in results[:2]:
        assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    # Batch size does not change the answer.
    single = predict(model, [str(png)], ["No Finding", "pneumonia"])[0]
    assert rel_err(torch.tensor(list(single["probs"].values())),
                   torch.tensor(list(results[1]["probs"].values()))) < 1e-4
    with pytest.raises(ValueError, match="two classes"):
        predict(model, [str(png)], ["pneumonia"])

    assert main(["predict", dcm, str(png), "--model", base_dir, "--adapters", adapters,
                 "--classes", "No Finding", "pneumonia", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predictions"][0]["prediction"] in ("No Finding", "pneumonia")
    assert out["provenance"]["adapters"]["path"] == os.path.abspath(adapters)
    assert main(["predict", str(bad), *TINY, "--classes", "a", "b"]) == 1
    assert "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_downstream_cli(task, tmp_path):
    name = "siim" if task == "segment" else "rsna"
    writer = synthetic.write_siim if task == "segment" else synthetic.write_rsna
    writer(str(tmp_path / name), n=30, seed=6, image_size=64)
    assert main(["eval", task, *TINY, "--data-root", str(tmp_path / name), "--fractions", "0.1", "1",
                 "--epochs", "2", "--min-steps", "5", "--out", str(tmp_path / "out")]) == 0
    report = _read(tmp_path / "out" / f"{task}_{name}.json")
    assert set(report["fractions"]) == {"10%", "100%"}
    key = "dice" if task == "segment" else "map"
    for row in report["fractions"].values():
        assert row["n_train"] >= 1
        assert row[key] is None or 0.0 <= row[key] <= 1.0
    if task == "segment":
        assert all(row["dice"] is not None for row in report["fractions"].values())


def test_unreadable_and_missing_images_counted(tmp_path, capsys):
    import shutil

    root = tmp_path / "cx"
    info = synthetic.write_chexpert5x200(str(root), n=3, seed=7)
    paths = sorted(info["rows"])
    (root / paths[0]).write_bytes(b"corrupt jpeg")                # fails to decode at load time
    os.remove(root / paths[1])                                     # missing: left out when indexing
    assert main(["eval", "zeroshot", *TINY, "--dataset", "chexpert5x200", "--data-root", str(root),
                 "--out", str(tmp_path / "out")]) == 0
    report = _read(tmp_path / "out" / "zeroshot_chexpert5x200.json")
    assert report["n"] == 13 and report["skipped"] == 2          # no image counted twice
    assert any(paths[0].split("/")[-2] in e for e in report["skipped_examples"])
    assert main(["eval", "zeroshot", *TINY, "--dataset", "chexpert5x200",
                 "--data-root", str(root), "--out", str(tmp_path / "out2"), "--on-error", "raise"]) == 2
    assert re.search("corrupt|cannot read|not found", capsys.readouterr().err)
    shutil.rmtree(root)


def test_cli_bad_input(tmp_path, chexpert, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "zeroshot", *TINY, "--dataset", "nope", "--data-root", chexpert, "--out", "x"])
    with pytest.raises(SystemExit):
        main(["predict", "x.png", "--model", "tiny"])           # --classes is required
    assert main(["eval", "zeroshot", *TINY, "--dataset", "rsna",
                 "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert re.search("not found|not a directory|does not exist", capsys.readouterr().err)
