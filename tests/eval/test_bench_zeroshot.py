"""bench/bench_zeroshot.py runs and reports every case (timings themselves are not asserted:
too noisy on a shared CPU; that merged models skip the LoRA branch is tested in test_e2e_tiny)."""
import importlib.util
import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_zeroshot.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_zeroshot_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_zeroshot_tiny(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", str(tmp_path))
    out = bench.main(["--model", "tiny", "--batch-size", "4", "--iters", "2", "--warmup", "1"])
    assert [r["case"] for r in out["rows"]] == list(bench.CASES)
    for r in out["rows"]:
        assert r["median_ms"] > 0 and r["ms_per_image"] == pytest.approx(r["median_ms"] / 4)
    assert out["rows"][0]["vs_base"] == 1.0
    with open(out["file"]) as f:
        saved = json.load(f)
    assert saved["benchmark"] == "zeroshot-tiny" and "env" in saved and len(saved["rows"]) == 4
    assert "merged / base" in capsys.readouterr().out
