"""Backend dispatch: each implementation declares when it applies; use_backend sets what "auto"
means for a block of code (per thread)."""
import threading

import pytest
import torch

import acelora
from acelora.ops import _backend
from acelora.ops._backend import Implementation


@pytest.fixture
def toy_op(monkeypatch):
    """An op "toy" with a reference (any dtype) and a triton implementation (fp32 only) that say
    which ran."""
    monkeypatch.delenv("ACELORA_BACKEND", raising=False)
    monkeypatch.setitem(_backend._IMPLS, "toy", {})
    _backend.register("toy", "reference", lambda x: "reference")
    _backend.register("toy", "triton", lambda x: "triton", dtypes=(torch.float32,))
    return lambda backend="auto", dtype=torch.float32, device="cpu": _backend.implementation(
        "toy", backend, torch.device(device), dtype)(None)


def test_registration_declares_devices_dtypes_and_auto(toy_op):
    impls = _backend._IMPLS["toy"]
    assert impls["triton"].devices == ("cuda", "cpu") and impls["triton"].auto_devices == ("cuda",)
    assert impls["reference"].devices is None  # every device type
    assert _backend.auto_order("toy", "cuda", torch.float32) == ("triton", "reference")
    assert _backend.auto_order("toy", "cuda", torch.float64) == ("reference",)
    assert _backend.auto_order("toy", "cpu", torch.float32) == ("reference",)
    # The compiled LoRA-QKV extension declares CPU tensors too, and auto prefers it there.
    lq = _backend._IMPLS["lora_qkv"]["cuda"]
    assert lq.runs_on("cpu") and lq.auto_on("cpu") and _backend.auto_order("lora_qkv", "cpu")[0] == "cuda"
    assert toy_op() == "reference"
    with pytest.raises(ValueError, match="cannot register"):
        _backend.register("toy", "auto", lambda x: x)


def test_explicit_backend_checks_device_and_dtype(toy_op, monkeypatch):
    monkeypatch.setattr(_backend, "_MISSING", {**_backend._MISSING, "triton": lambda d: ""})
    assert toy_op("triton") == "triton"
    with pytest.raises(TypeError, match=r"triton backend takes \['torch.float32'\]"):
        toy_op("triton", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs cuda or cpu tensors"):
        toy_op("triton", device="meta")
    with pytest.raises(RuntimeError, match="no 'cuda' implementation"):
        toy_op("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        toy_op("fast")


def test_use_backend_sets_what_auto_means_and_nests(toy_op, monkeypatch):
    monkeypatch.setattr(_backend, "_MISSING", {**_backend._MISSING, "triton": lambda d: ""})
    assert acelora.ops.current_backend() == "auto"
    with acelora.ops.use_backend("triton"):
        assert acelora.ops.current_backend() == "triton"
        assert toy_op() == "triton"                        # auto now means triton ...
        assert toy_op("reference") == "reference"          # ... a name in the call still wins
        with pytest.raises(TypeError, match="takes"):      # ... and it is a request: no silent fallback
            toy_op(dtype=torch.float64)
        with acelora.ops.use_backend("auto"):
            assert toy_op() == "reference"                 # automatic again (the CPU's choice)
        assert toy_op() == "triton"
        # an op without a triton implementation keeps choosing automatically
        assert _backend.resolve("lora_qkv", "auto", torch.device("cpu")) in ("cuda", "reference")
    assert toy_op() == "reference" and acelora.ops.current_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with acelora.ops.use_backend("fastest"):
            pass
    # restored on error too
    with pytest.raises(KeyError):
        with acelora.ops.use_backend("triton"):
            raise KeyError
    assert acelora.ops.current_backend() == "auto"


def test_use_backend_is_per_thread(toy_op, monkeypatch):
    monkeypatch.setattr(_backend, "_MISSING", {**_backend._MISSING, "triton": lambda d: ""})
    inside, entered, leave = {}, threading.Event(), threading.Event()

    def other_thread():
        with acelora.ops.use_backend("reference"):
            entered.set()
            leave.wait(10)
            inside["other"] = toy_op()

    t = threading.Thread(target=other_thread)
    with acelora.ops.use_backend("triton"):
        t.start()
        entered.wait(10)
        inside["main"] = toy_op()      # the other thread's block does not leak here
        leave.set()
        t.join(10)
    assert inside == {"main": "triton", "other": "reference"}


def test_use_backend_reaches_the_ops_of_a_module(monkeypatch):
    """A module built with the default backend follows the block it runs in."""
    monkeypatch.delenv("ACELORA_BACKEND", raising=False)
    calls = []
    real = _backend._IMPLS["hypergraph_conv"]["reference"]

    def spy(*args):
        calls.append("reference")
        return real.fn(*args)

    monkeypatch.setitem(_backend._IMPLS["hypergraph_conv"], "reference",
                        Implementation(spy, real.devices, real.auto_devices, real.dtypes))
    hgnn = acelora.ACEHGNN(dim=8, hidden=4, topk=2)
    x, attn = torch.randn(2, 6, 8), torch.rand(2, 5)
    with acelora.ops.use_backend("reference"):
        hgnn(x, attn, global_only=True)
    assert calls == ["reference"]
    if _backend.backend_available("hypergraph_conv", "triton", x.device)[0]:  # the interpreter
        with acelora.ops.use_backend("triton"):
            out = hgnn(x, attn, global_only=True)
        assert calls == ["reference"]  # triton ran, not the reference
        with acelora.ops.use_backend("reference"):
            ref = hgnn(x, attn, global_only=True)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_environment_variable_is_the_default_and_the_block_wins(toy_op, monkeypatch):
    monkeypatch.setattr(_backend, "_MISSING", {**_backend._MISSING, "triton": lambda d: ""})
    monkeypatch.setenv("ACELORA_BACKEND", "triton")
    assert toy_op() == "triton"
    with acelora.ops.use_backend("auto"):
        assert toy_op() == "reference"
