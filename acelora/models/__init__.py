"""Model creation and loading (open_clip BiomedCLIP, the tiny variant), module swapping, the
ACE-LoRA model and its checkpoints."""
