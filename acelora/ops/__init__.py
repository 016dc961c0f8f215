"""Functional ops: autograd Functions, backend dispatch (``_backend``) and the PyTorch reference
of each op. Backends: ``"reference" | "triton" | "cuda" | "auto"``; ``use_backend(name)`` sets
what ``"auto"`` means for a block of code."""
from acelora.ops._backend import BACKENDS, current_backend, resolve, use_backend  # noqa: F401
from acelora.ops.lora_qkv import lora_qkv, lora_qkv_reference, merge_lora_qkv_weight  # noqa: F401,E402
from acelora.ops.infonce import label_guided_infonce, label_guided_infonce_reference, labels_to_ids  # noqa: F401,E402
from acelora.ops.hypergraph import hypergraph_affinity, hypergraph_conv, hypergraph_conv_reference, hypergraph_incidence  # noqa: F401,E402
from acelora.ops import hypergraph_triton  # noqa: F401,E402  (registers hypergraph_conv's "triton" backend)
