"""The training loop, schedules, checkpoints, logging and the ``train``/``demo`` commands."""
from __future__ import annotations

import importlib

# Imported on first use: ``acelora --help`` should not pay for the whole loop.
_EXPORTS = {
    "Trainer": "acelora.train.loop",
    "zero_shot_accuracy": "acelora.train.loop",
    "TrainConfig": "acelora.train.settings",
    "load_train_config": "acelora.train.settings",
    "run_training": "acelora.train.run",
    "run_demo": "acelora.train.demo",
    "init_distributed": "acelora.train.distributed",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'acelora.train' has no attribute {name!r}")
