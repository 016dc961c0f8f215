"""Histopathology zero-shot sets in their official layouts: LC25000 and MHIST.

LC25000 (Borkowski et al. 2019; 25,000 768×768 JPEG tiles, 5,000 per class)::

    lung_colon_image_set/
      lung_image_sets/{lung_aca,lung_n,lung_scc}/lungaca1.jpeg ...
      colon_image_sets/{colon_aca,colon_n}/colonca1.jpeg ...

It ships without a split. ``split="all"`` (the default) gives every image; ``"train"`` /
``"test"`` a deterministic hold-out (see :func:`lc25000_split`). The 25,000 tiles are
augmentations of 750 source images and the file names do not say which, so the hold-out cannot
group them: fine for zero-shot testing, optimistic for anything trained on ``"train"``.

MHIST (Wei et al. 2021; 3,152 224×224 PNG colorectal polyp tiles)::

    annotations.csv   Image Name, Majority Vote Label (HP | SSA),
                      Number of Annotators who Selected SSA (Out of 7), Partition (train | test)
    images/MHIST_aaa.png ...

Items of both: ``dict(image, label int, id, path)``, like the chest classification sets.
"""
from __future__ import annotations

import os

from acelora.data._common import DataError, find_file, read_csv, stable_fraction
from acelora.data.classification import _LabelledImages

LC25000_FOLDER = "lung_colon_image_set"
# task -> (its folder, [(class folder, class name as the prompts say it), ...]) in label order.
LC25000_TASKS = {
    "lung": ("lung_image_sets", (("lung_aca", "lung adenocarcinoma"),
                                 ("lung_n", "benign lung"),
                                 ("lung_scc", "lung squamous cell carcinoma"))),
    "colon": ("colon_image_sets", (("colon_aca", "colon adenocarcinoma"),
                                   ("colon_n", "benign colonic tissue"))),
}
LC25000_TEST_FRACTION = 0.2
LC25000_SUFFIXES = (".jpeg", ".jpg", ".png")

MHIST_CSV = "annotations.csv"
MHIST_COLUMNS = ("Image Name", "Majority Vote Label", "Partition")
MHIST_VOTES_COLUMN = "Number of Annotators who Selected SSA (Out of 7)"
# label code in the CSV -> class name, in label order.
MHIST_LABELS = {"HP": "hyperplastic polyp", "SSA": "sessile serrated adenoma"}
SPLITS = ("all", "train", "test")


def _check_split(split: str | None) -> str:
    split = "all" if split is None else str(split).lower()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (None = all), got {split!r}")
    return split


def lc25000_split(class_folder: str, file_name: str,
                  test_fraction: float = LC25000_TEST_FRACTION) -> str:
    """The hold-out of one LC25000 tile: ``"test"`` when the MD5-based number of
    ``"{class_folder}/{file_name}"`` (:func:`~acelora.data._common.stable_fraction`, the first 8
    digest bytes little-endian over 2**64) is below ``test_fraction``, else ``"train"``. Fixed by
    the names alone, so the same on every machine; a smaller fraction's test set is a subset of a
    larger one's."""
    return "test" if stable_fraction(f"{class_folder}/{file_name}") < test_fraction else "train"


def lc25000_image_set(root: str) -> str:
    """The ``lung_colon_image_set`` folder: ``root`` itself or its child of that name."""
    if not os.path.isdir(root):
        raise DataError(f"LC25000 root is not a directory: {root!r}")
    nested = os.path.join(root, LC25000_FOLDER)
    if os.path.isdir(nested):
        return nested
    if any(os.path.isdir(os.path.join(root, folder)) for folder, _ in LC25000_TASKS.values()):
        return root
    raise DataError(f"LC25000 not found under {root!r}: expected {LC25000_FOLDER}/ or its "
                    f"{' / '.join(f for f, _ in LC25000_TASKS.values())} folders")


class LC25000Dataset(_LabelledImages):
    """One LC25000 task: ``task="lung"`` (3 classes) or ``"colon"`` (2 classes).

    ``root``: the folder holding ``lung_colon_image_set/`` or that folder itself. ``classes`` are
    the names the prompts use (``folders`` the folder names, same order). ``split``: ``"all"``
    (default), ``"train"`` or ``"test"`` of the hold-out of :func:`lc25000_split`. A missing task
    or class folder, or a class folder without images, is a :class:`DataError` naming it;
    undecodable images are found at load time (``on_error`` as for every dataset).
    """

    def __init__(self, root: str, task: str = "lung", split: str | None = "all", transform=None,
                 on_error: str = "raise", test_fraction: float = LC25000_TEST_FRACTION):
        super().__init__(transform, on_error)
        if task not in LC25000_TASKS:
            raise ValueError(f"task must be one of {sorted(LC25000_TASKS)}, got {task!r}")
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.task, self.split, self.test_fraction = task, _check_split(split), float(test_fraction)
        self.image_set = lc25000_image_set(root)
        task_folder, classes = LC25000_TASKS[task]
        task_dir = os.path.join(self.image_set, task_folder)
        if not os.path.isdir(task_dir):
            raise DataError(f"LC25000 {task} folder not found: {task_dir!r}")
        self.folders = [folder for folder, _ in classes]
        self.classes = [name for _, name in classes]
        for label, folder in enumerate(self.folders):
            class_dir = os.path.join(task_dir, folder)
            if not os.path.isdir(class_dir):
                raise DataError(f"LC25000 class folder not found: {class_dir!r} (expected "
                                f"{self.folders} under {task_dir!r})")
            files = sorted(e.name for e in os.scandir(class_dir)
                           if e.is_file() and e.name.lower().endswith(LC25000_SUFFIXES))
            if not files:
                raise DataError(f"LC25000 class folder {class_dir!r} holds no "
                                f"{'/'.join(LC25000_SUFFIXES)} images")
            for name in files:
                if self.split != "all" and lc25000_split(folder, name, self.test_fraction) != self.split:
                    continue
                self.records.append((f"{folder}/{name}", os.path.join(class_dir, name), label))
        self._check_nonempty(f"{task_dir!r} (split={self.split})")


class MHISTDataset(_LabelledImages):
    """MHIST: hyperplastic polyp (HP, label 0) vs sessile serrated adenoma (SSA, label 1).

    ``root``: the folder holding ``annotations.csv`` (or the CSV itself); images in
    ``image_root`` (default ``<root>/images``). ``split``: the CSV's ``Partition`` (``"test"``
    by default, the published evaluation set), ``"train"``, or ``"all"``. ``ssa_votes`` keeps
    how many of the 7 pathologists chose SSA per item (None when the column is absent).
    """

    def __init__(self, root: str, split: str | None = "test", transform=None,
                 image_root: str | None = None, on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        self.split = _check_split(split)
        if os.path.isdir(root):
            csv_path = find_file(root, (MHIST_CSV,), "MHIST annotations CSV")
        elif os.path.isfile(root):
            csv_path = root
        else:
            raise DataError(f"MHIST root is neither a folder nor a CSV file: {root!r}")
        self.csv_path = csv_path
        self.image_root = image_root or os.path.join(os.path.dirname(os.path.abspath(csv_path)), "images")
        if not os.path.isdir(self.image_root):
            raise DataError(f"MHIST images folder not found: {self.image_root!r} (unzip images.zip "
                            "there, or pass image_root)")
        self.classes = list(MHIST_LABELS.values())
        codes = list(MHIST_LABELS)
        rows = read_csv(csv_path, MHIST_COLUMNS)
        present = set(e.name for e in os.scandir(self.image_root)) if check_files else None
        self.ssa_votes: list[int | None] = []
        for line_no, row in enumerate(rows, start=2):
            name = row["Image Name"].strip()
            code = row["Majority Vote Label"].strip().upper()
            partition = row["Partition"].strip().lower()
            if code not in MHIST_LABELS:
                raise DataError(f"{csv_path}:{line_no}: column 'Majority Vote Label' is {code!r}; "
                                f"expected one of {codes}")
            if partition not in ("train", "test"):
                raise DataError(f"{csv_path}:{line_no}: column 'Partition' is {partition!r}; "
                                "expected 'train' or 'test'")
            if self.split != "all" and partition != self.split:
                continue
            if present is not None and name not in present:
                self._bad_record("missing image", f"image file not found: "
                                 f"{os.path.join(self.image_root, name)!r} ({csv_path}:{line_no})")
                continue
            self.records.append((name, os.path.join(self.image_root, name), codes.index(code)))
            self.ssa_votes.append(_votes(row.get(MHIST_VOTES_COLUMN), csv_path, line_no))
        self._check_nonempty(f"{csv_path} (split={self.split})")


def _votes(value: str | None, csv_path: str, line_no: int) -> int | None:
    if value is None or not value.strip():
        return None
    try:
        votes = int(float(value))
    except ValueError:
        votes = -1
    if not 0 <= votes <= 7:
        raise DataError(f"{csv_path}:{line_no}: column {MHIST_VOTES_COLUMN!r} is {value!r}; "
                        "expected a count from 0 to 7")
    return votes


__all__ = ["LC25000Dataset", "MHISTDataset", "LC25000_TASKS", "MHIST_LABELS", "lc25000_split",
           "lc25000_image_set"]
