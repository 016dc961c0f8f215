"""Adapter checkpoints: the trainable tensors in safetensors + a JSON config with a base fingerprint.

    dir/adapter_model.safetensors   LoRA A/B of every layer, both HGNNs, logit_scale (its log)
    dir/adapter_config.json         {"format", "version", "config": ACELoRAConfig, "base": fingerprint}

"config" is the method config only (what defines the adapters); how they were trained is the run's
record. Folders of format version 1 (acelora 0.1.0) also hold run settings there (``lr``,
``epochs``, ``seed``, ``extra``, ...): they are dropped on read, with a log line naming them.

The fingerprint describes the base architecture (widths, depths, heads, vocabulary, ...) and hashes
a few frozen tensors LoRA never touches, so adapters are refused on a different base with an error
that names what differs. Hashes are taken over the bfloat16 rounding of the values, so a base cast
to bf16 still matches its fp32 original.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from acelora import __version__
from acelora.config import LEGACY_RUN_FIELDS, PRESETS, ACELoRAConfig

log = logging.getLogger("acelora.models")

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT = "acelora-adapters"
FORMAT_VERSION = 2  # 2: "config" holds the method config only (1 also held run settings)

# Config fields that change the shapes/meaning of the saved tensors: they must agree on load.
# So must each tower's LoRA rank (lora_rank, unless lora_rank_image / lora_rank_text set it).
STRUCTURAL_FIELDS = ("lora_towers", "hgnn", "hgnn_hidden")


def _towers(model: nn.Module):
    """(image tower, text tower, embed_dim) of an acelora model or of a raw open_clip base."""
    if hasattr(model, "image_tower") and hasattr(model, "text_tower"):
        return model.image_tower, model.text_tower, int(model.embed_dim)
    from acelora.models.tower_text import text_tower
    from acelora.models.tower_vit import image_tower

    dim = getattr(model, "embed_dim", None)
    return image_tower(model), text_tower(model), int(dim if dim is not None else model.visual.output_dim)


def describe_towers(image, text, embed_dim: int) -> dict[str, Any]:
    """The numbers that define a two-tower base (works on the meta device)."""
    img, txt = image.describe(), text.describe()
    return {
        "embed_dim": int(embed_dim),
        "image_size": img["image_size"], "patch_size": img["patch_size"],
        "vision_width": img["width"], "vision_depth": img["depth"], "vision_heads": img["heads"],
        "text_width": txt["width"], "text_depth": txt["depth"], "text_heads": txt["heads"],
        "vocab_size": txt["vocab_size"], "context_length": txt["context_length"],
        "image_tower": img["tower"], "text_tower": txt["tower"],
        # What else defines a 3D tower (CTViT: depth patch, volume shape, codebook, pooling).
        **{f"vision_{k}": v for k, v in img.items()
           if k not in ("tower", "image_size", "patch_size", "width", "depth", "heads")},
    }


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """``describe_towers`` of an acelora model or a raw open_clip base."""
    return describe_towers(*_towers(model))


def _hashed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen tensors outside the attention projections, present in every such base.
    image, text, _ = _towers(model)
    return {**image.hashed_tensors(), **text.hashed_tensors()}


def weights_hash(base: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in _hashed_tensors(base).items():
        if t.is_meta:
            raise ValueError("cannot hash the weights of a model on the meta device")
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(base: nn.Module, with_weights: bool = True) -> dict[str, Any]:
    fp: dict[str, Any] = {"architecture": describe_architecture(base)}
    if with_weights:
        fp["weights_sha256"] = weights_hash(base)
    return fp


def check_fingerprint(saved: dict[str, Any], base: nn.Module) -> None:
    """ValueError naming every difference between the saved fingerprint and ``base``."""
    problems = []
    arch = describe_architecture(base)
    for key, value in saved.get("architecture", {}).items():
        if key in arch and arch[key] != value:
            problems.append(f"{key}: adapters were made for {value}, this base has {arch[key]}")
    if not problems and saved.get("weights_sha256") and saved["weights_sha256"] != weights_hash(base):
        problems.append("weights: the frozen base weights differ from the ones the adapters were "
                        f"trained on (hash {saved['weights_sha256']} != {weights_hash(base)})")
    if problems:
        raise ValueError("adapters do not match this base model: " + "; ".join(problems))


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON of an adapter folder (checked); ``["config"]`` is an ``ACELoRAConfig``."""
    directory = Path(directory)
    missing = [n for n in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE) if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"adapter folder {str(directory)!r} is missing: {', '.join(missing)}")
    with open(directory / ADAPTER_CONFIG_FILE) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(directory / ADAPTER_CONFIG_FILE)!r} is not an acelora adapter config")
    version = int(meta.get("version", 0))
    if version > FORMAT_VERSION:
        raise ValueError(f"adapter format version {meta['version']} is newer than this acelora "
                         f"({FORMAT_VERSION})")
    config = dict(meta["config"])
    if version < 2:
        dropped = {k: config.pop(k) for k in LEGACY_RUN_FIELDS if k in config}
        if dropped:
            log.warning("adapter folder %s (format version %d) records run settings in its "
                        "config; they do not define the adapters and were dropped: %s",
                        str(directory), version, ", ".join(f"{k}={v!r}" for k, v in sorted(dropped.items())))
        meta["dropped_run_fields"] = dropped
        config.setdefault("preset", _matching_preset(config))
    meta["config"] = ACELoRAConfig.from_dict(config)
    return meta


def _matching_preset(fields: dict[str, Any]) -> str:
    # Version-1 folders do not name their preset: the first non-default preset whose settings
    # they all have (the official importer's folders are "official"), else "paper".
    cfg = ACELoRAConfig.from_dict(fields)
    for name, settings in PRESETS.items():
        if settings and all(getattr(cfg, k) == v for k, v in settings.items()):
            return name
    return "paper"


def write_adapters(directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                   config: ACELoRAConfig, fingerprint: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
              str(directory / ADAPTER_WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "acelora_version": __version__,
            "config": config.to_dict(), "base": fingerprint, **(extra or {})}
    with open(directory / ADAPTER_CONFIG_FILE, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return directory


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / ADAPTER_WEIGHTS_FILE))


def check_structure(saved: ACELoRAConfig, current: ACELoRAConfig) -> None:
    diffs = [f"lora_rank ({tower} tower): saved {saved.rank_of(tower)}, model {current.rank_of(tower)}"
             for tower in ("image", "text") if saved.rank_of(tower) != current.rank_of(tower)]
    diffs += [f"{name}: saved {getattr(saved, name)!r}, model {getattr(current, name)!r}"
              for name in STRUCTURAL_FIELDS if getattr(saved, name) != getattr(current, name)]
    if diffs:
        raise ValueError("adapter config does not match the model's: " + "; ".join(diffs))
