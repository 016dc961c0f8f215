"""CT-RATE (3D chest CT + reports + 18 abnormality labels) in its released layout (DESIGN §8, §13).

Layout (``root`` may be the download's top folder or its ``dataset/`` folder)::

    dataset/{train,valid}[_fixed]/<split>_<patient>/<split>_<patient>_<scan>/<...>_<rec>.nii.gz
    dataset/metadata/{train,validation}_metadata.csv          VolumeName, RescaleSlope,
                                                              RescaleIntercept, XYSpacing, ZSpacing
    dataset/radiology_text_reports/{train,validation}_reports.csv
                                  VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN,
                                  Impressions_EN
    dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + 18 findings

The volumes of the first release store raw values: HU = RescaleSlope · v + RescaleIntercept from
the metadata. The ``_fixed`` release stores HU already while its metadata still lists the
scanner's slope/intercept, so applying them again shifts every voxel by the intercept: whether to
rescale is decided from the folder name (``apply_rescale`` overrides it).

Indexing reads the CSVs and lists folders only; volumes are read in ``__getitem__``.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter

import numpy as np
import torch

from acelora.data._common import MAX_CONSECUTIVE_SKIPS, DataError, ImageDataset, read_csv
from acelora.data.ct_transforms import CTPreprocess, VolumeCache

# The 18 abnormalities, spelled as the label CSV's columns (and as CT-CLIP's prompts say them).
CT_RATE_FINDINGS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
NIFTI_SUFFIX = ".nii.gz"
SPLITS = ("train", "valid")
# Why a volume failed to load; counted per DataLoader worker in shared memory (see _LoadSkips).
LOAD_REASONS = ("unreadable volume", "wrong rank", "non-finite voxels", "unreadable cache file")
MAX_WORKER_ROWS = 64


class VolumeError(DataError):
    """A volume that cannot be used; ``reason`` is one of :data:`LOAD_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_xy_spacing(text: str) -> tuple[float, float]:
    """``"[0.75, 0.75]"`` (also ``"(a, b)"``, ``"a\\b"`` or one number) → two floats."""
    numbers = re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf", str(text), re.I)
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise ValueError(f"XYSpacing {text!r} is not one or two numbers")
    return float(numbers[0]), float(numbers[1])


def report_text(findings: str, impressions: str | None = None, clean: bool = True) -> str:
    """Findings (+ Impressions) as one text. Blank, "nan" and "Not given." sections are left out;
    ``clean`` removes quotes and parentheses as CT-CLIP's datasets do."""
    parts = []
    for section in (findings, impressions):
        section = "" if section is None else str(section).strip()
        if section and section.lower() != "nan" and section != "Not given.":
            parts.append(section)
    text = " ".join(parts)
    if clean:
        text = re.sub(r"[\"'()]", "", text)
    return text.strip()


def _find_folder(root: str, name: str) -> str | None:
    for base in (root, os.path.join(root, "dataset")):
        path = os.path.join(base, name)
        if os.path.isdir(path):
            return path
    return None


def find_split_csv(root: str, folder: str, suffix: str, split: str) -> str:
    """The CSV of ``split`` in ``root/[dataset/]folder``: ``<prefix><suffix>`` with prefix
    "train" or "valid"/"validation" (the release writes both spellings)."""
    where = _find_folder(root, folder)
    if where is None:
        raise DataError(f"CT-RATE folder {folder!r} not found under {root!r} or {root!r}/dataset")
    prefixes = ("train",) if split == "train" else ("validation", "valid")
    for prefix in prefixes:
        for ext in ("", ".gz"):
            path = os.path.join(where, f"{prefix}{suffix}{ext}")
            if os.path.isfile(path):
                return path
    found = sorted(os.listdir(where))
    raise DataError(f"no {split} CSV in {where!r}: looked for "
                    f"{[p + suffix for p in prefixes]}; the folder has {found}")


class _LoadSkips:
    """Load-time skip counts by reason, one row per DataLoader worker in shared memory, so the
    main process sees the skips of its workers (each process writes only its own row)."""

    def __init__(self):
        self.counts = torch.zeros(MAX_WORKER_ROWS + 1, len(LOAD_REASONS), dtype=torch.int64)
        try:
            self.counts.share_memory_()
        except RuntimeError:              # no shared memory here: each process counts its own
            pass

    def add(self, reason: str) -> None:
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % MAX_WORKER_ROWS
        self.counts[row, LOAD_REASONS.index(reason)] += 1

    def by_reason(self) -> Counter:
        totals = self.counts.sum(0).tolist()
        return Counter({r: int(n) for r, n in zip(LOAD_REASONS, totals) if n})


class CTRATEDataset(ImageDataset):
    """CT-RATE volumes with their 18 labels and report text.

    ``split``: "train" or "valid". ``volumes``: the folder of volumes under ``dataset/``
    (default ``<split>_fixed`` when present, else ``<split>``). ``apply_rescale``: apply the
    metadata's slope/intercept (default: not for a ``*_fixed`` folder). ``preprocess``: a
    :class:`CTPreprocess` (default CT-CLIP's). ``cache_dir``: keep preprocessed volumes there
    (int16, memory-mapped; :meth:`build_cache` fills it up front). ``transform``: applied to the
    preprocessed tensor (e.g. augmentation).

    Items: ``dict(image [1,D,H,W] float32, labels [18] float multi-hot, text, id, path)``
    (``labels`` with ``with_labels``, ``text`` = Findings (+ Impressions with
    ``with_impressions``) with ``with_text``). Volumes lacking a metadata / label / report row or
    with unusable metadata are skipped at indexing (``on_error="skip"``) or raise; volumes that
    fail to load are replaced by the next readable one and counted by reason, across workers.
    """

    def __init__(self, root: str, split: str = "valid", volumes: str | None = None,
                 preprocess: CTPreprocess | None = None, apply_rescale: bool | None = None,
                 with_labels: bool = True, with_text: bool = True, with_impressions: bool = False,
                 findings=CT_RATE_FINDINGS, clean_text: bool = True, cache_dir: str | None = None,
                 transform=None, on_error: str = "raise", progress: bool | None = None):
        super().__init__(transform, on_error)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not os.path.isdir(root):
            raise DataError(f"CT-RATE root is not a directory: {root!r}")
        self.root, self.split, self.progress = root, split, progress
        self.preprocess = preprocess or CTPreprocess()
        self.classes = list(findings)
        self.with_labels, self.with_text = with_labels, with_text
        self.volume_dir = self._volume_dir(volumes)
        folder = os.path.basename(os.path.normpath(self.volume_dir))
        self.apply_rescale = (not folder.endswith("_fixed")) if apply_rescale is None else bool(apply_rescale)
        self.cache = VolumeCache(cache_dir, self.preprocess) if cache_dir else None
        self.load_skips = _LoadSkips()

        metadata = self._rows(find_split_csv(root, "metadata", "_metadata.csv", split),
                              ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"))
        labels_by_name = texts_by_name = None
        if with_labels:
            path = find_split_csv(root, "multi_abnormality_labels", "_predicted_labels.csv", split)
            labels_by_name = {name: self._label_vector(row, path, line)
                              for name, (row, line) in self._rows(path, ("VolumeName", *self.classes)).items()}
        if with_text:
            path = find_split_csv(root, "radiology_text_reports", "_reports.csv", split)
            texts_by_name = {name: report_text(row["Findings_EN"],
                                               row["Impressions_EN"] if with_impressions else None,
                                               clean_text)
                             for name, (row, _) in self._rows(path, ("VolumeName", "Findings_EN",
                                                                       "Impressions_EN")).items()}
        labels, self.texts = [], []
        for name, path in self._list_volumes():
            record = self._index_volume(name, path, metadata.get(name), labels_by_name, texts_by_name)
            if record is None:
                continue
            self.records.append(record)
            if with_labels:
                labels.append(labels_by_name[name])
            if with_text:
                self.texts.append(texts_by_name[name])
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.float32).reshape(-1, len(self.classes)))
        self._check_nonempty(self.volume_dir)

    # --- indexing (no volume is opened) ----------------------------------------------------

    def _volume_dir(self, volumes: str | None) -> str:
        names = [volumes] if volumes else [f"{self.split}_fixed", self.split]
        for name in names:
            path = _find_folder(self.root, name)
            if path is not None:
                return path
        raise DataError(f"CT-RATE volume folder {' or '.join(names)!r} not found under {self.root!r} "
                        f"or {self.root!r}/dataset")

    @staticmethod
    def _rows(path: str, required) -> dict[str, tuple[dict, int]]:
        rows = {}
        for line, row in enumerate(read_csv(path, required), start=2):
            rows.setdefault(row["VolumeName"].strip(), (row, line))
        return rows

    def _label_vector(self, row: dict, path: str, line: int) -> np.ndarray:
        try:
            values = [float(row[c]) for c in self.classes]
        except ValueError:
            values = [math.nan]
        if not all(v in (0.0, 1.0) for v in values):
            raise DataError(f"{path}:{line}: labels must be 0 or 1, got "
                            f"{[row[c] for c in self.classes]}")
        return np.asarray(values, dtype=np.float32)

    def _list_volumes(self):
        """``(VolumeName, path)`` of every ``<patient>/<scan>/*.nii.gz``, in sorted order."""
        from tqdm.auto import tqdm

        patients = sorted(e.path for e in os.scandir(self.volume_dir) if e.is_dir())
        for patient in tqdm(patients, desc=f"CT-RATE {self.split}: listing", unit="patient",
                            disable=True if self.progress is False else None, leave=False):
            for scan in sorted(e.path for e in os.scandir(patient) if e.is_dir()):
                for entry in sorted(os.scandir(scan), key=lambda e: e.name):
                    if entry.name.endswith(NIFTI_SUFFIX) and entry.is_file():
                        yield entry.name, entry.path

    def _index_volume(self, name, path, meta, labels_by_name, texts_by_name):
        if meta is None:
            return self._bad_record("missing metadata row", f"{name}: no row in the metadata CSV")
        row, line = meta
        try:
            xy = parse_xy_spacing(row["XYSpacing"])
            z = float(row["ZSpacing"])
        except ValueError as exc:
            return self._bad_record("bad spacing", f"{name} (metadata line {line}): {exc}")
        # CT-CLIP uses the first XYSpacing value for both in-plane axes; so do we.
        spacing = (xy[0], xy[0], z)                                   # NIfTI (x, y, z) order
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            return self._bad_record("bad spacing", f"{name} (metadata line {line}): spacing "
                                    f"XY={row['XYSpacing']!r} Z={row['ZSpacing']!r} is not positive")
        slope = intercept = None
        if self.apply_rescale:
            try:
                slope, intercept = float(row["RescaleSlope"]), float(row["RescaleIntercept"])
            except ValueError:
                slope = intercept = math.nan
            if not (math.isfinite(slope) and math.isfinite(intercept)):
                return self._bad_record("non-finite rescale slope/intercept",
                                        f"{name} (metadata line {line}): RescaleSlope="
                                        f"{row['RescaleSlope']!r} RescaleIntercept={row['RescaleIntercept']!r}")
        if labels_by_name is not None and name not in labels_by_name:
            return self._bad_record("missing labels row", f"{name}: no row in the labels CSV")
        if texts_by_name is not None:
            if name not in texts_by_name:
                return self._bad_record("missing report row", f"{name}: no row in the reports CSV")
            if not texts_by_name[name]:
                return self._bad_record("empty report", f"{name}: the report has no findings text")
        return name, path, slope, intercept, spacing

    # --- loading --------------------------------------------------------------------------

    def read_hu(self, index: int) -> np.ndarray:
        """The volume of record ``index`` in HU, NIfTI ``(x, y, z)`` order, float32."""
        import nibabel as nib

        name, path, slope, intercept, _ = self.records[index]
        try:
            data = nib.load(path).get_fdata(dtype=np.float32)
        except Exception as exc:   # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error, ...)
            raise VolumeError("unreadable volume", f"cannot read NIfTI {path!r}: "
                              f"{type(exc).__name__}: {exc}") from None
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise VolumeError("wrong rank", f"{path}: expected a 3-D volume, got shape {data.shape}")
        if self.apply_rescale:                   # in place: a chest CT is ~300 MB in float32
            data *= np.float32(slope)
            data += np.float32(intercept)
        if not np.isfinite(data).all():
            raise VolumeError("non-finite voxels", f"{path}: the volume holds NaN or inf values")
        return data

    def _cache_key(self, index: int) -> dict:
        _, _, slope, intercept, spacing = self.records[index]
        return {"rescale": self.apply_rescale, "slope": slope, "intercept": intercept,
                "spacing": list(spacing)}

    def _volume(self, index: int) -> torch.Tensor:
        name = self.records[index][0]
        if self.cache is not None:
            try:
                cached = self.cache.load(name, self._cache_key(index))
            except DataError as exc:
                raise VolumeError("unreadable cache file", str(exc)) from None
            if cached is not None:
                return cached
        volume = self.preprocess(self.read_hu(index), self.records[index][4], axes="xyz")
        if self.cache is not None:
            self.cache.save(name, volume, self._cache_key(index))
        return volume

    def _load(self, index: int) -> dict:
        name, path = self.records[index][:2]
        image = self._volume(index)
        if self.transform is not None:
            image = self.transform(image).contiguous()
        item = {"image": image, "id": name[:-len(NIFTI_SUFFIX)], "path": path}
        if self.with_labels:
            item["labels"] = self.labels[index].clone()
        if self.with_text:
            item["text"] = self.texts[index]
        return item

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        if self.on_error == "raise":
            return self._load(index)
        for attempt in range(min(len(self), MAX_CONSECUTIVE_SKIPS)):
            i = (index + attempt) % len(self)
            try:
                return self._load(i)
            except VolumeError as exc:
                self.load_skips.add(exc.reason)
                self.skips.examples.setdefault(exc.reason, str(exc))
        raise DataError(f"{type(self).__name__}: {MAX_CONSECUTIVE_SKIPS} unreadable volumes in a row "
                        f"from index {index}; is the data set intact?")

    @property
    def skip_reasons(self) -> Counter:
        """Skipped items by reason: at indexing, while building the cache, and at load time
        (in any DataLoader worker)."""
        return self.skips.reasons + self.load_skips.by_reason()

    @property
    def skipped(self) -> int:
        return sum(self.skip_reasons.values())

    # --- the cache ------------------------------------------------------------------------

    def build_cache(self, num_workers: int = 0) -> dict:
        """Preprocess every volume not cached yet into ``cache_dir``, with a progress bar.
        Volumes that fail are dropped from the dataset and counted (``on_error="skip"``) or
        raise. Returns ``dict(cached, built, skipped)``."""
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        if self.cache is None:
            raise ValueError("build_cache needs a dataset made with cache_dir=...")
        keep, built, failed = [], 0, Counter()
        loader = DataLoader(_CacheBuilder(self), batch_size=None, num_workers=num_workers)
        for index, was_built, error in tqdm(loader, total=len(self), unit="volume",
                                            desc=f"CT-RATE {self.split}: caching",
                                            disable=True if self.progress is False else None):
            if error is None:
                keep.append(index)
                built += int(was_built)
                continue
            reason, message = error
            if self.on_error == "raise":
                raise VolumeError(reason, message)
            self.skips.add(reason, message, quiet=True)
            failed[reason] += 1
        if failed:
            self.records = [self.records[i] for i in keep]
            self.labels = self.labels[keep] if self.with_labels else self.labels
            self.texts = [self.texts[i] for i in keep] if self.with_text else self.texts
            self.skips.summarize()
        return {"cached": len(keep), "built": built, "skipped": dict(failed)}


class _CacheBuilder(torch.utils.data.Dataset):
    """``(index, built?, None | (reason, message))`` per record, so workers can fill the cache."""

    def __init__(self, dataset: CTRATEDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        ds = self.dataset
        try:
            name = ds.records[index][0]
            if ds.cache.load(name, ds._cache_key(index)) is not None:
                return index, False, None
        except DataError:
            pass                                   # an unreadable cache file is rebuilt
        try:
            volume = ds.preprocess(ds.read_hu(index), ds.records[index][4], axes="xyz")
        except VolumeError as exc:
            return index, False, (exc.reason, str(exc))
        ds.cache.save(name, volume, ds._cache_key(index))
        return index, True, None


__all__ = ["CTRATEDataset", "CT_RATE_FINDINGS", "VolumeError", "parse_xy_spacing", "report_text",
           "find_split_csv", "LOAD_REASONS"]
