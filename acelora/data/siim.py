"""SIIM-ACR Pneumothorax Segmentation in its official layout (DESIGN §8).

``train-rle.csv`` with header "ImageId, EncodedPixels" (note the space): one row per mask
component, "-1" for no pneumothorax; the DICOM files ``<ImageId>.dcm`` anywhere below
``dicom-images-train/`` (the release nests them as study/series/instance). There is no official
labelled test split: ``split`` assigns images deterministically (md5 of the ImageId) by ``fractions``.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch

from acelora.data._common import DataError, ImageDataset, find_file, hash_split, read_csv
from acelora.data.images import load_image
from acelora.data.rle import EMPTY, rle_decode_union

SPLITS = ("train", "valid", "test")


def _check_rle(text: str) -> str | None:
    """None if ``text`` looks like a SIIM RLE, else what is wrong (cheap; no mask is built)."""
    text = text.strip()
    if text in ("", EMPTY):
        return None
    tokens = text.split()
    if len(tokens) % 2:
        return f"odd number of RLE values ({len(tokens)})"
    if not all(tok.isdigit() for tok in tokens):
        return "RLE values must be non-negative integers"
    return None


class SIIMPneumothoraxDataset(ImageDataset):
    """Binary pneumothorax classification (``classes = ["No Finding", "pneumothorax"]``).

    Item ``dict(image, label int, id)``; with ``with_mask=True`` also ``mask`` BoolTensor[H, W]:
    the OR of the image's RLE rows at the DICOM's size, carried through the transform's
    ``map_mask`` (see :class:`BiomedCLIPTransform`) so it matches the output image.
    """

    LABEL_CSV = ("train-rle.csv", "train-rle.csv.gz", "stage_2_train.csv")
    IMAGE_DIRS = ("dicom-images-train", "stage_2_images", "dicom-images-test")

    def __init__(self, root: str, split: str | None = "test", transform=None,
                 with_mask: bool = False, fractions=(0.7, 0.15, 0.15), on_error: str = "raise",
                 check_files: bool = True):
        super().__init__(transform, on_error)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None (all), got {split!r}")
        if with_mask and transform is not None and not hasattr(transform, "map_mask"):
            raise ValueError("with_mask=True needs a transform with map_mask(mask) "
                             "(e.g. biomedclip_transform()) or no transform")
        if not os.path.isdir(root):
            raise DataError(f"SIIM root is not a directory: {root!r}")
        self.root, self.split, self.with_mask = root, split, with_mask
        self.classes = ["No Finding", "pneumothorax"]
        csv_path = find_file(root, self.LABEL_CSV, "SIIM RLE CSV")

        rles: OrderedDict[str, list[str]] = OrderedDict()
        for line_no, row in enumerate(read_csv(csv_path, ("ImageId", "EncodedPixels")), start=2):
            problem = _check_rle(row["EncodedPixels"])
            if problem:
                raise DataError(f"{csv_path}:{line_no}: {problem} for ImageId {row['ImageId'].strip()}")
            rle = row["EncodedPixels"].strip()
            rles.setdefault(row["ImageId"].strip(), []).append(rle or EMPTY)

        files = self._index_dicoms(root)
        for image_id, image_rles in rles.items():
            if split is not None and hash_split(image_id, fractions) != split:
                continue
            path = files.get(image_id)
            if path is None:
                if check_files:
                    self._bad_record("missing image", f"no DICOM file {image_id}.dcm under {root!r}")
                    continue
                path = os.path.join(root, self.IMAGE_DIRS[0], f"{image_id}.dcm")
            positive = [r for r in image_rles if r != EMPTY]
            self.records.append((image_id, path, int(bool(positive)), positive))
        self._check_nonempty(f"{csv_path} (split={split})")

    def _index_dicoms(self, root: str) -> dict[str, str]:
        """ImageId → path of every .dcm below the image folders (names only; nothing is opened)."""
        dirs = [os.path.join(root, d) for d in self.IMAGE_DIRS if os.path.isdir(os.path.join(root, d))]
        files: dict[str, str] = {}
        for top in dirs or [root]:
            for dirpath, _, names in os.walk(top):
                for name in names:
                    if name.lower().endswith(".dcm"):
                        files.setdefault(name[:-4], os.path.join(dirpath, name))
        return files

    @property
    def targets(self) -> list[int]:
        return [record[2] for record in self.records]

    def _load(self, index: int) -> dict:
        image_id, path, label, rles = self.records[index]
        image = load_image(path)
        item = {"image": self._image_tensor(image), "label": label, "id": image_id,
                "path": path}
        if self.with_mask:
            width, height = image.size
            try:
                mask = rle_decode_union(rles, height, width)
            except ValueError as exc:
                raise DataError(f"{image_id}: RLE does not fit the {height}x{width} image {path!r}: {exc}") from None
            item["mask"] = self.transform.map_mask(mask) if self.transform is not None \
                else torch.from_numpy(np.ascontiguousarray(mask))
        return item
