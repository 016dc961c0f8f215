"""SIIM-ACR pneumothorax run-length encoding (DESIGN §8).

Pixels are numbered column-major (down each column, then the next column), from 0. The string is
pairs "start length"; each start is relative to the end of the previous run (the first to pixel 0).
"-1" (or an empty string) is an empty mask. Several rows for one image are OR-ed.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

EMPTY = "-1"


def rle_decode(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """A SIIM RLE string → bool mask [height, width]. Malformed input raises ValueError."""
    flat = np.zeros(height * width, dtype=bool)
    text = (rle or "").strip()
    if text in ("", EMPTY):
        return flat.reshape(width, height).T
    try:
        numbers = np.array([int(tok) for tok in text.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"RLE must be integers, got {text[:60]!r}") from None
    if numbers.size % 2:
        raise ValueError(f"RLE must hold start/length pairs, got {numbers.size} numbers")
    starts, lengths = numbers[0::2], numbers[1::2]
    if (starts < 0).any() or (lengths < 0).any():
        raise ValueError("RLE starts and lengths must be non-negative")
    # Absolute start of run i = sum of starts[:i+1] + sum of lengths[:i].
    absolute = np.cumsum(starts) + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    ends = absolute + lengths
    if ends.size and ends[-1] > flat.size:
        raise ValueError(f"RLE runs past the end of a {height}x{width} mask "
                         f"(pixel {int(ends[-1])} > {flat.size})")
    # Mark run boundaries (+1 at a start, -1 at an end) and integrate: O(pixels) for any run count.
    delta = np.zeros(flat.size + 1, dtype=np.int32)
    np.add.at(delta, absolute, 1)
    np.add.at(delta, ends, -1)
    flat = np.cumsum(delta[:-1]) > 0
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray) -> str:
    """Bool/0-1 mask [H, W] → SIIM RLE string ("-1" when empty); inverse of :func:`rle_decode`."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    flat = mask.T.reshape(-1).astype(bool)  # column-major
    if not flat.any():
        return EMPTY
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    lengths = ends - starts
    relative = starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s} {n}" for s, n in zip(relative.tolist(), lengths.tolist()))


def rle_decode_union(rles: Iterable[str], height: int = 1024, width: int = 1024) -> np.ndarray:
    """OR of the masks of several RLE rows of one image."""
    mask = np.zeros((height, width), dtype=bool)
    for rle in rles:
        mask |= rle_decode(rle, height, width)
    return mask
