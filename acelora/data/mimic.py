"""MIMIC-CXR-JPG image–report pairs in the official layout (DESIGN §8).

Expected under ``root`` (each CSV may also be ``.csv.gz``)::

    mimic-cxr-2.0.0-metadata.csv   dicom_id, subject_id, study_id, ViewPosition, ...
    mimic-cxr-2.0.0-split.csv      dicom_id, study_id, subject_id, split (train/validate/test)
    mimic-cxr-2.0.0-chexpert.csv   subject_id, study_id, the 14 CheXpert findings (1/0/-1/blank)
    files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports, either
      mimic_cxr_sectioned.csv      study (s50414267), findings, impression, ...   (report_source="csv")
      files/p10/p10000032/s50414267.txt                                           (report_source="txt")
"""
from __future__ import annotations

import os

import numpy as np
import torch

from acelora.config import CHEXPERT_FINDINGS
from acelora.data._common import DataError, ImageDataset, find_file, read_csv
from acelora.data.images import load_image
from acelora.data.labels import LabelPolicy
from acelora.data.reports import findings_impression, join_sections

FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "validate", "test")
_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate"}
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
SECTIONED_CSV = "mimic_cxr_sectioned.csv"


def _csv_path(root: str, name: str, what: str) -> str:
    return find_file(root, (name, name + ".gz"), what)


def study_dir(subject_id: str, study_id: str) -> str:
    """files/p{first two digits}/p{subject}/s{study} (relative)."""
    return os.path.join("files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}")


def _norm_id(value: str) -> str:
    # Ids are integers; pandas-written CSVs sometimes carry them as "10000032.0".
    value = value.strip()
    return value[:-2] if value.endswith(".0") else value


class MimicCXRDataset(ImageDataset):
    """Frontal (PA/AP) MIMIC-CXR-JPG images with their report text and CheXpert labels.

    Item: ``dict(image FloatTensor[3,H,W], text str, labels FloatTensor[14], id str)``; labels in
    :data:`acelora.config.CHEXPERT_FINDINGS` order through ``label_policy``; text = FINDINGS +
    IMPRESSION. One item per frontal image (a study with two frontal images gives two items).

    All annotations (CSVs and reports) are read when the dataset is built; images only in
    ``__getitem__``. ``on_error="skip"`` drops records with a missing image, missing labels or an
    empty report (counted in :attr:`skips`); ``"raise"`` stops at the first with a
    :class:`DataError` naming it.
    """

    def __init__(self, root: str, split: str | None = "train", transform=None,
                 label_policy: LabelPolicy | None = None, report_source: str = "auto",
                 on_error: str = "raise", reports_root: str | None = None,
                 check_files: bool = True):
        super().__init__(transform, on_error)
        if not os.path.isdir(root):
            raise DataError(f"MIMIC-CXR root is not a directory: {root!r}")
        split = _SPLIT_ALIASES.get(split, split)
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (or None for all), got {split!r}")
        if report_source not in ("auto", "csv", "txt"):
            raise ValueError(f"report_source must be 'auto', 'csv' or 'txt', got {report_source!r}")
        self.root = root
        self.split = split
        self.label_policy = label_policy or LabelPolicy()
        self.reports_root = reports_root or root
        self.classes = list(CHEXPERT_FINDINGS)

        if report_source == "auto":
            has_csv = any(os.path.isfile(os.path.join(self.reports_root, SECTIONED_CSV + gz))
                          for gz in ("", ".gz"))
            report_source = "csv" if has_csv else "txt"
        self.report_source = report_source

        metadata_path = _csv_path(root, METADATA_CSV, "MIMIC-CXR metadata CSV")
        split_path = _csv_path(root, SPLIT_CSV, "MIMIC-CXR split CSV")
        labels_path = _csv_path(root, CHEXPERT_CSV, "MIMIC-CXR CheXpert label CSV")
        metadata = read_csv(metadata_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        split_of = {row["dicom_id"].strip(): row["split"].strip()
                    for row in read_csv(split_path, ("dicom_id", "split"))}
        labels_of = self._read_labels(labels_path)
        reports = self._read_csv_reports() if report_source == "csv" else None

        texts, labels, self.views = [], [], {}
        for row in metadata:
            view = row["ViewPosition"].strip().upper()
            if view not in FRONTAL_VIEWS:
                continue
            dicom_id = row["dicom_id"].strip()
            if dicom_id not in split_of:
                self._bad_record("not in the split CSV", f"{dicom_id}: no row in {split_path}")
                continue
            if split is not None and split_of[dicom_id] != split:
                continue
            subject, study = _norm_id(row["subject_id"]), _norm_id(row["study_id"])
            rel = study_dir(subject, study)
            path = os.path.join(root, rel, f"{dicom_id}.jpg")
            if check_files and not os.path.isfile(path):
                self._bad_record("missing image", f"image file not found: {path!r}")
                continue
            if study not in labels_of:
                self._bad_record("no labels", f"study s{study}: no row in {labels_path}")
                continue
            text = self._report(study, rel, reports)
            if text is None:
                continue
            self.records.append((dicom_id, path))
            self.views[dicom_id] = view
            texts.append(text)
            labels.append(labels_of[study])
        self.texts = texts
        self.labels = torch.tensor(np.asarray(labels, dtype=np.float32).reshape(-1, len(self.classes)))
        self._check_nonempty(f"{root!r} (split={split})")

    # --- annotations
    def _read_labels(self, path: str) -> dict[str, list[float]]:
        rows = read_csv(path, ("study_id", *CHEXPERT_FINDINGS))
        labels = {}
        for line_no, row in enumerate(rows, start=2):
            try:
                labels[_norm_id(row["study_id"])] = [self.label_policy(row[f]) for f in CHEXPERT_FINDINGS]
            except ValueError as exc:
                raise DataError(f"{path}:{line_no}: {exc}") from None
        return labels

    def _read_csv_reports(self) -> dict[str, str]:
        path = _csv_path(self.reports_root, SECTIONED_CSV, "MIMIC-CXR sectioned report CSV")
        reports = {}
        for row in read_csv(path, ("study", "findings", "impression")):
            study = row["study"].strip().lstrip("s")
            reports[study] = join_sections(row["findings"], row["impression"])
        return reports

    def _report(self, study: str, rel: str, reports: dict[str, str] | None) -> str | None:
        if reports is not None:
            if study not in reports:
                self._bad_record("no report", f"study s{study}: no row in {SECTIONED_CSV}")
                return None
            text = reports[study]
            where = f"{SECTIONED_CSV} (study s{study})"
        else:
            path = os.path.join(self.reports_root, rel + ".txt")
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = join_sections(*findings_impression(f.read()))
            except FileNotFoundError:
                self._bad_record("no report", f"report file not found: {path!r}")
                return None
            where = path
        if not text:
            self._bad_record("empty report", f"empty report (no FINDINGS/IMPRESSION text): {where}")
            return None
        return text

    # --- items
    def _load(self, index: int) -> dict:
        dicom_id, path = self.records[index]
        image = self._image_tensor(load_image(path))
        return {"image": image, "text": self.texts[index], "labels": self.labels[index].clone(),
                "id": dicom_id, "path": path}
