"""CT volume preprocessing as CT-CLIP applies it (DESIGN §13), and an opt-in int16 cache.

Axis order. NIfTI arrays (``nibabel``'s ``get_fdata``) are indexed ``(x, y, z)`` = ``(i, j, k)``;
the model reads ``[D, H, W]`` = ``(z, x, y)``, i.e. the NIfTI array transposed by ``(2, 0, 1)``
with no flip (CT-CLIP's ``data_inference_nii.py`` transposes exactly so, resamples in that order
and, after crop/pad, permutes back to depth first). :func:`nifti_to_dhw` is that transpose.

Order of the steps (CT-CLIP's inference dataset): HU (slope/intercept, done by the dataset) →
clip to [−1000, 1000] → trilinear resample to (z 1.5, x 0.75, y 0.75) mm, new size
``floor(n · spacing / target)`` per axis, ``align_corners=False`` → ÷1000 → centre crop / pad
with −1 to 240×480×480 (D×H×W). CT-CLIP's *training* dataset clips after resampling instead;
``clip_first=False`` reproduces that order.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from acelora.data._common import DataError

CT_RATE_SPACING = (1.5, 0.75, 0.75)     # mm along (D, H, W) = (z, x, y)
CT_RATE_SHAPE = (240, 480, 480)         # (D, H, W)
CT_RATE_HU_RANGE = (-1000.0, 1000.0)


def nifti_to_dhw(array: np.ndarray) -> np.ndarray:
    """A NIfTI-ordered ``(x, y, z)`` array as the model's ``(D, H, W)`` = ``(z, x, y)`` (a view)."""
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {tuple(array.shape)}")
    return array.transpose(2, 0, 1)


def dhw_to_nifti(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`nifti_to_dhw`: ``(D, H, W)`` → NIfTI ``(x, y, z)`` (a view)."""
    if array.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {tuple(array.shape)}")
    return array.transpose(1, 2, 0)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> tuple[int, ...]:
    """CT-CLIP's new size per axis: ``int(n · spacing / target)`` (floor), at least 1."""
    return tuple(max(1, int(n * (s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def center_crop_pad(volume: torch.Tensor, shape: Sequence[int], value: float) -> torch.Tensor:
    """Centre crop then pad each axis of a 3-D tensor to ``shape``: crop start
    ``max((n − t) // 2, 0)``; pad ``(t − n') // 2`` before and the rest after (CT-CLIP's split)."""
    slices, pads = [], []
    for n, t in zip(volume.shape, shape):
        start = max((n - t) // 2, 0)
        kept = min(t, n - start)
        slices.append(slice(start, start + kept))
        before = (t - kept) // 2
        pads.append((before, t - kept - before))
    volume = volume[tuple(slices)]
    if any(p for pair in pads for p in pair):
        flat = [p for pair in reversed(pads) for p in pair]        # F.pad: last axis first
        volume = F.pad(volume, flat, value=value)
    return volume


@dataclass(frozen=True)
class CTPreprocess:
    """HU volume + voxel spacing → float32 tensor ``[1, D, H, W]`` for a CT-CLIP image tower.

    ``target_spacing`` and ``target_shape`` are in ``(D, H, W)`` order (mm and voxels); the
    defaults are CT-CLIP's. ``dtype`` is what the resampling is computed in (CT-CLIP resamples
    the float64 array of ``get_fdata``; float32 differs by ~1e-7 relative and halves memory).
    """

    target_spacing: tuple[float, float, float] = CT_RATE_SPACING
    target_shape: tuple[int, int, int] = CT_RATE_SHAPE
    hu_range: tuple[float, float] = CT_RATE_HU_RANGE
    scale: float = 1000.0
    pad_value: float = -1.0
    clip_first: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "target_spacing", tuple(float(s) for s in self.target_spacing))
        object.__setattr__(self, "target_shape", tuple(int(s) for s in self.target_shape))
        object.__setattr__(self, "hu_range", tuple(float(v) for v in self.hu_range))
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"target_spacing must be three positive mm values (D, H, W), got "
                             f"{self.target_spacing}")
        if len(self.target_shape) != 3 or min(self.target_shape) < 1:
            raise ValueError(f"target_shape must be three positive sizes (D, H, W), got {self.target_shape}")
        if len(self.hu_range) != 2 or not self.hu_range[0] < self.hu_range[1]:
            raise ValueError(f"hu_range must be (low, high) with low < high, got {self.hu_range}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def value_range(self) -> tuple[float, float]:
        """Every output value lies in this interval (clipped HU ÷ scale, and the pad value)."""
        low, high = self.hu_range[0] / self.scale, self.hu_range[1] / self.scale
        return min(low, self.pad_value), max(high, self.pad_value)

    def settings(self) -> dict:
        return asdict(self)

    def __call__(self, volume, spacing: Sequence[float], axes: str = "dhw") -> torch.Tensor:
        """``volume``: HU values, indexed ``(D, H, W)`` (``axes="dhw"``) or as NIfTI stores them
        ``(x, y, z)`` (``axes="xyz"``); ``spacing``: mm per voxel along the axes of ``volume``, in
        the same order."""
        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        x = torch.as_tensor(np.asarray(volume), dtype=dtype) if not isinstance(volume, torch.Tensor) \
            else volume.to(dtype)
        spacing = tuple(float(s) for s in spacing)
        if x.ndim != 3:
            raise ValueError(f"expected a 3-D volume, got shape {tuple(x.shape)}")
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be three positive finite mm values, got {spacing}")
        if axes == "xyz":
            x = x.permute(2, 0, 1)
            spacing = (spacing[2], spacing[0], spacing[1])
        elif axes != "dhw":
            raise ValueError(f"axes must be 'dhw' or 'xyz', got {axes!r}")
        low, high = self.hu_range
        if self.clip_first:
            x = x.clamp(low, high)
        size = resampled_shape(x.shape, spacing, self.target_spacing)
        if size != tuple(x.shape):
            x = F.interpolate(x[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
        if not self.clip_first:
            x = x.clamp(low, high)
        x = x / self.scale
        x = center_crop_pad(x, self.target_shape, self.pad_value)
        return x.to(torch.float32).unsqueeze(0).contiguous()


# --- the preprocessed cache ---------------------------------------------------------------

INT16_MAX = 32767


class VolumeCache:
    """Preprocessed volumes on disk as int16 ``.npy`` files, read memory-mapped.

    Values are quantised linearly over :attr:`CTPreprocess.value_range` onto ±32767 (for the
    defaults, ``q = round(x · 32767)``: step 3.1e-5, so −1, 0 and 1, the pad included, are
    exact). Files live in ``root/<settings hash>/<volume>.<key hash>.npy``; the settings hash
    covers the preprocessing, the per-volume key whatever else the volume's values depend on
    (the dataset passes the HU conversion and the spacing), so a change of either never reads a
    stale file. Writes are atomic (temporary file + rename), safe with DataLoader workers.
    """

    def __init__(self, root: str, preprocess: CTPreprocess):
        self.preprocess = preprocess
        settings = preprocess.settings()
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = os.path.join(root, f"ct-{digest}")
        low, high = preprocess.value_range
        self.offset = (high + low) / 2.0
        self.levels_per_unit = INT16_MAX / ((high - low) / 2.0)   # q = (x - offset) * this
        self.step = 1.0 / self.levels_per_unit
        self._settings = settings

    def path(self, name: str, key: dict | None = None) -> str:
        stem = name[:-len(".nii.gz")] if name.endswith(".nii.gz") else os.path.splitext(name)[0]
        key_hash = hashlib.sha1(json.dumps(key or {}, sort_keys=True).encode()).hexdigest()[:10]
        return os.path.join(self.folder, f"{stem}.{key_hash}.npy")

    def quantize(self, volume: torch.Tensor) -> np.ndarray:
        q = np.rint((volume.double().numpy() - self.offset) * self.levels_per_unit)
        return np.clip(q, -INT16_MAX, INT16_MAX).astype(np.int16)

    def dequantize(self, stored: np.ndarray) -> torch.Tensor:
        out = stored.astype(np.float32)          # reads the mapped pages once
        out /= np.float32(self.levels_per_unit)  # a division keeps ±32767 -> ±1 exact
        if self.offset:
            out += np.float32(self.offset)
        return torch.from_numpy(out)

    def load(self, name: str, key: dict | None = None) -> torch.Tensor | None:
        """The cached ``[1, D, H, W]`` tensor, or None when not cached."""
        path = self.path(name, key)
        if not os.path.isfile(path):
            return None
        try:
            stored = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cache file {path!r} is unreadable ({type(exc).__name__}: {exc}); "
                            "delete it to rebuild") from None
        expected = (1, *self.preprocess.target_shape)
        if stored.shape != expected or stored.dtype != np.int16:
            raise DataError(f"cache file {path!r} holds {stored.dtype} {stored.shape}, expected int16 "
                            f"{expected}; delete it to rebuild")
        return self.dequantize(stored)

    def save(self, name: str, volume: torch.Tensor, key: dict | None = None) -> str:
        path = self.path(name, key)
        os.makedirs(self.folder, exist_ok=True)
        settings_file = os.path.join(self.folder, "settings.json")
        if not os.path.isfile(settings_file):
            _atomic_write(settings_file, lambda f: f.write(json.dumps(self._settings, indent=2).encode()))
        _atomic_write(path, lambda f: np.save(f, self.quantize(volume)))
        return path


def _atomic_write(path: str, write) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


__all__ = ["CTPreprocess", "VolumeCache", "nifti_to_dhw", "dhw_to_nifti", "resampled_shape",
           "center_crop_pad", "CT_RATE_SPACING", "CT_RATE_SHAPE", "CT_RATE_HU_RANGE"]
