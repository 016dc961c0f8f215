"""The model objects users hold: ``CLIPModel`` (a frozen base) and ``ACELoRAModel`` (LoRA +
ACE-HGNN + label-guided InfoNCE on top of it), and their factories.

Both expose one interface (tokenizer, preprocess, encode_image/encode_text/encode_image_tokens,
logit_scale, forward -> {"loss", "image_emb", "text_emb", "logit_scale"}), so evaluation code does
not care which it gets.
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
from acelora.models.biomedclip import create_base_model
from acelora.models.inject import inject_adapters
from acelora.nn.lora import LoRAQKV
from acelora.nn.loss import LabelGuidedInfoNCELoss


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


class CLIPModel(nn.Module):
    """An open_clip BiomedCLIP-like model with acelora's interface (no adapters).

    Attributes: ``base`` (the open_clip model), ``tokenizer``, ``preprocess``, ``logit_scale``
    (log of the multiplier, open_clip convention).
    """

    def __init__(self, base: nn.Module, tokenizer, preprocess=None):
        super().__init__()
        self.base = base
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.logit_scale = base.logit_scale  # shared with the base
        self.loss_fn = LabelGuidedInfoNCELoss()

    # ------------------------------------------------------------------ shapes
    @property
    def image_size(self) -> int:
        return _pair0(self.base.visual.image_size)

    @property
    def patch_size(self) -> int:
        return _pair0(self.base.visual.trunk.patch_embed.patch_size)

    @property
    def embed_dim(self) -> int:
        return int(self.base.embed_dim)

    @property
    def context_length(self) -> int:
        return int(self.base.context_length)

    @property
    def pad_token_id(self) -> int:
        return int(self.base.text.config.pad_token_id or 0)

    # ------------------------------------------------------------------ towers
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a [B, 3, H, W] tensor, got "
                             f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes "
                             f"{self.image_size}x{self.image_size}")
        weight = self.base.visual.trunk.patch_embed.proj.weight
        return images.to(device=weight.device, dtype=weight.dtype)

    def _text_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [B, L] tensor (use model.tokenizer(texts))")
        if input_ids.shape[1] > self.context_length:
            raise ValueError(f"input_ids have length {input_ids.shape[1]} > context length "
                             f"{self.context_length}")
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids "
                             f"{tuple(input_ids.shape)} differ in shape")
        device = self.base.text.transformer.embeddings.word_embeddings.weight.device
        return input_ids.to(device), attention_mask.to(device).long()

    def _image_forward(self, images):
        """(features after the trunk's final norm [B,N,W], projected tokens [B,N,D])."""
        feats = self.base.visual.trunk.forward_features(self._check_images(images))
        return feats, self.base.visual.head(feats)

    def _text_backbone(self, input_ids, attention_mask):
        """(BERT output, attention_mask): the tower without its projection."""
        input_ids, attention_mask = self._text_inputs(input_ids, attention_mask)
        return self.base.text.transformer(input_ids=input_ids, attention_mask=attention_mask), attention_mask

    def _text_forward(self, input_ids, attention_mask):
        """(BERT output, projected tokens [B,L,D], attention_mask)."""
        out, attention_mask = self._text_backbone(input_ids, attention_mask)
        return out, self.base.text.proj(out.last_hidden_state), attention_mask

    def _image_global(self, feats):
        visual = self.base.visual
        return visual.head(visual.trunk.forward_head(feats))

    def _text_global(self, out, attention_mask):
        return self.base.text.proj(self.base.text.pooler(out, attention_mask))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, 3, S, S] -> [B, D]: the projected CLS embedding."""
        feats = self.base.visual.trunk.forward_features(self._check_images(images))
        emb = self._image_global(feats)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        """[B, L] token ids (+ mask) -> [B, D]: the projected CLS embedding."""
        out, mask = self._text_backbone(input_ids, attention_mask)  # only the pooled token is projected
        emb = self._text_global(out, mask)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, D]: every output token projected and L2-normalised (0 = CLS)."""
        return F.normalize(self._image_forward(images)[1], dim=-1)

    def encode_text_tokens(self, input_ids, attention_mask=None) -> torch.Tensor:
        """[B, L] -> [B, L, D]: every output token projected and L2-normalised (0 = CLS)."""
        return F.normalize(self._text_forward(input_ids, attention_mask)[1], dim=-1)

    def tokenize(self, texts, context_length: int | None = None) -> dict[str, torch.Tensor]:
        return self.tokenizer(texts, context_length=context_length)

    # ------------------------------------------------------------------ training
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image_emb = self.encode_image(images)
        text_emb = self.encode_text(input_ids, attention_mask)
        scale = self.logit_scale.exp()
        if labels is not None:
            labels = labels.to(image_emb.device)
        loss = self.loss_fn(image_emb, text_emb, scale, labels)
        return {"loss": loss, "image_emb": image_emb, "text_emb": text_emb, "logit_scale": scale}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both towers (open_clip's switch; LoRA grads are unchanged)."""
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
    normalize(hgnn(normalize(tokens), cls_attn, key_padding_mask, global_only=True)); with
    ``config.hgnn=False`` the projected CLS embedding.
    """

    def __init__(self, base: nn.Module, tokenizer, preprocess=None,
                 config: ACELoRAConfig | str | None = None):
        config = _as_config(config)
        super().__init__(base, tokenizer, preprocess)
        self.config = config
        base.requires_grad_(False)
        self.layers = inject_adapters(base, config)
        if config.hgnn:
            from acelora.nn.hgnn import ACEHGNN  # written beside this module; imported late

            kw = dict(dim=self.embed_dim, hidden=config.hgnn_hidden, topk=config.hgnn_topk,
                      negative_slope=config.hgnn_negative_slope, backend=config.backend)
            ref = base.logit_scale
            self.image_hgnn = ACEHGNN(**kw).to(device=ref.device, dtype=ref.dtype)
            self.text_hgnn = ACEHGNN(**kw).to(device=ref.device, dtype=ref.dtype)
        else:
            self.image_hgnn = self.text_hgnn = None
        # Own trainable copy: the base keeps its value.
        self.logit_scale = nn.Parameter(base.logit_scale.detach().clone())
        self.loss_fn = LabelGuidedInfoNCELoss(backend=config.backend)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    # ------------------------------------------------------------------ towers
    def _refine(self, hgnn, tokens, cls_attn, key_padding_mask, global_only=True):
        # cls_attn stays fp32: the op selects on it and promotes it itself.
        return hgnn(F.normalize(tokens, dim=-1), cls_attn, key_padding_mask, global_only=global_only)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.image_hgnn is None:  # only the CLS token is projected
            return super().encode_image(images, normalize)
        _, tokens = self._image_forward(images)
        emb = self._refine(self.image_hgnn, tokens, self.layers.image[-1].pop_cls_attn(), None)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _min_vertices(self) -> int:
        # The HGNN needs k candidates in every row: a local row picks among the other locals.
        return self.config.hgnn_topk + 2 if self.text_hgnn is not None else 0

    def _text_forward(self, input_ids, attention_mask):
        input_ids, attention_mask = self._text_inputs(input_ids, attention_mask)
        if self.text_hgnn is not None and self.config.text_padding_as_vertices:
            # official: padded positions are vertices, and the released checkpoint always saw
            # open_clip's fixed-length padding; pad to the context length so an embedding does not
            # depend on the other texts of its batch.
            short = self.context_length - input_ids.shape[1]
        else:  # a batch of very short texts: pad (masked) up to the vertices the HGNN needs
            short = self._min_vertices() - input_ids.shape[1]
        if short > 0:
            input_ids = F.pad(input_ids, (0, short), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, short), value=0)
        return super()._text_forward(input_ids, attention_mask)

    def _text_padding(self, attention_mask):
        """key_padding_mask of the text HGNN (True = not a vertex).

        ``paper``: padded tokens are not vertices, except that a text shorter than k+2 tokens
        borrows its first padded positions so every hyperedge can still be built.
        ``official``: None, every position is a vertex (as the released checkpoint was trained).
        """
        if self.config.text_padding_as_vertices:
            return None
        padding = attention_mask == 0
        need = self._min_vertices()
        # Branch-free (no `if too_short.any()`): that test was a device->host sync every text
        # forward on a GPU and a torch.compile graph break; the masked form costs a few [B, L]
        # elementwise ops and gives the same mask.
        too_short = (~padding).sum(1, keepdim=True) < need
        first = torch.arange(padding.shape[1], device=padding.device) < need
        return padding & ~(too_short & first)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        if self.text_hgnn is None:  # only the pooled token is projected
            return super().encode_text(input_ids, attention_mask, normalize)
        _, tokens, mask = self._text_forward(input_ids, attention_mask)
        emb = self._refine(self.text_hgnn, tokens, self.layers.text[-1].pop_cls_attn(),
                           self._text_padding(mask))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image_tokens(self, images: torch.Tensor, refined: bool = False) -> torch.Tensor:
        """[B, N, D] normalised tokens of the adapted tower; ``refined``: the HGNN's full output."""
        _, tokens = self._image_forward(images)
        if self.image_hgnn is not None:
            cls_attn = self.layers.image[-1].pop_cls_attn()
            if refined:
                tokens = self._refine(self.image_hgnn, tokens, cls_attn, None, global_only=False)
        return F.normalize(tokens, dim=-1)

    def encode_text_tokens(self, input_ids, attention_mask=None, refined: bool = False):
        _, tokens, mask = self._text_forward(input_ids, attention_mask)
        if self.text_hgnn is not None:
            cls_attn = self.layers.text[-1].pop_cls_attn()
            if refined:
                tokens = self._refine(self.text_hgnn, tokens, cls_attn, self._text_padding(mask),
                                      global_only=False)
        return F.normalize(tokens, dim=-1)

    def forward(self, images, input_ids, attention_mask=None, labels=None):
        if not self.config.label_guided:
            labels = None
        return super().forward(images, input_ids, attention_mask, labels)

    # ------------------------------------------------------------------ adapters
    def lora_modules(self) -> list[LoRAQKV]:
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
                                 _adapters.base_fingerprint(self.base))

    @torch.no_grad()
    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by ``save_adapters`` (or ``acelora.models.official``).

        Raises ValueError when they were made for another base or another adapter structure.
        """
        meta = _adapters.read_adapter_config(directory)
        _adapters.check_structure(meta["config"], self.config)
        _adapters.check_fingerprint(meta.get("base", {}), self.base)
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
                    dtype: torch.dtype | None = None, **overrides: Any) -> ACELoRAModel:
    """An ACE-LoRA model on a base (see ``create_model``), optionally with saved adapters.

    ``config``: a preset name ("paper" | "official"), an ``ACELoRAConfig``, or None (the
    adapters' own config when ``adapters`` is given, else "paper"). ``overrides`` replace config
    fields. The model is returned in eval mode; call ``.train()`` to train.
    """
    if config is None and adapters is not None:
        config = _adapters.read_adapter_config(adapters)["config"]
    cfg = _as_config(config)
    if overrides:
        cfg = cfg.replace(**overrides)
    base, tokenizer, preprocess = create_base_model(name, pretrained=pretrained, device=None,
                                                    dtype=dtype)
    model = ACELoRAModel(base, tokenizer, preprocess, cfg)
    if adapters is not None:
        model.load_adapters(adapters)
    model.to(device=device)
    return model.eval()
