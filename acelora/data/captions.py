"""Plain image–caption training pairs from one CSV (e.g. a Quilt-1M style export).

::

    captions.csv      image, caption[, label ...]
    images/0001.png   (image paths relative to the CSV's folder, or absolute)

Items have the training contract of :class:`~acelora.data.mimic.MimicCXRDataset`:
``dict(image, text, id, path[, labels FloatTensor[L]])``, so ``acelora train`` and
:class:`~acelora.data.collate.ImageTextCollator` take them unchanged. ``labels`` (for the
label-guided loss, which treats two pairs as negatives only when their label vectors differ)
come from ``label_columns``:

* one column of class names (``"lung adenocarcinoma"``, several joined by ``"|"``): a multi-hot
  vector over :attr:`classes` (the sorted distinct names, or the ``classes`` given);
* one or more 0/1 columns (CheXpert style: ``1`` positive; ``0``, ``-1`` and blank negative):
  one entry per column.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from acelora.data._common import DataError, ImageDataset, find_file, read_csv
from acelora.data.images import load_image

CAPTION_CSV = "captions.csv"
_BINARY_VALUES = {"": 0.0, "0": 0.0, "0.0": 0.0, "-1": 0.0, "-1.0": 0.0, "1": 1.0, "1.0": 1.0}


def _columns(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return [str(c).strip() for c in value]


class ImageCaptionDataset(ImageDataset):
    """Image–caption pairs listed in a CSV.

    ``csv_or_root``: the CSV, or a folder holding ``captions.csv``. ``image_column`` /
    ``caption_column`` name the columns (defaults ``image`` / ``caption``); image paths resolve
    against ``image_root`` (default: the CSV's folder). ``label_columns`` (a list, or a
    comma-separated string): see the module docstring; ``classes`` fixes the order of a name
    column's classes. Rows with an empty caption or a missing image are dropped and counted
    (``on_error="skip"``) or raise (``"raise"``); a label value that is neither a known class
    nor 0/1 is always a :class:`DataError` naming the file, line and column.
    """

    def __init__(self, csv_or_root: str, image_column: str = "image", caption_column: str = "caption",
                 label_columns: str | Sequence[str] | None = None, transform=None,
                 image_root: str | None = None, classes: Sequence[str] | None = None,
                 on_error: str = "raise", check_files: bool = True):
        super().__init__(transform, on_error)
        if os.path.isdir(csv_or_root):
            csv_path = find_file(csv_or_root, (CAPTION_CSV, CAPTION_CSV + ".gz"), "caption CSV")
        else:
            csv_path = csv_or_root
        self.csv_path = csv_path
        self.image_root = image_root or os.path.dirname(os.path.abspath(csv_path))
        self.image_column, self.caption_column = image_column, caption_column
        self.label_columns = _columns(label_columns)
        rows = read_csv(csv_path, (image_column, caption_column, *self.label_columns))
        self.label_mode = self._label_mode(rows)
        if self.label_mode == "names":
            column = self.label_columns[0]
            found = sorted({n for row in rows for n in _names(row[column])})
            self.classes = list(classes) if classes is not None else found
        else:
            self.classes = list(self.label_columns)
        index_of = {name: i for i, name in enumerate(self.classes)}

        self.texts: list[str] = []
        labels = []
        for line_no, row in enumerate(rows, start=2):
            where = f"{csv_path}:{line_no}"
            rel, text = row[image_column].strip(), " ".join(row[caption_column].split())
            if not rel:
                self._bad_record("no image path", f"{where}: empty {image_column!r}")
                continue
            if not text:
                self._bad_record("empty caption", f"{where}: empty {caption_column!r} for {rel}")
                continue
            vector = self._label_vector(row, index_of, where) if self.label_mode else None
            path = os.path.join(self.image_root, rel)
            if check_files and not os.path.isfile(path):
                self._bad_record("missing image", f"image file not found: {path!r} ({where})")
                continue
            self.records.append((rel, path))
            self.texts.append(text)
            if vector is not None:
                labels.append(vector)
        self.labels = (torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, len(self.classes)))
                       if self.label_mode else None)
        self._check_nonempty(csv_path)

    def _label_mode(self, rows: list[dict]) -> str | None:
        if not self.label_columns:
            return None
        if len(self.label_columns) == 1:
            values = {row[self.label_columns[0]].strip() for row in rows}
            if not values <= set(_BINARY_VALUES):
                return "names"
        return "binary"

    def _label_vector(self, row: dict, index_of: dict[str, int], where: str) -> np.ndarray:
        vector = np.zeros(len(self.classes), dtype=np.float32)
        if self.label_mode == "names":
            column = self.label_columns[0]
            for name in _names(row[column]):
                if name not in index_of:
                    raise DataError(f"{where}: column {column!r} holds {name!r}, not one of "
                                    f"{self.classes}")
                vector[index_of[name]] = 1.0
            return vector
        for i, column in enumerate(self.label_columns):
            value = row[column].strip()
            if value not in _BINARY_VALUES:
                raise DataError(f"{where}: column {column!r} is {value!r}; expected 1, 0, -1 or blank")
            vector[i] = _BINARY_VALUES[value]
        return vector

    def _load(self, index: int) -> dict:
        rel, path = self.records[index]
        item = {"image": self._image_tensor(load_image(path)), "text": self.texts[index],
                "id": rel, "path": path}
        if self.labels is not None:
            item["labels"] = self.labels[index].clone()
        return item


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split("|") if n.strip()]


__all__ = ["ImageCaptionDataset", "CAPTION_CSV"]
