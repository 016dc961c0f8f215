"""ACE-HGNN: the one-layer hypergraph network over a tower's output tokens (DESIGN §5)."""
from __future__ import annotations

import torch
from torch import nn

from acelora.ops.hypergraph import hypergraph_conv


class HGNNMLP(nn.Module):
    """f = Linear(dim→hidden) → LeakyReLU → Linear(hidden→dim); kaiming-normal weights."""

    def __init__(self, dim: int = 512, hidden: int = 128, negative_slope: float = 0.2):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.act = nn.LeakyReLU(negative_slope)
        self.up = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Weights kaiming-normal; biases keep nn.Linear's default (uniform in ±1/sqrt(fan_in)).
        for layer in (self.down, self.up):
            nn.init.kaiming_normal_(layer.weight)
            bound = 1.0 / layer.in_features ** 0.5
            nn.init.uniform_(layer.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class ACEHGNN(nn.Module):
    """Hypergraph refinement of one tower's tokens.

    Hyperedges: the global token's top-k by CLS attention (global→local) and each local token's
    top-k by cosine similarity (local→local); vertex→hyperedge through ``edge_mlp``, then
    hyperedge→vertex through ``node_mlp``. Neither the input nor the output is normalised here.

    Args:
        dim: token width D.  hidden: MLP bottleneck width.  topk: hyperedge size k.
        negative_slope: LeakyReLU slope of the MLPs.
        backend: "auto" | "reference" | "triton" (see acelora.ops.hypergraph).
    """

    def __init__(self, dim: int = 512, hidden: int = 128, topk: int = 5,
                 negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be positive, got dim={dim}, hidden={hidden}")
        self.dim, self.hidden, self.topk = dim, hidden, topk
        self.negative_slope = negative_slope
        self.backend = backend
        self.edge_mlp = HGNNMLP(dim, hidden, negative_slope)
        self.node_mlp = HGNNMLP(dim, hidden, negative_slope)

    def forward(self, tokens: torch.Tensor, cls_attn: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None,
                global_only: bool = False) -> torch.Tensor:
        """tokens [B, N, D], cls_attn [B, N-1] -> Out [B, N, D] (padded rows 0), or Out[:, 0] [B, D]
        when ``global_only`` (computed from the rows {0} ∪ top-k(0) only)."""
        if torch.is_tensor(tokens) and tokens.dim() == 3 and tokens.shape[-1] != self.dim:
            raise ValueError(f"tokens have width {tokens.shape[-1]} but this ACEHGNN has dim={self.dim}")
        return hypergraph_conv(tokens, cls_attn, self.edge_mlp, self.node_mlp, topk=self.topk,
                               key_padding_mask=key_padding_mask, global_only=global_only,
                               backend=self.backend)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, topk={self.topk}, "
                f"negative_slope={self.negative_slope}, backend={self.backend!r}")
