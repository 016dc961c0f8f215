"""Reading images: DICOM (MONOCHROME1, modality LUT, VOI LUT / window, 16-bit) and PNG/JPEG."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from acelora.data._common import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")


def _first(value) -> float:
    # Window Center/Width may be multi-valued (several presets); the first is the default one.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def apply_window(pixels: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1] (LINEAR, LINEAR_EXACT or SIGMOID)."""
    x = pixels.astype(np.float64)
    function = (function or "LINEAR").strip().upper()
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0, got {width}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise ValueError(f"unsupported VOI LUT Function {function!r}")
    if width < 1:
        raise ValueError(f"Window Width must be >= 1 for LINEAR windowing, got {width}")
    if width == 1:  # a threshold
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def read_dicom(path: str) -> np.ndarray:
    """A single-frame greyscale DICOM as float32 [H, W] in [0, 1], white = dense (bone).

    Order (PS3.4 grayscale pipeline): modality LUT (Rescale Slope/Intercept), then the VOI LUT
    Sequence if present, else Window Center/Width, else min–max scaling; MONOCHROME1 (where
    low values are white) is inverted last.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi

    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except FileNotFoundError:
        raise DataError(f"DICOM file not found: {path!r}") from None
    except (InvalidDicomError, AttributeError, ValueError, OSError, KeyError, EOFError,
            NotImplementedError, RuntimeError) as exc:
        raise DataError(f"cannot read DICOM {path!r}: {type(exc).__name__}: {exc}") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(f"{path}: Photometric Interpretation {photometric!r} is not greyscale")
    if stored.ndim != 2:
        raise DataError(f"{path}: expected a single-frame 2-D image, pixel array has shape "
                        f"{tuple(stored.shape)}")

    # The window is ignored when a VOI LUT is present (the LUT wins), so only check what is used.
    _check_finite_attributes(ds, path, _SCALING_ATTRIBUTES[:2] if ds.get("VOILUTSequence")
                             else _SCALING_ATTRIBUTES)
    if ds.get("VOILUTSequence"):
        # The VOI LUT maps stored values directly; its entries span 0 .. 2**bits - 1.
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        image = apply_voi(stored, ds).astype(np.float64) / float(2 ** bits - 1)
    else:
        values = apply_modality_lut(stored, ds).astype(np.float64)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            image = apply_window(values, _first(ds.WindowCenter), _first(ds.WindowWidth),
                                 str(ds.get("VOILUTFunction", "LINEAR")))
        else:
            low, high = float(values.min()), float(values.max())
            image = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    if not np.isfinite(image).all():  # NaN would be cast to black and scored as an image
        raise DataError(f"{path}: the modality/VOI LUT gives non-finite pixel values; the image "
                        "is unreadable")
    return np.clip(image, 0.0, 1.0).astype(np.float32)


# Attributes whose values scale the pixels: a NaN/Inf in any of them makes the image unreadable.
_SCALING_ATTRIBUTES = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth")


def _check_finite_attributes(ds, path: str, names) -> None:
    for name in names:
        if name not in ds:
            continue
        value = ds.data_element(name).value
        values = list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        try:
            bad = [v for v in values if v is not None and v != "" and not np.isfinite(float(v))]
        except (TypeError, ValueError):
            raise DataError(f"{path}: {name} {value!r} is not a number; the image is unreadable") from None
        if bad:
            raise DataError(f"{path}: {name} is {bad[0]!r} (not finite); the image is unreadable")


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float greyscale PNG: scale its range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
        image = Image.fromarray((array * 255.0 + 0.5).astype(np.uint8))
    return image.convert("RGB")


def load_image(path: str) -> Image.Image:
    """A DICOM, PNG or JPEG file as an RGB PIL image (greyscale replicated to 3 channels).

    Missing or corrupt files raise :class:`DataError` naming the file.
    """
    path = os.fspath(path)
    if path.lower().endswith(DICOM_SUFFIXES):
        pixels = read_dicom(path)
        return Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8)).convert("RGB")
    if not os.path.isfile(path):
        raise DataError(f"image file not found: {path!r}")
    try:
        with Image.open(path) as image:
            image.load()
            return _pil_to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path!r}: {type(exc).__name__}: {exc}") from None
