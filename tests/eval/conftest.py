import os
import sys

# The evaluation tests share a fake model (eval_fakes.py) that they import as a plain module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # These tests run many tiny ops; on a shared 2-core machine one thread avoids OpenMP
    # oversubscription stalls (seconds per step instead of milliseconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
