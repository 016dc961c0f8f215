"""SIIM run-length encoding: decode against a naive decoder, encode round-trip, union, bad input."""
import numpy as np
import pytest

from acelora.data.rle import rle_decode, rle_decode_union, rle_encode


def naive_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Pixel by pixel: relative starts, column-major numbering (x * height + y)."""
    mask = np.zeros((height, width), dtype=bool)
    if rle.strip() in ("", "-1"):
        return mask
    values = [int(v) for v in rle.split()]
    position = 0
    for start, length in zip(values[0::2], values[1::2]):
        position += start
        for p in range(position, position + length):
            mask[p % height, p // height] = True
        position += length
    return mask


def naive_encode(mask: np.ndarray) -> str:
    height, width = mask.shape
    runs, previous_end, run_start = [], 0, None
    for p in range(height * width):
        on = bool(mask[p % height, p // height])
        if on and run_start is None:
            run_start = p
        if not on and run_start is not None:
            runs.append((run_start - previous_end, p - run_start))
            previous_end, run_start = p, None
    if run_start is not None:
        runs.append((run_start - previous_end, height * width - run_start))
    return " ".join(f"{s} {n}" for s, n in runs) if runs else "-1"


def random_mask(rng, height, width, density):
    # Blobs plus speckle, so runs cross column boundaries and touch the image edges.
    mask = rng.uniform(size=(height, width)) < density
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    mask[max(0, y0 - 5):y0 + 5, max(0, x0 - 3):x0 + 8] = True
    return mask


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (7, 31)])
def test_decode_matches_naive_decoder(shape):
    rng = np.random.default_rng()
    height, width = shape
    for density in (0.05, 0.3, 0.9):
        mask = random_mask(rng, height, width, density)
        rle = naive_encode(mask)
        out = rle_decode(rle, height, width)
        assert out.shape == (height, width) and out.dtype == bool
        np.testing.assert_array_equal(out, naive_decode(rle, height, width))
        np.testing.assert_array_equal(out, mask)


def test_hand_example_is_column_major_and_relative():
    # Pixels 1,2 (column 0, rows 1-2) and then, 3 after the end of that run, pixels 6,7:
    # column 1 (rows 2-3) in a 4-row image.
    out = rle_decode("1 2 3 2", height=4, width=3)
    expected = np.zeros((4, 3), dtype=bool)
    expected[1:3, 0] = True
    expected[2:4, 1] = True
    np.testing.assert_array_equal(out, expected)
    assert rle_encode(expected) == "1 2 3 2"


def test_encode_round_trip_and_naive_encoder():
    rng = np.random.default_rng()
    for _ in range(5):
        height, width = (int(v) for v in rng.integers(5, 40, 2))
        mask = random_mask(rng, height, width, float(rng.uniform(0.01, 0.6)))
        text = rle_encode(mask)
        assert text == naive_encode(mask)
        np.testing.assert_array_equal(rle_decode(text, height, width), mask)
    full = np.ones((6, 5), dtype=bool)
    assert rle_encode(full) == "0 30"
    assert rle_encode(np.zeros((6, 5), dtype=bool)) == "-1"


def test_1024_default_and_empty():
    assert not rle_decode("-1").any() and rle_decode("-1").shape == (1024, 1024)
    assert not rle_decode("  -1 ").any() and not rle_decode("").any()
    out = rle_decode("1024 1024")  # exactly column 1
    assert out[:, 1].all() and out.sum() == 1024


def test_union_of_overlapping_rows():
    rng = np.random.default_rng()
    a, b = random_mask(rng, 20, 20, 0.1), random_mask(rng, 20, 20, 0.1)
    out = rle_decode_union([rle_encode(a), "-1", rle_encode(b)], 20, 20)
    np.testing.assert_array_equal(out, a | b)


@pytest.mark.parametrize("bad", ["1 2 3", "a b", "1 -2", "0 17"])
def test_bad_rle_raises(bad):
    with pytest.raises(ValueError):
        rle_decode(bad, 4, 4)


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((2, 2, 2)))
