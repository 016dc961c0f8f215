"""In CI, the skips that protect machines without a build or a GPU must not hide a broken build:
the compiled extension and the Triton interpreter path are required there."""
import os

import pytest
import torch

from acelora.ops import _backend, _extension

pytestmark = pytest.mark.skipif(not os.environ.get("CI"), reason="only CI promises a fresh build")


def test_ci_built_both_extensions():
    from torch.utils.cpp_extension import CUDA_HOME
    assert _extension.cpu_ops_available(), _extension.unavailable_reason()
    if CUDA_HOME is not None and torch.version.cuda is not None:
        assert _extension.cuda_ops_available(), _extension.unavailable_reason()


@pytest.mark.parametrize("op", ["hypergraph_conv", "label_guided_infonce"])
def test_ci_runs_the_triton_kernels_in_the_interpreter(op):
    ok, why = _backend.backend_available(op, "triton", torch.device("cpu"))
    assert ok, why

