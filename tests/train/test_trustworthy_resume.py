"""Issue 13, item 3: a resume must use the settings the checkpoint was trained with (lr, schedule,
seed, data, base weights, method config); --allow-config-change applies new ones and records the
change in config.json's history."""
import dataclasses
import json

import pytest
import torch

from acelora.cli import main
from acelora.config import get_config
from acelora.train.loop import Trainer
from acelora.train.settings import TrainConfig
from acelora.train.testing import ToyCLIP, ToyPairs


def _cfg(tmp_path, method=None, **values):
    base = dict(batch_size=8, lr=1e-2, warmup_steps=2, epochs=2, seed=3)
    base.update(values)
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run = {k: v for k, v in base.items() if k in run_fields}
    method_values = {k: v for k, v in base.items() if k not in run_fields}
    return TrainConfig(output_dir=str(tmp_path / "run"), progress=False, tensorboard=False, log_every=1,
                       method=method or get_config("paper", **method_values), **run)


def _model(frozen_shift=0.0):
    torch.manual_seed(0)
    model = ToyCLIP()
    with torch.no_grad():
        model.frozen.weight.add_(frozen_shift)   # another base of the same shape
    return model


def _first_epoch(tmp_path):
    Trainer(_model(), ToyPairs(32, seed=1), _cfg(tmp_path, max_steps=4)).fit()   # 4 steps = 1 epoch


def _record(tmp_path):
    return json.loads((tmp_path / "run" / "config.json").read_text())


@pytest.mark.parametrize("case", ["lr", "schedule", "seed", "data", "base", "method"])
def test_resume_with_other_settings_is_refused(tmp_path, case):
    from acelora.errors import UserError

    _first_epoch(tmp_path)
    model, data, values, method = _model(), ToyPairs(32, seed=1), {}, None
    if case == "lr":
        values["lr"] = 1e-3
    elif case == "schedule":
        values["epochs"] = 5
    elif case == "seed":
        values["seed"] = 4
    elif case == "data":
        data = ToyPairs(40, seed=1)
    elif case == "base":
        model = _model(frozen_shift=0.5)
    else:
        method = get_config("paper", hgnn_topk=3)
    needle = {"lr": "lr", "schedule": "epochs", "seed": "seed", "data": "training set size",
              "base": "base weights", "method": "hgnn_topk"}[case]
    trainer = Trainer(model, data, _cfg(tmp_path, method=method, resume="auto", **values))
    with pytest.raises(UserError, match=f"other settings.*{needle}.*--allow-config-change"):
        trainer.fit()
    record = _record(tmp_path)
    assert record["lr"] == 1e-2 and record["epochs"] == 2 and len(record["history"]) == 1


def test_allow_config_change_applies_and_records(tmp_path):
    _first_epoch(tmp_path)
    trainer = Trainer(_model(), ToyPairs(32, seed=1), _cfg(tmp_path, resume="auto", lr=1e-3, max_steps=5),
                      allow_config_change=True)
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["initial_lr"] == 1e-3
    assert trainer.scheduler.base_lrs == [1e-3] * len(trainer.optimizer.param_groups)
    record = _record(tmp_path)
    assert record["lr"] == 1e-3
    assert [e["event"] for e in record["history"]] == ["start", "resume"]
    assert record["history"][1]["changed"] == {"lr": {"checkpoint": 1e-2, "now": 1e-3}}
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["lr"] == 1e-3                       # the checkpoint goes on with it


def test_batch_size_never_changes_within_a_run(tmp_path):
    from acelora.errors import UserError

    _first_epoch(tmp_path)
    trainer = Trainer(_model(), ToyPairs(32, seed=1), _cfg(tmp_path, resume="auto", batch_size=16),
                      allow_config_change=True)
    with pytest.raises(UserError, match="batch_size cannot change"):
        trainer.fit()


def test_resume_through_the_command(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["train", "--model", "tiny", "--random-weights", "--output-dir", out, "--epochs", "2",
            "--batch-size", "8", "--set", "synthetic_size=16", "--val", "none", "--warmup-steps", "1",
            "--no-progress", "--no-tensorboard"]
    assert main(argv + ["--max-steps", "2"]) == 0
    assert main(argv + ["--resume", "auto", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.0001 in the checkpoint, 0.001 now" in err and "--allow-config-change" in err
    assert main(argv + ["--resume", "auto", "--lr", "1e-3", "--allow-config-change"]) == 0
    history = json.loads((tmp_path / "cli" / "config.json").read_text())["history"]
    assert history[-1]["event"] == "resume" and history[-1]["changed"]["lr"]["now"] == 1e-3
