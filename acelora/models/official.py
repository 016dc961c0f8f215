"""Importer for the released ACE-LoRA checkpoint (checkpoint/ACE_LoRA.pt, DESIGN §7).

Layout of that file (read with ``torch.load(weights_only=True)``, never unpickled freely)::

    {"weights": {
        "layer_{i}": {"{q,k,v}_proj": {"w_lora_A": [r, 768], "w_lora_B": [768, r]}},
                     # i = 0..11 the BERT text tower, 12..23 the ViT (12 -> ViT block 0)
        "{img,text}_{edge,node}_adapter": {"down.weight": [128, 512], "down.bias": [128],
                                           "up.weight": [512, 128], "up.bias": [512]},
        "logit_scale": scalar multiplier (not its log)},
     "metadata": {"r": 4, "topk": 5, "params": ..., "position": ..., ...}}

``import_official_checkpoint`` writes this library's adapter folder with the ``official`` preset;
load it with ``create_ace_lora("biomedclip-folder", adapters=out_dir)``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acelora.config import get_config
from acelora.models import adapters as _adapters

QKV = ("q_proj", "k_proj", "v_proj")
HGNN_PARTS = {"img": "image_hgnn", "text": "text_hgnn"}
MLP_PARTS = {"edge": "edge_mlp", "node": "node_mlp"}
MLP_TENSORS = ("down.weight", "down.bias", "up.weight", "up.bias")


def text_lora_prefix(i: int) -> str:
    return f"base.text.transformer.encoder.layer.{i}.attention.self.qkv."


def image_lora_prefix(j: int) -> str:
    return f"base.visual.trunk.blocks.{j}.attn.qkv."


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    # {"down": {"weight": t}} and {"down.weight": t} both become {"down.weight": t}.
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


def _tensor(value: Any, where: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise ValueError(f"{where}: expected a tensor, got {type(value).__name__}")
    return value.detach().to("cpu", torch.float32)


def _base_for_fingerprint(base: str | os.PathLike | nn.Module) -> tuple[nn.Module, bool]:
    """(open_clip model, whether its weights are real) for the adapter fingerprint."""
    if isinstance(base, nn.Module):
        return getattr(base, "base", base), True
    from acelora.models.biomedclip import BUILTIN_MODELS, _strip_schema, build_model, check_model_dir

    name = os.fspath(base)
    if name in BUILTIN_MODELS:
        oc_config, bert_config = BUILTIN_MODELS[name]
    else:  # a model folder: its configs only, the architecture is all we need here
        import json
        from acelora.models.biomedclip import _known_text_tower
        directory = _strip_schema(name)
        files = check_model_dir(directory)
        with open(files["open_clip_config"]) as f:
            oc_config = json.load(f)
        if "bert_config" in files:
            with open(files["bert_config"]) as f:
                bert_config = json.load(f)
        else:
            bert_config = _known_text_tower(Path(directory))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return build_model(oc_config, bert_config), False


def convert_official_state(weights: dict[str, Any], text_depth: int, vision_depth: int,
                           ) -> dict[str, torch.Tensor]:
    """Official ``weights`` dict -> this library's adapter tensors (names as in ACELoRAModel)."""
    if not isinstance(weights, dict):
        raise ValueError("the checkpoint's 'weights' must be a dict")
    out: dict[str, torch.Tensor] = {}
    n_layers = text_depth + vision_depth
    expected = {f"layer_{i}" for i in range(n_layers)}
    present = {k for k in weights if k.startswith("layer_")}
    if present != expected:
        raise ValueError(f"checkpoint LoRA layers {sorted(present)} do not match the base's "
                         f"{text_depth} text + {vision_depth} image layers "
                         f"(missing {sorted(expected - present)}, extra {sorted(present - expected)})")
    for i in range(n_layers):
        layer = weights[f"layer_{i}"]
        missing = [p for p in QKV if p not in layer]
        if missing:
            raise ValueError(f"layer_{i} lacks {missing}")
        a = [_tensor(layer[p].get("w_lora_A"), f"layer_{i}.{p}.w_lora_A") for p in QKV]
        b = [_tensor(layer[p].get("w_lora_B"), f"layer_{i}.{p}.w_lora_B") for p in QKV]
        r = a[0].shape[0]
        for p, ai, bi in zip(QKV, a, b):
            if ai.dim() != 2 or bi.dim() != 2 or ai.shape[0] != r or bi.shape[1] != r:
                raise ValueError(f"layer_{i}.{p}: w_lora_A {tuple(ai.shape)} / w_lora_B "
                                 f"{tuple(bi.shape)} are not [r, d_in] / [d_out, r] with r={r}")
        prefix = text_lora_prefix(i) if i < text_depth else image_lora_prefix(i - text_depth)
        out[prefix + "lora_A"] = torch.cat(a)     # [A_q; A_k; A_v]
        out[prefix + "lora_B"] = torch.cat(b)     # [B_q; B_k; B_v]
    for tower, module in HGNN_PARTS.items():
        for part, mlp in MLP_PARTS.items():
            key = f"{tower}_{part}_adapter"
            if key not in weights:
                raise ValueError(f"checkpoint lacks {key!r}")
            flat = _flatten(weights[key])
            lacking = [t for t in MLP_TENSORS if t not in flat]
            if lacking:
                raise ValueError(f"{key} lacks {lacking}")
            for t in MLP_TENSORS:
                out[f"{module}.{mlp}.{t}"] = _tensor(flat[t], f"{key}.{t}")
    if "logit_scale" not in weights:
        raise ValueError("checkpoint lacks 'logit_scale'")
    multiplier = float(_tensor(weights["logit_scale"], "logit_scale").reshape(-1)[0])
    if not multiplier > 0:
        raise ValueError(f"logit_scale must be a positive multiplier, got {multiplier}")
    out["logit_scale"] = torch.tensor(math.log(multiplier))  # stored as the multiplier; we keep its log
    return out


def import_official_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike,
                               base: str | os.PathLike | nn.Module = "biomedclip") -> Path:
    """Convert the released checkpoint to an adapter folder (``official`` preset).

    ``base``: the model the adapters go on: a built-in architecture name or model folder (the
    architecture is recorded), or a loaded model (its weights are fingerprinted too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "weights" not in ckpt:
        raise ValueError(f"{str(path)!r} is not an ACE-LoRA checkpoint (no 'weights' entry)")
    meta = dict(ckpt.get("metadata") or {})
    model, real = _base_for_fingerprint(base)
    arch = _adapters.describe_architecture(model)
    tensors = convert_official_state(ckpt["weights"], arch["text_depth"], arch["vision_depth"])

    r = tensors[text_lora_prefix(0) + "lora_A"].shape[0] // 3
    if "r" in meta and int(meta["r"]) != r:
        raise ValueError(f"metadata says r={meta['r']} but the LoRA tensors have rank {r}")
    hidden = tensors["image_hgnn.edge_mlp.down.weight"].shape[0]
    overrides: dict[str, Any] = {"lora_rank": r, "hgnn_hidden": hidden}
    if "topk" in meta:
        overrides["hgnn_topk"] = int(meta["topk"])
    for key in ("alpha", "lora_alpha"):
        if key in meta:
            overrides["lora_alpha"] = float(meta[key])
    config = get_config("official", **overrides)
    _check_shapes(tensors, model, config)

    fingerprint = _adapters.base_fingerprint(model, with_weights=real)
    source = {"source": {"file": path.name, "metadata": {k: _jsonable(v) for k, v in meta.items()}}}
    return _adapters.write_adapters(out_dir, tensors, config, fingerprint, extra=source)


def _check_shapes(tensors: dict[str, torch.Tensor], model: nn.Module, config) -> None:
    """Every converted tensor has the shape the ACE-LoRA model of ``model`` will expect."""
    arch = _adapters.describe_architecture(model)
    r, d = config.lora_rank, config.hgnn_hidden
    widths = {"text": arch["text_width"], "image": arch["vision_width"]}
    bad = []
    for name, t in tensors.items():
        tower = "text" if name.startswith("base.text") else "image" if name.startswith("base.visual") else None
        if tower and name.endswith("lora_A"):
            want = (3 * r, widths[tower])
        elif tower and name.endswith("lora_B"):
            want = (3 * widths[tower], r)
        elif name.endswith("down.weight"):
            want = (d, arch["embed_dim"])
        elif name.endswith("down.bias"):
            want = (d,)
        elif name.endswith("up.weight"):
            want = (arch["embed_dim"], d)
        elif name.endswith("up.bias"):
            want = (arch["embed_dim"],)
        else:
            continue
        if tuple(t.shape) != want:
            bad.append(f"{name}: {tuple(t.shape)} != {want}")
    if bad:
        raise ValueError("checkpoint tensors do not fit the base architecture: " + "; ".join(bad[:6]))


def _jsonable(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return repr(v)
