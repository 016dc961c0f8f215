"""LC25000, MHIST and the image–caption CSV: parsed from synthetic copies of their layouts with
exact counts, a deterministic disjoint hold-out, and bad input named or counted."""
import csv
import hashlib
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from acelora.data import DataError
from acelora.data.captions import ImageCaptionDataset
from acelora.data.collate import ImageTextCollator, classification_collate
from acelora.data.pathology import LC25000Dataset, MHISTDataset
from acelora.data.synthetic_pathology import (TISSUE_STYLES, render_he, write_caption_csv,
                                              write_lc25000, write_mhist)
from acelora.data.transforms import biomedclip_transform

LUNG = ["lung adenocarcinoma", "benign lung", "lung squamous cell carcinoma"]
COLON = ["colon adenocarcinoma", "benign colonic tissue"]
N_PER_CLASS = 12


@pytest.fixture(scope="module")
def lc25000(tmp_path_factory):
    return write_lc25000(str(tmp_path_factory.mktemp("lc")), n_per_class=N_PER_CLASS, seed=3,
                         image_size=32)


@pytest.fixture(scope="module")
def mhist(tmp_path_factory):
    return write_mhist(str(tmp_path_factory.mktemp("mhist")), n=23, seed=4, image_size=32)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _documented_split(folder, name, fraction=0.2):
    # The rule LC25000Dataset documents, written out independently: MD5 of "folder/name", first
    # 8 bytes little-endian over 2**64, below the fraction = test.
    u = int.from_bytes(hashlib.md5(f"{folder}/{name}".encode()).digest()[:8], "little") / 2.0 ** 64
    return "test" if u < fraction else "train"


# --- LC25000 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,classes", [("lung", LUNG), ("colon", COLON)])
def test_lc25000_counts_and_labels(lc25000, task, classes):
    ds = LC25000Dataset(lc25000["root"], task=task)
    assert ds.classes == classes and len(ds) == N_PER_CLASS * len(classes)
    assert Counter(ds.targets) == {c: N_PER_CLASS for c in range(len(classes))}
    for item_id, path, label in ds.records:
        assert lc25000["images"][item_id] == ds.folders[label]
        assert os.path.basename(path) == item_id.split("/")[1]
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["label"] == ds.records[0][2]
    # The root may also be the lung_colon_image_set folder itself.
    inner = LC25000Dataset(lc25000["image_set"], task=task)
    assert inner.records == ds.records


def test_lc25000_hold_out_is_documented_deterministic_and_disjoint(lc25000):
    full = LC25000Dataset(lc25000["root"], task="lung")
    parts = {s: LC25000Dataset(lc25000["root"], task="lung", split=s) for s in ("train", "test")}
    ids = {s: [r[0] for r in ds.records] for s, ds in parts.items()}
    assert not set(ids["train"]) & set(ids["test"])
    assert sorted(ids["train"] + ids["test"]) == sorted(r[0] for r in full.records)
    for split, names in ids.items():
        assert all(_documented_split(*i.split("/")) == split for i in names)
        # Exact counts per class, from the documented rule.
        expected = Counter(label for item_id, _, label in full.records
                           if _documented_split(*item_id.split("/")) == split)
        assert Counter(parts[split].targets) == expected
    again = LC25000Dataset(lc25000["root"], task="lung", split="test")
    assert again.records == parts["test"].records
    # A smaller test fraction's test set is inside the larger one's.
    small = LC25000Dataset(lc25000["root"], task="lung", split="test", test_fraction=0.1)
    assert {r[0] for r in small.records} <= set(ids["test"])
    with pytest.raises(ValueError, match="split"):
        LC25000Dataset(lc25000["root"], task="lung", split="valid")


def test_lc25000_missing_folders(lc25000, tmp_path):
    root = _copy(lc25000["root"], tmp_path / "lc")
    shutil.rmtree(os.path.join(root, "lung_colon_image_set", "lung_image_sets", "lung_scc"))
    with pytest.raises(DataError, match="lung_scc"):
        LC25000Dataset(root, task="lung")
    assert len(LC25000Dataset(root, task="colon")) == 2 * N_PER_CLASS  # the other task is intact
    shutil.rmtree(os.path.join(root, "lung_colon_image_set", "colon_image_sets"))
    with pytest.raises(DataError, match="colon_image_sets"):
        LC25000Dataset(root, task="colon")
    with pytest.raises(DataError, match="lung_colon_image_set"):
        LC25000Dataset(str(tmp_path), task="lung")
    empty = os.path.join(root, "lung_colon_image_set", "lung_image_sets", "lung_n")
    for name in os.listdir(empty):
        os.remove(os.path.join(empty, name))
    with pytest.raises(DataError, match="lung_n"):
        LC25000Dataset(root, task="lung")


def test_lc25000_corrupt_image_raise_and_skip(lc25000, tmp_path):
    root = _copy(lc25000["root"], tmp_path / "lc")
    ds = LC25000Dataset(root, task="colon")
    bad = 3
    with open(ds.records[bad][1], "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=ds.records[bad][0].split("/")[1]):
        ds[bad]
    skip = LC25000Dataset(root, task="colon", on_error="skip", transform=biomedclip_transform(32))
    loader = DataLoader(skip, batch_size=5, collate_fn=classification_collate)
    seen = sum(batch["images"].shape[0] for batch in loader)
    assert seen == len(skip) and skip.skipped == 1


# --- MHIST ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["test", "train", "all"])
def test_mhist_counts_per_split_and_class(mhist, split):
    truth = {n: m for n, m in mhist["images"].items() if split == "all" or m["partition"] == split}
    ds = MHISTDataset(mhist["root"], split=split)
    assert ds.classes == ["hyperplastic polyp", "sessile serrated adenoma"]
    assert len(ds) == len(truth)
    expected = Counter(0 if m["label"] == "HP" else 1 for m in truth.values())
    assert Counter(ds.targets) == expected and set(expected) == {0, 1}
    for (name, path, label), votes in zip(ds.records, ds.ssa_votes):
        assert ["HP", "SSA"][label] == truth[name]["label"] and votes == truth[name]["votes"]
        assert path == truth[name]["path"]
    assert MHISTDataset(os.path.join(mhist["root"], "annotations.csv"), split=split).records == ds.records


def test_mhist_default_split_is_test(mhist):
    n_test = sum(m["partition"] == "test" for m in mhist["images"].values())
    assert len(MHISTDataset(mhist["root"])) == n_test


def _rewrite(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(edit(rows))


def test_mhist_bad_input(mhist, tmp_path):
    root = _copy(mhist["root"], tmp_path / "m")
    csv_path = os.path.join(root, "annotations.csv")
    _rewrite(csv_path, lambda rows: [r[:3] for r in rows])  # drop Partition
    with pytest.raises(DataError, match="Partition"):
        MHISTDataset(root)

    root = _copy(mhist["root"], tmp_path / "m2")
    csv_path = os.path.join(root, "annotations.csv")
    _rewrite(csv_path, lambda rows: rows[:2] + [[rows[2][0], "TA", *rows[2][2:]]] + rows[3:])
    with pytest.raises(DataError, match=r"annotations\.csv:3.*Majority Vote Label"):
        MHISTDataset(root, split="all")

    root = _copy(mhist["root"], tmp_path / "m3")
    name = next(n for n, m in mhist["images"].items() if m["partition"] == "test")
    os.remove(os.path.join(root, "images", name))
    with pytest.raises(DataError, match=name):
        MHISTDataset(root)
    skip = MHISTDataset(root, on_error="skip")
    n_test = sum(m["partition"] == "test" for m in mhist["images"].values())
    assert len(skip) == n_test - 1 and skip.skipped == 1
    shutil.rmtree(os.path.join(root, "images"))
    with pytest.raises(DataError, match="images"):
        MHISTDataset(root)
    with pytest.raises(DataError, match="annotations.csv"):
        MHISTDataset(str(tmp_path))


def test_mhist_corrupt_image_is_counted(mhist, tmp_path):
    root = _copy(mhist["root"], tmp_path / "m")
    ds = MHISTDataset(root, split="all", on_error="skip")
    with open(ds.records[0][1], "wb") as f:
        f.write(b"\x89PNG broken")
    items = [ds[i] for i in range(len(ds))]
    assert ds.skipped == 1 and items[0]["id"] == ds.records[1][0]


# --- synthetic tiles are separable -----------------------------------------------------------------

def _features(tile):
    x = tile.astype(np.float64) / 255.0
    return np.concatenate([x.mean((0, 1)), x.std((0, 1)), [(x.min(-1) > 0.85).mean()]])


def test_synthetic_tissues_are_separable_by_colour_statistics():
    # Nearest class centroid on colour statistics: a linear probe a tiny model can beat.
    tissues = sorted(TISSUE_STYLES)
    train = {t: np.stack([_features(render_he(t, np.random.default_rng([0, i, k]), 48))
                          for i in range(6)]) for k, t in enumerate(tissues)}
    mean = np.concatenate(list(train.values())).mean(0)
    std = np.concatenate(list(train.values())).std(0) + 1e-9
    centroids = np.stack([((train[t] - mean) / std).mean(0) for t in tissues])
    correct = total = 0
    for k, t in enumerate(tissues):
        for i in range(6):
            f = (_features(render_he(t, np.random.default_rng([1, i, k]), 48)) - mean) / std
            correct += int(np.argmin(((centroids - f) ** 2).sum(1)) == k)
            total += 1
    assert correct / total >= 0.9, correct / total
    with pytest.raises(ValueError, match="tissue"):
        render_he("liver", np.random.default_rng(0))


# --- image–caption CSV ------------------------------------------------------------------------------

def fake_tokenizer(texts, context_length=None):
    ids = [[1] + [2 + (ord(c) % 50) for c in t[:12]] for t in texts]
    out = torch.tensor([row + [0] * (13 - len(row)) for row in ids])
    return {"input_ids": out, "attention_mask": (out != 0).long()}


def test_caption_csv_items_match_the_training_contract(tmp_path):
    truth = write_caption_csv(str(tmp_path), n=10, seed=2, image_size=32)
    ds = ImageCaptionDataset(truth["csv"], label_columns="label")
    assert len(ds) == 10 and ds.label_mode == "names"
    assert ds.classes == sorted({r["label"] for r in truth["rows"]})
    for i, row in enumerate(truth["rows"]):
        item = ds[i]
        assert set(item) == {"image", "text", "labels", "id", "path"}  # as MimicCXRDataset's
        assert item["text"] == row["caption"] and item["id"] == row["image"]
        assert item["labels"].tolist() == [float(c == row["label"]) for c in ds.classes]
        assert item["path"] == os.path.join(str(tmp_path), row["image"])
    batch = ImageTextCollator(fake_tokenizer)([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 32, 32) and batch["labels"].shape == (4, len(ds.classes))
    # The folder holding captions.csv works too; without label columns there are no labels.
    plain = ImageCaptionDataset(str(tmp_path))
    assert "labels" not in plain[0] and plain.labels is None and len(plain) == 10


def test_caption_csv_custom_columns_binary_labels_and_bad_rows(tmp_path):
    truth = write_caption_csv(str(tmp_path), n=6, seed=1, image_size=32, image_column="image_path",
                              caption_column="text", label_column=None, csv_name="quilt.csv")
    csv_path = truth["csv"]
    with pytest.raises(DataError, match="image"):
        ImageCaptionDataset(csv_path)  # default column names are not in this CSV
    rows = [["image_path", "text", "tumor", "benign"]]
    flags = [("1", "0"), ("0", "1"), ("", "-1"), ("1.0", "0.0"), ("0", "1"), ("1", "")]
    for row, (t, b) in zip(truth["rows"], flags):
        rows.append([row["image"], row["caption"], t, b])
    rows.append(["images/missing.png", "a caption", "1", "0"])
    rows.append([truth["rows"][0]["image"], "   ", "1", "0"])
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    ds = ImageCaptionDataset(csv_path, image_column="image_path", caption_column="text",
                             label_columns=["tumor", "benign"], on_error="skip")
    assert len(ds) == 6 and ds.skipped == 2 and dict(ds.skips.reasons) == {"missing image": 1, "empty caption": 1}
    assert ds.label_mode == "binary" and ds.classes == ["tumor", "benign"]
    assert ds.labels.tolist() == [[1, 0], [0, 1], [0, 0], [1, 0], [0, 1], [1, 0]]
    with pytest.raises(DataError, match="missing.png"):
        ImageCaptionDataset(csv_path, image_column="image_path", caption_column="text")
    rows[1][2] = "maybe"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DataError, match=r"quilt\.csv:2.*tumor"):
        ImageCaptionDataset(csv_path, image_column="image_path", caption_column="text",
                            label_columns="tumor,benign", on_error="skip")
