"""``acelora demo --quick`` end to end: adaptation raises zero-shot accuracy on the shifted domain."""
import json
import os

from acelora.cli import main


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())
    before, after = summary["before"]["accuracy"], summary["after"]["accuracy"]
    assert after > before + 0.05, (before, after)
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert "trainable params" in text and "before adaptation" in text and "after ACE-LoRA" in text
    for key in ("adapters", "best_adapters", "checkpoint", "generalist_model"):
        assert os.path.exists(summary[key]), key
    for plot in summary["plots"]:
        assert plot.endswith(".png") and os.path.isfile(plot)
    assert (out / "ace-lora" / "adapters" / "adapter_config.json").is_file()
    assert (out / "ace-lora" / "logs" / "steps.csv").is_file()
    assert (out / "generalist" / "model" / "open_clip_config.json").is_file()
