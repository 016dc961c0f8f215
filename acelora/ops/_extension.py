"""Loading of the compiled LoRA-QKV extension (acelora._C and acelora._C_cuda).

``acelora._C`` defines the ``torch.ops.acelora`` schemas and the C++ CPU kernels;
``acelora._C_cuda`` adds the CUDA kernels of the same ops, so it is only usable once ``_C`` is.
Import never fails: when a compiled module is missing, the reference op is used and a one-time
message says why.
"""
from __future__ import annotations

import importlib

# name -> (module or None, why not). A plain dict rather than functools.lru_cache so that
# torch.compile can trace the availability checks without a graph break.
_MODULES: dict[str, tuple[object, str]] = {}


def _load(name: str):
    if name not in _MODULES:
        try:
            _MODULES[name] = (importlib.import_module(name), "")
        except Exception as exc:  # not built, or built against another torch
            _MODULES[name] = (None, f"{name} could not be imported ({type(exc).__name__}: {exc}); build it "
                                    "with `python setup.py build_ext --inplace` or "
                                    "`pip install --no-build-isolation -e .`")
    return _MODULES[name]


def cpu_ops_available() -> bool:
    return _load("acelora._C")[0] is not None


def cuda_ops_available() -> bool:
    # The CUDA kernels register against the schemas that acelora._C defines.
    return cpu_ops_available() and _load("acelora._C_cuda")[0] is not None


def unavailable_reason() -> str:
    return _load("acelora._C")[1] or _load("acelora._C_cuda")[1]
