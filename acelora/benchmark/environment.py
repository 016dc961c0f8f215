"""What a benchmark result records about where it ran: device, versions, commit, machine load,
and the device's peak FLOP/s for model-FLOPs utilisation."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

# Dense bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name().
# MFU is always taken against this one number (whatever the case's precision), so cases compare.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}
FLOPS_NOTE = ("flops_per_step counted with torch.utils.flop_counter.FlopCounterMode over one "
              "forward+backward of the case's own step (matmul/conv/attention FLOPs; elementwise ops "
              "and the optimizer not counted); mfu = flops_per_step / median step time / the "
              "device's dense bf16 peak (null when the peak is unknown, e.g. on a CPU)")


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.check_output(["git", *args], cwd=root, text=True,
                                       stderr=subprocess.DEVNULL, timeout=10).strip()
    except Exception:
        return None


def env_info() -> dict:
    """Device, versions and the source commit recorded with every result."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "hostname": platform.node(), "commit": _git("rev-parse", "HEAD") or "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["dirty"] = None if status is None else bool(status)
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # fp32 matmul precision decides whether the fp32 reference runs on TF32 tensor cores.
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    for name in ("acelora", "triton", "open_clip", "timm", "transformers", "nvtx"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def loadavg() -> list[float] | None:
    """The machine's load averages: a shared CPU's load explains noisy CPU timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return peak
    return None


def device_tag(device: torch.device) -> str:
    """File-name-safe device name, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return "cpu"
