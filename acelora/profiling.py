"""Named phases for profilers, and a per-phase timer.

``phase("image_tower")`` marks a region of a training or inference step. It opens

* an NVTX range (domain ``acelora``), seen by Nsight Systems, when the ``nvtx`` package (or
  torch's own NVTX bindings) and a CUDA device are present — otherwise nothing at all;
* a ``torch.profiler.record_function`` range while a torch profiler is recording, so the phase
  shows up by name in the chrome trace;
* a timed entry of the active :class:`PhaseTimer`, if one is active.

With none of these on, ``phase`` costs one function call and a few attribute checks, so it can
stay in hot code. Modules can be marked from outside with :func:`annotate_module` (forward hooks),
which avoids editing model code to profile it.

``ACELORA_NVTX=0`` turns the NVTX ranges off, ``ACELORA_NVTX=1`` turns them on even without a
CUDA device (useful only for tests of this module).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

NVTX_DOMAIN = "acelora"

_nvtx_backend: tuple[Callable[[str], None], Callable[[], None]] | None | bool = False  # False: unresolved
_active_timers: list["PhaseTimer"] = []


def _load_nvtx():
    """(push, pop) for NVTX ranges, or None where there is nothing to emit them to."""
    setting = os.environ.get("ACELORA_NVTX", "auto").lower()
    if setting in ("0", "off", "false", "no"):
        return None
    if setting not in ("1", "on", "true", "yes") and not torch.cuda.is_available():
        return None  # without a GPU no tool reads the ranges
    try:
        import nvtx

        return (lambda name: nvtx.push_range(name, domain=NVTX_DOMAIN)), \
            (lambda: nvtx.pop_range(domain=NVTX_DOMAIN))
    except Exception:  # pragma: no cover - depends on the environment
        pass
    try:
        from torch.cuda import nvtx as torch_nvtx

        torch_nvtx.range_push("acelora/probe")
        torch_nvtx.range_pop()
        return torch_nvtx.range_push, torch_nvtx.range_pop
    except Exception:  # pragma: no cover - CPU-only builds of torch
        return None


def nvtx_backend():
    """The resolved (push, pop) pair or None; resolved once, reset by :func:`reset_nvtx`."""
    global _nvtx_backend
    if _nvtx_backend is False:
        _nvtx_backend = _load_nvtx()
    return _nvtx_backend


def nvtx_enabled() -> bool:
    return nvtx_backend() is not None


def reset_nvtx() -> None:
    """Forget the resolved NVTX backend (after changing ``ACELORA_NVTX``)."""
    global _nvtx_backend
    _nvtx_backend = False


@contextlib.contextmanager
def _phase(name: str, nvtx, timer, record: bool) -> Iterator[None]:
    profiler_range = None
    if record:
        profiler_range = torch.profiler.record_function(name)
        profiler_range.__enter__()
    if nvtx is not None:
        nvtx[0](name)
    if timer is not None:
        timer._enter(name)
    try:
        yield
    finally:
        if timer is not None:
            timer._exit()
        if nvtx is not None:
            nvtx[1]()
        if profiler_range is not None:
            profiler_range.__exit__(None, None, None)


def phase(name: str):
    """Context manager marking ``name`` for NVTX, the torch profiler and the active PhaseTimer."""
    if torch.compiler.is_compiling():  # no Python-side ranges inside a compiled graph
        return contextlib.nullcontext()
    nvtx = nvtx_backend()
    timer = _active_timers[-1] if _active_timers else None
    record = torch.autograd._profiler_enabled()
    if nvtx is None and timer is None and not record:
        return contextlib.nullcontext()
    return _phase(name, nvtx, timer, record)


# --------------------------------------------------------------------------- module hooks

def annotate_module(module: nn.Module, name: str) -> list:
    """Wrap every forward call of ``module`` in ``phase(name)`` (from outside: forward hooks).

    Returns the hook handles; call ``.remove()`` on each to undo. The range closes even when the
    forward raises (``always_call``).
    """
    stack: list = []

    def pre_hook(mod, args):
        ctx = phase(name)
        ctx.__enter__()
        stack.append(ctx)

    def post_hook(mod, args, output):
        if stack:
            stack.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre_hook),
            module.register_forward_hook(post_hook, always_call=True)]


def remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


# --------------------------------------------------------------------------- timer

@dataclass
class _Record:
    name: str
    parent: int                   # index of the enclosing record, -1 at top level
    start: object = None          # perf_counter seconds or a CUDA event
    end: object = None


@dataclass
class PhaseStats:
    name: str
    calls: int = 0
    total_ms: float = 0.0         # inclusive: time inside the phase
    self_ms: float = 0.0          # exclusive: minus the phases nested in it


@dataclass
class PhaseTimer:
    """Per-phase wall time of the code run inside ``with timer:`` (phases may nest).

    On a CUDA device, each phase is bracketed by CUDA events (no synchronisation inside the step),
    so it measures GPU-stream time between the phase's boundaries; on the CPU, ``perf_counter``.
    Call :meth:`summary` after the measured steps (it synchronises once).
    """

    device: torch.device | str = "cpu"
    steps: int = 0
    _records: list[_Record] = field(default_factory=list)
    _stack: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._cuda = self.device.type == "cuda"

    def _now(self):
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _enter(self, name: str) -> None:
        rec = _Record(name, self._stack[-1] if self._stack else -1)
        self._records.append(rec)
        self._stack.append(len(self._records) - 1)
        rec.start = self._now()

    def _exit(self) -> None:
        idx = self._stack.pop()
        self._records[idx].end = self._now()

    def __enter__(self) -> "PhaseTimer":
        _active_timers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active_timers.remove(self)

    def step(self) -> None:
        """Count one measured step (for per-step averages)."""
        self.steps += 1

    def reset(self) -> None:
        self._records.clear()
        self._stack.clear()
        self.steps = 0

    def summary(self) -> list[PhaseStats]:
        """Per-phase calls, inclusive and exclusive milliseconds, in first-seen order."""
        if self._stack:
            raise RuntimeError(f"phases still open: {[self._records[i].name for i in self._stack]}")
        if self._cuda:
            torch.cuda.synchronize(self.device)
        durations = []
        for rec in self._records:
            if self._cuda:
                durations.append(rec.start.elapsed_time(rec.end))
            else:
                durations.append((rec.end - rec.start) * 1e3)
        child_ms = [0.0] * len(self._records)
        for i, rec in enumerate(self._records):
            if rec.parent >= 0:
                child_ms[rec.parent] += durations[i]
        stats: dict[str, PhaseStats] = {}
        for i, rec in enumerate(self._records):
            s = stats.setdefault(rec.name, PhaseStats(rec.name))
            s.calls += 1
            s.total_ms += durations[i]
            s.self_ms += max(durations[i] - child_ms[i], 0.0)
        return list(stats.values())

    def table(self, step_ms: float | None = None) -> list[dict]:
        """Rows for a printed table / JSON: per-step milliseconds and share of the step."""
        steps = max(self.steps, 1)
        rows = []
        for s in self.summary():
            row = {"phase": s.name, "calls_per_step": s.calls / steps,
                   "ms_per_step": s.total_ms / steps, "self_ms_per_step": s.self_ms / steps}
            if step_ms:
                row["self_pct_of_step"] = 100.0 * (s.self_ms / steps) / step_ms
            rows.append(row)
        return rows
