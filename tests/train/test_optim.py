"""Learning-rate schedule and optimizer parameter groups."""
import math

import pytest
import torch
from torch import nn

from acelora.train.optim import build_optimizer, build_scheduler, lr_factor


def _naive_lr(step, base, warmup, total, min_factor=0.0):
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    t = min(t, 1.0)
    return base * (min_factor + (1 - min_factor) * (1 + math.cos(math.pi * t)) / 2)


def test_lr_factor_values():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(4, 10, 100) == pytest.approx(0.5)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)           # cosine starts at the peak
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)           # half-way through the decay
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1000, 10, 100) == pytest.approx(0.0, abs=1e-12)  # clamps past the end
    assert lr_factor(100, 10, 100, min_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)               # no warm-up


@pytest.mark.parametrize("warmup,total", [(3, 17), (0, 5), (5, 5), (8, 40)])
def test_scheduler_follows_warmup_cosine(warmup, total):
    w = nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.AdamW([w], lr=0.01)
    sched = build_scheduler(opt, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [_naive_lr(s, 0.01, min(warmup, total), total) for s in range(total)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert all(lr > 0 for lr in seen[: max(1, total - 1)])


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, 1, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_factor(0, -1, 10)


def test_optimizer_takes_trainable_only_and_splits_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    model.logit_scale = nn.Parameter(torch.tensor(2.0))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2)
    ids = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert id(model[0].weight) not in ids and id(model[0].bias) not in ids
    assert ids[id(model[2].weight)] == 0.2
    assert ids[id(model[2].bias)] == 0.0 and ids[id(model[1].weight)] == 0.0
    assert ids[id(model.logit_scale)] == 0.0
    assert len(ids) == 5


def test_optimizer_errors():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(nn.Linear(2, 2), lr=0)
