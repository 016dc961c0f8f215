"""Build script: the Python package plus the LoRA-QKV extension (acelora._C).

The CPU extension is always built. The CUDA one is added when a CUDA toolkit is found
(ACELORA_NO_CUDA=1 skips it; TORCH_CUDA_ARCH_LIST picks the targets, default sm_90 only so
CI compiles fast). The package still imports without any compiled op: ops/ then falls back
to the PyTorch reference and says so once.
"""
import glob
import os

from setuptools import setup

PACKAGES = [
    "acelora",
    "acelora.models",
    "acelora.nn",
    "acelora.ops",
    "acelora.benchmark",
    "acelora.data",
    "acelora.data.synthetic",
    "acelora.eval",
    "acelora.train",
    "acelora.kernels",
]
# Triton kernels live in the top-level kernels/ folder but ship as acelora.kernels.
PACKAGE_DIR = {"acelora": "acelora", "acelora.kernels": "kernels"}


def _extensions():
    if os.environ.get("ACELORA_NO_EXT") == "1":
        return [], {}
    # An nvcc wrapper on PATH (e.g. /usr/local/bin/nvcc) would make torch guess CUDA_HOME=/usr/local,
    # which has no lib64/libcudart: prefer the standard toolkit location when it exists.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    if not cpp_sources:
        return [], {}
    # Recent torch headers need C++20.
    cxx_flags = ["-O3", "-std=c++20"]
    ext_modules = [cpp_extension.CppExtension("acelora._C", cpp_sources,
                                              extra_compile_args={"cxx": cxx_flags})]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    import torch
    want_cuda = (os.environ.get("ACELORA_NO_CUDA") != "1" and cpp_extension.CUDA_HOME is not None
                 and torch.version.cuda is not None)  # a CPU-only torch has no CUDA libraries to link
    if cuda_sources and want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext_modules.append(cpp_extension.CUDAExtension(
            "acelora._C_cuda", cuda_sources,
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}))
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return ext_modules, cmdclass


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
