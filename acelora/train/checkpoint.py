"""Atomic training checkpoints that resume exactly.

A checkpoint is one torch file holding only tensors and plain Python containers, so it is read
back with ``torch.load(weights_only=True)`` (no arbitrary unpickling): the trainable parameters by
name, the optimizer and scheduler state, every RNG state (Python, NumPy, torch CPU and CUDA), the
step/epoch counters and the run's config. It is written to a temporary file in the same folder
and moved into place with ``os.replace``, so a crash never leaves a half-written checkpoint under
the final name.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from acelora.train.optim import trainable_named_parameters

CHECKPOINT_VERSION = 1


# --- RNG --------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every random state a training step draws from, as weights_only-loadable values."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"name": version, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --- files ------------------------------------------------------------------------------------

def atomic_torch_save(obj: Any, path: str) -> str:
    """``torch.save`` to a temporary file beside ``path``, fsync, mode 0644, then ``os.replace``
    onto it (a full disk is an error naming ``path``)."""
    from acelora.outputs import atomic_write

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_directory(write, path: str) -> str:
    """Call ``write(tmp_dir)`` then swap the folder into place at ``path``.

    A reader sees either the old complete folder or the new complete one; a crash inside
    ``write`` leaves ``path`` untouched. Files get mode 0644, folders 0755; a full disk is an
    error naming ``path``.
    """
    from acelora.outputs import DIR_MODE, FILE_MODE, _raise_named

    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    except OSError as exc:
        _raise_named(exc, path)
    try:
        write(tmp)
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, DIR_MODE)
            for name in files:
                os.chmod(os.path.join(root, name), FILE_MODE)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            _raise_named(exc, path)
        raise
    return path


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (CPU copies)."""
    return {n: p.detach().cpu().clone() for n, p in trainable_named_parameters(model)}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back in place; the names must match exactly."""
    params = dict(trainable_named_parameters(model))
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError("checkpoint does not match the model's trainable parameters: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"checkpoint parameter {name!r} has shape {tuple(state[name].shape)}, "
                                 f"the model's has {tuple(param.shape)}")
            param.copy_(state[name].to(param.dtype))


def save_checkpoint(path: str, model: nn.Module, optimizer=None, scheduler=None, *, step: int,
                    epoch: int, config: dict | None = None, extra: dict | None = None) -> str:
    """Write the full training state atomically to ``path``."""
    state = {
        "version": CHECKPOINT_VERSION,
        "model": trainable_state_dict(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "step": int(step),
        "epoch": int(epoch),
        "config": config or {},
        "extra": extra or {},
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str, model: nn.Module | None = None, optimizer=None, scheduler=None,
                    restore_rng: bool = True, map_location="cpu") -> dict[str, Any]:
    """Read a checkpoint (weights_only) and restore whatever of model/optimizer/scheduler/RNG is
    given. Returns the raw state (``step``, ``epoch``, ``config``, ``extra``, ...)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated/corrupt file or a foreign pickle
        raise ValueError(f"cannot read checkpoint {path!r}: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path!r} is not an acelora training checkpoint "
                         f"(version {state.get('version') if isinstance(state, dict) else None!r})")
    if model is not None:
        load_trainable_state_dict(model, state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    return state
