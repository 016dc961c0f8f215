"""Base models (BiomedCLIP, open_clip ViT configs, local folders, hf-hub cache, tiny variants),
their towers, the attention-adapter registry, the ACE-LoRA model and its checkpoints."""
from acelora.models.ace_lora import ACELoRAModel, CLIPModel, create_ace_lora, create_model  # noqa: F401
from acelora.models.attention_adapters import (ATTENTION_ADAPTERS, AttentionAdapter,  # noqa: F401
                                               register_attention_adapter)
from acelora.models.biomedclip import save_base_model  # noqa: F401
from acelora.models.factory import create_base_model  # noqa: F401
from acelora.models.official import import_official_checkpoint  # noqa: F401
from acelora.models.towers import PaddingPolicy, TowerOutput  # noqa: F401
