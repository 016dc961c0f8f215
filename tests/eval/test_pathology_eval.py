"""``acelora eval zeroshot --dataset lc25000-lung|lc25000-colon|mhist`` end to end on the tiny model
and synthetic copies of the official layouts."""
import json
import shutil

import pytest

from acelora.cli import main
from acelora.data.pathology import LC25000Dataset, MHISTDataset
from acelora.data.synthetic_pathology import write_lc25000, write_mhist
from acelora.eval.prompts import PATHOLOGY_TEMPLATES, default_templates

N_PER_CLASS = 4


@pytest.fixture(scope="module")
def lc25000(tmp_path_factory):
    return write_lc25000(str(tmp_path_factory.mktemp("lc")), n_per_class=N_PER_CLASS, seed=5,
                         image_size=48)


@pytest.fixture(scope="module")
def mhist(tmp_path_factory):
    return write_mhist(str(tmp_path_factory.mktemp("mhist")), n=14, seed=6, image_size=48)


def _zeroshot(dataset, root, out, *extra):
    assert main(["eval", "zeroshot", "--model", "tiny", "--random-weights", "--device", "cpu",
                 "--dataset", dataset, "--data-root", root, "--out", str(out), "--batch-size", "8",
                 *extra]) == 0
    with open(out / f"zeroshot_{dataset}.json") as f:
        return json.load(f)


def _check(report, n, classnames):
    assert report["n"] == n and report["classnames"] == classnames
    assert report["templates"] == list(PATHOLOGY_TEMPLATES)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert 0.0 <= report[key] <= 1.0, key
    assert sum(map(sum, report["confusion_matrix"])) == n


def test_lc25000_lung_all_images_by_default(lc25000, tmp_path, capsys):
    report = _zeroshot("lc25000-lung", lc25000["root"], tmp_path)
    _check(report, 3 * N_PER_CLASS,
           ["lung adenocarcinoma", "benign lung", "lung squamous cell carcinoma"])
    assert report["skipped"] == 0 and "lc25000-lung: n=12" in capsys.readouterr().out


def test_lc25000_colon_hold_out_and_corrupt_image(lc25000, tmp_path):
    n_test = len(LC25000Dataset(lc25000["root"], task="colon", split="test"))
    assert 0 < n_test < 2 * N_PER_CLASS
    report = _zeroshot("lc25000-colon", lc25000["root"], tmp_path / "test", "--split", "test")
    _check(report, n_test, ["colon adenocarcinoma", "benign colonic tissue"])
    # An undecodable tile is counted, the rest evaluated.
    root = shutil.copytree(lc25000["root"], tmp_path / "copy")
    bad = LC25000Dataset(str(root), task="colon").records[0][1]
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8 truncated")
    report = _zeroshot("lc25000-colon", str(root), tmp_path / "bad")
    assert report["n"] == 2 * N_PER_CLASS - 1 and report["skipped"] == 1


def test_mhist_test_partition_by_default_and_split_all(mhist, tmp_path):
    n_test = sum(m["partition"] == "test" for m in mhist["images"].values())
    classes = ["hyperplastic polyp", "sessile serrated adenoma"]
    _check(_zeroshot("mhist", mhist["root"], tmp_path / "test"), n_test, classes)
    _check(_zeroshot("mhist", mhist["root"], tmp_path / "all", "--split", "all"), 14, classes)


def test_pathology_templates_are_the_default_only_for_pathology_sets(mhist):
    assert default_templates(MHISTDataset(mhist["root"])) == PATHOLOGY_TEMPLATES
    assert default_templates(object()) != PATHOLOGY_TEMPLATES
