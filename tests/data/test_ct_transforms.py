"""CT preprocessing (CT-CLIP's order, axis order, resampling, crop/pad) and the int16 cache."""
import math
import os

import numpy as np
import pytest
import torch

from acelora.data._common import DataError
from acelora.data.ct_transforms import (CTPreprocess, VolumeCache, dhw_to_nifti, nifti_to_dhw,
                                        resampled_shape)


def linear_resize_axis(a: np.ndarray, axis: int, out: int) -> np.ndarray:
    """1-D linear resampling along ``axis`` with half-pixel centres (align_corners=False):
    source coordinate (i + 0.5) · n / out − 0.5, clamped at 0, neighbours clamped at n − 1."""
    n = a.shape[axis]
    src = np.maximum((np.arange(out) + 0.5) * (n / out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    lam = src - i0
    shape = [1] * a.ndim
    shape[axis] = out
    lam = lam.reshape(shape)
    return np.take(a, i0, axis=axis) * (1 - lam) + np.take(a, i1, axis=axis) * lam


def reference(hu_dhw, spacing, target_spacing, target_shape, clip_first=True):
    """An independent float64 NumPy implementation of CT-CLIP's preprocessing."""
    x = np.asarray(hu_dhw, dtype=np.float64)
    if clip_first:
        x = np.clip(x, -1000, 1000)
    for axis in range(3):
        new = max(1, math.floor(x.shape[axis] * spacing[axis] / target_spacing[axis]))
        if new != x.shape[axis]:
            x = linear_resize_axis(x, axis, new)
    if not clip_first:
        x = np.clip(x, -1000, 1000)
    x = x / 1000.0
    out = np.full(target_shape, -1.0)
    src, dst = [], []
    for n, t in zip(x.shape, target_shape):
        if n >= t:
            s = (n - t) // 2
            src.append(slice(s, s + t))
            dst.append(slice(0, t))
        else:
            b = (t - n) // 2
            src.append(slice(0, n))
            dst.append(slice(b, b + n))
    out[tuple(dst)] = x[tuple(src)]
    return out


def test_axis_order_nifti_xyz_to_model_dhw():
    # a[i, j, k] encodes its own NIfTI index; the model's [D, H, W] must be (k, i, j).
    i, j, k = np.meshgrid(np.arange(4), np.arange(5), np.arange(3), indexing="ij")
    a = (100 * i + 10 * j + k).astype(np.float64)                    # (x, y, z) = (4, 5, 3)
    pre = CTPreprocess(target_spacing=(2.0, 0.5, 0.7), target_shape=(3, 4, 5), dtype="float64")
    out = pre(a, (0.5, 0.7, 2.0), axes="xyz")                       # spacing in (x, y, z) order
    assert out.shape == (1, 3, 4, 5)
    for kk, ii, jj in [(0, 0, 0), (2, 3, 4), (1, 2, 3), (2, 0, 4)]:
        assert out[0, kk, ii, jj].item() == pytest.approx(a[ii, jj, kk] / 1000.0, rel=1e-7)
    assert np.array_equal(nifti_to_dhw(a)[2, 3, 1], a[3, 1, 2])
    assert np.array_equal(dhw_to_nifti(nifti_to_dhw(a)), a)
    dhw = pre(np.ascontiguousarray(nifti_to_dhw(a)), (2.0, 0.5, 0.7), axes="dhw")
    assert torch.equal(dhw, out)
    with pytest.raises(ValueError, match="axes"):
        pre(a, (1, 1, 1), axes="zyx")


@pytest.mark.parametrize("clip_first", [True, False])
def test_resample_matches_independent_reference(clip_first):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1600, 1600, size=(11, 13, 9))
    spacing = (2.5, 0.7, 0.9)                                      # (z, x, y) mm
    target_spacing, target_shape = (1.5, 0.75, 0.75), (20, 10, 14)
    expected_size = (18, 12, 10)                                   # floor(11·2.5/1.5) etc.
    assert resampled_shape(hu.shape, spacing, target_spacing) == expected_size
    ref = reference(hu, spacing, target_spacing, target_shape, clip_first)
    out64 = CTPreprocess(target_spacing, target_shape, clip_first=clip_first, dtype="float64")(hu, spacing)
    out32 = CTPreprocess(target_spacing, target_shape, clip_first=clip_first)(hu, spacing)
    assert out64.dtype == torch.float32 and out64.shape == (1, *target_shape)
    scale = np.abs(ref).max()
    assert np.abs(out64[0].double().numpy() - ref).max() / scale < 1e-7     # float32 output rounding
    # In float32 PyTorch also computes the source coordinates in float32 (~1e-6 of a voxel).
    assert np.abs(out32[0].double().numpy() - ref).max() / scale < 5e-6
    assert out32.min() >= -1 and out32.max() <= 1


def test_clip_order_matters_where_the_volume_exceeds_the_window():
    hu = np.zeros((2, 2, 4))
    hu[..., :2], hu[..., 2:] = 3000.0, -1000.0
    args = dict(target_spacing=(1, 1, 1), target_shape=(2, 2, 3), dtype="float64")
    spacing = (1.0, 1.0, 0.75)                                     # 4 -> 3 voxels along W
    first = CTPreprocess(**args)(hu, spacing)[0, 0, 0].numpy()
    after = CTPreprocess(**args, clip_first=False)(hu, spacing)[0, 0, 0].numpy()
    assert np.allclose(first, reference(hu, spacing, (1, 1, 1), (2, 2, 3))[0, 0], atol=1e-7)
    assert np.allclose(after, reference(hu, spacing, (1, 1, 1), (2, 2, 3), clip_first=False)[0, 0], atol=1e-7)
    assert after[1] > first[1]                                     # the middle voxel mixes both


def test_center_crop_and_pad_with_minus_one():
    hu = np.arange(5 * 7 * 9, dtype=np.float64).reshape(5, 7, 9)
    pre = CTPreprocess(target_spacing=(1, 1, 1), target_shape=(8, 4, 9), hu_range=(-1e4, 1e4), dtype="float64")
    out = pre(hu, (1, 1, 1))[0].double().numpy()
    expected = np.full((8, 4, 9), -1.0)
    expected[1:6] = hu[:, 1:5, :] / 1000.0                         # pad 1 before, 2 after; crop from 1
    assert np.array_equal(out, expected.astype(np.float32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="target_spacing"):
        CTPreprocess(target_spacing=(0, 1, 1))
    with pytest.raises(ValueError, match="hu_range"):
        CTPreprocess(hu_range=(10, -10))
    with pytest.raises(ValueError, match="spacing"):
        CTPreprocess()(np.zeros((2, 2, 2)), (1, float("nan"), 1))
    with pytest.raises(ValueError, match="3-D"):
        CTPreprocess()(np.zeros((2, 2)), (1, 1, 1))


def test_cache_round_trip_int16_memory_mapped(tmp_path):
    rng = np.random.default_rng(1)
    pre = CTPreprocess(target_spacing=(2.0, 1.0, 1.0), target_shape=(6, 12, 12))
    hu = rng.uniform(-1200, 1200, (5, 14, 10))
    hu[1:4, 3:10, 2:8] = 1500.0                                     # clipped to exactly 1
    volume = pre(hu, (2.5, 0.8, 1.1))
    assert (volume == -1).any() and (volume == 1).any()            # pad and clipped voxels
    cache = VolumeCache(str(tmp_path), pre)
    key = {"slope": 1.0, "intercept": -1024.0}
    assert cache.load("valid_1_a_1.nii.gz", key) is None
    path = cache.save("valid_1_a_1.nii.gz", volume, key)
    stored = np.load(path, mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.int16 and stored.shape == (1, 6, 12, 12)
    back = cache.load("valid_1_a_1.nii.gz", key)
    assert back.dtype == torch.float32 and back.shape == volume.shape
    assert (back - volume).abs().max().item() <= cache.step / 2 + 1e-7
    assert torch.equal(back[volume == -1], volume[volume == -1])   # -1 and 1 are exact
    assert torch.equal(back[volume == 1], volume[volume == 1])
    assert cache.load("valid_1_a_1.nii.gz", {**key, "intercept": 0.0}) is None      # other key
    other = VolumeCache(str(tmp_path), CTPreprocess(target_spacing=(2.0, 1.0, 1.0), target_shape=(6, 12, 12),
                                                    clip_first=False))
    assert other.folder != cache.folder and other.load("valid_1_a_1.nii.gz", key) is None
    with open(path, "wb") as f:
        f.write(b"not a numpy file")
    with pytest.raises(DataError, match="delete it"):
        cache.load("valid_1_a_1.nii.gz", key)
    assert sorted(os.listdir(cache.folder)) == sorted(["settings.json", os.path.basename(path)])
