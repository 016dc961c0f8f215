"""Writers that lay synthetic chest X-rays out in each data set's official format (DESIGN §8):
MIMIC-CXR-JPG, NIH ChestX-ray14, CheXpert 5x200, RSNA pneumonia (DICOM), SIIM-ACR pneumothorax
(DICOM + RLE), and single DICOM files."""
from __future__ import annotations

import csv
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from acelora.config import CHEXPERT_FINDINGS
from acelora.data.labels import NIH_FINDINGS
from acelora.data.reports import findings_impression
from acelora.data.rle import rle_encode
from acelora.data.synthetic.render import (FIVE_CLASSES, NO_FINDING, check_findings, gauss,
                                           render_array, smooth_noise)
from acelora.data.synthetic.report_text import report_for

def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence], header_line: str | None = None):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        if header_line is not None:  # a header that csv would quote or that must stay verbatim
            f.write(header_line + "\n")
        writer = csv.writer(f, lineterminator="\n")
        if header_line is None:
            writer.writerow(header)
        writer.writerows(rows)


def write_dicom(path: str, image: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] = (1.0, 0.0),
                sop_instance_uid: str | None = None, patient_id: str = "anon") -> None:
    """Write ``image`` (float [H, W] in [0, 1], white = dense) as a 16-bit single-frame DICOM.

    ``bits`` stored bits (8..16) in 16 allocated; ``MONOCHROME1`` stores inverted values (a
    correct reader inverts them back); ``window`` (center, width) in output units after
    ``rescale`` (slope, intercept) is written as Window Center/Width.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits <= 16:
        raise ValueError(f"bits must be in 8..16, got {bits}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image must be [H, W], got shape {image.shape}")
    top = 2 ** bits - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    uid = sop_instance_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rescale != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _pick_findings(rng: np.random.Generator, pool: Sequence[str], max_findings: int,
                   p_normal: float) -> list[str]:
    if rng.uniform() < p_normal or max_findings < 1:
        return []
    count = int(rng.integers(1, max_findings + 1))
    return [pool[int(i)] for i in sorted(rng.choice(len(pool), size=min(count, len(pool)), replace=False))]


def _digits(rng: np.random.Generator, first: int, n: int) -> str:
    return str(first) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))


def write_mimic(root: str, n: int = 40, seed: int = 0, image_size: int = 64, domain: int = 0,
                findings: Sequence[str] = FIVE_CLASSES, max_findings: int = 2,
                p_normal: float = 0.25, reports: str = "both") -> dict:
    """A MIMIC-CXR-JPG tree of ``n`` studies under ``root``.

    Writes ``files/p{sid[:2]}/p{sid}/s{study}/{dicom_id}.jpg`` (one or two frontal images per
    study, sometimes a LATERAL one that readers must drop, and a few with a blank view),
    ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv`` (labels 1.0 for drawn findings; the others
    blank, 0.0 or -1.0), and the reports as ``files/p../p{sid}/s{study}.txt`` and/or
    ``mimic_cxr_sectioned.csv`` (``reports`` = "txt" | "csv" | "both").

    Returns the ground truth: ``studies[study_id] = dict(subject_id, split, findings, chexpert
    (finding → raw CSV value), findings_text, impression_text)`` and ``images[dicom_id] =
    dict(study_id, subject_id, view, path)``.
    """
    if reports not in ("txt", "csv", "both"):
        raise ValueError(f"reports must be 'txt', 'csv' or 'both', got {reports!r}")
    pool = check_findings(findings)
    rng = np.random.default_rng([seed, 101])
    studies, images = {}, {}
    meta_rows, split_rows, label_rows, section_rows = [], [], [], []
    subject = None
    used: set[str] = set()
    for s in range(int(n)):
        if subject is None or rng.uniform() < 0.5:  # about two studies per subject
            subject = _digits(rng, 1, 8)
            split = str(rng.choice(["train", "train", "train", "validate", "test"]))
        study = _digits(rng, 5, 8)
        while study in used:
            study = _digits(rng, 5, 8)
        used.add(study)
        drawn = _pick_findings(rng, pool, max_findings, p_normal)
        chexpert = {}
        for name in CHEXPERT_FINDINGS:
            if name in drawn:
                chexpert[name] = "1.0"
            elif name == NO_FINDING:
                chexpert[name] = "" if drawn else "1.0"
            else:
                chexpert[name] = str(rng.choice(["", "", "", "0.0", "-1.0"]))
        report = report_for(drawn, rng)
        f_text, i_text = findings_impression(report)
        rel_study = os.path.join("files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        if reports in ("txt", "both"):
            os.makedirs(os.path.join(root, os.path.dirname(rel_study)), exist_ok=True)
            with open(os.path.join(root, rel_study + ".txt"), "w", encoding="utf-8") as f:
                f.write(report)
        if reports in ("csv", "both"):
            section_rows.append([f"s{study}", i_text, f_text, i_text, ""])
        label_rows.append([subject, study] + [chexpert[name] for name in CHEXPERT_FINDINGS])
        studies[study] = {"subject_id": subject, "split": split, "findings": drawn,
                          "chexpert": chexpert, "findings_text": f_text, "impression_text": i_text}
        views = ["PA"] if rng.uniform() < 0.6 else ["AP"]
        if rng.uniform() < 0.25:
            views.append(views[0])  # a second frontal image of the same study
        if rng.uniform() < 0.5:
            views.append(str(rng.choice(["LATERAL", "LL"])))
        if rng.uniform() < 0.08:
            views.append("")  # unknown view: not frontal, dropped
        patient_rng = np.random.default_rng([seed, 103, s])
        for v, view in enumerate(views):
            dicom_id = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2 ** 32, 5))
            rel = os.path.join(rel_study, f"{dicom_id}.jpg")
            array = render_array(drawn, np.random.default_rng([seed, 103, s]), image_size, domain) \
                if view in ("PA", "AP") else render_array(drawn, patient_rng, image_size, domain)[:, ::-1]
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(_to_uint8(array), mode="L").save(path, quality=95)
            meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, image_size,
                              image_size, "21800506", "213014.531", "Chest (PA and Lat)",
                              {"PA": "postero-anterior", "AP": "antero-posterior"}.get(view, "lateral"),
                              "Erect"])
            split_rows.append([dicom_id, study, subject, split])
            images[dicom_id] = {"study_id": study, "subject_id": subject, "view": view, "path": path}
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"], meta_rows)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"),
               ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"),
               ["subject_id", "study_id", *CHEXPERT_FINDINGS], label_rows)
    if section_rows:
        _write_csv(os.path.join(root, "mimic_cxr_sectioned.csv"),
                   ["study", "impression", "findings", "last_paragraph", "comparison"], section_rows)
    return {"root": root, "studies": studies, "images": images}


def write_nih(root: str, n: int = 40, seed: int = 0, image_size: int = 64, domain: int = 0,
              max_findings: int = 2, p_normal: float = 0.3, test_fraction: float = 0.3) -> dict:
    """An NIH ChestX-ray14 tree: ``images/{patient:08d}_{follow:03d}.png``,
    ``Data_Entry_2017.csv`` (its exact header, "Finding Labels" joined by "|", "No Finding" for
    none) and ``train_val_list.txt`` / ``test_list.txt`` split by patient.

    Returns ``images[name] = dict(findings (NIH names), split, path)``.
    """
    rng = np.random.default_rng([seed, 201])
    images, rows, lists = {}, [], {"train_val": [], "test": []}
    patient, follow = 0, 0
    for i in range(int(n)):
        if patient == 0 or rng.uniform() < 0.6:
            patient += int(rng.integers(1, 5))
            follow = 0
            split = "test" if rng.uniform() < test_fraction else "train_val"
        else:
            follow += 1
        name = f"{patient:08d}_{follow:03d}.png"
        drawn = _pick_findings(rng, NIH_FINDINGS, max_findings, p_normal)
        path = os.path.join(root, "images", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        array = render_array(drawn, np.random.default_rng([seed, 203, i]), image_size, domain)
        Image.fromarray(_to_uint8(array), mode="L").save(path)
        rows.append([name, "|".join(drawn) if drawn else NO_FINDING, follow, patient,
                     int(rng.integers(20, 90)), str(rng.choice(["M", "F"])),
                     str(rng.choice(["PA", "AP"])), image_size, image_size, 0.143, 0.143, ""])
        lists[split].append(name)
        images[name] = {"findings": drawn, "split": split, "path": path}
    _write_csv(os.path.join(root, "Data_Entry_2017.csv"), (), rows,
               header_line="Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                           "Patient Gender,View Position,OriginalImage[Width,Height],"
                           "OriginalImagePixelSpacing[x,y],")
    for split, names in lists.items():
        with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
            f.write("".join(f"{name}\n" for name in names))
    return {"root": root, "images": images}


def write_chexpert5x200(root: str, n: int = 25, seed: int = 0, image_size: int = 64,
                        domain: int = 0) -> dict:
    """CheXpert 5×200 in GLoRIA's format: ``chexpert_5x200.csv`` (Path, Sex, Age,
    Frontal/Lateral, AP/PA and the 14 findings) with ``n`` rows per class (200 in the real set),
    each positive (1.0) for exactly one of the 5 classes; images under
    ``CheXpert-v1.0-small/valid/patient{id}/study1/view1_frontal.jpg``.

    Returns ``rows[path] = class name``.
    """
    rng = np.random.default_rng([seed, 301])
    out, rows = {}, []
    index = 0
    for c, cls in enumerate(FIVE_CLASSES):
        for _ in range(int(n)):
            index += 1
            rel = f"CheXpert-v1.0-small/valid/patient{64540 + index:05d}/study1/view1_frontal.jpg"
            values = {}
            for name in CHEXPERT_FINDINGS:
                if name == cls:
                    values[name] = "1.0"
                elif name in FIVE_CLASSES or name == NO_FINDING:
                    values[name] = str(rng.choice(["", "0.0"]))
                else:
                    values[name] = str(rng.choice(["", "", "0.0", "-1.0"]))
            array = render_array([cls], np.random.default_rng([seed, 303, index]), image_size, domain)
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(_to_uint8(array), mode="L").save(path, quality=95)
            rows.append([rel, str(rng.choice(["Male", "Female"])), int(rng.integers(20, 90)),
                         "Frontal", str(rng.choice(["AP", "PA"]))] + [values[f] for f in CHEXPERT_FINDINGS])
            out[rel] = cls
    # Shuffle so classes are not in blocks (a reader must not rely on order).
    order = rng.permutation(len(rows))
    _write_csv(os.path.join(root, "chexpert_5x200.csv"),
               ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS],
               [rows[int(i)] for i in order])
    return {"root": root, "rows": out}


def _dicom_style(rng: np.random.Generator) -> dict:
    """A random mix of what real DICOMs do: 12/16 bits, MONOCHROME1, a window, a rescale."""
    bits = int(rng.choice([12, 16]))
    style = {"bits": bits, "photometric": str(rng.choice(["MONOCHROME2", "MONOCHROME1"]))}
    if rng.uniform() < 0.5:
        top = 2 ** bits - 1
        style["window"] = (top / 2.0 + 0.5, float(top + 1))  # the full range: a lossless window
    return style


def _uid(rng: np.random.Generator) -> str:
    return "1.2.276.0.7230010.3.1.4.8323329." + ".".join(
        str(int(x)) for x in (rng.integers(1000, 32000), rng.integers(1.5e9, 1.6e9), rng.integers(1e5, 1e6)))


def write_rsna(root: str, n: int = 30, seed: int = 0, image_size: int = 128, domain: int = 0,
               p_positive: float = 0.4) -> dict:
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (patientId,x,y,width,height,Target;
    one row per box, one row with empty box fields for Target=0),
    ``stage_2_detailed_class_info.csv`` and ``stage_2_train_images/{patientId}.dcm`` (16-bit,
    some MONOCHROME1, some windowed). Each box is a visible opacity in the image.

    Returns ``patients[pid] = dict(target, boxes [[x, y, w, h], ...], path, dicom style)``.
    """
    rng = np.random.default_rng([seed, 401])
    patients, rows, info = {}, [], []
    for i in range(int(n)):
        pid = "-".join(f"{int(x):0{w}x}" for x, w in zip(rng.integers(0, 2 ** 32, 5),
                                                         (8, 4, 4, 4, 12)))
        patient_rng = np.random.default_rng([seed, 403, i])
        array = render_array([], patient_rng, image_size, domain).astype(np.float64)
        target = int(rng.uniform() < p_positive)
        boxes = []
        if target:
            for side in rng.permutation(2)[: int(rng.integers(1, 3))]:
                w = float(round(image_size * rng.uniform(0.12, 0.2)))
                h = float(round(image_size * rng.uniform(0.15, 0.28)))
                x = float(round(image_size * (0.18 if side == 0 else 0.55) + rng.uniform(0, 0.1) * image_size))
                y = float(round(image_size * rng.uniform(0.3, 0.5)))
                boxes.append([x, y, w, h])
                axis = np.arange(image_size) + 0.5
                Y, X = np.meshgrid(axis, axis, indexing="ij")
                blob = gauss(X, Y, x + w / 2, y + h / 2, w / 3.5, h / 3.5)
                array = array + 0.3 * blob * (0.8 + 0.2 * smooth_noise(patient_rng, image_size, 16))
        style = _dicom_style(rng)
        path = os.path.join(root, "stage_2_train_images", f"{pid}.dcm")
        write_dicom(path, np.clip(array, 0, 1), patient_id=pid, **style)
        if boxes:
            rows += [[pid, *(f"{v:.1f}" for v in box), 1] for box in boxes]
        else:
            rows.append([pid, "", "", "", "", 0])
        info.append([pid, "Lung Opacity" if target else
                     str(rng.choice(["Normal", "No Lung Opacity / Not Normal"]))])
        patients[pid] = {"target": target, "boxes": boxes, "path": path, **style}
    _write_csv(os.path.join(root, "stage_2_train_labels.csv"),
               ["patientId", "x", "y", "width", "height", "Target"], rows)
    _write_csv(os.path.join(root, "stage_2_detailed_class_info.csv"), ["patientId", "class"], info)
    return {"root": root, "patients": patients}


def write_siim(root: str, n: int = 20, seed: int = 0, image_size: int = 128, domain: int = 0,
               p_positive: float = 0.5) -> dict:
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` with the header "ImageId, EncodedPixels", values
    written as the release does (a leading space; " -1" for no pneumothorax), one row per mask
    component so an image may have several rows (their masks overlap: readers must OR them);
    DICOMs at ``dicom-images-train/{study uid}/{series uid}/{ImageId}.dcm`` (16-bit, some
    MONOCHROME1). The release's images are 1024×1024; ``image_size`` keeps tests small (the RLE
    is column-major on the image's own size).

    Returns ``images[image_id] = dict(mask bool [H, W] (the union), components [masks], path)``.
    """
    rng = np.random.default_rng([seed, 501])
    images, rows = {}, []
    axis = np.arange(image_size) + 0.5
    Y, X = np.meshgrid(axis / image_size, axis / image_size, indexing="ij")
    for i in range(int(n)):
        image_id = _uid(rng)
        patient_rng = np.random.default_rng([seed, 503, i])
        array = render_array([], patient_rng, image_size, domain).astype(np.float64)
        components = []
        if rng.uniform() < p_positive:
            # A dark apical/lateral rim (pneumothorax), sometimes split into overlapping parts.
            side = int(rng.integers(0, 2))
            cx = 0.3 if side == 0 else 0.7
            for _ in range(int(rng.integers(1, 4))):
                ex, ey = cx + rng.uniform(-0.05, 0.05), rng.uniform(0.25, 0.45)
                component = (((X - ex) / rng.uniform(0.05, 0.12)) ** 2
                             + ((Y - ey) / rng.uniform(0.06, 0.15)) ** 2) < 1.0
                if component.any():
                    components.append(component)
            mask = np.logical_or.reduce(components) if components else np.zeros_like(X, bool)
            array = np.where(mask, array * 0.45, array)
        mask = np.logical_or.reduce(components) if components else np.zeros(X.shape, bool)
        style = _dicom_style(rng)
        study, series = _uid(rng), _uid(rng)
        path = os.path.join(root, "dicom-images-train", study, series, f"{image_id}.dcm")
        write_dicom(path, np.clip(array, 0, 1), sop_instance_uid=image_id, patient_id=image_id, **style)
        if components:
            rows += [[image_id, " " + rle_encode(c)] for c in components]
        else:
            rows.append([image_id, " -1"])
        images[image_id] = {"mask": mask, "components": components, "path": path, **style}
    order = rng.permutation(len(rows))  # rows of one image need not be adjacent
    _write_csv(os.path.join(root, "train-rle.csv"), (), [rows[int(i)] for i in order],
               header_line="ImageId, EncodedPixels")
    return {"root": root, "images": images}
