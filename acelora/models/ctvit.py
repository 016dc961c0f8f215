"""CTViT, CT-CLIP's 3D image tower, computing what CT-CLIP computes with faster building blocks.

Structure (module and parameter names are CT-CLIP's, so its checkpoints load unchanged):

* ``to_patch_emb``: volume ``[B, C, D, H, W]`` -> patches of ``pt x p x p`` voxels ->
  LayerNorm -> Linear -> LayerNorm (these two LayerNorms have biases) -> tokens ``[B, T, h, w, dim]``.
* ``enc_spatial_transformer`` over the ``h*w`` tokens of each depth slab, with the additive
  continuous position bias of ``spatial_rel_pos_bias``; then ``enc_temporal_transformer`` over the
  ``T`` slabs of each ``(h, w)`` position. Each layer: depthwise-conv position generator (PEG),
  cosine attention, GEGLU feed-forward, each residual; a bias-free LayerNorm at the end.
* ``vq``: the cosine-similarity vector quantiser (vector-quantize-pytorch 1.1.2 key names). Here it
  is frozen: it never takes EMA updates (CT-CLIP's code updates the codebook in train mode) and is
  straight-through in training. ``use_quantizer = False`` bypasses it (continuous tokens out).

What differs from CT-CLIP's code is only how things are computed: attention through
``F.scaled_dot_product_attention`` (position bias as ``attn_mask``, ``scale=8``) instead of einsum;
the position-bias MLP evaluated on the ``(2h-1)(2w-1)`` distinct relative offsets instead of all
``(hw)^2`` pairs, and cached while it cannot need gradients; the codebook search in chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class CTViTConfig:
    """Hyper-parameters of CTViT (CT-CLIP v2: the defaults)."""
    dim: int = 512
    codebook_size: int = 8192
    image_size: tuple[int, int] = (480, 480)  # (H, W) of the input slices
    patch_size: int = 20                      # spatial patch (both H and W)
    temporal_patch_size: int = 10             # depth patch
    spatial_depth: int = 4
    temporal_depth: int = 4
    heads: int = 8
    dim_head: int = 32
    channels: int = 1
    ff_mult: int = 4
    attn_scale: float = 8.0
    cpb_layers: int = 2                       # hidden layers of the position-bias MLP
    use_quantizer: bool = True
    keep_unused: bool = False                 # build CT-CLIP's decoder-side heads (unused here)

    def grid(self, depth: int) -> tuple[int, int, int]:
        """Token grid ``(T, h, w)`` of a volume with ``depth`` slices."""
        return (depth // self.temporal_patch_size, self.image_size[0] // self.patch_size,
                self.image_size[1] // self.patch_size)


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learned ``gamma`` and a fixed ``beta`` buffer (CT-CLIP's ``LayerNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * x


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm (with bias) -> Linear -> GEGLU -> Linear; indices 0/1/4 are CT-CLIP's keys."""
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner * 2, bias=False), GEGLU(),
                         nn.Dropout(0.0), nn.Linear(inner, dim, bias=False))


class PositionGenerator(nn.Module):
    """Depthwise 3x3x3 convolution over the token grid, zero-padded causally along its first axis.

    ``grid_shape`` is ``(B, T, h, w)``. CT-CLIP hands the same ``(B, T, h, w)`` to the temporal
    transformer, whose tokens are ordered ``(B h w) T``: there the convolution runs over that memory
    reinterpreted as a ``(B, T, h, w)`` grid. It is reproduced as is, since the weights were trained
    with it (``x.reshape`` below, never a permute).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, grid_shape: Sequence[int]) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*grid_shape, shape[-1]).permute(0, 4, 1, 2, 3)
        x = self.dsconv(F.pad(x, (1, 1, 1, 1, 2, 0)))
        return x.permute(0, 2, 3, 4, 1).reshape(shape)


class CosineAttention(nn.Module):
    """CT-CLIP's attention: queries from the normalised input, keys/values (fused ``to_kv``) from
    the un-normalised input; q and k l2-normalised, times learned per-dim scales, times ``scale``.

    ``to_q`` and ``to_kv`` stay plain ``nn.Linear`` modules called as ``to_q(normed)`` and
    ``to_kv(x)``, so adapters can replace them. ``context_norm`` and the empty ``null_kv`` exist only
    because CT-CLIP's checkpoints hold them.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32, scale: float = 8.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, float(scale)
        self.norm = BiasFreeLayerNorm(dim)
        self.context_norm = BiasFreeLayerNorm(dim)
        self.null_kv = nn.Parameter(torch.empty(heads, 0, dim_head))
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.to_q(self.norm(x)))
        k, v = (self._heads(t) for t in self.to_kv(x).chunk(2, dim=-1))
        num_null = self.null_kv.shape[1] // 2
        if num_null:  # never in CT-CLIP's self-attention; kept general for odd checkpoints
            null = self.null_kv.reshape(self.heads, num_null, 2, self.dim_head)
            b = x.shape[0]
            k = torch.cat((null[:, :, 0].expand(b, -1, -1, -1), k), dim=2)
            v = torch.cat((null[:, :, 1].expand(b, -1, -1, -1), v), dim=2)
            if attn_bias is not None:
                attn_bias = F.pad(attn_bias, (num_null, 0))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        if attn_bias is not None:  # 4-D: a 3-D mask sends CPU SDPA to its slower math path
            attn_bias = attn_bias.to(q.dtype).expand(1, *attn_bias.shape[-3:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.to_out(out.transpose(1, 2).flatten(2))


class ContinuousPositionBias(nn.Module):
    """Additive attention bias ``[heads, hw, hw]`` from an MLP of signed-log relative offsets.

    The MLP runs once per distinct offset ``(dy, dx)`` and is gathered into the pair matrix (the
    same numbers as running it on every pair). The result is cached per grid, dtype and device while
    no gradient can flow into the MLP; the cache key includes the parameters' versions, so loading
    weights or an optimiser step invalidates it.
    """

    def __init__(self, dim: int, heads: int, layers: int = 2):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1))])
        for _ in range(layers - 1):
            self.net.append(nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)))
        self.net.append(nn.Linear(dim, heads))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _compute(self, h: int, w: int, device, dtype) -> torch.Tensor:
        dy = torch.arange(-(h - 1), h, device=device)
        dx = torch.arange(-(w - 1), w, device=device)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)
        rel = offsets.to(dtype)
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        for layer in self.net:
            rel = layer(rel)                                       # [(2h-1)(2w-1), heads]
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                indexing="ij")
        ys, xs = ys.reshape(-1), xs.reshape(-1)
        index = (ys[:, None] - ys[None, :] + h - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        return rel[index].permute(2, 0, 1).contiguous()            # [heads, hw, hw]

    def forward(self, h: int, w: int, device=None, dtype=None) -> torch.Tensor:
        params = list(self.parameters())
        device = device if device is not None else params[0].device
        dtype = dtype if dtype is not None else params[0].dtype
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            self._cache = None
            return self._compute(h, w, device, dtype)
        # Inference tensors cannot be saved for a later backward: keyed on the mode too.
        key = (h, w, str(device), dtype, torch.is_inference_mode_enabled(),
               tuple((p.data_ptr(), p._version) for p in params))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self._compute(h, w, device, dtype))
        return self._cache[1]


class TransformerLayer(nn.ModuleList):
    """``[PEG, attention, None, feed-forward]`` (CT-CLIP's indices; slot 2 is its unused
    cross-attention), each residual. A module with a ``forward`` of its own, so activation
    checkpointing can wrap a whole layer (``Transformer.grad_checkpointing`` or the trainer's)."""

    def forward(self, x: torch.Tensor, grid_shape: Sequence[int],
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        peg, attn, _, ff = self
        x = peg(x, grid_shape) + x
        x = attn(x, attn_bias) + x
        return ff(x) + x


class Transformer(nn.Module):
    """``layers[i]``: :class:`TransformerLayer`, then ``norm_out``. With ``grad_checkpointing``
    each layer's activations are recomputed in the backward pass."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4,
                 attn_scale: float = 8.0):
        super().__init__()
        self.layers = nn.ModuleList([
            TransformerLayer([PositionGenerator(dim), CosineAttention(dim, heads, dim_head, attn_scale),
                              None, feed_forward(dim, ff_mult)])
            for _ in range(depth)])
        self.norm_out = BiasFreeLayerNorm(dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, grid_shape: Sequence[int],
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, grid_shape, attn_bias, use_reentrant=False)
            else:
                x = layer(x, grid_shape, attn_bias)
        return self.norm_out(x)


class CosineCodebook(nn.Module):
    """Buffers of vector-quantize-pytorch 1.1.2's ``CosineSimCodebook`` (one codebook)."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        embed = torch.empty(1, codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", F.normalize(embed, dim=-1))


class FrozenCosineQuantizer(nn.Module):
    """Nearest code by cosine similarity; returns the code's stored vector. Never updated.

    In training the output is ``x + (code - x).detach()`` (straight-through: the gradient passes
    to ``x`` unchanged), as vector-quantize-pytorch computes it.
    """

    def __init__(self, dim: int, codebook_size: int, chunk: int = 4096):
        super().__init__()
        self._codebook = CosineCodebook(dim, codebook_size)
        self.chunk = chunk  # tokens per similarity block: bounds the [tokens, codes] matrix

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed[0]

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Indices ``[...]`` of the nearest codes of ``x [..., dim]``."""
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        flat = F.normalize(work.reshape(-1, work.shape[-1]), dim=-1)
        embed = F.normalize(self.codebook.to(work.dtype), dim=-1)
        ind = torch.cat([(part @ embed.T).argmax(dim=-1) for part in flat.split(self.chunk)])
        return ind.reshape(x.shape[:-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ind = self.codes(x)
        quantized = self.codebook[ind].to(x.dtype)
        if self.training:
            quantized = x + (quantized - x).detach()
        return quantized, ind


class PatchRearrange(nn.Module):
    """``[B, C, T*pt, h*p, w*p] -> [B, T, h, w, C*pt*p*p]`` (channel, depth, row, column order)."""

    def __init__(self, patch_size: int, temporal_patch_size: int):
        super().__init__()
        self.p, self.pt = patch_size, temporal_patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, hh, ww = x.shape
        p, pt = self.p, self.pt
        x = x.reshape(b, c, d // pt, pt, hh // p, p, ww // p, p)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, d // pt, hh // p, ww // p, c * pt * p * p)


class CTViT(nn.Module):
    """The image tower: ``forward_features`` gives the tokens before the quantiser,
    ``forward`` the tokens CT-CLIP pools (quantised unless ``use_quantizer`` is False)."""

    def __init__(self, config: CTViTConfig = CTViTConfig()):
        super().__init__()
        cfg = config
        self.config = cfg
        self.image_size = tuple(cfg.image_size)
        self.patch_size = cfg.patch_size
        self.temporal_patch_size = cfg.temporal_patch_size
        if any(s % cfg.patch_size for s in self.image_size):
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{cfg.patch_size}")
        self.use_quantizer = cfg.use_quantizer
        self.spatial_rel_pos_bias = ContinuousPositionBias(cfg.dim, cfg.heads, cfg.cpb_layers)
        patch_dim = cfg.channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.to_patch_emb = nn.Sequential(
            PatchRearrange(cfg.patch_size, cfg.temporal_patch_size), nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, cfg.dim), nn.LayerNorm(cfg.dim))
        block = dict(dim=cfg.dim, heads=cfg.heads, dim_head=cfg.dim_head, ff_mult=cfg.ff_mult,
                     attn_scale=cfg.attn_scale)
        self.enc_spatial_transformer = Transformer(depth=cfg.spatial_depth, **block)
        self.enc_temporal_transformer = Transformer(depth=cfg.temporal_depth, **block)
        self.vq = FrozenCosineQuantizer(cfg.dim, cfg.codebook_size)
        if cfg.keep_unused:
            # CT-CLIP's VQ-VAE heads: in its checkpoints, never on the CLIP path.
            frame_dim = cfg.channels * cfg.patch_size ** 2
            self.to_patch_emb_first_frame = nn.Sequential(
                nn.Identity(), nn.LayerNorm(frame_dim), nn.Linear(frame_dim, cfg.dim),
                nn.LayerNorm(cfg.dim))
            self.to_pixels_first_frame = nn.Sequential(nn.Linear(cfg.dim, frame_dim))
            self.to_pixels = nn.Sequential(nn.Linear(cfg.dim, patch_dim))

    def grid(self, depth: int) -> tuple[int, int, int]:
        return self.config.grid(depth)

    def _check_input(self, video: torch.Tensor) -> None:
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.channels:
            raise ValueError(f"CTViT expects volumes [B, {cfg.channels}, D, H, W], got "
                             f"{tuple(video.shape)}")
        d, hw = video.shape[2], tuple(video.shape[3:])
        if hw != self.image_size:
            raise ValueError(f"volume slices are {hw}, this CTViT takes {self.image_size}: "
                             "resample/crop the volume first (CTPreprocess)")
        if d % cfg.temporal_patch_size or d == 0:
            raise ValueError(f"volume depth {d} is not a positive multiple of the depth patch "
                             f"{cfg.temporal_patch_size}")

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """Encoded tokens ``[B, T, h, w, dim]`` before the quantiser."""
        self._check_input(video)
        tokens = self.to_patch_emb(video)
        b, t, h, w, d = tokens.shape
        grid_shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w, device=tokens.device, dtype=tokens.dtype)
        x = self.enc_spatial_transformer(tokens.reshape(b * t, h * w, d), grid_shape, attn_bias=bias)
        x = x.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
        x = self.enc_temporal_transformer(x, grid_shape)
        return x.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)

    def forward(self, video: torch.Tensor, return_codes: bool = False):
        """Tokens ``[B, T, h, w, dim]`` after the quantiser (or before it, when bypassed); with
        ``return_codes`` also the code indices ``[B, T, h, w]`` (None when bypassed)."""
        tokens = self.forward_features(video)
        codes = None
        if self.use_quantizer:
            tokens, codes = self.vq(tokens)
        return (tokens, codes) if return_codes else tokens
