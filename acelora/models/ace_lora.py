"""The model objects users hold: ``CLIPModel`` (a frozen base) and ``ACELoRAModel`` (LoRA +
ACE-HGNN + label-guided InfoNCE on top of it), and their factories.

Both expose one interface (tokenizer, preprocess, encode_image/encode_text, the token APIs,
image_features/text_features -> ``TowerOutput``, logit_scale, forward -> {"loss", "image_emb",
"text_emb", "logit_scale"}), so evaluation code does not care which it gets. The model talks to
its base only through its two towers (``acelora.models.towers``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from acelora.config import ACELoRAConfig, get_config
from acelora.models import adapters as _adapters
from acelora.models.attention_adapters import LoRASpec, inject_attention
from acelora.models.factory import create_base_model
from acelora.models.task import ContrastiveTask
from acelora.models.tower_text import text_tower
from acelora.models.tower_vit import image_tower
from acelora.models.towers import PaddingPolicy, TowerOutput
from acelora.nn.hgnn import ACEHGNN
from acelora.nn.loss import LabelGuidedInfoNCELoss


class CLIPModel(nn.Module):
    """A CLIP-like base model with acelora's interface (no adapters).

    Attributes: ``base`` (the open_clip model), ``image_tower`` / ``text_tower`` (plain objects
    over the base's modules), ``tokenizer``, ``preprocess``, ``logit_scale`` (log of the
    multiplier, open_clip convention).
    """

    def __init__(self, base: nn.Module, tokenizer, preprocess=None):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.image_tower = image_tower(base)
        self.text_tower = text_tower(base)
        self.logit_scale = base.logit_scale  # shared with the base
        self.loss_fn = LabelGuidedInfoNCELoss()

    # ------------------------------------------------------------------ shapes
    @property
    def image_size(self) -> int:
        return self.image_tower.image_size

    @property
    def patch_size(self) -> int:
        return self.image_tower.patch_size

    @property
    def volume_shape(self) -> tuple[int, int, int] | None:
        """(D, H, W) of the CT volumes a 3D image tower takes (CT-CLIP); None for 2D towers."""
        return getattr(self.image_tower, "volume_shape", None)

    @property
    def embed_dim(self) -> int:
        dim = getattr(self.base, "embed_dim", None)
        return int(dim if dim is not None else self.base.visual.output_dim)

    @property
    def context_length(self) -> int:
        return self.text_tower.context_length

    @property
    def pad_token_id(self) -> int:
        return self.text_tower.pad_token_id

    def describe_architecture(self) -> dict[str, Any]:
        """The numbers that define the base (adapter fingerprints; works on the meta device)."""
        return _adapters.describe_towers(self.image_tower, self.text_tower, self.embed_dim)

    # ------------------------------------------------------------------ towers
    def image_features(self, images: torch.Tensor, cls_attn: str | None = None) -> TowerOutput:
        """The image tower's output: projected tokens (0 = CLS), optionally the CLS row."""
        return self.image_tower(images, cls_attn)

    def text_features(self, input_ids, attention_mask=None, cls_attn: str | None = None) -> TowerOutput:
        """The text tower's output: projected tokens (0 = the global token), the global token's
        row when asked, and the HGNN key-padding mask."""
        return self.text_tower(input_ids, attention_mask, cls_attn)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, S, S] -> [B, D]: the projected global embedding."""
        emb = self.image_tower.pooled(images)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids (+ mask) -> [B, D]: the projected global embedding."""
        emb = self.text_tower.pooled(input_ids, attention_mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, D]: every output token projected and L2-normalised (0 = CLS)."""
        return F.normalize(self.image_features(images).tokens, dim=-1)

    def encode_text_tokens(self, input_ids, attention_mask=None) -> torch.Tensor:
        """[B, L] -> [B, L, D]: every output token projected and L2-normalised (0 = global)."""
        return F.normalize(self.text_features(input_ids, attention_mask).tokens, dim=-1)

    def image_transform(self, train: bool = False):
        """The model's own image preprocessing, the one every pipeline uses (train, eval,
        predict): PIL -> [3, S, S] at the model's image size with its config's mean/std, the
        geometry exposed for boxes and masks; ``train`` adds open_clip's mild random crop. A 3D
        tower's volume preprocessing (``preprocess``) is returned as it is."""
        if getattr(self.image_tower, "volume_shape", None) is not None:
            return self.preprocess
        from acelora.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BiomedCLIPTransform

        pre = (getattr(self.base, "open_clip_config", None) or {}).get("preprocess_cfg", {})
        return BiomedCLIPTransform(self.image_size, train=train, mean=pre.get("mean", OPENAI_CLIP_MEAN),
                                   std=pre.get("std", OPENAI_CLIP_STD))

    def tokenize(self, texts, context_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, context_length=context_length)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One training step's forward: {"loss", "image_emb", "text_emb", "logit_scale"} (through
        ``ContrastiveTask``, the one definition of the step)."""
        return ContrastiveTask(self).step(images, input_ids, attention_mask, labels)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (open_clip's switch, which the towers read)."""
        self.base.set_grad_checkpointing(enable)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keep the multiplier in [1, max_scale], as open_clip does after each optimiser step."""
        self.logit_scale.clamp_(0.0, math.log(max_scale))

    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) not in seen and (p.requires_grad or not trainable_only):
                seen.add(id(p))
                total += p.numel()
        return total

    def num_trainable_parameters(self) -> int:
        return self.num_parameters(trainable_only=True)


class ACELoRAModel(CLIPModel):
    """ACE-LoRA: a frozen base + LoRA on every q/k/v + one ACE-HGNN per tower + a learned
    logit scale, trained with label-guided InfoNCE (DESIGN §4–§6).

    ``encode_image`` / ``encode_text`` return the HGNN-refined global embedding
    normalize(hgnn(normalize(tokens), cls_attn, padding, global_only=True)); with
    ``config.hgnn=False`` the projected global embedding. ``backend`` is how the ops run
    (LoRA, HGNN, loss), not what the adapters are: it is not part of the config.
    """

    def __init__(self, base: nn.Module, tokenizer, preprocess=None,
                 config: ACELoRAConfig | str | None = None, backend: str = "auto"):
        config = _as_config(config)
        super().__init__(base, tokenizer, preprocess)
        self.config = config
        base.requires_grad_(False)
        unknown = set(config.lora_towers) - {"image", "text"}
        if unknown:
            raise ValueError(f"lora_towers may hold 'image' and 'text', got {sorted(unknown)}")
        if config.hgnn and not getattr(self.image_tower, "has_global_token", True):
            raise ValueError(f"{type(base).__name__}'s image tower ({self.image_tower.name}) has no "
                             "global token, so ACE-HGNN is not offered on it: use the medct preset "
                             "or set hgnn: false")
        if config.ct_quantizer != "straight-through":
            if not hasattr(self.image_tower, "quantizer"):
                raise ValueError(f"ct_quantizer={config.ct_quantizer!r} is for CT-CLIP bases; "
                                 f"{type(base).__name__} has no vector quantiser")
            self.image_tower.quantizer = config.ct_quantizer
        specs = {kind: LoRASpec(config.rank_of(kind), config.scale_of(config.rank_of(kind)),
                                config.lora_dropout, backend) for kind in config.lora_towers}
        self.layers = inject_attention({"image": self.image_tower, "text": self.text_tower},
                                       {kind: specs.get(kind) for kind in ("image", "text")})
        if config.hgnn:
            kw = dict(dim=self.embed_dim, hidden=config.hgnn_hidden, topk=config.hgnn_topk,
                      negative_slope=config.hgnn_negative_slope, backend=backend)
            ref = base.logit_scale
            self.image_hgnn = ACEHGNN(**kw).to(device=ref.device, dtype=ref.dtype)
            self.text_hgnn = ACEHGNN(**kw).to(device=ref.device, dtype=ref.dtype)
            # The HGNN needs k candidates in every row: a local row picks among the other locals.
            self.text_tower.padding_policy = PaddingPolicy(
                as_vertices=config.text_padding_as_vertices, min_vertices=config.hgnn_topk + 2)
        else:
            self.image_hgnn = self.text_hgnn = None
        # Own trainable copy: the base keeps its value.
        self.logit_scale = nn.Parameter(base.logit_scale.detach().clone())
        self.loss_fn = LabelGuidedInfoNCELoss(backend=backend)

    # ------------------------------------------------------------------ towers
    def image_features(self, images, cls_attn: str | None = None) -> TowerOutput:
        """As ``CLIPModel``; ``cls_attn=True`` asks for the row kind of the config."""
        return self.image_tower(images, self.config.image_cls_attn if cls_attn is True else cls_attn)

    def text_features(self, input_ids, attention_mask=None, cls_attn: str | None = None) -> TowerOutput:
        mode = self.config.text_cls_attn if cls_attn is True else cls_attn
        return self.text_tower(input_ids, attention_mask, mode)

    def refine(self, hgnn, out: TowerOutput, global_only: bool = True) -> torch.Tensor:
        """The HGNN on a tower's output (tokens normalised first; the row stays fp32)."""
        return hgnn(F.normalize(out.tokens, dim=-1), out.cls_attn, out.padding, global_only=global_only)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.image_hgnn is None:  # only the CLS token is projected
            return super().encode_image(images, normalize)
        emb = self.refine(self.image_hgnn, self.image_features(images, True))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        if self.text_hgnn is None:  # only the pooled token is projected
            return super().encode_text(input_ids, attention_mask, normalize)
        emb = self.refine(self.text_hgnn, self.text_features(input_ids, attention_mask, True))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_tokens(self, images: torch.Tensor, refined: bool = False) -> torch.Tensor:
        """[B, N, D] normalised tokens of the adapted tower; ``refined``: the HGNN's full output."""
        refine = refined and self.image_hgnn is not None
        out = self.image_features(images, refine or None)
        tokens = self.refine(self.image_hgnn, out, global_only=False) if refine else out.tokens
        return F.normalize(tokens, dim=-1)

    def encode_text_tokens(self, input_ids, attention_mask=None, refined: bool = False):
        refine = refined and self.text_hgnn is not None
        out = self.text_features(input_ids, attention_mask, refine or None)
        tokens = self.refine(self.text_hgnn, out, global_only=False) if refine else out.tokens
        return F.normalize(tokens, dim=-1)

    # ------------------------------------------------------------------ adapters
    def lora_modules(self) -> list[nn.Module]:
        return self.layers.lora_modules()

    def merge(self) -> None:
        """Fold every s·B·A into its W (inference at exactly the base cost)."""
        for m in self.lora_modules():
            m.merge()

    def unmerge(self) -> None:
        for m in self.lora_modules():
            m.unmerge()

    @property
    def merged(self) -> bool:
        mods = self.lora_modules()
        return bool(mods) and all(m.merged for m in mods)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter tensors by name: LoRA A/B, both HGNNs, logit_scale (chosen by role, not by
        requires_grad, so a model frozen for evaluation still saves and loads)."""
        return {name: p for name, p in self.named_parameters()
                if name.endswith((".lora_A", ".lora_B")) or name == "logit_scale"
                or name.startswith(("image_hgnn.", "text_hgnn."))}

    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write the adapters (safetensors + JSON config with the base fingerprint).

        Works merged or not: A, B and the fingerprinted base tensors do not change on merge()."""
        _adapters.write_adapters(directory, self.adapter_state_dict(), self.config,
                                 _adapters.base_fingerprint(self))

    @torch.no_grad()
    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by ``save_adapters`` (or ``acelora.models.official``).

        Raises ValueError when they were made for another base or another adapter structure.
        """
        meta = _adapters.read_adapter_config(directory)
        _adapters.check_structure(meta["config"], self.config)
        _adapters.check_fingerprint(meta.get("base", {}), self)
        tensors = _adapters.read_adapter_tensors(directory)
        own = self.adapter_state_dict()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter tensors do not match the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        bad = [f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
               for k in own if tensors[k].shape != own[k].shape]
        if bad:
            raise ValueError("adapter tensor shapes do not match: " + "; ".join(bad[:5]))
        was_merged = any(m.merged for m in self.lora_modules())
        self.unmerge()
        for k, p in own.items():
            p.copy_(tensors[k])
        if was_merged:
            self.merge()

    # ------------------------------------------------------------------ reporting
    def _parts(self) -> dict[str, list[nn.Parameter]]:
        parts: dict[str, list[nn.Parameter]] = {}
        for tower, mods in (("image", self.layers.image), ("text", self.layers.text)):
            parts[f"{tower} LoRA"] = [p for m in mods for n, p in m.named_parameters()
                                      if n.endswith(("lora_A", "lora_B"))]
        if self.image_hgnn is not None:
            parts["image HGNN"] = list(self.image_hgnn.parameters())
            parts["text HGNN"] = list(self.text_hgnn.parameters())
        parts["logit scale"] = [self.logit_scale]
        return parts

    def trainable_parameter_report(self) -> str:
        """Trainable / all parameters per part and in total (like peft's report)."""
        total = self.num_parameters()
        lines = []
        for part, params in self._parts().items():
            n = sum(p.numel() for p in params if p.requires_grad)
            lines.append(f"  {part:<12s} {n:>12,d}")
        trainable = self.num_trainable_parameters()
        lines.append(f"trainable params: {trainable:,d} || all params: {total:,d} || "
                     f"trainable%: {100.0 * trainable / max(total, 1):.4f}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"trainable={self.num_trainable_parameters():,d}"


# ---------------------------------------------------------------------------- factories

def _as_config(config: ACELoRAConfig | str | dict | None) -> ACELoRAConfig:
    if config is None:
        return get_config("paper")
    if isinstance(config, ACELoRAConfig):
        return config
    if isinstance(config, str):
        return get_config(config)
    if isinstance(config, dict):
        return ACELoRAConfig.from_dict(config)
    raise TypeError(f"config must be a preset name, an ACELoRAConfig or a dict, got {type(config).__name__}")


def create_model(name: str = "biomedclip", device: str | torch.device | None = None,
                 pretrained: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None) -> CLIPModel:
    """The frozen base model with acelora's interface.

    ``name``: "tiny" | "biomedclip" (built-in architectures, random weights unless
    ``pretrained`` names a local state-dict file) or a local model folder ("/dir" or
    "local-dir:/dir"). Nothing is downloaded.
    """
    base, tokenizer, preprocess = create_base_model(name, pretrained=pretrained, device=device,
                                                    dtype=dtype)
    base.requires_grad_(False)
    return CLIPModel(base, tokenizer, preprocess).eval()


def create_ace_lora(name: str = "biomedclip", config: ACELoRAConfig | str | None = None,
                    adapters: str | os.PathLike | None = None,
                    device: str | torch.device | None = None,
                    pretrained: str | os.PathLike | None = None,
                    dtype: torch.dtype | None = None, backend: str = "auto",
                    **overrides: Any) -> ACELoRAModel:
    """An ACE-LoRA model on a base (see ``create_model``), optionally with saved adapters.

    ``config``: a preset name ("paper" | "official"), an ``ACELoRAConfig``, or None (the
    adapters' own config when ``adapters`` is given, else "paper"). ``overrides`` replace config
    fields. ``backend``: the ops' backend for LoRA, HGNN and loss ("auto" | "reference" |
    "triton" | "cuda"). The model is returned in eval mode; call ``.train()`` to train.
    """
    if config is None and adapters is not None:
        config = _adapters.read_adapter_config(adapters)["config"]
    cfg = _as_config(config)
    if overrides:
        cfg = cfg.replace(**overrides)
    base, tokenizer, preprocess = create_base_model(name, pretrained=pretrained, device=None,
                                                    dtype=dtype)
    model = ACELoRAModel(base, tokenizer, preprocess, cfg, backend=backend)
    if adapters is not None:
        model.load_adapters(adapters)
    model.to(device=device)
    return model.eval()
