"""DICOM (MONOCHROME1, window, rescale, VOI LUT, 16-bit) and PNG/JPEG reading, bad files."""
import numpy as np
import pydicom
import pytest
from PIL import Image

from acelora.data import DataError
from acelora.data.images import apply_window, load_image, read_dicom
from acelora.data.synthetic import write_dicom


def naive_linear_window(x, center, width):
    """DICOM PS3.3 C.11.2.1.2.1, element by element, output range [0, 1]."""
    out = np.empty_like(x, dtype=np.float64)
    for idx, v in np.ndenumerate(x.astype(np.float64)):
        if v <= center - 0.5 - (width - 1) / 2:
            out[idx] = 0.0
        elif v > center - 0.5 + (width - 1) / 2:
            out[idx] = 1.0
        else:
            out[idx] = ((v - (center - 0.5)) / (width - 1) + 0.5)
    return out


def _edit(path, **tags):
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_monochrome1_is_inverted(tmp_path):
    rng = np.random.default_rng()
    image = rng.uniform(0.05, 0.95, (20, 24))
    image[0, 0], image[-1, -1] = 0.0, 1.0  # full range, so min-max scaling is the identity
    write_dicom(str(tmp_path / "m2.dcm"), image, "MONOCHROME2", bits=16)
    write_dicom(str(tmp_path / "m1.dcm"), image, "MONOCHROME1", bits=16)
    stored = pydicom.dcmread(str(tmp_path / "m1.dcm")).pixel_array
    assert stored[0, 0] == 65535 and stored[-1, -1] == 0  # really stored inverted
    m1, m2 = read_dicom(str(tmp_path / "m1.dcm")), read_dicom(str(tmp_path / "m2.dcm"))
    assert m1.dtype == np.float32 and m1.shape == (20, 24)
    np.testing.assert_allclose(m1, m2, atol=1e-6)
    np.testing.assert_allclose(m2, image, atol=1.0 / 65535 + 1e-6)


@pytest.mark.parametrize("bits", [12, 16])
def test_window_matches_reference(tmp_path, bits):
    rng = np.random.default_rng()
    top = 2 ** bits - 1
    image = rng.uniform(0, 1, (16, 16))
    center, width = round(float(rng.uniform(0.3, 0.7) * top), 1), round(float(rng.uniform(0.2, 0.5) * top), 1)
    path = str(tmp_path / "w.dcm")
    write_dicom(path, image, "MONOCHROME2", bits=bits, window=(center, width))
    stored = pydicom.dcmread(path).pixel_array
    ref = naive_linear_window(stored, center, width)
    out = read_dicom(path)
    assert 0 < ref.mean() < 1 and (ref == 0).any() and (ref == 1).any()  # clips on both sides
    np.testing.assert_allclose(out, ref, atol=1e-6)
    # The same window on a MONOCHROME1 file: inverted after windowing.
    path1 = str(tmp_path / "w1.dcm")
    write_dicom(path1, image, "MONOCHROME1", bits=bits, window=(center, width))
    stored1 = pydicom.dcmread(path1).pixel_array
    np.testing.assert_allclose(read_dicom(path1), 1.0 - naive_linear_window(stored1, center, width),
                               atol=1e-6)


def test_rescale_then_window(tmp_path):
    rng = np.random.default_rng()
    image = rng.uniform(0, 1, (12, 12))
    slope, intercept = 2.0, -1024.0
    center, width = 2000.0, 3000.0  # in rescaled (output) units
    path = str(tmp_path / "r.dcm")
    write_dicom(path, image, bits=12, rescale=(slope, intercept), window=(center, width))
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_dicom(path), naive_linear_window(stored * slope + intercept,
                                                                     center, width), atol=1e-6)


def test_multi_valued_window_uses_first(tmp_path):
    image = np.linspace(0, 1, 64).reshape(8, 8)
    path = str(tmp_path / "mv.dcm")
    write_dicom(path, image, bits=12)
    _edit(path, WindowCenter=[1000, 3000], WindowWidth=[800, 200])
    stored = pydicom.dcmread(path).pixel_array
    np.testing.assert_allclose(read_dicom(path), naive_linear_window(stored, 1000, 800), atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    rng = np.random.default_rng()
    image = rng.uniform(0, 1, (10, 10))
    path = str(tmp_path / "lut.dcm")
    write_dicom(path, image, bits=12)
    ds = pydicom.dcmread(path)
    first, n = 100, 3000
    lut = (np.sqrt(np.arange(n) / (n - 1)) * 65535).astype(np.uint16)  # a curve, not a line
    item = Dataset()
    item.LUTDescriptor = [n, first, 16]
    item.LUTData = lut.astype("<u2").tobytes()
    ds.VOILUTSequence = Sequence([item])
    ds.WindowCenter, ds.WindowWidth = "5", "3"  # must be ignored: the LUT wins
    ds.save_as(path)
    stored = pydicom.dcmread(path).pixel_array.astype(np.int64)
    ref = lut[np.clip(stored - first, 0, n - 1)] / 65535.0
    np.testing.assert_allclose(read_dicom(path), ref, atol=1e-6)


def test_sixteen_bit_precision_kept(tmp_path):
    # A ramp of 4096 grey levels: more than 8 bits must survive reading.
    image = np.linspace(0, 1, 4096).reshape(64, 64)
    path = str(tmp_path / "ramp.dcm")
    write_dicom(path, image, bits=16)
    out = read_dicom(path)
    assert len(np.unique(out)) == 4096
    np.testing.assert_allclose(out, image, atol=1e-4)
    rgb = load_image(path)  # 8-bit RGB for the transforms
    assert rgb.mode == "RGB" and rgb.size == (64, 64)
    np.testing.assert_allclose(np.asarray(rgb)[..., 0] / 255.0, image, atol=1 / 255 + 1e-6)


def test_apply_window_bad_arguments():
    with pytest.raises(ValueError, match="Window Width"):
        apply_window(np.zeros(3), 0, 0.5)
    with pytest.raises(ValueError, match="VOI LUT Function"):
        apply_window(np.zeros(3), 0, 10, "CUBIC")
    sig = apply_window(np.array([0.0, 50.0, 100.0]), 50, 40, "SIGMOID")
    np.testing.assert_allclose(sig, 1 / (1 + np.exp(-4 * (np.array([0, 50, 100]) - 50) / 40)))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_dicom(str(tmp_path / "missing.dcm"))
    with pytest.raises(DataError, match="not found"):
        load_image(str(tmp_path / "missing.jpg"))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a dicom file" * 10)
    with pytest.raises(DataError, match="junk.dcm"):
        load_image(str(junk))
    truncated = tmp_path / "trunc.dcm"
    write_dicom(str(truncated), np.zeros((32, 32)), bits=12)
    truncated.write_bytes(truncated.read_bytes()[:-500])
    with pytest.raises(DataError, match="trunc.dcm"):
        load_image(str(truncated))
    corrupt = tmp_path / "bad.jpg"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:20])
    with pytest.raises(DataError, match="bad.jpg"):
        load_image(str(corrupt))


def test_png_and_jpeg(tmp_path):
    rng = np.random.default_rng()
    grey = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(str(tmp_path / "g.png"))
    assert out.mode == "RGB" and out.size == (7, 9)
    np.testing.assert_array_equal(np.asarray(out)[..., 1], grey)
    # 16-bit PNG: its range is scaled to 8 bits, not clipped at 255.
    deep = (np.linspace(0, 1, 63).reshape(9, 7) * 40000).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    out16 = np.asarray(load_image(str(tmp_path / "d.png")))[..., 0].astype(np.float64)
    np.testing.assert_allclose(out16 / 255.0, deep / deep.max(), atol=1 / 255 + 1e-6)
