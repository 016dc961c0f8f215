"""nn.Modules of the method: LoRA-QKV, CLS-attention capture, ACE-HGNN, the loss module."""
from acelora.nn.loss import LabelGuidedInfoNCELoss  # noqa: F401,E402
from acelora.nn.hgnn import ACEHGNN  # noqa: F401,E402
