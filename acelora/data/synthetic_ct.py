"""Synthetic chest CT in CT-RATE's released layout, for tests and the CT demo.

Each volume is HU-valued: air, a body ellipse with a fat rim, two lungs, the heart and the
spine, plus any of :data:`SYNTHETIC_CT_FINDINGS` drawn where a radiologist would look for them.
``shift`` (0 = the reference domain, 1 = far) moves the scanner/population: denser lungs, brighter
soft tissue, more noise, larger bodies and fainter findings, so a model fitted on ``shift=0`` sees
a new domain. :func:`write_ct_rate` writes NIfTI volumes and the three CSVs exactly as CT-RATE
names them, as the raw release (stored values + slope/intercept) and the ``_fixed`` release
(HU stored, same metadata), from the same HU volumes.
"""
from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np

from acelora.data.ct_transforms import CTPreprocess, dhw_to_nifti
from acelora.data.ctrate import CT_RATE_FINDINGS, report_text

SYNTHETIC_CT_FINDINGS = ("Pleural effusion", "Lung nodule", "Cardiomegaly", "Emphysema",
                         "Consolidation")
# Slope/intercept pairs the raw release cycles through (CT scanners store HU + 1024 and others).
RESCALES = ((1.0, -1024.0), (0.5, -1000.0), (1.0, -2048.0))

_POSITIVE = {
    "Pleural effusion": ("Pleural effusion is seen in the {side} hemithorax.",
                         "There is {side} pleural effusion with adjacent compressive changes.",
                         "Pleural effusion is present on the {side} side."),
    "Lung nodule": ("A {size} mm nodule is present in the {side} lung.",
                    "Solid lung nodule measuring {size} mm in the {side} lower lobe.",
                    "Lung nodule is present in the {side} lung."),
    "Cardiomegaly": ("The heart is enlarged (cardiomegaly).", "Cardiomegaly is observed.",
                     "Cardiomegaly is present."),
    "Emphysema": ("Diffuse emphysema is seen in both lungs.",
                  "Centrilobular emphysematous changes are present in both lungs.",
                  "Emphysema is present in both lungs."),
    "Consolidation": ("Consolidation is present in the {side} lung.",
                      "An area of consolidation with air bronchograms in the {side} lower lobe."),
}
# Negations both ways radiologists write them ("No X." and "X is not present."), and positives
# that also say "X is present": a text tower trained from scratch on these reports (the CT
# demo's) then meets the wording of CT-CLIP's zero-shot prompts.
_NEGATIVE = {
    "Pleural effusion": ("No pleural effusion.", "Pleural effusion is not present."),
    "Lung nodule": ("No lung nodule was detected.", "Lung nodule is not present."),
    "Cardiomegaly": ("Heart size is normal.", "Cardiomegaly is not present."),
    "Emphysema": ("No emphysema.", "Emphysema is not present."),
    "Consolidation": ("No consolidation was observed.", "Consolidation is not present."),
}


def _ellipsoid(coords, center, radii) -> np.ndarray:
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, center, radii)) <= 1.0


def render_ct(findings: Sequence[str] = (), shape: Sequence[int] = (16, 32, 32),
              spacing: Sequence[float] = (3.0, 1.5, 1.5), nominal_spacing: Sequence[float] | None = None,
              shift: float = 0.0, rng: np.random.Generator | None = None,
              noise_rng: np.random.Generator | None = None) -> np.ndarray:
    """An HU volume ``[D, H, W]`` (float32) with ``findings`` drawn in. Anatomy is placed in
    millimetres relative to ``shape × nominal_spacing`` (default ``spacing``), so a volume with a
    finer ``spacing`` shows the same body larger in voxels. ``rng`` places the findings,
    ``noise_rng`` (default ``rng``) draws the noise."""
    unknown = sorted(set(findings) - set(SYNTHETIC_CT_FINDINGS))
    if unknown:
        raise ValueError(f"cannot render {unknown}; renderable findings are {SYNTHETIC_CT_FINDINGS}")
    rng = rng or np.random.default_rng(0)
    noise_rng = noise_rng or rng
    nominal = nominal_spacing or spacing
    half = [n * s / 2.0 for n, s in zip(shape, nominal)]
    # Normalised coordinates: -1..1 over the nominal field of view; d = feet..head, h = right..left,
    # w = anterior..posterior.
    axes = [((np.arange(n) - (n - 1) / 2.0) * s / h).astype(np.float32)
            for n, s, h in zip(shape, spacing, half)]
    d, h, w = np.meshgrid(*axes, indexing="ij")
    body = 1.0 + 0.12 * shift
    soft, lung_hu = 40.0 + 30.0 * shift, -850.0 + 120.0 * shift
    contrast = 1.0 - 0.35 * shift
    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[_ellipsoid((h, w), (0, 0), (0.9 * body, 0.7 * body))] = -100.0          # fat rim
    vol[_ellipsoid((h, w), (0, 0), (0.8 * body, 0.6 * body))] = soft
    taper = np.sqrt(np.clip(1.0 - ((d + 0.15) / 1.05) ** 2, 0.0, 1.0))          # apex narrower
    lungs = []
    for side in (-1, 1):
        lung = _ellipsoid((h, w), (0.4 * side, 0.02), (0.3 * taper + 1e-6, 0.45 * taper + 1e-6))
        lung &= np.abs(d) < 0.9
        lungs.append(lung)
        vol[lung] = lung_hu
    lung_any = lungs[0] | lungs[1]
    if "Emphysema" in findings:
        vol[lung_any] = lung_hu - 100.0 * contrast
        holes = lung_any & (rng.random(shape) < 0.25)
        vol[holes] = -1000.0
    heart_r = 1.45 if "Cardiomegaly" in findings else 1.0
    heart = _ellipsoid((d, h, w), (0.05, 0.08, -0.22), (0.45 * heart_r, 0.22 * heart_r, 0.2 * heart_r))
    vol[heart] = soft
    vol[_ellipsoid((h, w), (0.0, 0.5), (0.09, 0.09)) & (np.abs(d) < 0.95)] = 400.0      # spine
    lesion = soft * contrast + lung_hu * (1.0 - contrast)
    if "Pleural effusion" in findings:
        side = int(rng.integers(2))
        depth = rng.uniform(0.12, 0.22)
        vol[lungs[side] & (w > 0.45 * taper - depth)] = 10.0 * contrast + lung_hu * (1 - contrast)
    if "Consolidation" in findings:
        side = int(rng.integers(2))
        center = (rng.uniform(-0.4, 0.1), 0.4 * (2 * side - 1), rng.uniform(-0.1, 0.2))
        vol[lungs[side] & _ellipsoid((d, h, w), center, (0.3, 0.17, 0.2))] = lesion - 20.0
    if "Lung nodule" in findings:
        side = int(rng.integers(2))
        center = (rng.uniform(-0.4, 0.4), 0.4 * (2 * side - 1) + rng.uniform(-0.08, 0.08),
                  rng.uniform(-0.15, 0.15))
        r = rng.uniform(0.1, 0.14)
        vol[_ellipsoid((d, h, w), center, (2 * r, r, r))] = lesion
    vol += noise_rng.normal(0.0, 15.0 + 35.0 * shift, size=shape).astype(np.float32)
    return vol


def synthetic_report(findings: Sequence[str], rng: np.random.Generator) -> dict:
    """CT-RATE report columns for a volume with ``findings``: the findings are described in
    ``Findings_EN``; absent ones are sometimes denied; ``Impressions_EN`` lists them."""
    sentences = ["Trachea and both main bronchi are open.", "Mediastinal structures were evaluated."]
    for name in SYNTHETIC_CT_FINDINGS:
        if name in findings:
            template = _POSITIVE[name][int(rng.integers(len(_POSITIVE[name])))]
            sentences.append(template.format(side=("right", "left")[int(rng.integers(2))],
                                             size=int(rng.integers(4, 12))))
        elif rng.random() < 0.5:
            sentences.append(_NEGATIVE[name][int(rng.integers(len(_NEGATIVE[name])))])
    if findings:
        impressions = ", ".join(f.lower() for f in findings).capitalize() + "."
    else:
        impressions = "Not given." if rng.random() < 0.3 else "No significant pathology."
    return {"ClinicalInformation_EN": "Not given.", "Technique_EN": "Non-contrast thoracic CT.",
            "Findings_EN": " ".join(sentences), "Impressions_EN": impressions}


def _write_csv(path: str, header: Sequence[str], rows: Sequence[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(header))
        writer.writeheader()
        writer.writerows(rows)


def _save_nifti(path: str, stored_dhw: np.ndarray, xy: float, z: float) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.ascontiguousarray(dhw_to_nifti(stored_dhw)).astype(np.int16)   # (x, y, z)
    image = nib.Nifti1Image(data, np.diag([xy, xy, z, 1.0]))
    image.set_data_dtype(np.int16)            # store as is: no header scaling
    image.header.set_xyzt_units("mm")
    nib.save(image, path)


def write_ct_rate(root: str, patients: dict | None = None, shape: Sequence[int] = (8, 32, 32),
                  z_spacing: float = 3.0, xy_spacing: float = 1.5, spacing_jitter: float = 0.0,
                  shift: float = 0.0, finding_rate: float = 0.35, releases: Sequence[str] = ("raw", "fixed"),
                  seed: int = 0) -> dict:
    """Write a synthetic CT-RATE under ``root/dataset``: ``patients`` per split (default
    ``{"train": 6, "valid": 3}``), 1–2 scans per patient and 1–2 reconstructions per scan (same
    findings, own noise and, with ``spacing_jitter``, own spacing), volumes of ``shape`` (D, H, W)
    at ``(z_spacing, xy_spacing)`` mm. ``releases``: "raw" (``{split}/``: stored = (HU −
    intercept) / slope, int16) and/or "fixed" (``{split}_fixed/``: stored = HU), sharing one
    metadata CSV. Returns ``dict(dataset_dir, names {split: [VolumeName]}, labels {split:
    [N, 18] array}, hu {split: {VolumeName: (spacing (z, x, y), [D,H,W] HU before int16)}})``.
    """
    patients = patients or {"train": 6, "valid": 3}
    bad = set(releases) - {"raw", "fixed"}
    if bad or not releases:
        raise ValueError(f"releases must be some of ('raw', 'fixed'), got {tuple(releases)}")
    dataset_dir = os.path.join(root, "dataset")
    rng = np.random.default_rng(seed)
    out = {"dataset_dir": dataset_dir, "names": {}, "labels": {}, "hu": {}}
    csv_prefix = {"train": ("train", "train"), "valid": ("validation", "valid")}
    for split, n_patients in patients.items():
        if split not in csv_prefix:
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        meta, reports, labels, names, hu = [], [], [], [], {}
        for p in range(1, n_patients + 1):
            for scan in "ab"[:int(rng.integers(1, 3))]:
                present = [f for f in SYNTHETIC_CT_FINDINGS if rng.random() < finding_rate]
                scan_seed = int(rng.integers(2 ** 31))
                report = synthetic_report(present, rng)
                for rec in range(1, int(rng.integers(1, 3)) + 1):
                    name = f"{split}_{p}_{scan}_{rec}.nii.gz"
                    jitter = 1.0 + spacing_jitter * rng.uniform(-1.0, 1.0)
                    xy, z = round(xy_spacing * jitter, 4), round(z_spacing * jitter, 4)
                    volume = render_ct(present, shape, (z, xy, xy), (z_spacing, xy_spacing, xy_spacing),
                                       shift, rng=np.random.default_rng(scan_seed),
                                       noise_rng=np.random.default_rng(int(rng.integers(2 ** 31))))
                    slope, intercept = RESCALES[len(names) % len(RESCALES)]
                    folder = os.path.join(f"{split}_{p}", f"{split}_{p}_{scan}")
                    if "raw" in releases:
                        stored = np.rint((volume - intercept) / slope)
                        _save_nifti(os.path.join(dataset_dir, split, folder, name), stored, xy, z)
                    if "fixed" in releases:
                        _save_nifti(os.path.join(dataset_dir, f"{split}_fixed", folder, name),
                                    np.rint(volume), xy, z)
                    meta.append({"VolumeName": name, "Manufacturer": "Synthetic",
                                 "RescaleIntercept": intercept, "RescaleSlope": slope,
                                 "XYSpacing": f"[{xy}, {xy}]", "ZSpacing": z})
                    reports.append({"VolumeName": name, **report})
                    labels.append({"VolumeName": name,
                                   **{f: int(f in present) for f in CT_RATE_FINDINGS}})
                    names.append(name)
                    hu[name] = ((z, xy, xy), volume)
        meta_prefix, label_prefix = csv_prefix[split]
        _write_csv(os.path.join(dataset_dir, "metadata", f"{meta_prefix}_metadata.csv"),
                   ["VolumeName", "Manufacturer", "RescaleIntercept", "RescaleSlope", "XYSpacing",
                    "ZSpacing"], meta)
        _write_csv(os.path.join(dataset_dir, "radiology_text_reports", f"{meta_prefix}_reports.csv"),
                   ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN",
                    "Impressions_EN"], reports)
        _write_csv(os.path.join(dataset_dir, "multi_abnormality_labels",
                                f"{label_prefix}_predicted_labels.csv"),
                   ["VolumeName", *CT_RATE_FINDINGS], labels)
        out["names"][split] = names
        out["labels"][split] = np.asarray([[r[f] for f in CT_RATE_FINDINGS] for r in labels],
                                          dtype=np.float32).reshape(-1, len(CT_RATE_FINDINGS))
        out["hu"][split] = hu
    return out


class SyntheticCTPairs:
    """``n`` synthetic volume–report pairs made in memory at a model's input size (no files): the
    CT demo's data. Items as :class:`~acelora.data.ctrate.CTRATEDataset` gives them: ``image``
    ``[1, D, H, W]`` through ``preprocess`` (CT-CLIP's: HU clip, ÷1000; rendered at its target
    spacing and shape, so nothing is resampled), ``labels`` over ``findings`` (default CT-RATE's
    18), ``text`` = Findings (+ Impressions), ``id``. Deterministic in ``seed``; ``shift`` as in
    :func:`render_ct`."""

    def __init__(self, n: int, preprocess: CTPreprocess | None = None, shift: float = 0.0,
                 seed: int = 0, finding_rate: float = 0.35, findings: Sequence[str] = CT_RATE_FINDINGS,
                 with_impressions: bool = True):
        import torch

        self.preprocess = preprocess or CTPreprocess(target_spacing=(22.5, 7.5, 7.5),
                                                     target_shape=(16, 48, 48))
        self.classes = list(findings)
        spacing, shape = self.preprocess.target_spacing, self.preprocess.target_shape
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(int(n)):
            present = [f for f in SYNTHETIC_CT_FINDINGS if rng.random() < finding_rate]
            hu = render_ct(present, shape, spacing, shift=shift,
                           rng=np.random.default_rng(int(rng.integers(2 ** 31))))
            report = synthetic_report(present, rng)
            text = report_text(report["Findings_EN"],
                               report["Impressions_EN"] if with_impressions else None)
            labels = torch.tensor([float(f in present) for f in self.classes])
            self.items.append({"image": self.preprocess(hu, spacing), "labels": labels,
                               "text": text, "id": f"synthetic_ct_{seed}_{i}"})
        self.labels = torch.stack([item["labels"] for item in self.items]) if self.items else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        return {**item, "image": item["image"].clone(), "labels": item["labels"].clone()}


__all__ = ["SYNTHETIC_CT_FINDINGS", "SyntheticCTPairs", "render_ct", "synthetic_report",
           "write_ct_rate"]
