"""The one place that chooses a backend for every functional op.

Each op module registers its implementations here by name::

    register("label_guided_infonce", "reference", _reference_fn)
    register("label_guided_infonce", "triton", _triton_fn)   # may import triton lazily

and calls ``implementation(op, backend, tensor)`` to get the function to run.
``backend="auto"`` picks the fastest available implementation for the tensor's device
(``AUTO_ORDER``); the reference everywhere else. ``ACELORA_BACKEND`` in the environment overrides
what ``"auto"`` means (handy to force the reference in a debugging session).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("reference", "triton", "cuda", "auto")
# Preference per device type when backend="auto".
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)}
# Per-op exceptions to AUTO_ORDER, {(op, device_type): order}, set by the op modules.
AUTO_ORDER_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {}
# Ops whose "cuda" backend (the compiled extension) also has C++ kernels for CPU tensors.
CPU_EXTENSION_OPS: set[str] = set()

_IMPLS: dict[str, dict[str, Callable]] = {}


def register(op: str, backend: str, fn: Callable) -> Callable:
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"cannot register backend {backend!r}")
    _IMPLS.setdefault(op, {})[backend] = fn
    return fn


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_available(op: str, backend: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device``, and if not, why."""
    if backend not in _IMPLS.get(op, {}):
        return False, f"op {op!r} has no {backend!r} implementation"
    if backend == "reference":
        return True, ""
    if backend == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if device.type == "cuda" or triton_interpreted():
            return True, ""
        return False, "triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
    if backend == "cuda":
        if device.type == "cpu" and op in CPU_EXTENSION_OPS:
            from acelora.ops import _extension
            if _extension.cpu_ops_available():
                return True, ""
            return False, _extension.unavailable_reason()
        if device.type != "cuda":
            return False, "the CUDA extension needs CUDA tensors"
        from acelora.ops import _extension
        if not _extension.cuda_ops_available():
            return False, _extension.unavailable_reason()
        return True, ""
    return False, f"unknown backend {backend!r}"


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend name that will run ``op`` on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get("ACELORA_BACKEND", "auto")
        if forced != "auto":
            backend = forced
    if backend != "auto":
        ok, why = backend_available(op, backend, device)
        if not ok:
            raise RuntimeError(f"backend {backend!r} cannot run {op} on {device.type} tensors: {why}")
        return backend
    for candidate in auto_order(op, device.type):
        ok, why = backend_available(op, candidate, device)
        if ok:
            return candidate
        if candidate != "reference" and device.type == "cuda" and "not installed" in why:
            _warn_once(op, candidate, why)
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors")


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    return AUTO_ORDER_OVERRIDES.get((op, device_type), AUTO_ORDER.get(device_type, ("reference",)))


def implementation(op: str, backend: str, device: torch.device) -> Callable:
    return _IMPLS[op][resolve(op, backend, device)]


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, backend: str, why: str) -> None:
    warnings.warn(f"acelora: {op} falls back from {backend} ({why})", stacklevel=3)
