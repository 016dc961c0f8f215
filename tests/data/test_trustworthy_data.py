"""Issue 13, item 6 (data): a DICOM whose rescale or window values are not finite is unreadable
(named; skipped and counted, or an error), and integer class labels need class names."""
import json
import warnings

import numpy as np
import pydicom
import pytest

from acelora.cli import main
from acelora.data._common import DataError
from acelora.data.images import read_dicom
from acelora.data.synthetic import write_dicom


def _edit(path, **tags):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that "NaN" is not a valid DS value
        ds = pydicom.dcmread(path)
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(path)


@pytest.mark.parametrize("tags", [{"RescaleSlope": "NaN"}, {"RescaleIntercept": "inf"},
                                  {"WindowCenter": "NaN"}, {"WindowWidth": ["nan", "400"]}])
def test_non_finite_rescale_or_window_is_unreadable(tmp_path, tags):
    path = str(tmp_path / "x.dcm")
    write_dicom(path, np.random.default_rng(0).random((8, 8)), bits=12, rescale=(1.0, 0.0),
                window=(2000.0, 3000.0))
    assert np.isfinite(read_dicom(path)).all()
    _edit(path, **tags)
    name = next(iter(tags))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=f"x.dcm: {name}.*not finite.*unreadable"):
            read_dicom(path)


def test_non_finite_dicom_is_skipped_and_counted_or_raised(tmp_path, capsys):
    from acelora.data import synthetic

    root = tmp_path / "rsna"
    synthetic.write_rsna(str(root), n=6, seed=2, image_size=64)
    bad = str(sorted(root.rglob("*.dcm"))[0])
    _edit(bad, RescaleSlope="NaN")
    argv = ["eval", "zeroshot", "--model", "tiny", "--random-weights", "--dataset", "rsna", "--data-root",
            str(root), "--split", "all", "--out", str(tmp_path / "out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
        report = json.loads((tmp_path / "out" / "zeroshot_rsna.json").read_text())
        assert report["skipped"] == 1 and report["n"] == 5
        assert any("RescaleSlope" in e for e in report["skipped_examples"])
        assert main(argv + ["--on-error", "raise"]) == 2
    assert "RescaleSlope" in capsys.readouterr().err


def test_integer_labels_need_class_names(tmp_path, capsys):
    from PIL import Image

    from acelora.data.classification import CSVClassification

    rows = ["path,label"]
    for i in range(4):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="integer class ids.*--classes"):
        CSVClassification(str(tmp_path / "labels.csv"))
    assert CSVClassification(str(tmp_path / "labels.csv"), classes=["normal", "effusion"]).classes == \
        ["normal", "effusion"]
    argv = ["eval", "zeroshot", "--model", "tiny", "--random-weights", "--dataset", "csv", "--data-root",
            str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "--classes" in capsys.readouterr().err
    assert main(argv + ["--classes", "normal", "effusion"]) == 0
