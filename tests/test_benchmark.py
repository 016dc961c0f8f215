"""acelora.profiling (phases, timer, hooks) and the ``acelora bench`` command (CPU, tiny model)."""
import contextlib
import json
import math
import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from acelora import benchmark, profiling
from acelora.profiling import PhaseTimer, annotate_module, phase, remove_hooks


@pytest.fixture
def fake_nvtx(monkeypatch):
    """A stand-in ``nvtx`` module that records push/pop calls."""
    import sys
    import types

    calls = []
    mod = types.ModuleType("nvtx")
    mod.push_range = lambda message=None, domain=None, **kw: calls.append(("push", message, domain))
    mod.pop_range = lambda domain=None: calls.append(("pop", domain))
    monkeypatch.setitem(sys.modules, "nvtx", mod)
    profiling.reset_nvtx()
    yield calls
    profiling.reset_nvtx()


# --------------------------------------------------------------------------- phase()

def test_phase_is_a_noop_without_nvtx_or_cuda(monkeypatch, fake_nvtx):
    monkeypatch.delenv("ACELORA_NVTX", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    profiling.reset_nvtx()
    assert not profiling.nvtx_enabled()
    ctx = phase("image_tower")
    assert isinstance(ctx, contextlib.nullcontext)  # nothing entered at all
    with ctx:
        pass
    assert fake_nvtx == []  # nvtx importable, but no GPU: no ranges


def test_phase_is_a_noop_when_nvtx_is_missing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvtx", None)          # `import nvtx` raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACELORA_NVTX", raising=False)
    profiling.reset_nvtx()
    try:
        with phase("x"):
            y = torch.ones(3) * 2
        assert y.sum().item() == 6
        assert profiling.nvtx_backend() is None
    finally:
        profiling.reset_nvtx()


def test_phase_emits_nested_nvtx_ranges_when_enabled(monkeypatch, fake_nvtx):
    monkeypatch.setenv("ACELORA_NVTX", "1")
    profiling.reset_nvtx()
    with phase("outer"):
        with phase("inner"):
            pass
    assert fake_nvtx == [("push", "outer", "acelora"), ("push", "inner", "acelora"),
                         ("pop", "acelora"), ("pop", "acelora")]
    monkeypatch.setenv("ACELORA_NVTX", "0")
    profiling.reset_nvtx()
    fake_nvtx.clear()
    with phase("off"):
        pass
    assert fake_nvtx == []


def test_phase_closes_its_range_on_error(monkeypatch, fake_nvtx):
    monkeypatch.setenv("ACELORA_NVTX", "1")
    profiling.reset_nvtx()
    with pytest.raises(ZeroDivisionError):
        with phase("boom"):
            1 / 0
    assert [c[0] for c in fake_nvtx] == ["push", "pop"]


# --------------------------------------------------------------------------- PhaseTimer

def test_phase_timer_inclusive_and_exclusive_times():
    timer = PhaseTimer("cpu")
    with timer:
        for _ in range(2):
            with phase("parent"):
                time.sleep(0.01)
                with phase("child"):
                    time.sleep(0.02)
            timer.step()
    stats = {s.name: s for s in timer.summary()}
    assert stats["parent"].calls == 2 and stats["child"].calls == 2
    assert stats["child"].total_ms >= 2 * 20 * 0.99
    assert stats["child"].self_ms == pytest.approx(stats["child"].total_ms)
    # exclusive time of the parent = inclusive minus the nested child
    assert stats["parent"].self_ms == pytest.approx(stats["parent"].total_ms - stats["child"].total_ms)
    assert stats["parent"].self_ms >= 2 * 10 * 0.99
    rows = {r["phase"]: r for r in timer.table()}
    assert rows["child"]["calls_per_step"] == 1
    assert rows["parent"]["ms_per_step"] == pytest.approx(stats["parent"].total_ms / 2)
    # phases outside the timer's `with` are not recorded
    with phase("after"):
        pass
    assert "after" not in {s.name for s in timer.summary()}


def test_phase_timer_refuses_open_phases():
    timer = PhaseTimer()
    with timer:
        ctx = phase("open")
        ctx.__enter__()
        with pytest.raises(RuntimeError, match="open"):
            timer.summary()
        ctx.__exit__(None, None, None)
    assert [s.name for s in timer.summary()] == ["open"]


def test_annotate_module_times_forward_and_is_removable():
    lin = nn.Linear(4, 4)
    handles = annotate_module(lin, "linear")
    timer = PhaseTimer()
    with timer:
        lin(torch.randn(2, 4))
        lin(torch.randn(2, 4))
    assert {s.name: s.calls for s in timer.summary()} == {"linear": 2}
    remove_hooks(handles)
    timer.reset()
    with timer:
        lin(torch.randn(2, 4))
    assert timer.summary() == []


# --------------------------------------------------------------------------- statistics

def test_summarise_matches_numpy_percentiles():
    times = torch.rand(37).mul(10).add(1).tolist()
    s = benchmark.summarise(times, batch=8)
    assert s["median_ms"] == pytest.approx(float(np.median(times)))
    assert s["p10_ms"] == pytest.approx(float(np.percentile(times, 10)))
    assert s["p90_ms"] == pytest.approx(float(np.percentile(times, 90)))
    assert s["images_per_s"] == pytest.approx(8 / (np.median(times) / 1e3))
    assert s["images_per_s_p10"] <= s["images_per_s"] <= s["images_per_s_p90"]


def test_time_interleaved_runs_round_robin():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.005))}
    times = benchmark.time_interleaved(fns, steps=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4
    assert len(times["a"]) == len(times["b"]) == 3
    assert min(times["b"]) >= 5 * 0.99 > max(times["a"])


def test_count_flops_of_a_matmul():
    a, b = torch.randn(6, 5), torch.randn(5, 7)
    assert benchmark.count_flops(lambda: a @ b) == 2 * 6 * 5 * 7


# --------------------------------------------------------------------------- reference modules

def _naive_split_qkv(x, w, bias, a, b, s):
    d, r = w.shape[0] // 3, a.shape[0] // 3
    outs = []
    for i in range(3):
        wi, bi = w[i * d:(i + 1) * d], bias[i * d:(i + 1) * d]
        ai, bi_ = a[i * r:(i + 1) * r], b[i * d:(i + 1) * d]
        outs.append(x @ wi.T + bi + s * (x @ ai.T) @ bi_.T)
    return torch.cat(outs, -1)


def test_split_lora_qkv_matches_naive_float64():
    d_in, d_out, r, s = 12, 8, 2, 0.7
    w, bias = torch.randn(3 * d_out, d_in), torch.randn(3 * d_out)
    a, b = torch.randn(3 * r, d_in), torch.randn(3 * d_out, r)
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    mod = benchmark.SplitLoRAQKV(w, bias, a, b, s, dropout_p=0.0).double()
    ref = _naive_split_qkv(x, w.double(), bias.double(), a.double(), b.double(), s)
    out = mod(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    # only the adapters train
    out.sum().backward()
    assert all(p.grad is None for p in mod.proj.parameters())
    assert all(p.grad is not None for p in list(mod.lora_A) + list(mod.lora_B))
    assert sum(p.numel() for p in mod.parameters() if p.requires_grad) == 3 * r * d_in + 3 * d_out * r


def test_split_qkv_lora_swaps_lora_modules_of_a_model():
    from acelora.nn.lora import LoRAQKV

    torch.manual_seed(1)
    w, bias = torch.randn(3 * 8, 8), torch.randn(3 * 8)
    model = nn.Sequential(LoRAQKV(w, bias, rank=2, scale=0.5, dropout=0.1), nn.ReLU(),
                          nn.Linear(24, 3))
    with torch.no_grad():
        model[0].lora_B.normal_()
    model.eval()
    x = torch.randn(4, 8)
    before = model(x)
    assert benchmark.split_qkv_lora(model) == 1
    assert isinstance(model[0], benchmark.SplitLoRAQKV)
    assert model[0].dropout[0].p == 0.1
    after = model(x)
    assert ((after - before).norm() / before.norm()).item() < 1e-5


def test_explicit_attention_switch_matches_sdpa():
    """The reference case's attention (``explicit`` on the library's modules): the full matrix,
    the CLS row read off it; same output and row as SDPA + the row op."""
    from types import SimpleNamespace

    from acelora.nn.attention import attend

    q, k, v = torch.randn(3, 2, 4, 6, 8, dtype=torch.float64).unbind(0)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[0, ..., 4:] = False
    explicit = SimpleNamespace(explicit=True, scale=8 ** -0.5, training=False)
    out, cls = attend(explicit, q, k, v, mask, row_mode="probs")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    # naive CLS row: softmax of q_0·k_j / sqrt(d) over the kept keys, heads averaged
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * 8 ** -0.5
    logits = logits.masked_fill(~mask[:, :, 0], -math.inf)
    assert torch.allclose(cls, logits.softmax(-1).mean(1).float())
    assert cls[0, 4:].abs().max().item() == 0  # padded keys get nothing
    _, sdpa_row = attend(SimpleNamespace(explicit=False, scale=8 ** -0.5, training=False),
                         q, k, v, mask, row_mode="probs")
    assert torch.allclose(cls, sdpa_row)


# --------------------------------------------------------------------------- the command



def test_reference_case_computes_the_same_model():
    """Split LoRA + dense HGNN + explicit attention + full-length padding is the same function
    as the default path (same seed -> same weights)."""
    tc_ref = benchmark.build_train_case("reference", "tiny", 3, torch.device("cpu"), seed=3)
    tc_def = benchmark.build_train_case("default", "tiny", 3, torch.device("cpu"), seed=3)
    for tc in (tc_ref, tc_def):  # a "hypergraph" range per HGNN (pre + post hook each), removable
        assert len(tc.hooks) == 4
        benchmark.remove_hooks(tc.hooks)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in tc.model.modules())
        tc.model.eval()
    explicit = [m.explicit for m in tc_ref.model.modules() if hasattr(m, "explicit")]
    assert explicit and all(explicit)                            # no SDPA in the reference case
    assert not any(m.explicit for m in tc_def.model.modules() if hasattr(m, "explicit"))
    splits = {n: m for n, m in tc_ref.model.named_modules() if isinstance(m, benchmark.SplitLoRAQKV)}
    merged = {n: m for n, m in tc_def.model.named_modules() if type(m).__name__ == "LoRAQKV"}
    assert splits and splits.keys() == merged.keys()
    assert sum(isinstance(m, benchmark.DenseHGNN) for m in tc_ref.model.modules()) == 2
    n_ref = sum(p.numel() for p in tc_ref.model.parameters() if p.requires_grad)
    assert n_ref == tc_def.model.num_trainable_parameters()      # same trainable parameters
    with torch.no_grad():  # a trained-looking adapter: nonzero B, copied into the split modules
        for name, mod in merged.items():
            mod.lora_B.normal_(0, 0.2)
            d, r = mod.out_features, mod.rank
            for i in range(3):
                splits[name].lora_A[i].copy_(mod.lora_A[i * r:(i + 1) * r])
                splits[name].lora_B[i].copy_(mod.lora_B[i * d:(i + 1) * d])
        images = tc_def.batch.images
        a = tc_def.model.encode_image(images)
        b = tc_ref.model.encode_image(images)
        assert ((a - b).norm() / a.norm()).item() < 1e-4
        ids, mask = tc_def.batch.input_ids, tc_def.batch.attention_mask
        assert tc_ref.batch.input_ids.shape[1] == tc_ref.model.context_length > ids.shape[1]
        assert torch.equal(tc_ref.batch.input_ids[:, :ids.shape[1]], ids)
        ta = tc_def.model.encode_text(ids, mask)
        tb = tc_ref.model.encode_text(tc_ref.batch.input_ids, tc_ref.batch.attention_mask)
        assert ((ta - tb).norm() / ta.norm()).item() < 1e-4


REQUIRED_ROW_KEYS = {"case", "batch", "device", "dtype", "status", "median_ms", "p10_ms", "p90_ms",
                     "images_per_s", "images_per_s_p10", "images_per_s_p90", "peak_mem_bytes",
                     "flops_per_step", "mfu", "timed_steps"}


def test_bench_command_writes_json(tmp_path, capsys):
    from acelora.cli import main

    rc = main(["bench", "--model", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1",
               "--device", "cpu", "--cases", "reference,default,inference", "--out", str(tmp_path)])
    assert rc == 0
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert {"env", "settings", "rows", "speedups", "flops_note"} <= set(data)
    assert {"torch", "commit", "python"} <= set(data["env"])
    assert "FlopCounterMode" in data["flops_note"]
    cases = [r["case"] for r in data["rows"]]
    assert cases == ["reference", "default", "inference-base", "inference-merged",
                     "inference-merged-nohgnn"]
    for row in data["rows"]:
        assert row["status"] == "ok", row.get("error")
        assert REQUIRED_ROW_KEYS <= set(row), REQUIRED_ROW_KEYS - set(row)
        assert row["timed_steps"] == 2 and row["batch"] == 2
        assert row["images_per_s"] > 0 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["flops_per_step"] > 0
        assert row["mfu"] is None and row["peak_mem_bytes"] is None  # CPU
    ref, default = data["rows"][0], data["rows"][1]
    assert ref["text_length"] == 64 and ref["dtype"] == "fp32"      # tiny context length
    assert default["text_length"] < ref["text_length"]               # dynamic padding
    assert ref["flops_per_step"] > default["flops_per_step"]         # dense HGNN, padding
    assert "default_vs_reference/b2/cpu" in data["speedups"]
    assert "latency_vs_base" in data["rows"][3] and "latency_vs_base" in data["rows"][4]
    assert "merged_latency_vs_base/b2/cpu" in data["speedups"]
    # FLOPs: merged LoRA costs (about) the base; the HGNN adds on top
    base_f, merged_f, nohgnn_f = (r["flops_per_step"] for r in data["rows"][2:])
    assert base_f <= nohgnn_f < 1.05 * base_f < merged_f
    out = capsys.readouterr().out
    assert "images_per_s" in out and "wrote" in out


def test_bench_profile_writes_trace_and_breakdown(tmp_path):
    res = benchmark.run(model="tiny", batches=[2], devices=["cpu"], cases=["default"], steps=1,
                        warmup=1, profile=str(tmp_path / "prof"), out=str(tmp_path), verbose=False,
                        interleave=False)
    row = res["rows"][0]
    assert row["status"] == "ok", row.get("error")
    prof = row["profile"]
    trace = json.loads(open(prof["trace"]).read())
    assert trace["traceEvents"]
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"image_tower", "text_tower", "loss", "backward", "optimizer"} <= names
    phases = {r["phase"]: r for r in prof["phases"]}
    assert {"step", "forward", "image_tower", "text_tower", "hypergraph", "cls_attention", "loss",
            "backward", "optimizer"} <= set(phases)
    assert phases["hypergraph"]["calls_per_step"] == 2       # one HGNN per tower
    assert phases["cls_attention"]["calls_per_step"] == 2    # last block of each tower
    total_self = sum(r["self_ms_per_step"] for r in prof["phases"])
    assert total_self == pytest.approx(phases["step"]["ms_per_step"], rel=1e-6)
    text = open(prof["breakdown"]).read()
    assert "hypergraph" in text and "self_pct_of_step" in text


def test_compile_failure_is_reported_not_raised(tmp_path, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    res = benchmark.run(model="tiny", batches=[2], devices=["cpu"], cases=["compile", "default"],
                        steps=1, warmup=0, out=str(tmp_path), verbose=False)
    comp, default = res["rows"]
    assert comp["status"] == "failed" and "no compiler here" in comp["error"]
    assert default["status"] == "ok"
    assert os.path.exists(res["path"])


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit, match="unknown case"):
        benchmark.parse_cases("reference,fast")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            benchmark.resolve_devices(["cuda"])
    with pytest.raises(ValueError, match="steps"):
        benchmark.run(steps=0, out=None, verbose=False)
