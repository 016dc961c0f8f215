"""A plain float64-capable reference of CT-CLIP's computation, written as functions over a state dict
with CT-CLIP's key names (``CTCLIP.state_dict()`` of its code), in the order its modules compute:

* CTViT ``forward(video, return_encoded_tokens=True)``: patch embedding, spatial transformer with
  the continuous position bias recomputed for every (h*w)^2 pair on each call, temporal
  transformer (both given the same ``(b, t, h, w)`` shape for their PEG), cosine VQ.
* attention as einsum(q, k) * 8 + bias -> softmax -> einsum(attn, v), null key/values prepended.
* ``CTCLIP.forward``: v2 ``mean(dim=1)`` then ``view(b, -1)``; v1 ``view(b, -1)``; CLS of the HF
  BertModel's last hidden state; ``to_*_latent`` and l2-normalisation.

Deviation, on purpose: vector-quantize-pytorch casts the tokens to float32 before the codebook
search; here the search runs in the input's dtype so that a float64 run stays float64.
``random_ctclip_state_dict`` writes every key CT-CLIP's checkpoints hold (including the unused
``*_extra`` projections, CTViT's decoder heads and BERT's ``position_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VT = "visual_transformer."


@dataclass(frozen=True)
class RefSpec:
    dim: int
    heads: int
    dim_head: int
    patch: int
    temporal_patch: int
    image_size: tuple[int, int]
    spatial_depth: int
    temporal_depth: int
    codebook_size: int
    channels: int = 1
    cpb_layers: int = 2

    @classmethod
    def of(cls, vision_config) -> "RefSpec":
        c = vision_config
        return cls(c.dim, c.heads, c.dim_head, c.patch_size, c.temporal_patch_size,
                   tuple(c.image_size), c.spatial_depth, c.temporal_depth, c.codebook_size,
                   c.channels, c.cpb_layers)


# --------------------------------------------------------------------------- random weights

def _vision_shapes(s: RefSpec) -> dict[str, tuple[int, ...]]:
    inner, patch_dim = s.heads * s.dim_head, s.channels * s.temporal_patch * s.patch ** 2
    frame_dim, ff_inner = s.channels * s.patch ** 2, int(4 * (2 / 3) * s.dim)
    shapes = {"spatial_rel_pos_bias.net.0.0.weight": (s.dim, 2),
              "spatial_rel_pos_bias.net.0.0.bias": (s.dim,)}
    for i in range(1, s.cpb_layers):
        shapes[f"spatial_rel_pos_bias.net.{i}.0.weight"] = (s.dim, s.dim)
        shapes[f"spatial_rel_pos_bias.net.{i}.0.bias"] = (s.dim,)
    shapes[f"spatial_rel_pos_bias.net.{s.cpb_layers}.weight"] = (s.heads, s.dim)
    shapes[f"spatial_rel_pos_bias.net.{s.cpb_layers}.bias"] = (s.heads,)
    for name, d_in in (("to_patch_emb", patch_dim), ("to_patch_emb_first_frame", frame_dim)):
        shapes.update({f"{name}.1.weight": (d_in,), f"{name}.1.bias": (d_in,),
                       f"{name}.2.weight": (s.dim, d_in), f"{name}.2.bias": (s.dim,),
                       f"{name}.3.weight": (s.dim,), f"{name}.3.bias": (s.dim,)})
    for tf, depth in (("enc_spatial_transformer", s.spatial_depth),
                      ("enc_temporal_transformer", s.temporal_depth)):
        for i in range(depth):
            p = f"{tf}.layers.{i}."
            shapes.update({
                p + "0.dsconv.weight": (s.dim, 1, 3, 3, 3), p + "0.dsconv.bias": (s.dim,),
                p + "1.null_kv": (s.heads, 0, s.dim_head), p + "1.q_scale": (s.dim_head,),
                p + "1.k_scale": (s.dim_head,), p + "1.norm.gamma": (s.dim,),
                p + "1.norm.beta": (s.dim,), p + "1.context_norm.gamma": (s.dim,),
                p + "1.context_norm.beta": (s.dim,), p + "1.to_q.weight": (inner, s.dim),
                p + "1.to_kv.weight": (2 * inner, s.dim), p + "1.to_out.weight": (s.dim, inner),
                p + "3.0.weight": (s.dim,), p + "3.0.bias": (s.dim,),
                p + "3.1.weight": (2 * ff_inner, s.dim), p + "3.4.weight": (s.dim, ff_inner)})
        shapes[f"{tf}.norm_out.gamma"] = (s.dim,)
        shapes[f"{tf}.norm_out.beta"] = (s.dim,)
    shapes.update({"vq._codebook.initted": (1,), "vq._codebook.cluster_size": (1, s.codebook_size),
                   "vq._codebook.embed": (1, s.codebook_size, s.dim),
                   "to_pixels_first_frame.0.weight": (frame_dim, s.dim),
                   "to_pixels_first_frame.0.bias": (frame_dim,),
                   "to_pixels.0.weight": (patch_dim, s.dim), "to_pixels.0.bias": (patch_dim,)})
    return shapes


def _random(key: str, shape, g: torch.Generator | None, device) -> torch.Tensor:
    if device is not None and torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    if key.endswith(("gamma", "q_scale", "k_scale", "norm.weight")) or (
            key.endswith(".weight") and len(shape) == 1):
        return 1 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    if key.endswith("vq._codebook.embed"):
        e = F.normalize(torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)
        return e * (1 + 0.1 * torch.rand(shape[:-1] + (1,), generator=g, dtype=torch.float64))
    if key.endswith("initted"):
        return torch.ones(shape, dtype=torch.float64)
    if key.endswith("cluster_size"):
        return torch.rand(shape, generator=g, dtype=torch.float64)
    if len(shape) <= 1:  # biases and beta buffers: non-zero so that a dropped one shows
        return 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
    return torch.randn(shape, generator=g, dtype=torch.float64) / fan_in ** 0.5


def random_ctclip_state_dict(spec: RefSpec, text_config: dict, dim_image: int, dim_latent: int,
                             seed: int = 0, device=None) -> dict[str, torch.Tensor]:
    """Every key of a CT-CLIP checkpoint, random values (float32; ``device="meta"``: shapes only)."""
    from transformers import BertConfig, BertModel
    g = None if device == "meta" else torch.Generator().manual_seed(seed)
    state = {VT + k: _random(k, shape, g, device) for k, shape in _vision_shapes(spec).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            bert = BertModel(BertConfig(**text_config), add_pooling_layer=True)
    for k, v in bert.state_dict().items():
        if v.is_floating_point() and v.device.type != "meta":
            v = v + 0.02 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        state["text_transformer." + k] = v
    n = text_config["max_position_embeddings"]
    state["text_transformer.embeddings.position_ids"] = torch.arange(n, device=device)[None]
    dim_text = text_config["hidden_size"]
    for name, shape in (("to_text_latent", (dim_latent, dim_text)),
                        ("to_visual_latent", (dim_latent, dim_image))):
        for suffix in ("", "_extra"):
            state[f"{name}{suffix}.weight"] = _random(name, shape, g, device)
    state["temperature"] = torch.tensor(0.3, device=device)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


# --------------------------------------------------------------------------- computation

def _ln_bias_free(sd, p, x):
    return F.layer_norm(x, x.shape[-1:], sd[p + "gamma"], sd[p + "beta"])


def _linear(sd, p, x):
    return F.linear(x, sd[p + "weight"], sd.get(p + "bias"))


def patch_embed(sd, spec: RefSpec, video):
    """'b c (t pt) (h p1) (w p2) -> b t h w (c pt p1 p2)', LayerNorm, Linear, LayerNorm."""
    p, pt = spec.patch, spec.temporal_patch
    x = video.unfold(2, pt, pt).unfold(3, p, p).unfold(4, p, p)    # b c t h w pt p1 p2
    b, c, t, h, w = x.shape[:5]
    x = x.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, t, h, w, -1)
    x = F.layer_norm(x, x.shape[-1:], sd[VT + "to_patch_emb.1.weight"], sd[VT + "to_patch_emb.1.bias"])
    x = _linear(sd, VT + "to_patch_emb.2.", x)
    return F.layer_norm(x, x.shape[-1:], sd[VT + "to_patch_emb.3.weight"], sd[VT + "to_patch_emb.3.bias"])


def continuous_position_bias(sd, spec: RefSpec, h, w, dtype):
    """Every (i, j) pair of the h x w grid through the MLP; ``[heads, hw, hw]``."""
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    grid = grid.reshape(2, -1).T                                     # (h w) c
    rel = (grid[:, None, :] - grid[None, :, :]).to(dtype)
    rel = torch.sign(rel) * torch.log(rel.abs() + 1)
    p = VT + "spatial_rel_pos_bias.net."
    for i in range(spec.cpb_layers):
        rel = F.leaky_relu(_linear(sd, f"{p}{i}.0.", rel), 0.1)
    rel = _linear(sd, f"{p}{spec.cpb_layers}.", rel)
    return rel.permute(2, 0, 1)


def peg(sd, p, x, shape):
    orig = x.shape
    x = x.reshape(*shape, -1)
    x = x.permute(0, 4, 1, 2, 3)
    x = F.pad(x, (1, 1, 1, 1, 2, 0), value=0.0)
    x = F.conv3d(x, sd[p + "dsconv.weight"], sd[p + "dsconv.bias"], groups=x.shape[1])
    x = x.permute(0, 2, 3, 4, 1)
    return x.reshape(orig)


def attention(sd, p, spec: RefSpec, x, attn_bias=None):
    b, n, _ = x.shape
    kv_input = x
    x = _ln_bias_free(sd, p + "norm.", x)
    q = F.linear(x, sd[p + "to_q.weight"])
    k, v = F.linear(kv_input, sd[p + "to_kv.weight"]).chunk(2, dim=-1)
    q, k, v = (t.reshape(b, -1, spec.heads, spec.dim_head).permute(0, 2, 1, 3) for t in (q, k, v))
    null_kv = sd[p + "null_kv"]                                      # h (n r) d
    num_null = null_kv.shape[1] // 2
    null_kv = null_kv.reshape(spec.heads, num_null, 2, spec.dim_head)
    nk = null_kv[:, :, 0][None].expand(b, -1, -1, -1)
    nv = null_kv[:, :, 1][None].expand(b, -1, -1, -1)
    k, v = torch.cat((nk, k), dim=-2), torch.cat((nv, v), dim=-2)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    q, k = q * sd[p + "q_scale"], k * sd[p + "k_scale"]
    sim = torch.einsum("bhid,bhjd->bhij", q, k) * 8
    if attn_bias is not None:
        sim = sim + F.pad(attn_bias, (num_null, 0), value=0.0)
    attn = sim.softmax(dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", attn, v)
    out = out.permute(0, 2, 1, 3).reshape(b, n, -1)
    return F.linear(out, sd[p + "to_out.weight"])


def feed_forward(sd, p, x):
    x = F.layer_norm(x, x.shape[-1:], sd[p + "0.weight"], sd[p + "0.bias"])
    x, gate = F.linear(x, sd[p + "1.weight"]).chunk(2, dim=-1)
    return F.linear(F.gelu(gate) * x, sd[p + "4.weight"])


def transformer(sd, p, spec: RefSpec, depth, x, video_shape, attn_bias=None):
    for i in range(depth):
        layer = f"{p}layers.{i}."
        x = peg(sd, layer + "0.", x, video_shape) + x
        x = attention(sd, layer + "1.", spec, x, attn_bias) + x
        x = feed_forward(sd, layer + "3.", x) + x
    return _ln_bias_free(sd, p + "norm_out.", x)


def ctvit_tokens(sd, spec: RefSpec, video):
    """CTViT's encoded tokens ``[b, t, h, w, d]`` before the quantiser."""
    tokens = patch_embed(sd, spec, video)
    b, t, h, w, d = tokens.shape
    video_shape = (b, t, h, w)
    tokens = tokens.reshape(b * t, h * w, d)
    bias = continuous_position_bias(sd, spec, h, w, video.dtype)
    tokens = transformer(sd, VT + "enc_spatial_transformer.", spec, spec.spatial_depth, tokens,
                         video_shape, attn_bias=bias)
    tokens = tokens.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(b * h * w, t, d)
    tokens = transformer(sd, VT + "enc_temporal_transformer.", spec, spec.temporal_depth, tokens,
                         video_shape)
    return tokens.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4)


def quantize(sd, tokens):
    """Cosine VQ in eval mode: the stored code vector of the most similar code, and its index."""
    embed = sd[VT + "vq._codebook.embed"].to(tokens.dtype)              # 1 c d
    flat = F.normalize(tokens.reshape(1, -1, tokens.shape[-1]), dim=-1)
    dist = torch.einsum("hnd,hcd->hnc", flat, F.normalize(embed, dim=-1))
    ind = dist.argmax(dim=-1)
    quantized = embed[0][ind[0]]
    return quantized.reshape(tokens.shape), ind[0].reshape(tokens.shape[:-1])


def encode_image(sd, spec: RefSpec, video, pooling="mean_depth", use_quantizer=True):
    tokens = ctvit_tokens(sd, spec, video)
    if use_quantizer:
        tokens, _ = quantize(sd, tokens)
    if pooling == "mean_depth":
        tokens = torch.mean(tokens, dim=1)
    pooled = tokens.reshape(tokens.shape[0], -1)
    return F.normalize(F.linear(pooled, sd["to_visual_latent.weight"].to(video.dtype)), dim=-1)


def encode_text(sd, text_config: dict, input_ids, attention_mask, dtype=torch.float64):
    """A fresh eager-attention BertModel with the state dict's text weights; CLS -> latent."""
    from transformers import BertConfig, BertModel
    config = BertConfig(**text_config, attn_implementation="eager")
    bert = BertModel(config, add_pooling_layer=True)
    prefix = "text_transformer."
    own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own.pop("embeddings.position_ids", None)
    bert.load_state_dict(own, strict=True)
    bert = bert.to(dtype).eval()
    with torch.no_grad():
        hidden = bert(input_ids=input_ids, attention_mask=attention_mask)[0]
    return F.normalize(F.linear(hidden[:, 0, :], sd["to_text_latent.weight"].to(dtype)), dim=-1)
