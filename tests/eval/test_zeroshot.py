"""Zero-shot classification against a naive float64 reference, on a fake model (eval_fakes)."""
import json
import math
import os

import numpy as np
import pytest
import torch

from eval_fakes import FakeCLIP, TensorItems

from acelora.eval import metrics as M
from acelora.eval.prompts import DEFAULT_TEMPLATES, default_classnames
from acelora.eval.zeroshot import ZeroShotClassifier, class_embeddings, zero_shot_evaluate
from acelora.testing import rel_err


def naive_class_embeddings(model, classnames, templates):
    rows = []
    for name in classnames:
        embs = []
        for t in templates:
            tok = model.tokenizer([t.replace("{c}", name)])
            e = model.encode_text(tok["input_ids"], tok["attention_mask"], normalize=False).double()[0]
            embs.append(e / e.norm())
        mean = torch.stack(embs).mean(0)
        rows.append(mean / mean.norm())
    return torch.stack(rows)


def naive_probs(model, images, classnames, templates):
    with torch.no_grad():
        cls = naive_class_embeddings(model, classnames, templates)
        img = model.encode_image(images, normalize=False).double()
        img = img / img.norm(dim=1, keepdim=True)
        return (model.logit_scale.double().exp() * img @ cls.T).softmax(-1)


def naive_auroc(y, s):
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def naive_metrics(probs, y, C):
    pred = probs.argmax(1)
    recalls, f1s = [], []
    for c in range(C):
        tp = ((pred == c) & (y == c)).sum()
        fp = ((pred == c) & (y != c)).sum()
        fn = ((pred != c) & (y == c)).sum()
        if (y == c).any():
            recalls.append(tp / (tp + fn))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    if C == 2:
        auroc = naive_auroc(y, probs[:, 1])
    else:
        auroc = np.mean([naive_auroc((y == c).astype(int), probs[:, c]) for c in range(C)])
    return {"accuracy": (pred == y).mean(), "balanced_accuracy": np.mean(recalls),
            "macro_f1": np.mean(f1s), "auroc": auroc}


def test_class_embeddings_match_naive():
    model = FakeCLIP(seed=1)
    names = ["Atelectasis", "Cardiomegaly", "Pleural Effusion"]
    templates = ("a chest X-ray image of {c}.", "Findings suggesting {c}.", "{c} is present")
    out = class_embeddings(model, names, templates)
    ref = naive_class_embeddings(model, names, templates)
    assert out.shape == (3, FakeCLIP.embed_dim)
    assert rel_err(out, ref) < 1e-5
    # The mean of normalised prompts, not the embedding of one template.
    single = naive_class_embeddings(model, names, templates[:1])
    assert rel_err(single, ref) > 1e-2


@pytest.mark.parametrize("num_classes", [2, 4])
def test_zero_shot_evaluate_matches_naive(num_classes, tmp_path):
    torch.manual_seed(num_classes)
    model = FakeCLIP(seed=num_classes)
    n = 40
    images = torch.randn(n, 3, 32, 32)
    labels = torch.randint(0, num_classes, (n,))
    labels[:num_classes] = torch.arange(num_classes)  # every class present
    names = [f"finding {chr(97 + c)}" for c in range(num_classes)]
    ds = TensorItems(list(images), label=labels.tolist(), classes=names)

    result = zero_shot_evaluate(model, ds, templates=DEFAULT_TEMPLATES, batch_size=7,
                                out_dir=str(tmp_path), name="zs")
    probs = naive_probs(model, images, names, DEFAULT_TEMPLATES).numpy()
    ref = naive_metrics(probs, labels.numpy(), num_classes)
    for key, value in ref.items():
        assert result[key] == pytest.approx(value, abs=1e-9), key
    assert result["n"] == n and result["skipped"] == 0
    assert result["classnames"] == names
    assert np.asarray(result["confusion_matrix"]).sum() == n

    files = result["files"]
    for key in ("json", "confusion_matrix", "roc", "predictions"):
        assert os.path.getsize(files[key]) > 0, key
    with open(files["json"]) as f:
        report = json.load(f)
    assert report["accuracy"] == pytest.approx(ref["accuracy"])
    with open(files["predictions"]) as f:
        lines = f.read().splitlines()
    assert len(lines) == n + 1
    row = lines[1].split(",")
    assert float(row[3]) == pytest.approx(probs[0, 0], abs=1e-5)


def test_perfect_classifier_scores_one():
    # Images built to align with the class embeddings: the zero-shot classifier must be perfect.
    model = FakeCLIP(seed=3, lora=False)
    names = ["alpha", "beta", "gamma"]
    with torch.no_grad():
        cls = class_embeddings(model, names, DEFAULT_TEMPLATES)
        model.proj.copy_(torch.eye(FakeCLIP.embed_dim))
        model.patch.weight.zero_()
        model.patch.bias.zero_()
    labels = torch.tensor([0, 1, 2] * 5)

    # Feed the class embedding as the image's pooled feature through the bias of the patch conv.
    probs = []
    for y in labels:
        with torch.no_grad():
            model.patch.bias.copy_(cls[y] * 5)
        probs.append(ZeroShotClassifier(model, names).probs(torch.zeros(1, 3, 32, 32)))
    probs = torch.cat(probs)
    m = M.classification_metrics(probs, labels, names)
    assert m["accuracy"] == 1.0 and m["balanced_accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["auroc"] == 1.0


def test_merged_for_evaluation_and_restored():
    model = FakeCLIP(seed=4)
    model.train()
    images = torch.randn(12, 3, 32, 32)
    ds = TensorItems(list(images), label=[i % 2 for i in range(12)], classes=["No Finding", "pneumonia"])
    before = model.proj.detach().clone()
    unmerged = zero_shot_evaluate(model, ds, merge=False)
    assert model.lora_calls > 0
    model.lora_calls = 0
    merged = zero_shot_evaluate(model, ds, merge=True)
    assert model.lora_calls == 0, "a merged model must not run the LoRA side branch"
    assert not model.merged and model.training          # state restored afterwards
    assert torch.equal(model.proj, before) or rel_err(model.proj, before) < 1e-6
    assert merged["auroc"] == pytest.approx(unmerged["auroc"], abs=1e-6)
    assert merged["accuracy"] == unmerged["accuracy"]


def test_undecodable_images_are_counted_or_raise():
    model = FakeCLIP()
    images = list(torch.randn(10, 3, 32, 32))
    ds = TensorItems(images, bad={2, 7}, label=[i % 2 for i in range(10)], classes=["a", "b"])
    result = zero_shot_evaluate(model, ds, classnames=["no finding", "pneumonia"], batch_size=4)
    assert result["n"] == 8 and result["skipped"] == 2
    assert "item2" in result["skipped_examples"][0]
    with pytest.raises(Exception, match="item2"):
        zero_shot_evaluate(model, ds, classnames=["no finding", "pneumonia"], on_error="raise")


def test_bad_class_names():
    model = FakeCLIP()
    ds = TensorItems(list(torch.randn(4, 3, 32, 32)), label=[0, 1, 2, 0])
    with pytest.raises(ValueError, match="class names"):
        zero_shot_evaluate(model, ds)                       # no classes anywhere
    with pytest.raises(ValueError, match="class names"):
        zero_shot_evaluate(model, ds, classnames=[])
    with pytest.raises(ValueError, match="duplicate"):
        zero_shot_evaluate(model, ds, classnames=["a", "a", "b"])
    with pytest.raises(ValueError, match="only 2 class names"):
        zero_shot_evaluate(model, ds, classnames=["a", "b"])
    with pytest.raises(ValueError, match=r"\{c\}"):
        zero_shot_evaluate(model, ds, classnames=["a", "b", "c"], templates=["no placeholder"])


def test_protocol_class_names():
    class RSNAPneumoniaDataset:
        classes = ["No Finding", "pneumonia"]

    class CheXpert5x200Dataset:
        classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]

    assert default_classnames(RSNAPneumoniaDataset()) == ["No Finding", "pneumonia"]
    assert default_classnames(CheXpert5x200Dataset())[-1] == "Pleural Effusion"


def test_metric_edge_cases():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]])
    m = M.classification_metrics(probs, torch.tensor([0, 0]))
    assert math.isnan(m["auroc"])                             # one class only: undefined, not a crash
    assert M.json_safe(m)["auroc"] is None
    with pytest.raises(ValueError, match="targets must lie"):
        M.classification_metrics(probs, torch.tensor([0, 2]))
