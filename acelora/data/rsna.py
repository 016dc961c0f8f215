"""RSNA Pneumonia Detection (Kaggle) in its official layout (DESIGN §8).

``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target): one row per box, one row
with empty box fields when Target=0; images ``stage_2_train_images/<patientId>.dcm``. There is no
official labelled test split: ``split`` assigns patients deterministically (an md5 hash of the
patientId) to train/valid/test by ``fractions``.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from acelora.data._common import DataError, ImageDataset, find_file, hash_split, read_csv
from acelora.data.images import load_image

SPLITS = ("train", "valid", "test")
BOX_FORMATS = ("pixels", "normalized")


class RSNAPneumoniaDataset(ImageDataset):
    """Binary pneumonia classification (``classes = ["No Finding", "pneumonia"]``) with boxes.

    Item ``dict(image, label int, id, boxes FloatTensor[n, 4])``, boxes xyxy. With
    ``box_format="pixels"`` they are pixel coordinates of the *output* image: the transform's
    ``map_boxes`` (see :class:`BiomedCLIPTransform`) maps them; without a transform they are in the
    original image's pixels. ``"normalized"``: fractions of the original width/height (any transform).
    """

    LABEL_CSV = ("stage_2_train_labels.csv", "stage_2_train_labels.csv.gz")
    IMAGE_DIRS = ("stage_2_train_images", "stage_1_train_images")

    def __init__(self, root: str, split: str | None = "test", transform=None,
                 fractions=(0.7, 0.15, 0.15), box_format: str = "pixels", on_error: str = "raise",
                 check_files: bool = True):
        super().__init__(transform, on_error)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None (all), got {split!r}")
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
        if box_format == "pixels" and transform is not None and not hasattr(transform, "map_boxes"):
            raise ValueError("box_format='pixels' needs a transform with map_boxes(boxes, (w, h)) "
                             "(e.g. biomedclip_transform()); use box_format='normalized' otherwise")
        if not os.path.isdir(root):
            raise DataError(f"RSNA root is not a directory: {root!r}")
        self.root, self.split, self.box_format = root, split, box_format
        self.classes = ["No Finding", "pneumonia"]
        csv_path = find_file(root, self.LABEL_CSV, "RSNA label CSV")
        image_dir = next((os.path.join(root, d) for d in self.IMAGE_DIRS
                          if os.path.isdir(os.path.join(root, d))), os.path.join(root, self.IMAGE_DIRS[0]))

        boxes: OrderedDict[str, list[list[float]]] = OrderedDict()
        targets: dict[str, int] = {}
        for line_no, row in enumerate(read_csv(csv_path, ("patientId", "x", "y", "width", "height", "Target")),
                                      start=2):
            pid = row["patientId"].strip()
            try:
                target = int(float(row["Target"]))
                fields = [row[k].strip() for k in ("x", "y", "width", "height")]
                box = [float(v) for v in fields] if all(fields) else None
            except ValueError as exc:
                raise DataError(f"{csv_path}:{line_no}: {exc}") from None
            if target not in (0, 1) or (target == 1) != (box is not None) or \
                    targets.get(pid, target) != target:
                raise DataError(f"{csv_path}:{line_no}: patient {pid} has Target={row['Target']!r} "
                                f"and box {fields}; Target=1 rows need a box, Target=0 rows none, "
                                "and all rows of a patient the same Target")
            targets[pid] = target
            boxes.setdefault(pid, [])
            if box is not None:
                x, y, w, h = box
                boxes[pid].append([x, y, x + w, y + h])

        for pid, patient_boxes in boxes.items():
            if split is not None and hash_split(pid, fractions) != split:
                continue
            path = os.path.join(image_dir, f"{pid}.dcm")
            if check_files and not os.path.isfile(path):
                self._bad_record("missing image", f"image file not found: {path!r}")
                continue
            self.records.append((pid, path, targets[pid], patient_boxes))
        self._check_nonempty(f"{csv_path} (split={split})")

    @property
    def targets(self) -> list[int]:
        return [record[2] for record in self.records]

    def _load(self, index: int) -> dict:
        pid, path, label, boxes = self.records[index]
        image = load_image(path)
        width, height = image.size
        box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.box_format == "normalized":
            box_tensor = box_tensor / torch.tensor([width, height, width, height], dtype=torch.float32)
        elif self.transform is not None:
            box_tensor = self.transform.map_boxes(box_tensor, (width, height))
        return {"image": self._image_tensor(image), "label": label, "id": pid, "path": path,
                "boxes": box_tensor}
