"""CT-CLIP (3D chest CT CLIP): CTViT image tower + CXR-BERT text tower, built and loaded offline.

``create_ctclip(name, pretrained=None, tokenizer_dir=None, device=None, dtype=None)`` ->
``(model, tokenizer, preprocess)`` for ``"ct-clip-v2"`` (patches 20/10, mean over depth),
``"ct-clip-v1"`` (patches 30/15, all tokens flattened) and ``"ct-clip-tiny"`` (same structure at toy
size for tests and the CPU demo). Parameter names are CT-CLIP's, so a checkpoint saved by its code
(``CT-CLIP_v2.pt``) loads as is, and :func:`save_ctclip` writes the same layout.

The model: ``encode_image(volumes [B, 1, D, H, W])`` and ``encode_text(input_ids, attention_mask)``
give l2-normalised ``[B, dim_latent]``; ``logit_scale`` is CT-CLIP's ``temperature`` parameter
itself (the same tensor), the log of the logit multiplier (CT-CLIP multiplies by ``exp(t)``).
The image latent is ``to_visual_latent`` of the pooled quantised tokens; setting
``model.visual_transformer.use_quantizer = False`` pools the continuous tokens instead (a
documented deviation, for adaptation experiments; CT-CLIP always quantises).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acelora.models.ctvit import CTViT, CTViTConfig
from acelora.models.tokenizer import TextTokenizer, generate_vocabulary

CONTEXT_LENGTH = 512  # CT-CLIP tokenizes to BERT's maximum length

# microsoft/BiomedVLP-CXR-BERT-specialized as CT-CLIP loads it: a plain BertModel, dropout 0.25.
CXR_BERT_CONFIG: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.25,
    "attention_probs_dropout_prob": 0.25, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}

TINY_BERT_CONFIG: dict[str, Any] = dict(
    CXR_BERT_CONFIG, vocab_size=len(generate_vocabulary()), hidden_size=64, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=128)

POOLINGS = ("mean_depth", "flatten")


@dataclass(frozen=True)
class CTCLIPConfig:
    vision: CTViTConfig = CTViTConfig()
    text: dict = field(default_factory=lambda: dict(CXR_BERT_CONFIG))
    depth: int = 240              # slices of the input volume (D)
    dim_latent: int = 512
    pooling: str = "mean_depth"   # v2: mean over depth then flatten; v1: flatten all tokens
    spacing: tuple[float, float, float] = (1.5, 0.75, 0.75)  # preprocessing target, mm (D, H, W)
    keep_unused: bool = False     # build the *_extra projections and CTViT's decoder heads

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return (self.depth, *self.vision.image_size)

    @property
    def dim_image(self) -> int:
        t, h, w = self.vision.grid(self.depth)
        return (h * w if self.pooling == "mean_depth" else t * h * w) * self.vision.dim


CTCLIP_CONFIGS: dict[str, CTCLIPConfig] = {
    "ct-clip-v2": CTCLIPConfig(),
    "ct-clip-v1": CTCLIPConfig(vision=CTViTConfig(patch_size=30, temporal_patch_size=15),
                               pooling="flatten"),
    # Same field of view as v2 (360 mm cube) at 16 x 48 x 48 voxels; 4 x 6 x 6 tokens.
    "ct-clip-tiny": CTCLIPConfig(
        vision=CTViTConfig(dim=32, codebook_size=64, image_size=(48, 48), patch_size=8,
                           temporal_patch_size=4, spatial_depth=2, temporal_depth=2, heads=4,
                           dim_head=8),
        text=dict(TINY_BERT_CONFIG), depth=16, dim_latent=32, spacing=(22.5, 7.5, 7.5)),
}


class CTCLIP(nn.Module):
    """CT-CLIP's modules under CT-CLIP's names: ``visual_transformer``, ``text_transformer``,
    ``to_visual_latent``, ``to_text_latent``, ``temperature`` (and, with ``keep_unused``, the
    ``*_extra`` copies that CT-CLIP builds but never uses)."""

    def __init__(self, config: CTCLIPConfig = CTCLIPConfig(), name: str = "ct-clip"):
        super().__init__()
        from transformers import BertConfig, BertModel
        if config.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {config.pooling!r}")
        self.config, self.name = config, name
        vision = replace(config.vision, keep_unused=config.keep_unused)
        self.visual_transformer = CTViT(vision)
        self.text_transformer = BertModel(BertConfig(**config.text), add_pooling_layer=True)
        dim_text = config.text["hidden_size"]
        self.to_text_latent = nn.Linear(dim_text, config.dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(config.dim_image, config.dim_latent, bias=False)
        self.temperature = nn.Parameter(torch.tensor(1.0))
        if config.keep_unused:
            self.to_text_latent_extra = nn.Linear(dim_text, config.dim_latent, bias=False)
            self.to_visual_latent_extra = nn.Linear(config.dim_image, config.dim_latent, bias=False)

    # ------------------------------------------------------------------ interface
    @property
    def logit_scale(self) -> nn.Parameter:
        """CT-CLIP's ``temperature``: the log of the logit multiplier (same tensor)."""
        return self.temperature

    @property
    def context_length(self) -> int:
        return CONTEXT_LENGTH

    @property
    def embed_dim(self) -> int:
        return self.config.dim_latent

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return self.config.volume_shape

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per layer of CTViT's two transformers and of CXR-BERT."""
        vit = self.visual_transformer
        for transformer in (vit.enc_spatial_transformer, vit.enc_temporal_transformer):
            transformer.grad_checkpointing = bool(enable)
        bert = self.text_transformer
        # transformers >= 5 names the switch activation_checkpointing_* (the old name warns)
        name = "activation_checkpointing" if hasattr(bert, "activation_checkpointing_enable") \
            else "gradient_checkpointing"
        getattr(bert, f"{name}_enable" if enable else f"{name}_disable")()

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, h, w, dim]`` -> ``[B, dim_image]`` as CT-CLIP pools (v2 mean over depth)."""
        if self.config.pooling == "mean_depth":
            tokens = tokens.mean(dim=1)
        pooled = tokens.reshape(tokens.shape[0], -1)
        if pooled.shape[1] != self.config.dim_image:
            raise ValueError(f"{self.name}: the volume gives {pooled.shape[1]} pooled features, "
                             f"to_visual_latent takes {self.config.dim_image}; volumes must be "
                             f"{self.volume_shape} (D, H, W)")
        return pooled

    def encode_image(self, volumes: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``[B, 1, D, H, W]`` -> image latents ``[B, dim_latent]``."""
        latents = self.to_visual_latent(self.pool(self.visual_transformer(volumes)))
        return F.normalize(latents, dim=-1) if normalize else latents

    def encode_text_tokens(self, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states of the text tower ``[B, L, dim_text]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.text_transformer(input_ids=input_ids, attention_mask=attention_mask)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """Token ids ``[B, L]`` (CLS first) -> text latents ``[B, dim_latent]`` from the CLS state."""
        latents = self.to_text_latent(self.encode_text_tokens(input_ids, attention_mask)[:, 0])
        return F.normalize(latents, dim=-1) if normalize else latents

    def forward(self, volumes: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None):
        """``(image_latents, text_latents, logit multiplier exp(temperature))``."""
        return (self.encode_image(volumes), self.encode_text(input_ids, attention_mask),
                self.temperature.exp())


# --------------------------------------------------------------------------- checkpoints

# Keys CT-CLIP's checkpoints may hold that this model need not: BERT's position ids (persistent in
# older transformers), the unused *_extra projections and CTViT's VQ-VAE heads.
_TOLERATED = ("text_transformer.embeddings.position_ids",)
_DROPPABLE_PREFIXES = ("to_text_latent_extra.", "to_visual_latent_extra.",
                       "visual_transformer.to_patch_emb_first_frame.",
                       "visual_transformer.to_pixels_first_frame.", "visual_transformer.to_pixels.")


def _listing(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def read_ctclip_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in a CT-CLIP checkpoint file (plain, ``{"model": ...}`` from its trainer, or
    with DDP's ``module.`` prefix), read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT-CLIP checkpoint {str(path)!r} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a CT-CLIP state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_ctclip_weights(model: CTCLIP, state: dict[str, torch.Tensor], source: str = "checkpoint"
                        ) -> None:
    """Load a state dict in CT-CLIP's key layout; every other difference is an error naming keys."""
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if k in own or not (k in _TOLERATED or k.startswith(_DROPPABLE_PREFIXES))}
    missing = [k for k in own if k not in state and k not in _TOLERATED]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {model.name}: missing {len(missing)} key(s) "
            f"[{_listing(missing)}]; unexpected {len(unexpected)} key(s) [{_listing(unexpected)}]. "
            "Is it a CT-CLIP checkpoint of this configuration (v1: patches 30/15, v2: 20/10)?")
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source} has {len(wrong)} tensor(s) of another shape than {model.name}: "
                         f"{_listing(wrong, 4)}. Pick the configuration the checkpoint was trained "
                         "with (ct-clip-v1 / ct-clip-v2).")
    model.load_state_dict(state, strict=False)  # exact key set checked above
    model.visual_transformer.spatial_rel_pos_bias._cache = None


def save_ctclip(model: CTCLIP, path: str | os.PathLike) -> Path:
    """Write the model's state dict in CT-CLIP's key layout (``torch.save``, CPU tensors).

    A model built with ``keep_unused=True`` writes every key of CT-CLIP's checkpoints (BERT's
    ``position_ids`` buffer aside, which transformers >= 4.31 no longer saves); without it the
    unused heads are absent. This module loads either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    return path


# --------------------------------------------------------------------------- factory

def build_ctclip(name: str, *, seed: int = 0, keep_unused: bool = False,
                 device: str | torch.device | None = None) -> CTCLIP:
    """A randomly initialised CT-CLIP (deterministic in ``seed``); ``device="meta"`` builds the
    shapes only (parameter counts without allocating them)."""
    if name not in CTCLIP_CONFIGS:
        raise ValueError(f"unknown CT-CLIP configuration {name!r}: use one of {sorted(CTCLIP_CONFIGS)}")
    config = replace(CTCLIP_CONFIGS[name], keep_unused=keep_unused)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return CTCLIP(config, name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CTCLIP(config, name=name)
    return model


def _preprocess_for(config: CTCLIPConfig):
    """The data package's CT preprocessing for this input shape."""
    from acelora.data.ct_transforms import CTPreprocess

    return CTPreprocess(target_spacing=config.spacing, target_shape=config.volume_shape)


def create_ctclip(name: str = "ct-clip-v2", pretrained: str | os.PathLike | None = None,
                  tokenizer_dir: str | os.PathLike | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                  *, seed: int = 0, keep_unused: bool = False):
    """``(model, tokenizer, preprocess)`` of a CT-CLIP configuration, in eval mode.

    Args:
        name: ``"ct-clip-v2"``, ``"ct-clip-v1"`` or ``"ct-clip-tiny"``.
        pretrained: a checkpoint saved by CT-CLIP's code (or :func:`save_ctclip`); without it the
            weights are random, deterministic in ``seed``. Never downloaded.
        tokenizer_dir: a local folder with CXR-BERT's ``vocab.txt`` (max length 512). Required with
            v1/v2 weights; otherwise the generated WordPiece vocabulary is used (tests, demos).
        keep_unused: also build the modules CT-CLIP stores but never uses (``*_extra``, CTViT's
            decoder heads), e.g. to save a file CT-CLIP's strict ``load_state_dict`` accepts.
    """
    if name not in CTCLIP_CONFIGS:
        raise ValueError(f"unknown CT-CLIP configuration {name!r}: use one of {sorted(CTCLIP_CONFIGS)}")
    if tokenizer_dir is not None:
        if not (Path(tokenizer_dir) / "vocab.txt").is_file() and \
                not (Path(tokenizer_dir) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer folder {str(tokenizer_dir)!r} has no vocab.txt")
        tokenizer = TextTokenizer.from_directory(tokenizer_dir, CONTEXT_LENGTH)
    elif pretrained is not None and name != "ct-clip-tiny":
        raise ValueError(f"{name} weights need CXR-BERT's tokenizer: pass tokenizer_dir= a folder "
                         "with its vocab.txt")
    else:
        tokenizer = TextTokenizer.generated(CONTEXT_LENGTH)
    model = build_ctclip(name, seed=seed, keep_unused=keep_unused)
    if pretrained is not None:
        load_ctclip_weights(model, read_ctclip_checkpoint(pretrained), source=f"{str(pretrained)!r}")
    if tokenizer.vocab_size > model.config.text["vocab_size"]:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, {name}'s text tower "
                         f"embeds {model.config.text['vocab_size']}")
    model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer, _preprocess_for(model.config)
