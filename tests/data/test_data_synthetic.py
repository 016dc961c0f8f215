"""Synthetic CXRs: deterministic, every finding visible and learnable, domains shift the images,
reports name the findings, the data set follows the data contract."""
import numpy as np
import pytest
import torch
from PIL import Image

from acelora.config import CHEXPERT_FINDINGS
from acelora.data.collate import ImageTextCollator
from acelora.data.reports import findings_impression
from acelora.data.synthetic import (FIVE_CLASSES, RENDERABLE, SyntheticCXRPairs, render_array,
                                    render_cxr, report_for)

SEED = int(np.random.default_rng().integers(0, 10_000))


def test_render_deterministic_and_shaped():
    a = render_cxr(["Edema"], np.random.default_rng(SEED), size=40)
    b = render_cxr(["Edema"], np.random.default_rng(SEED), size=40)
    c = render_cxr(["Edema"], np.random.default_rng(SEED + 1), size=40)
    assert isinstance(a, Image.Image) and a.mode == "RGB" and a.size == (40, 40)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    grey = np.asarray(a)
    assert np.array_equal(grey[..., 0], grey[..., 2])  # grey values in every channel
    assert render_cxr([], np.random.default_rng(0), size=20, mode="L").mode == "L"


def test_anatomy_dark_lungs_bright_mediastinum():
    img = render_array([], np.random.default_rng(SEED), size=64)
    assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    lungs = np.r_[img[24:36, 12:20].ravel(), img[24:36, 44:52].ravel()].mean()
    mediastinum = img[14:26, 29:35].mean()
    corners = img[:5, :5].mean()
    assert corners < lungs < mediastinum


@pytest.mark.parametrize("finding", RENDERABLE)
def test_every_finding_changes_the_image(finding):
    normal = render_array([], np.random.default_rng(SEED), size=48)
    sick = render_array([finding], np.random.default_rng(SEED), size=48)
    assert (np.abs(sick - normal) > 0.05).sum() >= 4, finding  # even a nodule covers pixels


def test_findings_look_like_themselves():
    size = 64
    for seed in range(SEED, SEED + 3):
        normal = render_array([], np.random.default_rng(seed), size)
        # Cardiomegaly: a wider bright heart in the lower middle.
        heart = render_array(["Cardiomegaly"], np.random.default_rng(seed), size)
        region = (heart - normal)[int(0.55 * size):int(0.72 * size), int(0.25 * size):int(0.85 * size)]
        assert region.min() > -0.02 and region.mean() > 0.02
        # Effusion: a brighter lung base, upper lung unchanged.
        eff = render_array(["Pleural Effusion"], np.random.default_rng(seed), size)
        diff = eff - normal
        assert diff[int(0.6 * size):int(0.8 * size)].mean() > 5 * abs(diff[: int(0.3 * size)].mean())
        # Pneumothorax: a sizeable dark region (no lung markings), all in one lung.
        ptx = render_array(["Pneumothorax"], np.random.default_rng(seed), size)
        darker = (ptx - normal) < -0.03
        left, right = int(darker[:, : size // 2].sum()), int(darker[:, size // 2:].sum())
        assert max(left, right) > 100 and min(left, right) == 0


def _features(ds):
    x = np.stack([ds[i]["image"][0].numpy() for i in range(len(ds))]).reshape(len(ds), -1)
    return x.astype(np.float64), np.asarray(ds.targets)


def test_learnable_and_domain_shift():
    # A linear probe on raw pixels learns the classes well above chance in the domain it was
    # fitted on and drops on another domain (same patients, labels and reports).
    train = SyntheticCXRPairs(240, image_size=32, seed=SEED)
    test0 = SyntheticCXRPairs(120, image_size=32, seed=SEED + 1)
    test1 = SyntheticCXRPairs(120, image_size=32, seed=SEED + 1, domain=1)
    assert test0.texts == test1.texts and torch.equal(test0.labels, test1.labels)
    (xtr, ytr), (x0, y0), (x1, y1) = _features(train), _features(test0), _features(test1)
    mu = xtr.mean(0)
    design = lambda x: np.c_[x - mu, np.ones(len(x))]  # noqa: E731
    a = design(xtr)
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ np.eye(len(train.classes))[ytr])
    acc0 = (np.argmax(design(x0) @ w, 1) == y0).mean()
    acc1 = (np.argmax(design(x1) @ w, 1) == y1).mean()
    chance = 1.0 / len(train.classes)
    assert acc0 > 0.6 > 2 * chance, acc0
    assert acc1 < acc0 - 0.2, (acc0, acc1)


def test_domains_differ_in_appearance():
    rng_state = SEED
    images = [render_array(["Edema"], np.random.default_rng(rng_state), 48, domain=d) for d in (0, 1, 2, 7)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 0.02, (i, j)
    with pytest.raises(ValueError, match="domain"):
        render_array([], np.random.default_rng(0), 32, domain=-1)


def test_report_for():
    rng = np.random.default_rng(SEED)
    for finding in FIVE_CLASSES:
        report = report_for([finding], rng)
        assert "FINDINGS:" in report and "IMPRESSION:" in report
        findings, impression = findings_impression(report)
        assert findings and impression
        key = {"Pleural Effusion": "effusion"}.get(finding, finding.lower())
        assert key in impression.lower()  # the findings may paraphrase ("the heart is enlarged")
    normal = report_for([], rng)
    text = " ".join(findings_impression(normal)).lower()
    assert text and not any(name.lower() in text for name in FIVE_CLASSES)
    with pytest.raises(ValueError, match="unknown finding"):
        report_for(["Dragons"], rng)


def test_dataset_contract():
    ds = SyntheticCXRPairs(30, image_size=40, seed=SEED)
    assert len(ds) == 30 and ds.classes == ["No Finding", *FIVE_CLASSES]
    counts = np.bincount(ds.targets, minlength=6)
    assert (counts > 0).sum() >= 4
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) >= {"image", "text", "labels", "path"}
        assert item["image"].shape == (3, 40, 40) and item["image"].dtype == torch.float32
        assert item["labels"].shape == (14,) and item["labels"].dtype == torch.float32
        assert item["labels"].sum() == 1  # one finding, or "No Finding"
        name = ds.classes[item["label"]]
        assert item["labels"][CHEXPERT_FINDINGS.index(name)] == 1
        assert isinstance(item["text"], str) and item["text"] and "\n" not in item["text"]
        assert item["path"].startswith("synthetic://")
    # Normalised with CLIP's statistics by default: roughly centred, not in [0, 1].
    assert ds[0]["image"].min() < -1.0
    again = SyntheticCXRPairs(30, image_size=40, seed=SEED)
    assert torch.equal(again[5]["image"], ds[5]["image"]) and again.texts == ds.texts
    assert SyntheticCXRPairs(30, image_size=40, seed=SEED + 1).texts != ds.texts
    assert torch.equal(ds[-1]["image"], ds[29]["image"])
    with pytest.raises(IndexError):
        ds[30]


def test_dataset_options_and_bad_input():
    ds = SyntheticCXRPairs(12, image_size=32, seed=SEED, include_normal=False,
                           findings=("Pneumothorax", "Cardiomegaly"),
                           transform=lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32)))
    assert ds.classes == ["Pneumothorax", "Cardiomegaly"]
    assert all(ds.labels[i, CHEXPERT_FINDINGS.index("No Finding")] == 0 for i in range(12))
    assert ds[0]["image"].shape == (32, 32, 3)  # the transform got the PIL image
    cached = SyntheticCXRPairs(4, image_size=32, seed=SEED, cache=True)
    assert torch.equal(cached[1]["image"], cached[1]["image"])
    with pytest.raises(ValueError, match="n must be"):
        SyntheticCXRPairs(0)
    with pytest.raises(ValueError, match="not CheXpert findings"):
        SyntheticCXRPairs(3, findings=("Pleural Effusion", "Effusion"))
    with pytest.raises(ValueError, match="duplicates"):
        SyntheticCXRPairs(3, findings=("Edema", "Edema"))


def test_collates_with_a_tokenizer():
    ds = SyntheticCXRPairs(6, image_size=32, seed=SEED)

    def tokenizer(texts):
        length = max(len(t.split()) for t in texts)
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(texts):
            n = len(t.split())
            ids[i, :n], mask[i, :n] = torch.arange(1, n + 1), 1
        return {"input_ids": ids, "attention_mask": mask}

    batch = ImageTextCollator(tokenizer)([ds[i] for i in range(6)])
    assert batch["images"].shape == (6, 3, 32, 32) and batch["labels"].shape == (6, 14)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    with pytest.raises(ValueError, match="empty"):
        ImageTextCollator(tokenizer)([{**ds[0], "text": "  "}])
