"""Datasets in their official formats, DICOM reading, transforms, synthetic data.

Names are imported on first use, so ``import acelora.data`` stays cheap (torchvision and pydicom
load only when a transform or a DICOM is needed).
"""
from importlib import import_module

_EXPORTS = {
    "DataError": "_common", "ImageDataset": "_common", "read_csv": "_common",
    "LabelPolicy": "labels", "NIH_FINDINGS": "labels", "CHEXPERT_5X200_CLASSES": "labels",
    "load_image": "images", "read_dicom": "images", "apply_window": "images",
    "rle_decode": "rle", "rle_encode": "rle", "rle_decode_union": "rle",
    "findings_impression": "reports", "join_sections": "reports",
    "BiomedCLIPTransform": "transforms", "biomedclip_transform": "transforms",
    "denormalize": "transforms",
    "MimicCXRDataset": "mimic",
    "CheXpert5x200Dataset": "classification", "NIHChestXray14Dataset": "classification",
    "ImageFolderClassification": "classification", "CSVClassification": "classification",
    "RSNAPneumoniaDataset": "rsna", "SIIMPneumothoraxDataset": "siim",
    "ImageTextCollator": "collate", "classification_collate": "collate",
    "SyntheticCXRPairs": "synthetic", "render_cxr": "synthetic", "report_for": "synthetic",
    "write_mimic": "synthetic", "write_nih": "synthetic", "write_chexpert5x200": "synthetic",
    "write_rsna": "synthetic", "write_siim": "synthetic", "write_dicom": "synthetic",
    "LC25000Dataset": "pathology", "MHISTDataset": "pathology", "ImageCaptionDataset": "captions",
    "CTRATEDataset": "ctrate", "CT_RATE_FINDINGS": "ctrate", "CTPreprocess": "ct_transforms",
    "VolumeCache": "ct_transforms", "render_ct": "synthetic_ct", "write_ct_rate": "synthetic_ct",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
