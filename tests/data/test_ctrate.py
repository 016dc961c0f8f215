"""CT-RATE: layout parsing, HU conversion (raw vs _fixed), preprocessing end to end, bad-volume
skipping (also in DataLoader workers) and the preprocessed cache, on synthetic copies."""
import csv
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from acelora.data._common import DataError
from acelora.data.ct_transforms import CTPreprocess, dhw_to_nifti
from acelora.data.ctrate import CT_RATE_FINDINGS, CTRATEDataset, parse_xy_spacing, report_text
from acelora.data.synthetic_ct import SYNTHETIC_CT_FINDINGS, render_ct, write_ct_rate
from acelora.eval.prompts import CT_FINDINGS

SHAPE = (8, 32, 32)
PRE = CTPreprocess(target_spacing=(3.0, 1.5, 1.5), target_shape=SHAPE)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ctrate"))
    info = write_ct_rate(root, patients={"train": 3, "valid": 3}, shape=SHAPE, spacing_jitter=0.2,
                         finding_rate=0.5, seed=3)
    return root, info


def _ds(root, **kw):
    kw.setdefault("preprocess", PRE)
    return CTRATEDataset(root, **kw)


def test_findings_and_helpers():
    assert CT_RATE_FINDINGS == CT_FINDINGS and len(CT_RATE_FINDINGS) == 18
    assert parse_xy_spacing("[0.75, 0.75]") == (0.75, 0.75)
    assert parse_xy_spacing("0.6") == (0.6, 0.6) and parse_xy_spacing("(0.5,0.7)") == (0.5, 0.7)
    with pytest.raises(ValueError):
        parse_xy_spacing("[]")
    assert report_text('Heart "enlarged" (cardiomegaly).', "Not given.") == "Heart enlarged cardiomegaly."
    assert report_text("Lungs clear.", "No pathology.") == "Lungs clear. No pathology."
    assert report_text("nan", None) == ""


def test_parsing_counts_labels_text(synth, monkeypatch):
    root, info = synth
    # Indexing must not open a volume.
    monkeypatch.setattr(nib, "load", lambda *a, **k: pytest.fail("a volume was read while indexing"))
    for split in ("train", "valid"):
        ds = _ds(root, split=split)
        names = info["names"][split]
        assert os.path.basename(ds.volume_dir) == f"{split}_fixed" and not ds.apply_rescale
        assert len(ds) == len(names) and ds.skipped == 0
        assert sorted(r[0] for r in ds.records) == sorted(names)
        by_name = dict(zip(names, info["labels"][split]))
        for record, labels in zip(ds.records, ds.labels):
            assert np.array_equal(labels.numpy(), by_name[record[0]])
        assert ds.classes == list(CT_RATE_FINDINGS)
    monkeypatch.undo()
    # The `dataset/` folder itself works as the root; raw release picked explicitly.
    raw = _ds(os.path.join(root, "dataset"), split="valid", volumes="valid", with_impressions=True)
    assert raw.apply_rescale and len(raw) == len(info["names"]["valid"])
    item = raw[0]
    assert item["image"].shape == (1, *SHAPE) and item["image"].dtype == torch.float32
    assert item["labels"].shape == (18,) and item["id"] == raw.records[0][0][:-len(".nii.gz")]
    assert item["text"].startswith("Trachea") and "(" not in item["text"]
    found = [CT_RATE_FINDINGS[j] for j in item["labels"].nonzero().ravel().tolist()]
    assert set(found) <= set(SYNTHETIC_CT_FINDINGS)
    assert len(raw.texts[0]) > len(_ds(root, split="valid", volumes="valid").texts[0])  # + impressions


def test_hu_conversion_and_the_fixed_double_rescale_trap(synth):
    root, info = synth
    raw = _ds(root, split="valid", volumes="valid")
    fixed = _ds(root, split="valid")                                # auto: valid_fixed, no rescale
    trap = _ds(root, split="valid", apply_rescale=True)             # override: rescale _fixed again
    stored = _ds(root, split="valid", volumes="valid", apply_rescale=False)
    meta = {r[0]: r for r in raw.records}
    for i, record in enumerate(fixed.records):
        name = record[0]
        spacing, hu = info["hu"]["valid"][name]
        hu_xyz = dhw_to_nifti(hu)
        j = [r[0] for r in raw.records].index(name)
        slope, intercept = meta[name][2], meta[name][3]
        assert np.array_equal(fixed.read_hu(i), np.rint(hu_xyz))                   # stored HU as is
        assert np.abs(raw.read_hu(j) - hu_xyz).max() <= slope / 2 + 1e-3            # slope·v + b
        assert np.allclose(trap.read_hu(i), slope * np.rint(hu_xyz) + intercept, atol=1e-3)
        assert np.allclose(stored.read_hu(j), np.rint((hu - intercept) / slope).transpose(1, 2, 0))
        # The file holds (x, y, z) with the spacing in the affine's diagonal.
        image = nib.load(record[1])
        assert image.shape == (SHAPE[1], SHAPE[2], SHAPE[0])
        assert np.allclose(np.diag(image.affine)[:3], (spacing[1], spacing[2], spacing[0]))
        # End to end: the item equals CTPreprocess of the known HU volume in (D, H, W) order.
        expected = PRE(np.rint(hu), spacing, axes="dhw")
        assert (fixed[i]["image"] - expected).abs().max().item() < 1e-6
        assert (raw[j]["image"] - expected).abs().max().item() <= 1e-3 * (slope / 2 + 0.5) + 1e-6
    assert any(meta[n][3] != 0 for n in meta)                       # the trap would shift voxels
    assert any(abs(raw.records[j][4][0] - 1.5) > 1e-3 for j in range(len(raw)))     # jittered spacing


def _copy(synth, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(synth[0], root)
    return root


def _edit_csv(path, edit):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = list(rows[0])
    rows = [r for r in (edit(dict(r)) for r in rows) if r is not None]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def _break(root, names):
    """Five kinds of bad volume; returns the names of the two that fail only when loaded."""
    d = os.path.join(root, "dataset")
    no_meta, nan_slope, no_label, unreadable, flat = names[:5]
    _edit_csv(os.path.join(d, "metadata", "validation_metadata.csv"),
              lambda r: None if r["VolumeName"] == no_meta else
              {**r, "RescaleSlope": "nan"} if r["VolumeName"] == nan_slope else r)
    _edit_csv(os.path.join(d, "multi_abnormality_labels", "valid_predicted_labels.csv"),
              lambda r: None if r["VolumeName"] == no_label else r)
    paths = {f: os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(d, "valid")) for f in fs}
    with open(paths[unreadable], "wb") as f:
        f.write(b"\x1f\x8b this is not a NIfTI")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), paths[flat])
    return unreadable, flat


def test_bad_volumes_skipped_with_reasons_also_in_workers(synth, tmp_path):
    root = _copy(synth, tmp_path)
    names = sorted(synth[1]["names"]["valid"])
    assert len(names) >= 7
    # The two load-time failures must not be neighbours (a skip serves the next volume).
    order = [names[0], names[1], names[2], names[3], names[5], names[4], *names[6:]]
    unreadable, flat = _break(root, order)
    with pytest.raises(DataError, match="metadata"):
        _ds(root, split="valid", volumes="valid")
    ds = _ds(root, split="valid", volumes="valid", on_error="skip")
    assert dict(ds.skip_reasons) == {"missing metadata row": 1, "non-finite rescale slope/intercept": 1,
                                     "missing labels row": 1}
    assert len(ds) == len(names) - 3
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=lambda items: [i["id"] for i in items])
    ids = [i for batch in loader for i in batch]
    assert len(ids) == len(ds)
    assert ds.skip_reasons["unreadable volume"] == 1 and ds.skip_reasons["wrong rank"] == 1
    assert ds.skipped == 5
    raising = _ds(root, split="valid", volumes="valid", on_error="skip")
    raising.on_error = "raise"
    bad = [i for i, r in enumerate(raising.records) if r[0] == unreadable][0]
    with pytest.raises(DataError, match=unreadable):
        raising[bad]


def test_cache_round_trip_equals_uncached(synth, tmp_path):
    root = _copy(synth, tmp_path)
    names = sorted(synth[1]["names"]["valid"])
    unreadable, _ = _break(root, [names[i] for i in (6, 5, 4, 0, 2)])    # unreadable: names[0]
    plain = _ds(root, split="valid", volumes="valid", on_error="skip")
    cached = _ds(root, split="valid", volumes="valid", on_error="skip", cache_dir=str(tmp_path / "cache"))
    summary = cached.build_cache()
    assert summary == {"cached": len(plain) - 2, "built": len(plain) - 2,
                       "skipped": {"unreadable volume": 1, "wrong rank": 1}}
    assert unreadable not in [r[0] for r in cached.records] and cached.skipped == 5
    assert cached.build_cache()["built"] == 0                      # everything already there
    files = [f for dp, _, fs in os.walk(cached.cache.folder) for f in fs if f.endswith(".npy")]
    assert len(files) == len(cached)
    by_id = {plain[i]["id"]: plain[i] for i in range(len(plain)) if plain.records[i][0] in
             {r[0] for r in cached.records}}
    for i in range(len(cached)):
        item = cached[i]
        ref = by_id[item["id"]]
        assert (item["image"] - ref["image"]).abs().max().item() <= cached.cache.step / 2 + 1e-6
        assert torch.equal(item["labels"], ref["labels"]) and item["text"] == ref["text"]
    # A different HU rule must not read the rescaled volumes' cache.
    other = _ds(root, split="valid", volumes="valid", on_error="skip", apply_rescale=False,
                cache_dir=str(tmp_path / "cache"))
    n_other = len(other)                                           # the NaN slope is not needed here
    assert n_other == len(plain) + 1 and other.build_cache()["built"] == n_other - 2


def test_render_findings_and_shift():
    rng = lambda: np.random.default_rng(0)   # noqa: E731
    clean = render_ct((), SHAPE, rng=rng())
    assert clean.dtype == np.float32 and clean.shape == SHAPE
    assert clean.min() < -900 and clean.max() > 300                 # air / lung and bone
    effusion = render_ct(("Pleural effusion",), SHAPE, rng=rng())
    emphysema = render_ct(("Emphysema",), SHAPE, rng=rng())
    assert (effusion > -300).sum() > (clean > -300).sum()           # fluid replaces lung
    assert (emphysema < -940).sum() > (clean < -940).sum()
    shifted = render_ct((), SHAPE, shift=1.0, rng=rng())
    lung = (clean > -900) & (clean < -800)
    assert np.median(shifted[lung]) > np.median(clean[lung]) + 50
    with pytest.raises(ValueError, match="renderable"):
        render_ct(("Hiatal hernia",), SHAPE)
