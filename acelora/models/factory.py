"""Where base models come from (DESIGN §3, §12): ``create_base_model(name)`` for

* built-in architectures: ``biomedclip``, ``tiny`` (and the CT-CLIP ones when present);
* open_clip's own ViT configs (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, their ``-quickgelu``
  variants, ...): the architecture only, so random weights unless ``pretrained`` names a file;
* local folders (``/path`` or ``local-dir:/path``): ``open_clip_config.json`` + weights, with a
  BERT text tower (BiomedCLIP-style) or open_clip's native one (QuiltNet, BMC-CLIP-style);
* ``hf-hub:org/name``: the same folder taken from the local Hugging Face cache only.

Nothing touches the network: every hub call passes ``local_files_only``. Random initialisation
is seeded (``seed``), so two processes building the same architecture get the same weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from acelora.models import biomedclip as _bc
from acelora.models.tokenizer import OpenCLIPTokenizer

HF_HUB_PREFIX = "hf-hub:"
RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def _seeded(seed: int):
    """A forked RNG seeded with ``seed``: random init without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- open_clip configs

def open_clip_unsupported(model_cfg: dict[str, Any]) -> str | None:
    """Why an open_clip model config cannot take ACE-LoRA here, or None when it can."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "multimodal_cfg" in model_cfg:
        return "CoCa models (a multimodal decoder) are not supported"
    if "timm_model_name" in vision:
        return None if "hf_model_name" in text else "timm image towers with a native text tower are not supported"
    if not isinstance(vision.get("layers"), int):
        return "ResNet image towers are not supported (ViT only)"
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok":
        return "image towers not pooled on the CLS token are not supported"
    if any(vision.get(k) or text.get(k) for k in ("qk_norm", "scaled_cosine_attn", "block_type")):
        return "custom attention blocks (qk-norm, scaled cosine attention) are not supported"
    if "hf_model_name" not in text:
        if text.get("pool_type", "argmax") not in ("argmax", "eos") or text.get("no_causal_mask"):
            return "text towers not pooled on the EOT token of a causal transformer are not supported"
        if text.get("embed_cls"):
            return "text towers with an appended CLS embedding are not supported"
    return None


@functools.lru_cache(maxsize=None)
def _open_clip_model_names() -> tuple[str, ...]:
    """open_clip's built-in configs that acelora supports offline (native ViT + causal text,
    open_clip's own BPE tokenizer)."""
    import open_clip

    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        text = cfg.get("text_cfg", {})
        if open_clip_unsupported(cfg) is None and "hf_model_name" not in text \
                and "hf_tokenizer_name" not in text and "timm_model_name" not in cfg.get("vision_cfg", {}):
            names.append(name)
    return tuple(names)


def _open_clip_all_names() -> list[str]:
    import open_clip
    return open_clip.list_models()


def _why_not(name: str) -> str:
    import open_clip
    cfg = open_clip.get_model_config(name)
    why = open_clip_unsupported(cfg)
    if why is None and "hf_model_name" in cfg.get("text_cfg", {}):
        why = "its HuggingFace text tower needs the model's own folder (not available offline)"
    return why or "its tokenizer is a HuggingFace one, not available offline"


def open_clip_model_names() -> list[str]:
    """open_clip's built-in configs that acelora supports offline (native ViT + causal text,
    open_clip's own BPE tokenizer)."""
    return list(_open_clip_model_names())


def build_open_clip(model_cfg: dict[str, Any], name: str = "custom") -> nn.Module:
    """open_clip's ``CLIP`` (or ``CustomTextCLIP``) of a native model config, randomly initialised."""
    from open_clip.model import CLIP, CustomTextCLIP

    why = open_clip_unsupported(model_cfg)
    if why is not None:
        raise ValueError(f"model {name!r}: {why}")
    cfg = copy.deepcopy(model_cfg)
    custom_text = cfg.pop("custom_text", False)
    model = (CustomTextCLIP if custom_text else CLIP)(**cfg)
    model.open_clip_config = {"model_cfg": copy.deepcopy(model_cfg)}
    model.name = name
    return model


def _native_tokenizer(text_cfg: dict[str, Any]):
    """open_clip's BPE tokenizer (shipped with open_clip) for a native text tower."""
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"the text tower uses the HuggingFace tokenizer {text_cfg['hf_tokenizer_name']!r}; "
                         "native text towers with a HuggingFace tokenizer are not supported")
    return OpenCLIPTokenizer(int(text_cfg.get("context_length", 77)))


# --------------------------------------------------------------------------- folders and the hub

def resolve_hf_hub(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache (never downloads)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            "acelora never downloads: fetch it once where there is network access "
            f"(`huggingface-cli download {repo_id}`) and copy the cache here, or pass the model "
            "folder itself") from exc


def load_model_folder(folder: str | os.PathLike, name: str | None = None):
    """(model, tokenizer, preprocess) from a folder with ``open_clip_config.json`` + weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    config_file = folder / _bc.OPEN_CLIP_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} is missing: {_bc.OPEN_CLIP_CONFIG_FILE}")
    try:
        with open(config_file) as f:
            oc_config = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {exc}") from exc
    model_cfg = oc_config.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{str(config_file)!r} has no 'model_cfg' section")
    if "hf_model_name" in model_cfg.get("text_cfg", {}):
        return _bc.load_model_dir(folder)            # BiomedCLIP-style: BERT text tower
    why = open_clip_unsupported(model_cfg)
    if why is not None:
        raise ValueError(f"model folder {str(folder)!r}: {why}")
    weights = next((folder / n for n in _bc.WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"model folder {str(folder)!r} is missing: " + " or ".join(_bc.WEIGHT_FILES))
    model = build_open_clip(model_cfg, name=name or f"local-dir:{folder.resolve()}")
    model.open_clip_config = copy.deepcopy(oc_config)
    _bc.load_base_weights(model, _bc.load_state_dict_file(weights))
    tokenizer = _native_tokenizer(model_cfg.get("text_cfg", {}))
    return model, tokenizer, _bc.build_preprocess(oc_config)


# --------------------------------------------------------------------------- the factory

def builtin_model_names() -> list[str]:
    """Every name ``create_base_model`` builds without a folder."""
    return sorted(_bc.BUILTIN_MODELS) + _ct_names() + open_clip_model_names()


def _ct_names() -> list[str]:
    from acelora.models import ctclip

    return sorted(ctclip.CTCLIP_CONFIGS)


def is_builtin(name: str) -> bool:
    """True for architectures built from a config (random weights unless weights are given)."""
    return name in _bc.BUILTIN_MODELS or name in _ct_names() or name in open_clip_model_names()


def create_base_model(name: str = "biomedclip", pretrained: str | os.PathLike | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                      seed: int = RANDOM_INIT_SEED):
    """The frozen base model, its tokenizer and its eval image transform.

    Args:
        name: a built-in architecture (``"biomedclip"``, ``"tiny"``, an open_clip ViT config
            such as ``"ViT-B-32"``; random weights unless ``pretrained``), a local model folder
            (``"local-dir:/path"`` or ``"/path"``), or ``"hf-hub:org/name"`` from the local
            Hugging Face cache.
        pretrained: a state-dict file (.bin/.pt/.safetensors, open_clip key names) to load into a
            built-in architecture. Never downloaded.
        device, dtype: where and in which dtype to put the model ("meta" builds no storage).
        seed: the seed of the random initialisation of built-in architectures.

    Returns ``(model, tokenizer, preprocess)``; the model is in eval mode.
    """
    name = os.fspath(name)
    path = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    meta = device is not None and torch.device(device).type == "meta"
    if name in _ct_names():
        from acelora.models import ctclip
        model, tokenizer, preprocess = ctclip.create_ctclip(name, pretrained=pretrained, device=device,
                                                            dtype=dtype)
        return model.eval(), tokenizer, preprocess
    if name in _bc.BUILTIN_MODELS or name in open_clip_model_names():
        with _seeded(seed), torch.device("meta") if meta else contextlib.nullcontext():
            if name in _bc.BUILTIN_MODELS:
                oc_config, bert_config = _bc.BUILTIN_MODELS[name]
                model = _bc.build_model(oc_config, bert_config, name=name)
                tokenizer = _bc.TextTokenizer.generated(model.context_length)
            else:
                import open_clip
                oc_config = {"model_cfg": open_clip.get_model_config(name)}
                model = build_open_clip(oc_config["model_cfg"], name=name)
                tokenizer = _native_tokenizer(oc_config["model_cfg"]["text_cfg"])
        if pretrained is not None:
            _bc.load_base_weights(model, _bc.load_state_dict_file(pretrained))
        preprocess = _bc.build_preprocess(oc_config)
    elif name.startswith(HF_HUB_PREFIX):
        if pretrained is not None:
            raise ValueError("pretrained= is for built-in architectures; an hf-hub model has its weights")
        model, tokenizer, preprocess = load_model_folder(resolve_hf_hub(name[len(HF_HUB_PREFIX):]), name=name)
    elif os.path.isdir(path) or name.startswith("local-dir:"):
        if pretrained is not None:
            raise ValueError("pretrained= is for built-in architectures; a model folder has its weights")
        model, tokenizer, preprocess = load_model_folder(path)
    elif name in _open_clip_all_names():
        raise ValueError(f"open_clip model {name!r}: {_why_not(name)}; acelora supports open_clip's "
                         "ViT configs with a native causal text tower (e.g. ViT-B-32, ViT-L-14)")
    else:
        raise ValueError(f"unknown base model {name!r}: use a built-in name ({', '.join(sorted(_bc.BUILTIN_MODELS))}, "
                         "an open_clip ViT config such as ViT-B-32), a local model folder, or "
                         "hf-hub:org/name from the local Hugging Face cache")
    if not meta:
        model.to(device=device, dtype=dtype)
    elif dtype is not None:
        model.to(dtype=dtype)
    return model.eval(), tokenizer, preprocess
