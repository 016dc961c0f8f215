"""Each synthetic writer + its reader: labels, boxes, masks and reports come back exactly;
bad input gives a DataError naming the problem or a counted skip, never a crash in a worker."""
import csv
import os
import shutil

import numpy as np
import pydicom
import pytest
import torch
from torch.utils.data import DataLoader

from acelora.config import CHEXPERT_FINDINGS, get_config
from acelora.data import DataError
from acelora.data.classification import CheXpert5x200Dataset, NIHChestXray14Dataset
from acelora.data.collate import ImageTextCollator, classification_collate
from acelora.data.images import read_dicom
from acelora.data.labels import CHEXPERT_5X200_CLASSES, NIH_FINDINGS, LabelPolicy
from acelora.data.mimic import MimicCXRDataset
from acelora.data.rsna import RSNAPneumoniaDataset
from acelora.data.siim import SIIMPneumothoraxDataset
from acelora.data.synthetic import (write_chexpert5x200, write_mimic, write_nih, write_rsna,
                                    write_siim)
from acelora.data.transforms import biomedclip_transform

SEED = int(np.random.default_rng().integers(0, 10_000))  # fresh data every run


@pytest.fixture(scope="module")
def mimic(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mimic"))
    return write_mimic(root, n=24, seed=SEED, image_size=48)


def fake_tokenizer(texts, context_length=None):
    ids = [[1] + [2 + (ord(c) % 50) for c in t[:20]] for t in texts]
    length = max(map(len, ids))
    if context_length is not None:
        length = min(length, context_length)
    out = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros_like(out)
    for i, row in enumerate(ids):
        row = row[:length]
        out[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": out, "attention_mask": mask}


# --- MIMIC-CXR -----------------------------------------------------------------------------------

def _expected_labels(chexpert, uncertain=0.0, blank=0.0):
    table = {"1.0": 1.0, "0.0": 0.0, "-1.0": uncertain, "": blank}
    return [table[chexpert[f]] for f in CHEXPERT_FINDINGS]


@pytest.mark.parametrize("source", ["txt", "csv"])
def test_mimic_round_trip(mimic, source):
    truth = mimic
    ds = MimicCXRDataset(truth["root"], split=None, report_source=source)
    frontal = {d for d, m in truth["images"].items() if m["view"] in ("PA", "AP")}
    assert any(m["view"] not in ("PA", "AP") for m in truth["images"].values())  # the test bites
    ids = [record[0] for record in ds.records]
    assert sorted(ids) == sorted(frontal)
    assert set(ds.views.values()) <= {"PA", "AP"}
    for i, dicom_id in enumerate(ids):
        study = truth["images"][dicom_id]["study_id"]
        s = truth["studies"][study]
        assert ds.labels[i].tolist() == _expected_labels(s["chexpert"])
        text = ds.texts[i]
        assert "INDICATION" not in text and "FINAL REPORT" not in text and "\n" not in text
        assert text.startswith(" ".join(s["findings_text"].split()[:3]))
        assert text.endswith(s["impression_text"].split()[-1])
        for finding in s["findings"]:
            assert finding.lower().split()[-1] in text.lower()
    item = ds[0]
    assert set(item) >= {"image", "text", "labels", "path"}
    assert item["image"].shape == (3, 48, 48) and item["labels"].shape == (14,)
    assert item["path"].endswith(f"{ids[0]}.jpg") and os.path.isfile(item["path"])
    rel = os.path.relpath(item["path"], truth["root"]).split(os.sep)
    subject = truth["images"][ids[0]]["subject_id"]
    assert rel[:3] == ["files", f"p{subject[:2]}", f"p{subject}"]


def test_mimic_csv_and_txt_reports_agree(mimic):
    a = MimicCXRDataset(mimic["root"], split=None, report_source="csv")
    b = MimicCXRDataset(mimic["root"], split=None, report_source="txt")
    assert a.texts == b.texts and torch.equal(a.labels, b.labels)


def test_mimic_splits_and_label_policy(mimic):
    by_split = {}
    for split in ("train", "validate", "test"):
        try:
            ds = MimicCXRDataset(mimic["root"], split=split)
        except DataError:  # a tiny set may leave a split empty
            continue
        by_split[split] = [r[0] for r in ds.records]
        for dicom_id in by_split[split]:
            assert mimic["studies"][mimic["images"][dicom_id]["study_id"]]["split"] == split
    assert sum(map(len, by_split.values())) == len(MimicCXRDataset(mimic["root"], split=None))
    if "validate" in by_split:  # "val" is an alias of MIMIC's "validate"
        assert len(MimicCXRDataset(mimic["root"], split="val")) == len(by_split["validate"])
    ones = MimicCXRDataset(mimic["root"], split=None,
                           label_policy=LabelPolicy.from_config(get_config(uncertain_label=1)))
    for i, (dicom_id, _) in enumerate(ones.records):
        chexpert = mimic["studies"][mimic["images"][dicom_id]["study_id"]]["chexpert"]
        assert ones.labels[i].tolist() == _expected_labels(chexpert, uncertain=1.0)
    assert any("-1.0" in s["chexpert"].values() for s in mimic["studies"].values())


def test_mimic_annotations_read_without_images(mimic, tmp_path, monkeypatch):
    import acelora.data.mimic as mimic_module

    def no_images(path):
        raise AssertionError("an image was opened while indexing")

    monkeypatch.setattr(mimic_module, "load_image", no_images)
    assert len(MimicCXRDataset(mimic["root"], split=None)) > 0


def test_mimic_collate_and_loader(mimic):
    ds = MimicCXRDataset(mimic["root"], split=None)
    loader = DataLoader(ds, batch_size=4, collate_fn=ImageTextCollator(fake_tokenizer, context_length=8))
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 48, 48)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 8
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert torch.equal(batch["labels"], ds.labels[:4]) and len(batch["paths"]) == 4


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_mimic_bad_input(mimic, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        MimicCXRDataset(str(tmp_path / "nope"))
    root = _copy(mimic["root"], tmp_path / "m")
    with pytest.raises(ValueError, match="split"):
        MimicCXRDataset(root, split="training")
    # A missing column: the error names the column and the file.
    meta = os.path.join(root, "mimic-cxr-2.0.0-metadata.csv")
    _rewrite_csv(meta, lambda rows: [[("View" if c == "ViewPosition" else c) for c in rows[0]]] + rows[1:])
    with pytest.raises(DataError, match=r"ViewPosition.*|metadata\.csv") as err:
        MimicCXRDataset(root, split=None)
    assert "ViewPosition" in str(err.value) and "metadata.csv" in str(err.value)
    os.remove(meta)
    with pytest.raises(DataError, match="metadata"):
        MimicCXRDataset(root, split=None)


def test_mimic_missing_image_empty_report_bad_label(mimic, tmp_path):
    root = _copy(mimic["root"], tmp_path / "m")
    full = MimicCXRDataset(root, split=None, report_source="txt")
    dicom_id, path = full.records[0]
    saved = open(path, "rb").read()
    os.remove(path)
    with pytest.raises(DataError, match=dicom_id):
        MimicCXRDataset(root, split=None, report_source="txt")
    skipping = MimicCXRDataset(root, split=None, report_source="txt", on_error="skip")
    assert len(skipping) == len(full) - 1 and skipping.skips.reasons["missing image"] == 1
    with open(path, "wb") as f:
        f.write(saved)

    # An empty report (no FINDINGS/IMPRESSION text): raise, or skip every image of that study.
    dicom_id2, path2 = full.records[-1]
    study = mimic["images"][dicom_id2]["study_id"]
    with open(os.path.dirname(path2) + ".txt", "w") as f:
        f.write("                FINAL REPORT\n INDICATION: none.\n\n FINDINGS:\n\n IMPRESSION:\n")
    with pytest.raises(DataError, match="empty report"):
        MimicCXRDataset(root, split=None, report_source="txt")
    skipping = MimicCXRDataset(root, split=None, report_source="txt", on_error="skip")
    n_study = sum(1 for d, m in mimic["images"].items()
                  if m["study_id"] == study and m["view"] in ("PA", "AP"))
    assert skipping.skips.reasons["empty report"] == n_study
    assert len(skipping) == len(full) - n_study

    labels = os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv")
    _rewrite_csv(labels, lambda rows: rows[:1] + [rows[1][:2] + ["2.0"] + rows[1][3:]] + rows[2:])
    with pytest.raises(DataError, match=r"chexpert\.csv:2"):
        MimicCXRDataset(root, split=None, on_error="skip")


def test_corrupt_image_raise_skip_and_workers(mimic, tmp_path):
    root = _copy(mimic["root"], tmp_path / "m")
    ds = MimicCXRDataset(root, split=None)
    bad_index = 1
    with open(ds.records[bad_index][1], "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=ds.records[bad_index][0]):
        ds[bad_index]
    skip = MimicCXRDataset(root, split=None, on_error="skip")
    item = skip[bad_index]  # the next readable item instead
    assert item["path"] == skip.records[bad_index + 1][1] and skip.skipped == 1
    # Through worker processes: the whole epoch runs and every batch is full.
    loader = DataLoader(skip, batch_size=3, num_workers=2,
                        collate_fn=ImageTextCollator(fake_tokenizer))
    seen = sum(batch["images"].shape[0] for batch in loader)
    assert seen == len(skip)
    # raise mode through a worker: the DataError's message reaches the main process.
    loader = DataLoader(ds, batch_size=len(ds), num_workers=1, collate_fn=ImageTextCollator(fake_tokenizer))
    with pytest.raises(Exception, match=ds.records[bad_index][0]):
        next(iter(loader))


# --- NIH ChestX-ray14 -------------------------------------------------------------------------

def test_nih_round_trip(tmp_path):
    truth = write_nih(str(tmp_path), n=20, seed=SEED, image_size=32)
    for split in ("test", "train_val"):
        names = {n for n, m in truth["images"].items() if m["split"] == split}
        if not names:
            continue
        ds = NIHChestXray14Dataset(str(tmp_path), split=split)
        assert {r[0] for r in ds.records} == names
        for i, (name, _) in enumerate(ds.records):
            expected = [1.0 if f in truth["images"][name]["findings"] else 0.0 for f in NIH_FINDINGS]
            assert ds.labels[i].tolist() == expected
    all_ = NIHChestXray14Dataset(str(tmp_path), split=None)
    assert len(all_) == 20 and all_[0]["image"].shape == (3, 32, 32)
    assert any(len(m["findings"]) > 1 for m in truth["images"].values())  # "|" was exercised
    with pytest.raises(ValueError, match="split"):
        NIHChestXray14Dataset(str(tmp_path), split="val")
    _rewrite_csv(str(tmp_path / "Data_Entry_2017.csv"),
                 lambda rows: rows[:1] + [[rows[1][0], "Cardiomegaly|Dragons"] + rows[1][2:]] + rows[2:])
    with pytest.raises(DataError, match="Dragons"):
        NIHChestXray14Dataset(str(tmp_path), split=None)


# --- CheXpert 5x200 ---------------------------------------------------------------------------

def test_chexpert5x200_round_trip(tmp_path):
    truth = write_chexpert5x200(str(tmp_path), n=3, seed=SEED, image_size=32)
    ds = CheXpert5x200Dataset(str(tmp_path))
    assert len(ds) == 15 and ds.classes == list(CHEXPERT_5X200_CLASSES)
    for rel, _, label in ds.records:
        assert CHEXPERT_5X200_CLASSES[label] == truth["rows"][rel]
    assert sorted(ds.targets) == sorted([0, 1, 2, 3, 4] * 3)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and isinstance(item["label"], int)
    # A row positive for two classes is not a 5x200 row.
    csv_path = str(tmp_path / "chexpert_5x200.csv")
    _rewrite_csv(csv_path, lambda rows: rows[:1] + [
        [("1.0" if rows[0][j] in CHEXPERT_5X200_CLASSES else v) for j, v in enumerate(rows[1])]] + rows[2:])
    with pytest.raises(DataError, match="exactly one"):
        CheXpert5x200Dataset(csv_path)
    assert len(CheXpert5x200Dataset(csv_path, on_error="skip")) == 14
    _rewrite_csv(csv_path, lambda rows: [["Pth" if c == "Path" else c for c in rows[0]]] + rows[1:])
    with pytest.raises(DataError, match="Path") as err:
        CheXpert5x200Dataset(csv_path)
    assert "chexpert_5x200.csv" in str(err.value)


# --- RSNA pneumonia -----------------------------------------------------------------------------

def test_rsna_round_trip(tmp_path):
    truth = write_rsna(str(tmp_path), n=12, seed=SEED, image_size=64, p_positive=0.6)
    ds = RSNAPneumoniaDataset(str(tmp_path), split=None)
    assert len(ds) == 12
    styles = {m["photometric"] for m in truth["patients"].values()}
    for i, (pid, path, target, _) in enumerate(ds.records):
        t = truth["patients"][pid]
        item = ds[i]
        assert item["label"] == target == t["target"]
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in t["boxes"]]).reshape(-1, 4)
        assert torch.equal(item["boxes"], expected.float())
        assert (len(t["boxes"]) > 0) == bool(target)
        pixels = read_dicom(path)  # air (the corners) is black whatever the photometric
        assert pixels[:4, :4].mean() < 0.25 and pixels[28:36, 28:36].mean() > 0.3
    assert styles == {"MONOCHROME1", "MONOCHROME2"} or len(ds) < 4
    normalized = RSNAPneumoniaDataset(str(tmp_path), split=None, box_format="normalized")
    i = next(i for i, r in enumerate(ds.records) if r[2] == 1)
    assert torch.allclose(normalized[i]["boxes"] * 64, ds[i]["boxes"])
    half = RSNAPneumoniaDataset(str(tmp_path), split=None, transform=biomedclip_transform(32))
    item = half[i]
    assert item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["boxes"], ds[i]["boxes"] / 2)
    batch = classification_collate([half[0], half[1]])
    assert batch["images"].shape == (2, 3, 32, 32) and len(batch["boxes"]) == 2


def test_rsna_splits_and_bad_rows(tmp_path):
    write_rsna(str(tmp_path), n=30, seed=SEED, image_size=32)
    parts = []
    for split in ("train", "valid", "test"):
        try:
            parts.append({r[0] for r in RSNAPneumoniaDataset(str(tmp_path), split=split).records})
        except DataError:
            parts.append(set())
    assert sum(map(len, parts)) == 30 and not (parts[0] & parts[1] or parts[0] & parts[2])
    csv_path = str(tmp_path / "stage_2_train_labels.csv")
    # Target=1 without a box.
    _rewrite_csv(csv_path, lambda rows: rows[:1] + [[rows[1][0], "", "", "", "", "1"]] + rows[2:])
    with pytest.raises(DataError, match=r"stage_2_train_labels\.csv:2"):
        RSNAPneumoniaDataset(str(tmp_path), split=None)


# --- SIIM pneumothorax --------------------------------------------------------------------------

def test_siim_round_trip(tmp_path):
    truth = write_siim(str(tmp_path), n=10, seed=SEED, image_size=48, p_positive=0.7)
    with open(tmp_path / "train-rle.csv") as f:
        assert f.readline().rstrip("\n") == "ImageId, EncodedPixels"
    ds = SIIMPneumothoraxDataset(str(tmp_path), split=None, with_mask=True)
    assert len(ds) == 10
    multi = 0
    for i, (image_id, *_rest) in enumerate(ds.records):
        t = truth["images"][image_id]
        item = ds[i]
        assert item["label"] == int(t["mask"].any())
        assert item["mask"].shape == (48, 48)
        np.testing.assert_array_equal(item["mask"].numpy(), t["mask"])
        multi += len(t["components"]) > 1
        if t["mask"].any():  # the pneumothorax is darker than the rest of the image
            image = item["image"][0].numpy()
            assert image[t["mask"]].mean() < image.mean() + 0.1
    with_transform = SIIMPneumothoraxDataset(str(tmp_path), split=None, with_mask=True,
                                             transform=biomedclip_transform(24))
    item = with_transform[0]
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (24, 24)
    batch = classification_collate([with_transform[0], with_transform[1]])
    assert batch["masks"].shape == (2, 24, 24) and batch["labels"].dtype == torch.long


def test_siim_bad_rle(tmp_path):
    write_siim(str(tmp_path), n=4, seed=SEED, image_size=32)
    path = str(tmp_path / "train-rle.csv")
    with open(path) as f:
        lines = f.read().splitlines()
    image_id = lines[1].split(",")[0]
    lines[1] = f"{image_id}, 3 4 5"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="odd number"):
        SIIMPneumothoraxDataset(str(tmp_path), split=None)
    lines[1] = f"{image_id}, 0 999999"  # runs past the image: found when the mask is built
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    ds = SIIMPneumothoraxDataset(str(tmp_path), split=None, with_mask=True)
    index = next(i for i, r in enumerate(ds.records) if r[0] == image_id)
    with pytest.raises(DataError, match="RLE"):
        ds[index]
    with open(path, "w") as f:
        f.write("ImageId,Pixels\nx,-1\n")
    with pytest.raises(DataError, match="EncodedPixels"):
        SIIMPneumothoraxDataset(str(tmp_path), split=None)


def test_on_error_value_checked(tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        NIHChestXray14Dataset(str(tmp_path), on_error="ignore")


def test_no_dataset_opens_an_image_while_indexing(tmp_path, monkeypatch):
    write_nih(str(tmp_path / "nih"), n=6, seed=SEED, image_size=32)
    write_chexpert5x200(str(tmp_path / "cx"), n=1, seed=SEED, image_size=32)
    write_rsna(str(tmp_path / "rsna"), n=4, seed=SEED, image_size=32)
    write_siim(str(tmp_path / "siim"), n=4, seed=SEED, image_size=32)
    write_mimic(str(tmp_path / "mimic"), n=4, seed=SEED, image_size=32)
    import PIL.Image

    def forbidden(*args, **kwargs):
        raise AssertionError("an image was opened while indexing")

    monkeypatch.setattr(PIL.Image, "open", forbidden)
    monkeypatch.setattr(pydicom, "dcmread", forbidden)
    built = [NIHChestXray14Dataset(str(tmp_path / "nih"), split=None),
             CheXpert5x200Dataset(str(tmp_path / "cx")),
             RSNAPneumoniaDataset(str(tmp_path / "rsna"), split=None),
             SIIMPneumothoraxDataset(str(tmp_path / "siim"), split=None, with_mask=True),
             MimicCXRDataset(str(tmp_path / "mimic"), split=None)]
    assert [len(d) for d in built] == [6, 5, 4, 4, len(built[-1])] and len(built[-1]) > 0
    with pytest.raises(AssertionError, match="opened"):
        built[0][0]  # and the patch does bite when an item is read
