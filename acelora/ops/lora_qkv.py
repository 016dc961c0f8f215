"""The LoRA-augmented merged QKV projection.

    y = x Wᵀ + b + s · [ drop_q(x) A_qᵀ B_qᵀ | drop_k(x) A_kᵀ B_kᵀ | drop_v(x) A_vᵀ B_vᵀ ]

Shapes: x [..., d_in]; weight [3·d_out, d_in] and bias [3·d_out] (frozen); lora_A [3r, d_in]
(A_q; A_k; A_v stacked); lora_B [3·d_out, r] (B_q; B_k; B_v stacked — the block-diagonal
3·d_out × 3r matrix of DESIGN §4 stored without its zero blocks). Dropout masks are independent
for q, k and v and only act in training.

Backends: ``"reference"`` (plain PyTorch, any device, gradients for W and b too) and ``"cuda"``,
the compiled extension (csrc/): ``acelora._C`` holds the schemas and the C++ CPU kernels,
``acelora._C_cuda`` the CUDA kernels. The compiled op never stores dropout masks: it returns the
(seed, offset) it drew from torch's generator and the backward pass regenerates the masks from
it (``lora_qkv_dropout_masks`` regenerates them for inspection). W and b are frozen there: its
backward computes dX, dA and dB only.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from acelora.ops import _backend, _extension
from acelora.ops._backend import implementation, register, resolve

OP = "lora_qkv"


def check_lora_qkv_args(x, weight, bias, lora_A, lora_B) -> tuple[int, int, int]:
    """Validate shapes, dtypes and devices; return (d_in, d_out, r)."""
    if weight.dim() != 2 or weight.shape[0] % 3:
        raise ValueError(f"weight must be [3*d_out, d_in], got {tuple(weight.shape)}")
    d_in, d_out = weight.shape[1], weight.shape[0] // 3
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features, weight expects {d_in}")
    if bias is not None and tuple(bias.shape) != (3 * d_out,):
        raise ValueError(f"bias must be [{3 * d_out}], got {tuple(bias.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[0] % 3 or lora_A.shape[0] == 0 or lora_A.shape[1] != d_in:
        raise ValueError(f"lora_A must be [3*r, {d_in}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // 3
    if tuple(lora_B.shape) != (3 * d_out, r):
        raise ValueError(f"lora_B must be [{3 * d_out}, {r}], got {tuple(lora_B.shape)}")
    tensors = [t for t in (x, weight, bias, lora_A, lora_B) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    return d_in, d_out, r


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def lora_qkv_reference(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                       training: bool = False, *, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: the CPU path and the oracle of the fused implementations.

    ``masks`` (optional, [3, *x.shape] bool/uint8, 1 = keep) replaces the random dropout masks of
    q, k and v — tests use it to replay the masks of the compiled op.
    """
    d_in, d_out, r = check_lora_qkv_args(x, weight, bias, lora_A, lora_B)
    _check_dropout(dropout_p)
    y = F.linear(x, weight, bias)
    if training and dropout_p > 0:
        if masks is not None:
            if tuple(masks.shape) != (3, *x.shape):
                raise ValueError(f"masks must be [3, {', '.join(map(str, x.shape))}], got {tuple(masks.shape)}")
            keep = masks.to(x.dtype) / (1.0 - dropout_p)
            drops = [x * keep[g] for g in range(3)]
        else:  # independent masks for q, k and v
            drops = [F.dropout(x, dropout_p, True) for _ in range(3)]
        down = torch.cat([F.linear(xd, a) for xd, a in zip(drops, lora_A.chunk(3))], -1)
    else:
        down = F.linear(x, lora_A)                                    # [..., 3r]
    up = torch.einsum("...gr,gor->...go", down.unflatten(-1, (3, r)),
                      lora_B.view(3, d_out, r)).flatten(-2)           # block-diagonal B
    return y + scale * up


# --------------------------------------------------------------------------------------------
# The compiled op: autograd and fake (meta) kernels registered once, when the extension loads.

_READY: set[str] = set()   # device types whose compiled op is loaded and registered


def _compiled_ops(device_type: str):
    """``torch.ops.acelora`` with autograd + fake kernels registered; raises if not built."""
    if device_type not in _READY:
        ok = _extension.cuda_ops_available() if device_type == "cuda" else _extension.cpu_ops_available()
        if not ok:
            raise RuntimeError(f"acelora's compiled LoRA-QKV op is unavailable: {_extension.unavailable_reason()}")
        _register_python_side()
        _READY.add(device_type)
    return torch.ops.acelora


@functools.lru_cache(maxsize=None)
def _register_python_side() -> None:
    lib = "acelora::"

    @torch.library.register_fake(lib + "lora_qkv_fwd")
    def _fwd_fake(x, weight, bias, lora_A, lora_B, scale, dropout_p, training):
        return (x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0]),
                x.new_empty(2, dtype=torch.int64))

    @torch.library.register_fake(lib + "lora_qkv_bwd")
    def _bwd_fake(grad_y, x, weight, lora_A, lora_B, u, rng_state, scale, dropout_p, training, need_dx):
        dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
        return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)

    @torch.library.register_fake(lib + "lora_qkv_dropout_masks")
    def _masks_fake(rng_state, tokens, d_in, dropout_p):
        return rng_state.new_empty(3, tokens, d_in, dtype=torch.uint8)

    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_A, lora_B, scale, dropout_p, training = inputs
        _, u, rng_state = output
        ctx.save_for_backward(x, weight, lora_A, lora_B, u, rng_state)
        ctx.hparams = (scale, dropout_p, training)

    def backward(ctx, grad_y, grad_u, grad_rng):
        # u and rng_state are internal outputs: their gradients are ignored.
        x, weight, lora_A, lora_B, u, rng_state = ctx.saved_tensors
        scale, dropout_p, training = ctx.hparams
        need_dx = ctx.needs_input_grad[0]
        if grad_y is None:
            grad_y = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        dx, dA, dB = torch.ops.acelora.lora_qkv_bwd(grad_y, x, weight, lora_A, lora_B, u, rng_state,
                                                    scale, dropout_p, training, need_dx)
        return (dx if need_dx else None, None, None, dA if ctx.needs_input_grad[3] else None,
                dB if ctx.needs_input_grad[4] else None, None, None, None)

    torch.library.register_autograd(lib + "lora_qkv_fwd", backward, setup_context=setup_context)


def _autocast(x, weight, bias, lora_A, lora_B):
    # The compiled op needs one dtype; under autocast follow F.linear (all operands in the autocast dtype).
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        return cast(x), cast(weight), cast(bias), cast(lora_A), cast(lora_B)
    return x, weight, bias, lora_A, lora_B


def lora_qkv_compiled(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
                      training: bool = False, *, return_rng_state: bool = False):
    """The extension op (C++ on the CPU, CUDA kernels on a GPU). W and b get no gradient.

    With ``return_rng_state=True`` returns ``(y, rng_state)``; ``lora_qkv_dropout_masks`` turns
    rng_state back into the masks that were used.
    """
    d_in, d_out, r = check_lora_qkv_args(x, weight, bias, lora_A, lora_B)
    _check_dropout(dropout_p)
    ops = _compiled_ops(x.device.type)
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    lead = x.shape[:-1]
    y, _, rng_state = ops.lora_qkv_fwd(x.reshape(-1, d_in), weight, bias, lora_A, lora_B, float(scale),
                                       float(dropout_p), bool(training))
    y = y.view(*lead, 3 * d_out)
    return (y, rng_state) if return_rng_state else y


def lora_qkv_dropout_masks(rng_state: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep-masks ([3, *shape] bool, 1 = kept) the compiled op used for an input of ``shape``."""
    shape = tuple(shape)
    tokens = 1
    for s in shape[:-1]:
        tokens *= s
    masks = _compiled_ops(rng_state.device.type).lora_qkv_dropout_masks(rng_state, tokens, shape[-1],
                                                                       float(dropout_p))
    return masks.view(3, *shape).bool()


def merge_lora_qkv_weight(weight, lora_A, lora_B, scale: float, sign: float = 1.0) -> torch.Tensor:
    """W + sign·s·blockdiag(B)·A (computed in float64, returned in W's dtype): the merged weight
    for inference (one dense GEMM); ``sign=-1`` undoes a merge."""
    d_in, d_out = weight.shape[1], weight.shape[0] // 3
    r = lora_A.shape[0] // 3
    delta = torch.bmm(lora_B.detach().double().view(3, d_out, r), lora_A.detach().double().view(3, r, d_in))
    return (weight.detach().double() + sign * scale * delta.reshape(3 * d_out, d_in)).to(weight.dtype)


register(OP, "reference", lora_qkv_reference)
# "cuda" names the compiled extension, which also has C++ kernels for CPU tensors. Measured on 2
# idle CPU threads (fwd+bwd, 394 and 1576 tokens, 768->2304, r=4, fp32): without dropout the C++ op
# is 5-15% faster than the reference; with dropout 0.1 it is ~10% slower, because it regenerates
# the three masks in backward instead of keeping three dropped copies of x (3*T*d_in activations
# saved). "auto" prefers it on the CPU for that memory; backend="reference" trains a little faster
# on a CPU.
register(OP, "cuda", lora_qkv_compiled, devices=("cuda", "cpu"), auto_devices=("cuda", "cpu"))
# Load and register eagerly (cheap: libtorch is already loaded) so that traced code never imports.
for _device_type in ("cpu", "cuda"):
    try:
        _compiled_ops(_device_type)
    except RuntimeError:
        pass


_WARNED: set[str] = set()


def _warn_fallback(device_type: str) -> None:
    if device_type in _WARNED:
        return
    _WARNED.add(device_type)
    warnings.warn(f"acelora: the compiled LoRA-QKV op is unavailable ({_extension.unavailable_reason()}); "
                  f"lora_qkv uses the PyTorch reference on {device_type}. Build it with "
                  "`python setup.py build_ext --inplace`.", stacklevel=3)


def lora_qkv(x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0,
             training: bool = False, backend: str = "auto") -> torch.Tensor:
    """y = x Wᵀ + b + s·B·drop(A x) for q, k and v at once (see the module docstring)."""
    name = resolve(OP, backend, x.device)
    requested = backend if backend != "auto" else _backend.current_backend()
    if name == "cuda" and torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad)):
        # The compiled op keeps W and b frozen; training them needs the reference.
        if requested == "cuda":
            raise ValueError("backend='cuda' keeps weight and bias frozen but they require grad: freeze "
                             "them (requires_grad_(False)) or use backend='reference'")
        name = "reference"
    elif name == "reference" and requested == "auto" and "cuda" in _backend.auto_order(OP, x.device.type):
        _warn_fallback(x.device.type)  # auto prefers the extension here, but it is not built
    return implementation(OP, name, x.device)(x, weight, bias, lora_A, lora_B, scale, dropout_p, training)
