"""Shared plumbing of the datasets: errors, CSV reading with column checks, skip bookkeeping and
the image-loading base class."""
from __future__ import annotations

import csv
import gzip
import io
import logging
import os
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

logger = logging.getLogger("acelora.data")

ON_ERROR = ("raise", "skip")
# In "skip" mode a bad item is replaced by the next readable one; this many bad items in a row
# means the data set itself is broken, not a few files in it.
MAX_CONSECUTIVE_SKIPS = 32


class DataError(ValueError):
    """A data file is missing, malformed or unreadable; the message names the file."""


def check_on_error(on_error: str) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error


def find_file(root: str, names: Sequence[str], what: str) -> str:
    """The first of ``names`` (relative to ``root``) that exists; else a DataError listing them."""
    for name in names:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"{what} not found under {root!r}: looked for {', '.join(names)}")


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: tolerate a byte-order mark


def read_csv(path: str, required: Iterable[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV (optionally .gz) as dicts keyed by the header, whose names are stripped of
    surrounding spaces (SIIM writes " EncodedPixels"). Missing file or columns: DataError."""
    if not os.path.isfile(path):
        raise DataError(f"CSV file not found: {path!r}")
    try:
        return _read_csv(path, required)
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:  # binary, bad gzip, ...
        raise DataError(f"{path}: not a readable CSV file: {type(exc).__name__}: {exc}") from None


def _read_csv(path: str, required: Iterable[str]) -> list[dict[str, str]]:
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty CSV file (no header)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; the header has {header}")
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if not values:
                continue
            if len(values) > len(header) and any(v.strip() for v in values[len(header):]):
                raise DataError(f"{path}:{line_no}: {len(values)} fields but the header has "
                                f"{len(header)}")
            values = values + [""] * (len(header) - len(values))
            rows.append(dict(zip(header, values)))
    return rows


def read_list(path: str) -> list[str]:
    """Non-empty lines of a text file (NIH's train_val_list.txt / test_list.txt)."""
    if not os.path.isfile(path):
        raise DataError(f"list file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


class SkipLog:
    """Counts skipped items by reason and logs them.

    Skips found while indexing (before a DataLoader forks) are exact; skips of unreadable images
    inside worker processes are logged there and counted in that worker's copy only.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, detail: str, quiet: bool = False) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, detail)
        (logger.debug if quiet else logger.warning)("%s: skipped %s", self.owner, detail)

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def summarize(self) -> None:
        """One warning for all the skips of indexing, with an example of each reason."""
        if self.count:
            parts = [f"{n} {reason} (e.g. {self.examples[reason]})"
                     for reason, n in self.reasons.items()]
            logger.warning("%s: skipped %d item(s): %s", self.owner, self.count, "; ".join(parts))

    def __repr__(self) -> str:
        return f"SkipLog({dict(self.reasons)})"


class ImageDataset(Dataset):
    """Base of the image datasets: records indexed up front, images read in ``__getitem__``.

    ``on_error="raise"`` raises a :class:`DataError` naming the file; ``"skip"`` drops bad records
    while indexing and, for an unreadable image at load time, logs it and returns the next
    readable item instead (so a batch never holds a silently wrong sample).
    """

    def __init__(self, transform: Callable | None = None, on_error: str = "raise"):
        self.transform = transform
        self.on_error = check_on_error(on_error)
        self.skips = SkipLog(type(self).__name__)
        self.records: list = []

    @property
    def skipped(self) -> int:
        return self.skips.count

    def _bad_record(self, reason: str, detail: str) -> None:
        """A record that cannot be used: raise, or count it (indexing time)."""
        if self.on_error == "raise":
            raise DataError(detail)
        self.skips.add(reason, detail, quiet=True)

    def _check_nonempty(self, what: str) -> None:
        self.skips.summarize()
        if not self.records:
            raise DataError(f"{type(self).__name__}: no usable items in {what}"
                            + (f" ({self.skipped} skipped: {dict(self.skips.reasons)})"
                               if self.skipped else ""))

    def __len__(self) -> int:
        return len(self.records)

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
            except DataError as exc:
                self.skips.add("unreadable image", str(exc))
        raise DataError(f"{type(self).__name__}: {MAX_CONSECUTIVE_SKIPS} unreadable items in a row "
                        f"from index {index}; is the data set intact?")

    def _load(self, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _image_tensor(self, image) -> torch.Tensor:
        """Apply the transform; without one, a float [3, H, W] tensor in [0, 1]."""
        if self.transform is not None:
            out = self.transform(image)
        else:
            # NumPy, not torch: a single-threaded copy (see collate._stack).
            array = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
            array /= 255.0
            return torch.from_numpy(array)
        return out if out.is_contiguous() else out.contiguous()


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (same on every machine and run), for splits."""
    import hashlib

    digest = hashlib.md5(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0 ** 64


def hash_split(key: str, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> str:
    """Deterministic train/valid/test assignment of ``key`` by ``fractions``."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {tuple(fractions)}")
    u = stable_fraction(key)
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "valid"
    return "test"
