"""The configuration of one training run: the run settings (optimiser, schedule, batch, seed,
precision, backend, where the model, data and outputs are) plus the method
(:class:`acelora.ACELoRAConfig`, what defines the adapters and what an adapter folder stores).

A config file (YAML or JSON) is one flat mapping whose keys are either run fields
(:class:`TrainConfig`) or method fields (:class:`ACELoRAConfig`, including ``preset``), e.g.::

    model: tiny              # "tiny" | "biomedclip" | a local model folder
    preset: paper            # the method preset the method fields start from
    dataset: synthetic       # "synthetic" | "mimic" (then data_root: /path/to/mimic-cxr-jpg)
    output_dir: runs/tiny
    epochs: 2
    lr: 1.0e-4
    batch_size: 32

Precedence: preset < config file < command-line overrides. Unknown keys are an error that names
them (and the closest valid key).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from acelora.config import PRESETS, ACELoRAConfig, get_config
from acelora.ops import BACKENDS

DATASETS = ("synthetic", "mimic", "captions", "ct-rate")
VALIDATIONS = ("auto", "none", "synthetic", "chexpert5x200", "nih", "lc25000-lung", "lc25000-colon",
               "mhist", "ct-rate")
NAN_POLICIES = ("skip", "error")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """Run settings of ``acelora train``; the method's settings (what the adapters are) are in
    ``method``, and the run's record (``output_dir/config.json``, checkpoints) holds both.

    ``batch_size`` is the contrastive batch of one optimizer step over all ranks and all
    accumulation steps; each rank's micro-batch is ``batch_size / (world_size · grad_accum)``.
    """

    model: str = "tiny"
    adapters: str | None = None              # start from saved adapters
    # --- optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100                  # linear warm-up, then cosine decay
    grad_accum: int = 1
    grad_checkpointing: bool = False
    precision: str = "auto"                  # "auto" (bf16 autocast on a GPU) | "fp32" | "bf16"
    seed: int = 0
    backend: str = "auto"                    # the ops' backend: "reference" | "triton" | "cuda" | "auto"
    # --- data
    dataset: str = "synthetic"
    data_root: str | None = None
    synthetic_size: int = 512                # synthetic training pairs
    synthetic_domain: int = 0
    image_column: str = "image"              # captions: data_root is the CSV (or its folder)
    caption_column: str = "caption"
    label_columns: str | list[str] | None = None  # captions: label column(s) (label-guided loss)
    with_impressions: bool = True            # ct-rate: text = Findings + Impressions (else Findings)
    cache_dir: str | None = None             # ct-rate: keep preprocessed volumes here (int16)
    val: str = "auto"                        # auto: synthetic for synthetic data, else none
    val_root: str | None = None
    val_size: int = 200                      # synthetic validation items
    val_metric: str = "accuracy"             # the metric that picks the best checkpoint (max)
    output_dir: str = "acelora-run"
    resume: str | None = None                # checkpoint file, or "auto" (output_dir's last one)
    device: str | None = None                # None: CUDA when available
    num_workers: int = 0
    log_every: int = 10
    max_steps: int | None = None             # stop after this many optimizer steps (total)
    clip_grad_norm: float | None = None
    nan_policy: str = "skip"                 # "skip" (zero the step, count it) | "error"
    max_nan_skips: int = 20                  # more skipped steps than this is an error
    random_weights: bool = False             # a built-in architecture without weights, on purpose
    save_every_steps: int | None = None      # also checkpoint every N optimizer steps
    save_every_minutes: float | None = None  # also checkpoint every M minutes
    tensorboard: bool = True
    progress: bool = True
    find_unused_parameters: bool = False
    method: ACELoRAConfig = field(default_factory=ACELoRAConfig)

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "mimic" and not self.data_root:
            raise ValueError("dataset 'mimic' needs data_root (the MIMIC-CXR-JPG folder)")
        if self.dataset == "captions" and not self.data_root:
            raise ValueError("dataset 'captions' needs data_root (the image-caption CSV)")
        if self.dataset == "ct-rate" and not self.data_root:
            raise ValueError("dataset 'ct-rate' needs data_root (the CT-RATE download's folder)")
        if self.val not in VALIDATIONS:
            raise ValueError(f"val must be one of {VALIDATIONS}, got {self.val!r}")
        if self.val not in ("auto", "none", "synthetic") and not self.val_root \
                and not (self.val == "ct-rate" and self.dataset == "ct-rate"):
            raise ValueError(f"val {self.val!r} needs val_root (the data set's folder)")
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"epochs, batch_size and grad_accum must be >= 1, got "
                             f"{self.epochs}, {self.batch_size}, {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.save_every_steps is not None and self.save_every_steps < 1:
            raise ValueError(f"save_every_steps must be >= 1 or null, got {self.save_every_steps}")
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            raise ValueError(f"save_every_minutes must be > 0 or null, got {self.save_every_minutes}")

    @property
    def preset(self) -> str:
        """The method preset the method fields started from."""
        return self.method.preset

    # --- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat form a config file uses."""
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "method"}
        return {**run, **self.method.to_dict()}

    def replace(self, **changes) -> "TrainConfig":
        return config_from_dict({**self.to_dict(), **changes})


RUN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "method")
METHOD_FIELDS = tuple(f.name for f in dataclasses.fields(ACELoRAConfig))


def _unknown_key_error(keys, where: str) -> ValueError:
    valid = sorted(RUN_FIELDS + METHOD_FIELDS)
    parts = []
    for k in sorted(keys):
        close = difflib.get_close_matches(str(k), valid, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown config key(s) in {where}: {', '.join(parts)}. "
                      f"Valid keys: {', '.join(valid)}")


def _field_defaults() -> dict[str, Any]:
    out = {}
    for cls in (TrainConfig, ACELoRAConfig):
        for f in dataclasses.fields(cls):
            if f.name == "method":
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _coerce(key: str, value: Any, where: str) -> Any:
    """Bring a value to its field's type (YAML reads ``1e-4`` as a string, JSON ``2.0`` for 2)."""
    default = _field_defaults().get(key)
    try:
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(default, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise TypeError
            return int(value)
        if key in ("max_steps", "clip_grad_norm", "save_every_steps", "save_every_minutes") \
                and isinstance(value, (str, int, float)) and not isinstance(value, bool) and value != "":
            if key in ("clip_grad_norm", "save_every_minutes"):
                return float(value)
            if float(value) != int(float(value)):
                raise TypeError
            return int(float(value))
        if key == "lora_towers" and isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except (TypeError, ValueError):
        kind = type(default).__name__ if default is not None else "number or null"
        raise ValueError(f"{where}: {key} must be a {kind}, got {value!r}") from None
    return value


def config_from_dict(values: dict[str, Any], where: str = "config") -> TrainConfig:
    """A :class:`TrainConfig` from one flat mapping of run and method fields."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(values).__name__}")
    unknown = set(values) - set(RUN_FIELDS) - set(METHOD_FIELDS)
    if unknown:
        raise _unknown_key_error(unknown, where)
    values = {k: _coerce(k, v, where) for k, v in values.items()}
    preset = values.get("preset") or "paper"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} in {where}; choose from {sorted(PRESETS)}")
    run = {k: v for k, v in values.items() if k in RUN_FIELDS}
    method_values = {k: v for k, v in values.items() if k in METHOD_FIELDS and k != "preset"}
    try:
        method = get_config(preset, **method_values)
    except TypeError as exc:
        raise ValueError(f"bad method setting in {where}: {exc}") from exc
    return TrainConfig(**run, method=method)


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file (an empty file is an empty mapping)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            data = json.loads(text) if text.strip() else {}
        elif ext in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"config file {path!r}: unknown extension {ext!r}; use .yaml, .yml or .json")
    except (json.JSONDecodeError, ImportError) as exc:
        raise ValueError(f"cannot parse config file {path!r}: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise ValueError(f"cannot parse config file {path!r}: {exc}") from exc
        raise
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of keys to values, "
                         f"got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: JSON/YAML scalars and lists (``2``, ``1e-4``, ``true``, ``null``,
    ``[image, text]``), else the string itself."""
    try:
        import yaml
        value = yaml.safe_load(text)
    except Exception:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
    if isinstance(value, dict):  # "a: b" is not meant as a mapping on a command line
        return text
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return text if value is None and text.lower() not in ("null", "none", "~") else value


def parse_set_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` → ``{key: parsed value}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key] = parse_value(value.strip())
    return out


def load_train_config(path: str | None = None, preset: str | None = None,
                      overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Preset < config file < ``overrides`` (``preset`` given here wins over the file's).

    A run's ``config.json`` is a valid config file: its record keys (provenance, history) are
    left out."""
    from acelora.train.run_folder import RECORD_KEYS

    values = read_config_file(path) if path else {}
    values = {k: v for k, v in values.items() if k not in RECORD_KEYS}
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(RUN_FIELDS) - set(METHOD_FIELDS)
    if unknown:
        raise _unknown_key_error(unknown, "the command-line overrides")
    if path:
        unknown = set(values) - set(RUN_FIELDS) - set(METHOD_FIELDS)
        if unknown:
            raise _unknown_key_error(unknown, repr(path))
    merged = {**values, **overrides}
    if preset is not None:
        merged["preset"] = preset
    return config_from_dict(merged, where=repr(path) if path else "config")
