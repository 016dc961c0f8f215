"""Zero-shot classification sets: CheXpert 5×200, NIH ChestX-ray14 and generic folder/CSV sets."""
from __future__ import annotations

import os

import numpy as np
import torch

from acelora.config import CHEXPERT_FINDINGS
from acelora.data._common import DataError, ImageDataset, find_file, read_csv, read_list
from acelora.data.images import load_image
from acelora.data.labels import CHEXPERT_5X200_CLASSES, NIH_FINDINGS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")


class _LabelledImages(ImageDataset):
    """Records ``(id, path, label)``; items ``dict(image, label int, id)``."""

    def _load(self, index: int) -> dict:
        item_id, path, label = self.records[index]
        return {"image": self._image_tensor(load_image(path)), "label": int(label), "id": item_id,
                "path": path}

    @property
    def targets(self) -> list[int]:
        return [record[2] for record in self.records]


class CheXpert5x200Dataset(_LabelledImages):
    """CheXpert 5×200 (GLoRIA's split): a CSV with ``Path`` and the 14 CheXpert findings, each row
    positive for exactly one of Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion.

    ``root_or_csv``: the CSV itself, or a folder holding ``chexpert_5x200.csv``. ``Path`` is
    resolved against ``image_root`` (default: the CSV's folder); a leading
    ``CheXpert-v1.0[-small]/`` component that is not on disk is tolerated.
    """

    CSV_NAMES = ("chexpert_5x200.csv", "chexpert_5x200.csv.gz")

    def __init__(self, root_or_csv: str, transform=None, image_root: str | None = None,
                 on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        if os.path.isdir(root_or_csv):
            csv_path = find_file(root_or_csv, self.CSV_NAMES, "CheXpert 5x200 CSV")
        else:
            csv_path = root_or_csv
        self.csv_path = csv_path
        self.image_root = image_root or os.path.dirname(os.path.abspath(csv_path))
        self.classes = list(CHEXPERT_5X200_CLASSES)
        rows = read_csv(csv_path, ("Path", *CHEXPERT_5X200_CLASSES))
        for line_no, row in enumerate(rows, start=2):
            rel = row["Path"].strip()
            try:
                positives = [i for i, c in enumerate(self.classes) if _is_positive(row[c])]
            except DataError as exc:
                raise DataError(f"{csv_path}:{line_no}: {exc}") from None
            if len(positives) != 1:
                self._bad_record("not exactly one class", f"{csv_path}:{line_no}: {rel} is positive for "
                                 f"{[self.classes[i] for i in positives]}; expected exactly one of {self.classes}")
                continue
            path = self._resolve(rel)
            if check_files and path is None:
                self._bad_record("missing image", f"image file not found: {os.path.join(self.image_root, rel)!r}")
                continue
            self.records.append((rel, path or os.path.join(self.image_root, rel), positives[0]))
        self._check_nonempty(csv_path)

    def _resolve(self, rel: str) -> str | None:
        candidates = [os.path.join(self.image_root, rel)]
        parts = rel.replace("\\", "/").split("/", 1)
        if len(parts) == 2 and parts[0].lower().startswith("chexpert"):
            candidates.append(os.path.join(self.image_root, parts[1]))
        return next((c for c in candidates if os.path.isfile(c)), None)


def _is_positive(value: str) -> bool:
    value = value.strip()
    try:
        return value != "" and float(value) == 1.0
    except ValueError:
        raise DataError(f"not a label value: {value!r}") from None


class NIHChestXray14Dataset(ImageDataset):
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` ("Finding Labels" joined by "|"; "No Finding"
    = all zero) and ``train_val_list.txt`` / ``test_list.txt``. Images under ``images/`` or the
    Kaggle layout ``images_*/images/``.

    Item ``dict(image, labels FloatTensor[14], id)`` in :data:`NIH_FINDINGS` order (``classes``).
    """

    CSV_NAMES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
    LISTS = {"test": "test_list.txt", "train_val": "train_val_list.txt"}

    def __init__(self, root: str, split: str | None = "test", transform=None,
                 on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        if split is not None and split not in self.LISTS:
            raise ValueError(f"split must be 'test', 'train_val' or None (all), got {split!r}")
        if not os.path.isdir(root):
            raise DataError(f"NIH ChestX-ray14 root is not a directory: {root!r}")
        self.root, self.split = root, split
        self.classes = list(NIH_FINDINGS)
        csv_path = find_file(root, self.CSV_NAMES, "NIH Data_Entry CSV")
        rows = read_csv(csv_path, ("Image Index", "Finding Labels"))
        wanted = set(read_list(os.path.join(root, self.LISTS[split]))) if split else None
        folders = self._image_folders(root)
        # One directory listing per folder instead of a stat per image and folder (112k images).
        where: dict[str, str] = {}
        if check_files:
            for folder in reversed(folders):
                if os.path.isdir(folder):
                    where.update((entry.name, folder) for entry in os.scandir(folder))
        index_of = {name: i for i, name in enumerate(self.classes)}
        labels = []
        for line_no, row in enumerate(rows, start=2):
            name = row["Image Index"].strip()
            if wanted is not None and name not in wanted:
                continue
            vector = np.zeros(len(self.classes), dtype=np.float32)
            for finding in row["Finding Labels"].split("|"):
                finding = finding.strip()
                if finding in ("", "No Finding"):
                    continue
                if finding not in index_of:
                    raise DataError(f"{csv_path}:{line_no}: unknown finding {finding!r}; "
                                    f"expected one of {self.classes} or 'No Finding'")
                vector[index_of[finding]] = 1.0
            folder = where.get(name) if check_files else folders[0]
            path = os.path.join(folder, name) if folder is not None else None
            if path is None:
                self._bad_record("missing image", f"image file not found: {name!r} under {folders}")
                continue
            self.records.append((name, path))
            labels.append(vector)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, len(self.classes)))
        self._check_nonempty(f"{csv_path} (split={split})")

    @staticmethod
    def _image_folders(root: str) -> list[str]:
        folders = [os.path.join(root, "images")]
        for entry in sorted(os.listdir(root)):
            nested = os.path.join(root, entry, "images")
            if entry.startswith("images_") and os.path.isdir(nested):
                folders.append(nested)
        return [f for f in folders if os.path.isdir(f)] or [os.path.join(root, "images")]

    def _load(self, index: int) -> dict:
        name, path = self.records[index]
        return {"image": self._image_tensor(load_image(path)), "labels": self.labels[index].clone(),
                "id": name, "path": path}


class ImageFolderClassification(_LabelledImages):
    """``root/<class name>/<image>``: one sub-folder per class, classes in sorted order."""

    def __init__(self, root: str, transform=None, on_error: str = "raise"):
        super().__init__(transform, on_error)
        if not os.path.isdir(root):
            raise DataError(f"image folder root is not a directory: {root!r}")
        self.root = root
        self.classes = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
        if not self.classes:
            raise DataError(f"{root!r} has no class sub-folders")
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_SUFFIXES):
                        path = os.path.join(dirpath, file)
                        self.records.append((os.path.relpath(path, root), path, label))
        self._check_nonempty(root)


class CSVClassification(_LabelledImages):
    """A CSV with an image-path column and a class column (names or integer ids).

    ``classes`` defaults to the sorted distinct names in ``label_col``; pass it to fix the order
    (integer labels then index into it).
    """

    def __init__(self, csv: str, image_col: str = "path", label_col: str = "label",
                 root: str | None = None, transform=None, classes: list[str] | None = None,
                 on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        rows = read_csv(csv, (image_col, label_col))
        self.root = root or os.path.dirname(os.path.abspath(csv))
        values = [row[label_col].strip() for row in rows]
        if classes is None and values and all(v.lstrip("-").isdigit() for v in values):
            # Prompts are built from class names: "a chest X-ray image of 0." means nothing.
            shown = ", ".join(sorted(set(values), key=int)[:6])
            raise DataError(f"{csv}: the label column {label_col!r} holds integer class ids ({shown}) "
                            "but no class names were given; pass the names in id order (--classes "
                            "NAME0 NAME1 ...)")
        self.classes = list(classes) if classes is not None else sorted(set(values))
        index_of = {name: i for i, name in enumerate(self.classes)}
        for line_no, (row, value) in enumerate(zip(rows, values), start=2):
            if value in index_of:
                label = index_of[value]
            elif classes is not None and value.lstrip("-").isdigit() and 0 <= int(value) < len(self.classes):
                label = int(value)
            else:
                raise DataError(f"{csv}:{line_no}: label {value!r} is not one of {self.classes}")
            path = os.path.join(self.root, row[image_col].strip())
            if check_files and not os.path.isfile(path):
                self._bad_record("missing image", f"image file not found: {path!r}")
                continue
            self.records.append((row[image_col].strip(), path, label))
        self._check_nonempty(csv)


__all__ = ["CheXpert5x200Dataset", "NIHChestXray14Dataset", "ImageFolderClassification",
           "CSVClassification", "CHEXPERT_FINDINGS"]
