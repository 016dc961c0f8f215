"""Issue 13, items 2, 4, 5 and 6 (training): a diverged or all-skipped epoch is never validated as
a number nor saved as best/; run folders are locked, checked writable first, not overwritten
without --overwrite and written atomically (mode 0644); step/minute checkpoints and resume without
duplicate log rows; identical labels warned once with the count."""
import csv
import dataclasses
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from acelora.cli import main
from acelora.config import get_config
from acelora.train.loop import Trainer
from acelora.train.settings import TrainConfig
from acelora.train.testing import ToyCLIP, ToyPairs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(tmp_path, name="run", **values):
    """A toy run's config; keys go to the run or the method config, wherever they live."""
    base = dict(batch_size=16, lr=1e-2, warmup_steps=2, epochs=2, seed=3)
    base.update(values)
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run = {k: v for k, v in base.items() if k in run_fields}
    method = {k: v for k, v in base.items() if k not in run_fields}
    return TrainConfig(output_dir=str(tmp_path / name), progress=False, tensorboard=False, log_every=1,
                       method=get_config("paper", **method), **run)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --- divergence ------------------------------------------------------------------------------

def test_diverged_parameters_stop_the_run_and_never_become_best(tmp_path):
    torch.manual_seed(0)
    model = ToyCLIP()
    calls = []
    trainer = Trainer(model, ToyPairs(32, seed=1), _cfg(tmp_path, epochs=3),
                      evaluate=lambda m: calls.append(1) or {"accuracy": 0.5 + 0.1 * len(calls)})
    real_step = trainer.train_step

    def step_then_blow_up(batch):
        out = real_step(batch)
        if trainer.step == 2:  # the first step of epoch 2 (2 steps per epoch): lr 1e6 would do this
            with torch.no_grad():
                model.text_head[2].weight.fill_(float("inf"))
        return out

    trainer.train_step = step_then_blow_up
    with pytest.raises(FloatingPointError, match="diverged in epoch 2.*no longer finite"):
        trainer.fit()
    assert len(calls) == 1                                   # epoch 2 was not validated
    rows = _rows(tmp_path / "run" / "logs" / "epochs.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and math.isnan(float(rows[1]["accuracy"]))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())
    from safetensors.torch import load_file
    best = load_file(str(tmp_path / "run" / "best" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in best.values())   # best/ is epoch 1's


def test_all_skipped_epoch_logs_nan_and_is_not_validated(tmp_path, caplog):
    data = ToyPairs(32, seed=2)
    data.images[:] = float("nan")                            # every step has a non-finite loss
    calls = []
    trainer = Trainer(ToyCLIP(), data, _cfg(tmp_path, nan_policy="skip", max_nan_skips=100),
                      evaluate=lambda m: calls.append(1) or {"accuracy": 0.9})
    with caplog.at_level(logging.WARNING, logger="acelora.train"):
        summary = trainer.fit()
    assert not calls and summary["best_epoch"] is None and summary["best"] is None
    assert not (tmp_path / "run" / "best").exists()
    rows = _rows(tmp_path / "run" / "logs" / "epochs.csv")
    assert all(math.isnan(float(r["loss"])) and math.isnan(float(r["accuracy"])) for r in rows)
    assert "all 2 steps were skipped" in caplog.text


def test_too_many_skips_stop_with_a_clear_message(tmp_path):
    data = ToyPairs(32, seed=2)
    data.images[:] = float("nan")
    trainer = Trainer(ToyCLIP(), data, _cfg(tmp_path, nan_policy="skip", max_nan_skips=2))
    with pytest.raises(FloatingPointError, match=r"diverged.*max_nan_skips=2.*The last checkpoint"):
        trainer.fit()


# --- run folders -----------------------------------------------------------------------------

def test_a_second_live_run_is_refused_naming_its_pid(tmp_path, capsys):
    from acelora.errors import UserError

    folder = tmp_path / "run"
    code = ("import sys, time; from acelora.outputs import RunFolderLock; "
            f"RunFolderLock({str(folder)!r}).acquire(); print('locked', flush=True); time.sleep(120)")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by another acelora run \\(PID {holder.pid}\\)"):
            Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path)).fit()
        assert main(["train", "--model", "tiny", "--random-weights", "--output-dir", str(folder),
                     "--epochs", "1"]) == 2
        assert f"PID {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert not (folder / "checkpoints").exists()
    Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path, epochs=1)).fit()   # the lock died with it


def test_a_finished_run_is_not_overwritten_without_overwrite(tmp_path):
    from acelora.errors import UserError

    Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path, epochs=1), evaluate=lambda m: {"accuracy": 1.0}).fit()
    assert (tmp_path / "run" / "best").is_dir()
    with pytest.raises(UserError, match="already holds a run.*--resume auto.*--overwrite"):
        Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path, epochs=1)).fit()
    Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path, epochs=1), overwrite=True).fit()
    assert not (tmp_path / "run" / "best").exists()               # the stale best/ went with it
    assert len(_rows(tmp_path / "run" / "logs" / "epochs.csv")) == 1


def test_outputs_are_checked_writable_before_any_work(tmp_path, monkeypatch, capsys):
    import acelora
    import acelora.eval.loading as loading

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be built before the output folder is checked")

    monkeypatch.setattr(acelora, "create_ace_lora", no_model)
    monkeypatch.setattr(loading, "load_model", no_model)
    assert main(["train", "--model", "tiny", "--random-weights", "--output-dir", str(blocker / "run"),
                 "--epochs", "1"]) == 2
    assert "not writable" in capsys.readouterr().err
    from acelora.data import synthetic
    synthetic.write_chexpert5x200(str(tmp_path / "cx"), n=1, seed=1)
    assert main(["eval", "zeroshot", "--model", "tiny", "--random-weights", "--dataset", "chexpert5x200",
                 "--data-root", str(tmp_path / "cx"), "--out", str(blocker / "out")]) == 2
    assert "--out" in capsys.readouterr().err


def test_outputs_are_atomic_with_mode_0644(tmp_path):
    from acelora.eval.metrics import write_json
    from acelora.outputs import atomic_write

    old = os.umask(0o077)                                     # a strict umask must not leak in
    try:
        Trainer(ToyCLIP(), ToyPairs(32), _cfg(tmp_path, epochs=1),
                evaluate=lambda m: {"accuracy": 1.0}).fit()
        report = write_json(str(tmp_path / "report.json"), {"accuracy": float("nan")})
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [run / "checkpoints" / "last.pt", run / "config.json", report,
             run / "adapters" / "trainable.safetensors", run / "best" / "trainable.safetensors"]
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o644, path
    for root, _, names in os.walk(tmp_path):
        assert not [n for n in names if n.endswith(".tmp")], root

    def crash(f):
        f.write(b'{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(report, crash)
    assert open(report).read().startswith("{") and "accuracy" in open(report).read()


def test_demo_quick_has_its_own_folder(tmp_path, monkeypatch, capsys):
    import acelora.train.demo as demo

    seen = []
    monkeypatch.setattr(demo, "_run_demo", lambda output_dir, *a: seen.append(output_dir) or
                        {"before": {"accuracy": 0.1}, "after": {"accuracy": 0.5}})
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick"]) == 0 and main(["demo"]) == 0
    assert seen == ["acelora-demo-quick", "acelora-demo"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert main(["demo", "--output-dir", "mine"]) == 2           # not a demo folder: refused
    assert "thesis.tex" in capsys.readouterr().err


# --- step checkpoints and resume -------------------------------------------------------------

def _run(tmp_path, name, crash_at=None, **values):
    torch.manual_seed(0)
    model = ToyCLIP(dropout=0.2)
    trainer = Trainer(model, ToyPairs(32, seed=1), _cfg(tmp_path, name, batch_size=8, **values))
    if crash_at is not None:
        real = trainer.train_step

        def killed(batch):
            if trainer.step == crash_at:
                raise KeyboardInterrupt("kill -9")
            return real(batch)

        trainer.train_step = killed
    return model, trainer


def test_step_checkpoints_and_resume_without_duplicate_rows(tmp_path, caplog):
    straight, trainer = _run(tmp_path, "straight")
    trainer.fit()
    # 4 steps per epoch; a checkpoint every 2 steps; killed during step 8 (after step 7 was logged).
    _, trainer = _run(tmp_path, "killed", crash_at=7, save_every_steps=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    state = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 6                                  # mid-epoch: only 1 step of work lost
    with caplog.at_level(logging.INFO, logger="acelora.train"):
        resumed, trainer = _run(tmp_path, "killed", resume="auto", save_every_steps=2)
        trainer.fit()
    assert "resumed from" in caplog.text
    a, b = _params(straight), _params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)             # exact, from a mid-epoch checkpoint
    steps = [int(r["step"]) for r in _rows(tmp_path / "killed" / "logs" / "steps.csv")]
    assert steps == list(range(1, 9))                           # no duplicate rows
    epochs = [int(r["epoch"]) for r in _rows(tmp_path / "killed" / "logs" / "epochs.csv")]
    assert epochs == [1, 2]


def test_resume_auto_says_it_started_fresh(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="acelora.train"):
        _, trainer = _run(tmp_path, "fresh", resume="auto", epochs=1)
        trainer.fit()
    assert "starting a fresh run" in caplog.text


def test_save_every_minutes(tmp_path, monkeypatch):
    import acelora.train.loop as loop

    clock = iter(range(0, 10 ** 6, 100))                      # 100 s pass between two reads
    monkeypatch.setattr(loop.time, "monotonic", lambda: float(next(clock)))
    _, trainer = _run(tmp_path, "timed", save_every_minutes=1.0, epochs=1)
    saved = []
    real = trainer.save_checkpoint
    trainer.save_checkpoint = lambda *a: saved.append(trainer.step) or real(*a)
    trainer.fit()
    assert saved == [1, 2, 3, 4]                               # steps 1-3 by time, 4 at the epoch end


def test_run_config_json_records_and_reloads(tmp_path):
    from acelora.train.settings import load_train_config

    cfg = _cfg(tmp_path, epochs=1)
    Trainer(ToyCLIP(), ToyPairs(32), cfg).fit()
    loaded = load_train_config(str(tmp_path / "run" / "config.json"))
    assert loaded.to_dict() == cfg.to_dict()


# --- identical labels ------------------------------------------------------------------------

def test_identical_labels_are_warned_once_with_the_count(tmp_path, caplog):
    data = ToyPairs(32, seed=4)
    data.labels[:] = data.labels[0]                          # one label vector for every pair
    with caplog.at_level(logging.WARNING, logger="acelora.train"):
        Trainer(ToyCLIP(), data, _cfg(tmp_path, epochs=2)).fit()
    warned = [r.getMessage() for r in caplog.records if "same label vector" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 batch(es) of epoch 1")


def test_loss_counts_identical_label_batches_without_a_sync():
    from acelora.nn.loss import LabelGuidedInfoNCELoss

    loss_fn = LabelGuidedInfoNCELoss(gather=False, backend="reference")
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    same = torch.zeros(4, 14)
    same[:, 2] = 1
    assert loss_fn(emb, emb, torch.tensor(10.0), same).item() == pytest.approx(0.0, abs=1e-6)
    loss_fn(emb, emb, torch.tensor(10.0), torch.eye(4, 14))
    loss_fn(emb[:1], emb[:1], torch.tensor(10.0), same[:1])       # one pair: nothing to mask
    loss_fn(emb, emb, torch.tensor(10.0), torch.tensor([3, 3, 3, 3]))
    assert loss_fn.identical_label_batches() == 2
    assert loss_fn.identical_label_batches() == 0                 # read and reset


def test_lr_1e6_is_never_validated_as_a_number_nor_best(tmp_path):
    # The case: the weights stay finite but produce NaN embeddings; argmax of NaN used to
    # score as class 0 and the epoch became best/.
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--random-weights", "--output-dir", str(out), "--lr", "1e6",
                 "--epochs", "2", "--batch-size", "8", "--set", "synthetic_size=16", "--set",
                 "val_size=8", "--warmup-steps", "1", "--no-progress", "--no-tensorboard"]) == 0
    rows = _rows(out / "logs" / "epochs.csv")
    assert len(rows) == 2 and all(math.isnan(float(r["accuracy"])) for r in rows)
    assert not (out / "best").exists()
