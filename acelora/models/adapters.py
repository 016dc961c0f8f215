"""Adapter checkpoints: the trainable tensors in safetensors + a JSON config with a base fingerprint.

    dir/adapter_model.safetensors   LoRA A/B of every layer, both HGNNs, logit_scale (its log)
    dir/adapter_config.json         {"format", "version", "config": ACELoRAConfig, "base": fingerprint}

The fingerprint describes the base architecture (widths, depths, heads, vocabulary, ...) and hashes
a few frozen tensors LoRA never touches, so adapters are refused on a different base with an error
that names what differs. Hashes are taken over the bfloat16 rounding of the values, so a base cast
to bf16 still matches its fp32 original.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acelora.config import ACELoRAConfig

ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FORMAT = "acelora-adapters"
FORMAT_VERSION = 1

# Config fields that change the shapes/meaning of the saved tensors: they must agree on load.
STRUCTURAL_FIELDS = ("lora_rank", "lora_towers", "hgnn", "hgnn_hidden")


def describe_architecture(base: nn.Module) -> dict[str, Any]:
    """The numbers that define an open_clip BiomedCLIP-like base (works on the meta device)."""
    trunk = base.visual.trunk
    bert = base.text.transformer.config
    patch = trunk.patch_embed.patch_size
    size = base.visual.image_size
    return {
        "embed_dim": int(base.embed_dim) if hasattr(base, "embed_dim") else int(base.visual.head.proj.out_features),
        "image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
        "patch_size": int(patch[0] if isinstance(patch, (tuple, list)) else patch),
        "vision_width": int(trunk.embed_dim),
        "vision_depth": len(trunk.blocks),
        "vision_heads": int(trunk.blocks[0].attn.num_heads),
        "text_width": int(bert.hidden_size),
        "text_depth": int(bert.num_hidden_layers),
        "text_heads": int(bert.num_attention_heads),
        "vocab_size": int(bert.vocab_size),
        "context_length": int(getattr(base, "context_length", 0)),
    }


def _hashed_tensors(base: nn.Module) -> dict[str, torch.Tensor]:
    # Frozen tensors outside the attention projections, present in every such base.
    return {
        "patch_embed": base.visual.trunk.patch_embed.proj.weight,
        "image_proj": base.visual.head.proj.weight,
        "word_embeddings": base.text.transformer.embeddings.word_embeddings.weight,
        "text_proj": next(p for p in base.text.proj.parameters()),
    }


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
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"adapter format version {meta['version']} is newer than this acelora "
                         f"({FORMAT_VERSION})")
    meta["config"] = ACELoRAConfig.from_dict(meta["config"])
    return meta


def write_adapters(directory: str | os.PathLike, tensors: dict[str, torch.Tensor],
                   config: ACELoRAConfig, fingerprint: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    from acelora import __version__

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
    from safetensors.torch import load_file
    return load_file(str(Path(directory) / ADAPTER_WEIGHTS_FILE))


def check_structure(saved: ACELoRAConfig, current: ACELoRAConfig) -> None:
    diffs = [f"{name}: saved {getattr(saved, name)!r}, model {getattr(current, name)!r}"
             for name in STRUCTURAL_FIELDS if getattr(saved, name) != getattr(current, name)]
    if diffs:
        raise ValueError("adapter config does not match the model's: " + "; ".join(diffs))
