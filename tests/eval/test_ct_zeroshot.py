"""CT-CLIP zero-shot protocol: threshold rule and metrics against a direct implementation of
CT-CLIP's code and scikit-learn, one image-tower pass per volume, the CLI on synthetic CT-RATE."""
import csv
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from eval_fakes import FakeCLIP, TensorItems

from acelora.cli import main
from acelora.data.ctrate import CT_RATE_FINDINGS
from acelora.data.synthetic_ct import write_ct_rate
from acelora.eval import commands
from acelora.eval.ct_zeroshot import (ct_clip_metrics, ct_clip_threshold, ct_zero_shot_evaluate,
                                      thresholded_metrics)


def confusion(true_labels, predictions):
    """sklearn's 2x2 confusion matrix (rows = truth), counted directly (sklearn's own call is
    ~10 ms; test_confusion_counts checks they agree)."""
    t, p = np.asarray(true_labels).astype(int), np.asarray(predictions).astype(int)
    return np.array([[((t == a) & (p == b)).sum() for b in (0, 1)] for a in (0, 1)])


def ctclip_find_threshold(probabilities, true_labels):
    """CT-CLIP's scripts/bootstrap_values.py find_threshold, step by step."""
    best_threshold, best_roc = 0, 10000
    for threshold in np.linspace(0, 1, 100):
        predictions = (probabilities > threshold).astype(int)
        cm = confusion(true_labels, predictions)
        tp, tn, fp, fn = cm[1, 1], cm[0, 0], cm[0, 1], cm[1, 0]
        current = math.sqrt(((1 - tp / (tp + fn)) ** 2) + (fp / (fp + tn)) ** 2)
        if current <= best_roc:
            best_roc, best_threshold = current, threshold
    return best_threshold


def test_confusion_counts():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 30), rng.random(30)
    for t in (0.0, 0.4, 1.0):
        assert np.array_equal(confusion(y, p > t), confusion_matrix(y, (p > t).astype(int), labels=[0, 1]))


@pytest.mark.parametrize("seed", range(4))
def test_threshold_rule_matches_ctclip(seed):
    rng = np.random.default_rng(seed)
    n = 60
    labels = (rng.random(n) < 0.3).astype(int)
    labels[:2] = [0, 1]
    probs = np.clip(0.35 * labels + rng.random(n) * 0.7, 0, 1)
    if seed % 2:                       # probabilities on the grid itself, and ties
        probs = np.linspace(0, 1, 100)[rng.integers(0, 100, n)]
    assert ct_clip_threshold(probs, labels) == ctclip_find_threshold(probs, labels)
    assert ct_clip_threshold(probs, np.zeros(n)) is None


def test_thresholded_metrics_match_sklearn():
    rng = np.random.default_rng(7)
    y = (rng.random(50) < 0.4).astype(int)
    p = rng.random(50)
    for t in (0.0, 0.3, 0.61, 1.0):
        pred = (p > t).astype(int)
        m = thresholded_metrics(p, y, t)
        assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-15)
        assert m["weighted_f1"] == pytest.approx(f1_score(y, pred, average="weighted", zero_division=0), abs=1e-15)
        assert m["positive_f1"] == pytest.approx(f1_score(y, pred, zero_division=0), abs=1e-15)
        tp, fp = ((pred == 1) & (y == 1)).sum(), ((pred == 1) & (y == 0)).sum()
        assert m["recall"] == pytest.approx(tp / y.sum()) and m["specificity"] == pytest.approx(1 - fp / (y == 0).sum())
    probs, targets = rng.random((40, 3)), (rng.random((40, 3)) < 0.5).astype(int)
    targets[:, 2] = 0
    res = ct_clip_metrics(probs, targets, ["a", "b", "c"], [0.2, None, None])
    assert res["threshold_fallback"] == ["b", "c"] and res["per_finding"]["b"]["threshold"] == 0.5
    assert math.isnan(res["per_finding"]["c"]["auroc"])
    assert res["mean_auroc"] == pytest.approx(np.mean([roc_auc_score(targets[:, j], probs[:, j]) for j in (0, 1)]))
    assert res["mean_weighted_f1"] == pytest.approx(np.mean([res["per_finding"][k]["weighted_f1"] for k in "abc"]))


class FakeCTCLIP(FakeCLIP):
    """FakeCLIP's text tower and logit scale with a volume tower; counts image-tower calls."""

    def __init__(self, seed=0):
        super().__init__(seed=seed, lora=False)
        gen = torch.Generator().manual_seed(seed + 1)
        self.volume_proj = nn.Parameter(torch.randn(8, self.embed_dim, generator=gen))
        self.image_calls, self.volumes_seen = 0, 0

    def encode_image(self, volumes, normalize=True):
        assert volumes.ndim == 5 and volumes.shape[1] == 1
        self.image_calls += 1
        self.volumes_seen += volumes.shape[0]
        out = F.adaptive_avg_pool3d(volumes, 2).flatten(1) @ self.volume_proj
        return F.normalize(out, dim=-1) if normalize else out


def naive_probs(model, volumes, findings, scale):
    with torch.no_grad():
        img = F.normalize(model.encode_image(volumes, normalize=False).double(), dim=-1)
        probs = np.zeros((len(volumes), len(findings)))
        for j, f in enumerate(findings):
            tok = model.tokenizer([f"{f} is present.", f"{f} is not present."])
            txt = F.normalize(model.encode_text(tok["input_ids"], tok["attention_mask"], normalize=False).double(), dim=-1)
            probs[:, j] = (scale * img @ txt.T).softmax(dim=1)[:, 0].numpy()
    return probs


def _items(n, seed):
    gen = torch.Generator().manual_seed(seed)
    volumes = torch.randn(n, 1, 4, 8, 8, generator=gen)
    labels = (torch.rand(n, 18, generator=gen) < 0.4).float()
    labels[0], labels[1] = 1, 0
    return volumes, labels


def test_evaluate_matches_naive_and_encodes_each_volume_once(tmp_path):
    model = FakeCTCLIP()
    findings = list(CT_RATE_FINDINGS[:6])                  # fewer ROC curves to draw: faster
    volumes, labels = _items(13, 0)
    labels = labels[:, :6]
    ds = TensorItems(list(volumes), bad=[4], labels=list(labels), classes=findings)
    result = ct_zero_shot_evaluate(model, ds, batch_size=4, out_dir=str(tmp_path), name="ct")
    assert model.volumes_seen == 12 and model.image_calls == 4         # once per batch, not per finding
    keep = [i for i in range(13) if i != 4]
    probs = naive_probs(model, volumes[keep], findings, math.exp(model.logit_scale.item()))
    y = labels[keep].numpy().astype(int)
    assert result["n"] == 12 and result["skipped"] == 1
    for j, f in enumerate(findings):
        row = result["per_finding"][f]
        t = ctclip_find_threshold(probs[:, j], y[:, j])
        assert row["threshold"] == t
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, j], probs[:, j]), abs=1e-9)
        pred = (probs[:, j] > t).astype(int)
        assert row["accuracy"] == pytest.approx(accuracy_score(y[:, j], pred))
        assert row["weighted_f1"] == pytest.approx(f1_score(y[:, j], pred, average="weighted"))
    assert "evaluation set itself" in result["threshold_source"]
    with open(result["files"]["per_finding"]) as f:
        rows = list(csv.reader(f))
    assert len(rows) == 8 and rows[-1][0] == "mean"
    with open(result["files"]["json"]) as f:
        assert json.load(f)["mean_weighted_f1"] == pytest.approx(result["mean_weighted_f1"])
    assert os.path.getsize(result["files"]["roc"]) > 0


def test_held_out_thresholds_and_logit_scale():
    model = FakeCTCLIP(seed=3)
    findings = list(CT_RATE_FINDINGS)
    (v1, l1), (v2, l2) = _items(10, 1), _items(9, 2)
    ds = TensorItems(list(v1), labels=list(l1), classes=findings)
    held = TensorItems(list(v2), labels=list(l2), classes=findings)
    result = ct_zero_shot_evaluate(model, ds, threshold_dataset=held, threshold_split="train",
                                   logit_scale=40.0)
    assert result["logit_scale"] == 40.0 and result["logit_scale_source"] == "given"
    assert result["threshold_source"].startswith("held-out split 'train'")
    held_probs = naive_probs(model, v2, findings, 40.0)
    for j, f in enumerate(findings):
        assert result["per_finding"][f]["threshold"] == ctclip_find_threshold(held_probs[:, j], l2[:, j].numpy())


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ctrate_cli"))
    write_ct_rate(root, patients={"train": 3, "valid": 3}, shape=(8, 32, 32), seed=5, releases=("fixed",))
    return root


def test_cli_end_to_end(ct_root, tmp_path, monkeypatch, capsys):
    model = FakeCTCLIP(seed=1)
    # The preprocessing follows the model's input shape and spacing (as CT-CLIP models carry them).
    model.volume_shape, model.config = (8, 32, 32), SimpleNamespace(spacing=(3.0, 1.5, 1.5))
    monkeypatch.setattr(commands, "_model", lambda args: model)
    out = str(tmp_path / "out")
    shape = ["--target-shape", "8", "32", "32", "--target-spacing", "3", "1.5", "1.5"]
    assert main(["eval", "ct-rate", "--model", "stand-in", "--data-root", ct_root, "--out", out,
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "thresholds: the evaluation set itself" in printed and "Lung nodule" in printed
    with open(os.path.join(out, "ct_rate_valid.json")) as f:
        report = json.load(f)
    from acelora.data.ct_transforms import CTPreprocess
    from acelora.data.ctrate import CTRATEDataset

    ds = CTRATEDataset(ct_root, "valid", preprocess=CTPreprocess((3, 1.5, 1.5), (8, 32, 32)), with_text=False)
    direct = ct_zero_shot_evaluate(model, ds)
    assert report["n"] == len(ds) and report["mean_auroc"] == pytest.approx(direct["mean_auroc"])
    assert report["mean_accuracy"] == pytest.approx(direct["mean_accuracy"])
    assert model.volumes_seen == 2 * len(ds)
    del model.volume_shape, model.config                            # now from the flags
    assert main(["eval", "ct-rate", "--model", "stand-in", "--data-root", ct_root, "--out", out,
                 "--threshold-split", "train", "--device", "cpu", *shape]) == 0
    with open(os.path.join(out, "ct_rate_valid.json")) as f:
        assert json.load(f)["threshold_source"].startswith("held-out split 'train'")
    assert main(["eval", "ct-rate", "--model", "stand-in", "--data-root", ct_root, "--out", out,
                 "--threshold-split", "valid", *shape]) == 2


def test_unreadable_volume_is_counted_once_not_replaced(ct_root, tmp_path):
    import shutil

    from acelora.data.ct_transforms import CTPreprocess
    from acelora.data.ctrate import CTRATEDataset

    root = str(tmp_path / "copy")
    shutil.copytree(ct_root, root)
    ds = CTRATEDataset(root, "valid", preprocess=CTPreprocess((3, 1.5, 1.5), (8, 32, 32)),
                       with_text=False, on_error="skip")
    with open(ds.records[1][1], "wb") as f:
        f.write(b"broken")
    model = FakeCTCLIP()
    result = ct_zero_shot_evaluate(model, ds)
    assert result["n"] == len(ds) - 1 and result["skipped"] == 1
    assert "cannot read NIfTI" in result["skipped_examples"][0]
    assert model.volumes_seen == len(ds) - 1                       # the next volume is not served twice
