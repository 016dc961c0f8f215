"""Multi-label (positive vs negative prompt per finding) evaluation against a naive reference."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from eval_fakes import FakeCLIP, TensorItems

from acelora.eval import metrics as M
from acelora.eval.multilabel import MultiLabelCSVDataset, multilabel_evaluate


def naive_prompt(model, texts):
    embs = []
    for t in texts:
        tok = model.tokenizer([t])
        e = model.encode_text(tok["input_ids"], tok["attention_mask"], normalize=False).double()[0]
        embs.append(e / e.norm())
    m = torch.stack(embs).mean(0)
    return m / m.norm()


def naive_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_multilabel_matches_naive(tmp_path):
    model = FakeCLIP(seed=5)
    findings = ["Atelectasis", "Cardiomegaly", "Effusion", "Pleural Thickening"]
    pos_t = ("Findings suggesting {c}.", "There is {c}.")
    neg_t = ("No evidence of {c}.",)
    n = 30
    images = torch.randn(n, 3, 32, 32)
    labels = (torch.rand(n, len(findings)) < 0.4).float()
    labels[0], labels[1] = 1, 0                                      # both classes in every column
    ds = TensorItems(list(images), labels=list(labels), classes=["Atelectasis", "Cardiomegaly",
                                                                  "Effusion", "Pleural_Thickening"])
    result = multilabel_evaluate(model, ds, positive_templates=pos_t, negative_templates=neg_t,
                                 batch_size=8, out_dir=str(tmp_path), name="ml")
    assert result["findings"] == findings                            # underscores become spaces

    with torch.no_grad():
        img = model.encode_image(images, normalize=False).double()
        img = img / img.norm(dim=1, keepdim=True)
        scale = model.logit_scale.double().exp()
        probs = np.zeros((n, len(findings)))
        for j, f in enumerate(findings):
            p = naive_prompt(model, [t.replace("{c}", f) for t in pos_t])
            q = naive_prompt(model, [t.replace("{c}", f) for t in neg_t])
            probs[:, j] = torch.stack([scale * img @ p, scale * img @ q], 1).softmax(1)[:, 0].numpy()
    y = labels.numpy().astype(int)
    pred = (probs > 0.5).astype(int)
    aurocs, f1s = [], []
    for j, f in enumerate(findings):
        row = result["per_finding"][f]
        aurocs.append(naive_auroc(y[:, j], probs[:, j]))
        tp = ((pred[:, j] == 1) & (y[:, j] == 1)).sum()
        f1 = 2 * tp / (pred[:, j].sum() + y[:, j].sum()) if pred[:, j].sum() + y[:, j].sum() else 0.0
        f1s.append(f1)
        assert row["auroc"] == pytest.approx(aurocs[-1], abs=1e-9)
        assert row["accuracy"] == pytest.approx((pred[:, j] == y[:, j]).mean(), abs=1e-12)
        assert row["f1"] == pytest.approx(f1, abs=1e-12)
    assert result["mean_auroc"] == pytest.approx(np.mean(aurocs), abs=1e-9)
    assert result["macro_f1"] == pytest.approx(np.mean(f1s), abs=1e-9)
    assert result["mean_accuracy"] == pytest.approx((pred == y).mean(), abs=1e-12)
    with open(result["files"]["json"]) as f:
        assert json.load(f)["n"] == n
    assert os.path.getsize(result["files"]["roc"]) > 0


def test_undefined_auroc_is_nan_not_a_crash():
    probs = torch.rand(6, 2)
    targets = torch.tensor([[1, 0]] * 3 + [[0, 0]] * 3).float()
    m = M.multilabel_metrics(probs, targets, ["a", "b"])
    assert math.isnan(m["per_finding"]["b"]["auroc"])
    assert m["mean_auroc"] == m["per_finding"]["a"]["auroc"]


def test_bad_inputs():
    model = FakeCLIP()
    ds = TensorItems(list(torch.randn(4, 3, 32, 32)), labels=list(torch.ones(4, 3)))
    with pytest.raises(ValueError, match="finding names"):
        multilabel_evaluate(model, ds)                        # no names anywhere
    with pytest.raises(ValueError, match="2 finding names for 3"):
        multilabel_evaluate(model, ds, findings=["a", "b"])
    single = TensorItems(list(torch.randn(4, 3, 32, 32)), label=[0, 1, 0, 1], classes=["a", "b"])
    with pytest.raises(ValueError, match="multi-hot"):
        multilabel_evaluate(model, single)


def test_multilabel_csv_dataset(tmp_path):
    for i in range(4):
        Image.fromarray(np.full((20, 24), 40 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    rows = [["path", "Edema", "Nodule"], ["im0.png", "1", "0"], ["im1.png", "-1", ""],
            ["im2.png", "0", "1.0"], ["im3.png", "1", "1"], ["missing.png", "1", "1"]]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ds = MultiLabelCSVDataset(str(tmp_path / "labels.csv"), on_error="skip")
    assert ds.classes == ["Edema", "Nodule"] and len(ds) == 4 and ds.skipped == 1
    assert ds.labels.tolist() == [[1, 0], [0, 0], [0, 1], [1, 1]]
    item = ds[1]
    assert item["image"].shape == (3, 20, 24) and item["id"] == "im1.png"
    with pytest.raises(Exception, match="missing.png"):
        MultiLabelCSVDataset(str(tmp_path / "labels.csv"), on_error="raise")
    with pytest.raises(Exception, match="Fracture"):
        MultiLabelCSVDataset(str(tmp_path / "labels.csv"), findings=["Fracture"])
