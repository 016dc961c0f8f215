"""Model creation and loading (open_clip BiomedCLIP, the tiny variant), module swapping, the
ACE-LoRA model and its checkpoints."""
from acelora.models.ace_lora import ACELoRAModel, CLIPModel, create_ace_lora, create_model  # noqa: F401
from acelora.models.biomedclip import create_base_model, save_base_model  # noqa: F401
from acelora.models.official import import_official_checkpoint  # noqa: F401
