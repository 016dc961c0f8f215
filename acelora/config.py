"""One configuration dataclass for the method and its training, and the named presets."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

CHEXPERT_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
    "Pneumonia", "Pneumothorax", "Support Devices",
)


@dataclass
class ACELoRAConfig:
    """Everything that defines an ACE-LoRA model and how it is trained.

    The defaults are the ``paper`` preset (DESIGN §4–§7).
    """

    # --- LoRA on the merged q/k/v projection of every attention layer (DESIGN §4)
    lora_rank: int = 4
    lora_alpha: float = 1.0
    lora_dropout: float = 0.1
    lora_scaling: str = "rslora"          # "rslora": alpha/sqrt(r) | "standard": alpha/r
    lora_towers: tuple[str, ...] = ("image", "text")

    # --- ACE-HGNN (DESIGN §5)
    hgnn: bool = True
    hgnn_hidden: int = 128
    hgnn_topk: int = 5
    hgnn_negative_slope: float = 0.2
    text_padding_as_vertices: bool = False   # official: True (the released checkpoint kept them)
    image_cls_attn: str = "probs"            # "probs" | "logits" (official: pre-softmax logits)
    text_cls_attn: str = "probs"

    # --- loss (DESIGN §6)
    label_guided: bool = True
    uncertain_label: int = 0                 # CheXpert -1 maps to this (0 or 1)
    blank_label: int = 0

    # --- kernels
    backend: str = "auto"                    # "reference" | "triton" | "cuda" | "auto"

    # --- training
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_accum: int = 1
    grad_checkpointing: bool = False
    precision: str = "auto"                  # "auto" (bf16 autocast on a GPU) | "fp32" | "bf16"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.lora_scaling not in ("rslora", "standard"):
            raise ValueError(f"lora_scaling must be 'rslora' or 'standard', got {self.lora_scaling!r}")
        for name in ("image_cls_attn", "text_cls_attn"):
            if getattr(self, name) not in ("probs", "logits"):
                raise ValueError(f"{name} must be 'probs' or 'logits', got {getattr(self, name)!r}")
        if self.backend not in ("reference", "triton", "cuda", "auto"):
            raise ValueError(f"backend must be reference|triton|cuda|auto, got {self.backend!r}")
        if self.lora_rank < 1 or self.hgnn_topk < 1:
            raise ValueError("lora_rank and hgnn_topk must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.lora_towers = tuple(self.lora_towers)

    @property
    def lora_scale(self) -> float:
        """s in ``W x + s · B A x``: alpha/sqrt(r) (rank-stabilised) or alpha/r."""
        if self.lora_scaling == "rslora":
            return self.lora_alpha / math.sqrt(self.lora_rank)
        return self.lora_alpha / self.lora_rank

    def replace(self, **changes) -> "ACELoRAConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_towers"] = list(self.lora_towers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ACELoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
}


def get_config(preset: str = "paper", **overrides) -> ACELoRAConfig:
    """The config of a named preset, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return ACELoRAConfig(**{**PRESETS[preset], **overrides})
