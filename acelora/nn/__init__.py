"""nn.Modules of the method: LoRA-QKV, CLS-attention capture, ACE-HGNN, the loss module."""
from acelora.nn.loss import LabelGuidedInfoNCELoss  # noqa: F401,E402
