"""The method config: what defines an ACE-LoRA adapter, and the named presets.

An adapter folder stores exactly this (acelora/models/adapters.py). How a run trains it (lr,
schedule, epochs, batch, seed, precision, data, backend) is the run config,
:class:`acelora.train.settings.TrainConfig`, stored with the run.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

CHEXPERT_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
)

# CT-CLIP's vector quantiser during adaptation: gradient straight through it (CT-CLIP's training)
# or bypassed (the continuous tokens are pooled; a deviation from CT-CLIP).
CT_QUANTIZER_MODES = ("straight-through", "bypass")

# Run settings that acelora 0.1.0 kept in this config, so adapter folders it wrote carry them.
# They say how the adapters were trained, not what they are: readers drop them (with a note).
LEGACY_RUN_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "grad_accum",
                     "grad_checkpointing", "precision", "seed", "extra", "backend")


@dataclass
class ACELoRAConfig:
    """What defines an ACE-LoRA adapter: its structure and the method's choices.

    The defaults are the ``paper`` preset (DESIGN §4–§7). ``preset`` records the preset the
    fields started from (informative; the fields themselves are what counts).
    """

    # --- LoRA on the merged q/k/v projection of every attention layer (DESIGN §4)
    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.1
    lora_scaling: str = "rslora"          # "rslora": alpha/sqrt(r) | "standard": alpha/r
    lora_towers: tuple[str, ...] = ("image", "text")
    lora_rank_image: int | None = None       # rank of the image tower's adapters (None: lora_rank)
    lora_rank_text: int | None = None        # rank of the text tower's adapters (None: lora_rank)

    # --- ACE-HGNN (DESIGN §5)
    hgnn: bool = True
    hgnn_hidden: int = 128
    hgnn_topk: int = 5
    hgnn_negative_slope: float = 0.2
    text_padding_as_vertices: bool = False   # official: True (the released checkpoint kept them)
    image_cls_attn: str = "probs"            # "probs" | "logits" (official: pre-softmax logits)
    text_cls_attn: str = "probs"

    # --- loss and labels (DESIGN §6)
    label_guided: bool = True
    uncertain_label: int = 0                 # CheXpert -1 maps to this (0 or 1)
    blank_label: int = 0

    # --- CT-CLIP bases only (DESIGN §13)
    ct_quantizer: str = "straight-through"   # "straight-through" | "bypass" (see CT_QUANTIZER_MODES)

    preset: str = "paper"

    def __post_init__(self):
        if self.lora_scaling not in ("rslora", "standard"):
            raise ValueError(f"lora_scaling must be 'rslora' or 'standard', got {self.lora_scaling!r}")
        for name in ("image_cls_attn", "text_cls_attn"):
            if getattr(self, name) not in ("probs", "logits"):
                raise ValueError(f"{name} must be 'probs' or 'logits', got {getattr(self, name)!r}")
        if self.lora_rank < 1 or self.hgnn_topk < 1:
            raise ValueError("lora_rank and hgnn_topk must be >= 1")
        for name in ("lora_rank_image", "lora_rank_text"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or null (= lora_rank), got {value!r}")
        if self.ct_quantizer not in CT_QUANTIZER_MODES:
            raise ValueError(f"ct_quantizer must be one of {CT_QUANTIZER_MODES}, got {self.ct_quantizer!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        self.lora_towers = tuple(self.lora_towers)

    @property
    def lora_scale(self) -> float:
        """s in ``W x + s · B A x``: alpha/sqrt(r) (rank-stabilised) or alpha/r."""
        return self.scale_of(self.lora_rank)

    def scale_of(self, rank: int) -> float:
        """s for an adapter of rank ``rank``."""
        if self.lora_scaling == "rslora":
            return self.lora_alpha / math.sqrt(rank)
        return self.lora_alpha / rank

    def rank_of(self, tower: str) -> int:
        """The LoRA rank of the ``"image"`` or ``"text"`` tower."""
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        own = self.lora_rank_image if tower == "image" else self.lora_rank_text
        return self.lora_rank if own is None else own


    def replace(self, **changes) -> "ACELoRAConfig":
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_towers"] = list(self.lora_towers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ACELoRAConfig":
        _check_fields(d)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check_fields(values: dict[str, Any]) -> None:
    unknown = set(values) - {f.name for f in dataclasses.fields(ACELoRAConfig)}
    if not unknown:
        return
    run = sorted(unknown & set(LEGACY_RUN_FIELDS))
    hint = (f"; {run} are run settings: they belong to the run config "
            "(acelora.train.settings.TrainConfig), not to the method" if run else "")
    raise ValueError(f"unknown config field(s): {sorted(unknown)}{hint}")


PRESETS: dict[str, dict[str, Any]] = {
    # What the paper describes; the default for new training.
    "paper": {},
    # What the released checkpoint (checkpoint/ACE_LoRA.pt) was trained with.
    "official": {
        "text_padding_as_vertices": True,
        "image_cls_attn": "logits",
        "text_cls_attn": "probs",
        "lora_scaling": "rslora",
    },
    # MedCT-VLM on CT-CLIP (DESIGN §13): LoRA on q/k/v of every attention layer of both towers,
    # no HGNN (CTViT has no global token), label-guided InfoNCE over CT-RATE's 18 labels. Rank 23:
    # q/k/v LoRA costs 73,728·r parameters at v2 sizes (8 CTViT layers x 2,304·r + 12 BERT layers
    # x 4,608·r), and r = 23 gives 1,695,744 (+1 logit scale), the count nearest the paper's
    # ~1.67 M (r = 22: 1,622,016).
    "medct": {
        "hgnn": False,
        "lora_rank": 23,
        "lora_towers": ("image", "text"),
        "label_guided": True,
    },
}


def get_config(preset: str = "paper", **overrides) -> ACELoRAConfig:
    """The method config of a named preset, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    _check_fields(overrides)
    return ACELoRAConfig(**{**PRESETS[preset], **overrides, "preset": preset})
