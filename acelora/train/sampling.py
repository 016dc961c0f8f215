"""Determinism for training: seeding, the autocast choice, RNG snapshots (exact gradient
accumulation replays dropout masks) and the epoch sampler (exact mid-epoch resume)."""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


# --- determinism ------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` "bf16", or "auto" on a GPU; nothing for "fp32"/"auto" on CPU."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def rng_snapshot(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def rng_restore(snapshot: tuple, device: torch.device) -> None:
    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


# --- data -------------------------------------------------------------------------------------

class EpochSampler(Sampler[int]):
    """This rank's indices of one epoch: a permutation fixed by ``(seed, epoch)`` cut to whole
    global batches, rank ``r`` taking positions ``r, r + W, r + 2W, ...``.

    So global step ``s`` covers permutation entries ``[s·B, (s+1)·B)`` whatever the world size
    and ``set_epoch(epoch, skip_batches)`` resumes in the middle of an epoch.
    """

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True):
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.skip_batches = 0, 0
        self.steps_per_epoch = n // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"the data set has {n} items, fewer than one batch of {batch_size}")

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        perm = perm[: self.steps_per_epoch * self.batch_size]
        mine = perm[self.rank::self.world]
        return mine[self.skip_batches * (self.batch_size // self.world):].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.skip_batches) * (self.batch_size // self.world)
