"""BiomedCLIP (open_clip ``CustomTextCLIP``: timm ViT-B/16 + BiomedBERT) built and loaded offline.

Nothing here touches the network. open_clip builds an HF text tower from a hub name; we build it
from a ``BertConfig`` object instead (``OfflineCustomTextCLIP``), so the architecture is available
with random weights (tests, benchmarks) and real weights come from a local folder:

    folder/open_clip_config.json           open_clip's model + preprocess config
    folder/open_clip_pytorch_model.bin     (or open_clip_model.safetensors) the CLIP state dict
    folder/config.json                     the BERT config of the text tower
    folder/vocab.txt | tokenizer.json      the BERT tokenizer

``tiny`` is the same structure at toy scale (64 px ViT, 2+2 layers, width 64) with a generated
WordPiece vocabulary, for tests and the CPU demo.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CustomTextCLIP, _build_vision_tower

from acelora.models.tokenizer import TextTokenizer, generate_vocabulary

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

BIOMEDBERT_NAME = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

# open_clip_config.json of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (DESIGN §3).
BIOMEDCLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": BIOMEDBERT_NAME,
            "hf_tokenizer_name": BIOMEDBERT_NAME,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
}

# BiomedBERT-base (uncased, abstracts): BERT-base with its own 30,522-token vocabulary.
BIOMEDBERT_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}

TINY_VIT_NAME = "acelora_vit_tiny_patch16_64"
TINY_VIT_ARGS = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)

TINY_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": TINY_VIT_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 64,
        },
        "text_cfg": {
            "hf_model_name": "acelora/tiny-bert",
            "hf_tokenizer_name": "acelora/tiny-bert",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 64,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
}

TINY_BERT_CONFIG: dict[str, Any] = {
    **BIOMEDBERT_CONFIG,
    "vocab_size": len(generate_vocabulary()),
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
}

BUILTIN_MODELS: dict[str, tuple[dict, dict]] = {
    "biomedclip": (BIOMEDCLIP_CONFIG, BIOMEDBERT_CONFIG),
    "tiny": (TINY_CONFIG, TINY_BERT_CONFIG),
}

OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
BERT_CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
# Keys a real checkpoint may hold that our modules deliberately do not have.
_IGNORABLE_KEY_SUFFIXES = ("embeddings.position_ids",)
_IGNORABLE_KEY_PARTS = ("text.transformer.pooler.",)


def _register_tiny_vit() -> None:
    import timm
    from timm.models import register_model

    if timm.models.is_model(TINY_VIT_NAME):
        return

    def acelora_vit_tiny_patch16_64(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{TINY_VIT_NAME} has no pretrained weights")
        return timm.create_model("vit_base_patch16_224", pretrained=False, **{**TINY_VIT_ARGS, **kwargs})

    acelora_vit_tiny_patch16_64.__module__ = __name__
    register_model(acelora_vit_tiny_patch16_64)


_register_tiny_vit()


def _bert_config(bert_config: dict[str, Any] | Any):
    from transformers import BertConfig, PretrainedConfig

    if isinstance(bert_config, PretrainedConfig):
        return copy.deepcopy(bert_config)
    cfg = {k: v for k, v in dict(bert_config).items() if k != "model_type"}
    model_type = dict(bert_config).get("model_type", "bert")
    if model_type != "bert":
        raise ValueError(f"the text tower must be a BERT model, config.json says model_type={model_type!r}")
    return BertConfig(**cfg)


class OfflineCustomTextCLIP(CustomTextCLIP):
    """open_clip's ``CustomTextCLIP`` whose HF text tower comes from a config object.

    Same modules and state-dict keys as open_clip's own BiomedCLIP, minus BERT's unused pooler
    (open_clip drops it too for the ``cls_last_hidden_state_pooler``).
    """

    def __init__(self, open_clip_config: dict[str, Any], bert_config, name: str = "custom"):
        nn.Module.__init__(self)  # CustomTextCLIP.__init__ would build the text tower from the hub
        model_cfg = open_clip_config["model_cfg"]
        embed_dim = int(model_cfg["embed_dim"])
        text_cfg = model_cfg["text_cfg"]
        self.output_dict = False
        self.visual = _build_vision_tower(embed_dim, model_cfg["vision_cfg"])
        self.text = HFTextEncoder(
            text_cfg.get("hf_model_name", "bert"), output_dim=embed_dim,
            config=_bert_config(bert_config),
            pooler_type=text_cfg.get("hf_pooler_type", "cls_last_hidden_state_pooler"),
            proj_type=text_cfg.get("hf_proj_type", "mlp"), pretrained=False)
        if text_cfg.get("hf_pooler_type", "cls_last_hidden_state_pooler") != "cls_pooler":
            self.text.transformer.pooler = None
        self.context_length = int(text_cfg.get("context_length", self.text.context_length))
        self.vocab_size = self.text.vocab_size
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.logit_bias = None
        self.embed_dim = embed_dim
        self.name = name
        self.open_clip_config = copy.deepcopy(open_clip_config)

    @property
    def bert_config(self):
        return self.text.config


def build_model(open_clip_config: dict[str, Any], bert_config, name: str = "custom") -> nn.Module:
    """The CLIP model of an open_clip config and a BERT config, randomly initialised."""
    return OfflineCustomTextCLIP(open_clip_config, bert_config, name=name)


def build_preprocess(open_clip_config: dict[str, Any]) -> Callable:
    """Evaluation transform (resize, centre crop, normalise) of an open_clip config."""
    from open_clip.transform import image_transform

    pre = open_clip_config.get("preprocess_cfg", {})
    size = open_clip_config["model_cfg"]["vision_cfg"].get("image_size", 224)
    return image_transform(size, is_train=False, mean=tuple(pre.get("mean", OPENAI_MEAN)),
                           std=tuple(pre.get("std", OPENAI_STD)),
                           interpolation=pre.get("interpolation"), resize_mode=pre.get("resize_mode"))


# --------------------------------------------------------------------------- files

def _strip_schema(name: str) -> str:
    return name[len("local-dir:"):] if name.startswith("local-dir:") else name


def check_model_dir(directory: str | os.PathLike) -> dict[str, Path]:
    """Paths of the files a model folder needs; one error naming every missing file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model folder {str(directory)!r} does not exist")
    found: dict[str, Path] = {}
    missing: list[str] = []
    wanted = {"open_clip_config": (OPEN_CLIP_CONFIG_FILE,), "weights": WEIGHT_FILES,
              "bert_config": (BERT_CONFIG_FILE,), "tokenizer": TOKENIZER_FILES}
    for role, names in wanted.items():
        hit = next((directory / n for n in names if (directory / n).is_file()), None)
        if hit is None and role == "bert_config" and _known_text_tower(directory) is not None:
            continue  # BiomedCLIP's hub folder has no BERT config.json: the built-in one is exact
        if hit is None:
            missing.append(" or ".join(names))
        else:
            found[role] = hit
    if missing:
        raise FileNotFoundError(f"model folder {str(directory)!r} is missing: " + "; ".join(missing))
    return found


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # open_clip training checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_base_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that tolerates only keys our modules drop on purpose (BERT pooler, position ids)."""
    state = {k: v for k, v in state.items()
             if not (k.endswith(_IGNORABLE_KEY_SUFFIXES) or any(p in k for p in _IGNORABLE_KEY_PARTS))}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_IGNORABLE_KEY_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise ValueError(
            "weights do not match the model: "
            f"missing {len(missing)} key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
            f"unexpected {len(result.unexpected_keys)} key(s) {result.unexpected_keys[:5]}"
            f"{' ...' if len(result.unexpected_keys) > 5 else ''}")


def save_base_model(model: nn.Module, tokenizer: TextTokenizer, directory: str | os.PathLike,
                    safetensors: bool = False) -> Path:
    """Write a model folder in the layout ``create_base_model`` loads (open_clip's + BERT files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / OPEN_CLIP_CONFIG_FILE, "w") as f:
        json.dump(model.open_clip_config, f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file
        save_file(state, str(directory / WEIGHT_FILES[1]))
    else:
        torch.save(state, directory / WEIGHT_FILES[0])
    model.bert_config.to_json_file(str(directory / BERT_CONFIG_FILE))
    tokenizer.save(directory)
    return directory


def _known_text_tower(directory: Path) -> dict[str, Any] | None:
    """The built-in BERT config when the folder's open_clip config names BiomedBERT."""
    try:
        with open(directory / OPEN_CLIP_CONFIG_FILE) as f:
            name = json.load(f)["model_cfg"]["text_cfg"].get("hf_model_name")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return BIOMEDBERT_CONFIG if name == BIOMEDBERT_NAME else None


def load_model_dir(directory: str | os.PathLike):
    """(model, tokenizer, preprocess) from a local model folder."""
    files = check_model_dir(directory)
    with open(files["open_clip_config"]) as f:
        oc_config = json.load(f)
    if "model_cfg" not in oc_config:
        raise ValueError(f"{str(files['open_clip_config'])!r} has no 'model_cfg' section")
    if "bert_config" in files:
        with open(files["bert_config"]) as f:
            bert_config = json.load(f)
    else:
        bert_config = _known_text_tower(Path(directory))
    model = build_model(oc_config, bert_config, name=f"local-dir:{Path(directory).resolve()}")
    load_base_weights(model, load_state_dict_file(files["weights"]))
    tokenizer = TextTokenizer.from_directory(directory, model.context_length)
    return model, tokenizer, build_preprocess(oc_config)
