"""``acelora demo --ct --quick`` end to end: LoRA on both towers of a tiny CT-CLIP generalist
raises the mean zero-shot AUROC on held-out volumes of a shifted CT domain (mean over 3 seeds)."""
import json
import os

import pytest

from acelora.cli import main
from acelora.data.synthetic_ct import SYNTHETIC_CT_FINDINGS


@pytest.mark.slow   # ~95 s on 2 idle cores (3 seeds of 3D training); deselect with -m "not slow"
def test_demo_ct_quick(tmp_path, capsys):
    out = tmp_path / "demo-ct"
    assert main(["demo", "--ct", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "ct_demo_summary.json").read_text())
    (before, _), (after, _) = (summary["summary"][k]["mean_auroc"] for k in ("before", "after"))
    assert after > before, (before, after)
    assert len(summary["runs"]) == 3 and summary["seeds"] == [0, 1, 2]
    assert summary["trainable_parameters"] == 35_329          # medct on ct-clip-tiny
    for run in summary["runs"]:
        assert set(run["before"]["per_finding"]) == set(SYNTHETIC_CT_FINDINGS)
        assert os.path.isfile(os.path.join(run["best_adapters"], "adapter_model.safetensors"))
    for name in (*SYNTHETIC_CT_FINDINGS, "mean over findings"):
        assert name in text
    assert " ± " in text and "->" in text and "trainable params" in text
    assert os.path.isfile(summary["generalist_weights"])
