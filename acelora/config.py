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

    preset: str = "paper"

    def __post_init__(self):
        if self.lora_scaling not in ("rslora", "standard"):
            raise ValueError(f"lora_scaling must be 'rslora' or 'standard', got {self.lora_scaling!r}")
        for name in ("image_cls_attn", "text_cls_attn"):
            if getattr(self, name) not in ("probs", "logits"):
                raise ValueError(f"{name} must be 'probs' or 'logits', got {getattr(self, name)!r}")
        if self.lora_rank < 1 or self.hgnn_topk < 1:
            raise ValueError("lora_rank and hgnn_topk must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        self.lora_towers = tuple(self.lora_towers)

    @property
    def lora_scale(self) -> float:
        """s in ``W x + s · B A x``: alpha/sqrt(r) (rank-stabilised) or alpha/r."""
        if self.lora_scaling == "rslora":
            return self.lora_alpha / math.sqrt(self.lora_rank)
        return self.lora_alpha / self.lora_rank

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
}


def get_config(preset: str = "paper", **overrides) -> ACELoRAConfig:
    """The method config of a named preset, with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    _check_fields(overrides)
    return ACELoRAConfig(**{**PRESETS[preset], **overrides, "preset": preset})
