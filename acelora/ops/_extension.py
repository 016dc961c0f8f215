"""Loading of the compiled LoRA-QKV extension (acelora._C and acelora._C_cuda).

Import never fails: when a compiled module is missing, the reference op is used and a one-time
message says why.
"""
from __future__ import annotations

import functools
import importlib


@functools.lru_cache(maxsize=None)
def _load(name: str):
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # not built, or built against another torch
        return None, f"{name} could not be imported ({type(exc).__name__}: {exc})"


def cpu_ops_available() -> bool:
    return _load("acelora._C")[0] is not None


def cuda_ops_available() -> bool:
    return _load("acelora._C_cuda")[0] is not None


def unavailable_reason() -> str:
    return _load("acelora._C_cuda")[1] or _load("acelora._C")[1]
