"""The one place that chooses a backend for every functional op.

Each op module registers its implementations here, each declaring when it applies::

    register("label_guided_infonce", "reference", reference_fn)
    register("label_guided_infonce", "triton", triton_fn, dtypes=(torch.float32, ...))
    register("lora_qkv", "cuda", compiled_fn, devices=("cuda", "cpu"), auto_devices=("cuda", "cpu"))

and calls ``implementation(op, backend, device, dtype)`` to get the function to run.

When an implementation applies:
  * its **device types** (``devices``; default: the backend's own, ``BACKEND_DEVICES``) and the
    ones where ``"auto"`` may choose it (``auto_devices``; default: ``AUTO_DEVICES``);
  * its input **dtypes** (``dtypes``; None: any);
  * the backend's **availability** on that device type (triton installed, and a GPU or the
    interpreter; the compiled extension built for that device type).

``backend="auto"`` takes the first implementation in ``AUTO_PREFERENCE`` order that applies.
What "auto" means can be replaced for a block of code with :func:`use_backend` (per thread and
per asyncio task), or process-wide with ``ACELORA_BACKEND`` in the environment; a backend named in
a call always wins over both.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from acelora.ops import _extension

BACKENDS = ("reference", "triton", "cuda", "auto")
# Which backend "auto" prefers when several apply.
AUTO_PREFERENCE = ("cuda", "triton", "reference")
# Default device types of each backend (None: every device type), and where "auto" picks it.
# The triton backend runs on CPU tensors only through the interpreter (TRITON_INTERPRET=1), which
# is for tests: "auto" never chooses it there.
BACKEND_DEVICES: dict[str, tuple[str, ...] | None] = {
    "reference": None, "triton": ("cuda", "cpu"), "cuda": ("cuda",)}
AUTO_DEVICES: dict[str, tuple[str, ...] | None] = {
    "reference": None, "triton": ("cuda",), "cuda": ("cuda",)}


@dataclass(frozen=True)
class Implementation:
    """One backend of one op and when it applies."""
    fn: Callable
    devices: tuple[str, ...] | None       # None: every device type
    auto_devices: tuple[str, ...] | None
    dtypes: tuple[torch.dtype, ...] | None  # None: any dtype

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def auto_on(self, device_type: str) -> bool:
        return self.auto_devices is None or device_type in self.auto_devices

    def takes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes


_IMPLS: dict[str, dict[str, Implementation]] = {}


def register(op: str, backend: str, fn: Callable, *, devices: tuple[str, ...] | None = None,
             auto_devices: tuple[str, ...] | None = None,
             dtypes: tuple[torch.dtype, ...] | None = None) -> Callable:
    """Register ``fn`` as ``op``'s ``backend``; unset ``devices``/``auto_devices`` are the backend's
    defaults. ``fn`` is called after the op has checked its arguments."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"cannot register backend {backend!r}")
    devices = devices if devices is not None else BACKEND_DEVICES[backend]
    auto_devices = auto_devices if auto_devices is not None else AUTO_DEVICES[backend]
    _IMPLS.setdefault(op, {})[backend] = Implementation(fn, devices, auto_devices, dtypes)
    return fn


# --- availability of each backend ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_missing(device_type: str) -> str:
    if not triton_available():
        return "triton is not installed"
    if device_type == "cuda" or triton_interpreted():
        return ""
    return "triton needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"


def _extension_missing(device_type: str) -> str:
    ok = _extension.cuda_ops_available() if device_type == "cuda" else _extension.cpu_ops_available()
    return "" if ok else (_extension.unavailable_reason() or f"the compiled extension has no {device_type} kernels")


# backend -> (device type -> "" when it can run there, else why not)
_MISSING: dict[str, Callable[[str], str]] = {
    "reference": lambda device_type: "", "triton": _triton_missing, "cuda": _extension_missing}


def backend_available(op: str, backend: str, device: torch.device,
                      dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device`` (and ``dtype``), and if not, why."""
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        return False, f"op {op!r} has no {backend!r} implementation"
    if not impl.runs_on(device.type):
        where = " or ".join(impl.devices or ())
        return False, f"the {backend} backend of {op} needs {where} tensors"
    if not impl.takes(dtype):
        return False, _dtype_refusal(backend, impl, dtype)
    why = _MISSING[backend](device.type)
    return (not why), why


def _dtype_refusal(backend: str, impl: Implementation, dtype) -> str:
    return (f"the {backend} backend takes {[str(d) for d in impl.dtypes]} inputs, got {dtype}; "
            "use backend='reference'")


# --- the backend "auto" stands for ---------------------------------------------------------------

_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("acelora_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops of the enclosed block that are called with ``backend="auto"`` (the default of
    every op and module) on ``name``.

    Ops that have no implementation called ``name`` keep choosing automatically, so one model can
    run under ``use_backend("triton")`` although its LoRA op has no Triton kernel. An op that has
    one but cannot run it (device, dtype, not installed) raises, as if named in the call.
    ``use_backend("auto")`` restores the automatic choice inside an outer block. The setting is
    per thread (and per asyncio task); blocks nest.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _CURRENT.set(name)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_backend() -> str:
    """What ``"auto"`` stands for here: the innermost :func:`use_backend`, else
    ``ACELORA_BACKEND``, else ``"auto"``."""
    name = _CURRENT.get()
    if name is None:
        name = os.environ.get("ACELORA_BACKEND", "auto")
    return name


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend name that will run ``op`` on ``device`` (inputs of ``dtype``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        chosen = current_backend()
        if chosen != "auto" and chosen in _IMPLS.get(op, {}):
            backend = chosen
    if backend != "auto":
        ok, why = backend_available(op, backend, device)
        if not ok:
            raise RuntimeError(f"backend {backend!r} cannot run {op} on {device.type} tensors: {why}")
        impl = _IMPLS[op][backend]
        if not impl.takes(dtype):
            raise TypeError(_dtype_refusal(backend, impl, dtype))
        return backend
    for candidate in auto_order(op, device.type, dtype):
        ok, why = backend_available(op, candidate, device, dtype)
        if ok:
            return candidate
        if candidate == "triton" and device.type == "cuda" and "not installed" in why:
            _warn_once(op, candidate, why)
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors")


def auto_order(op: str, device_type: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """The implementations "auto" may choose for ``op`` on ``device_type``, most preferred first."""
    impls = _IMPLS.get(op, {})
    return tuple(name for name in AUTO_PREFERENCE
                 if name in impls and impls[name].auto_on(device_type) and impls[name].takes(dtype))


def implementation(op: str, backend: str, device: torch.device,
                   dtype: torch.dtype | None = None) -> Callable:
    return _IMPLS[op][resolve(op, backend, device, dtype)].fn


@functools.lru_cache(maxsize=None)
def _warn_once(op: str, backend: str, why: str) -> None:
    warnings.warn(f"acelora: {op} falls back from {backend} ({why})", stacklevel=3)
