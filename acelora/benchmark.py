"""``acelora bench``: images/s of a full ACE-LoRA training step and of zero-shot inference.

Training-step cases (one step = forward of both towers with their HGNNs, the loss, backward, AdamW):

* ``reference`` — the research-code configuration, eager fp32: split q/k/v LoRA (three frozen
  Linears and three LoRA branches per layer), explicit softmax(q kᵀ) v attention with the CLS
  row read off the full N×N matrix, the dense hypergraph (``global_only=False``, then token 0)
  and the unfused loss on the reference backend, and text padded to the full context length.
* ``default`` — the library's defaults: bf16 autocast on a GPU, ``backend="auto"``, the
  global-only HGNN path, SDPA, text padded to the batch's longest report.
* ``compile`` — ``default`` with the forward compiled by ``torch.compile`` (a failure is caught
  and reported in the results, not raised).

Inference cases: zero-shot classification images/s (image tower + similarity against
precomputed class embeddings) of the base model, of the ACE-LoRA model with merged adapters, and
of the same without its HGNN (the merged LoRA alone), timed round-robin.

On the CPU the training cases are also timed round-robin (``interleave``), so that load from
other processes on a shared machine hits every case alike; on a GPU they run one after another.

Each timing is the median (with p10/p90) of ``--steps`` steps after ``--warmup`` steps, taken
with CUDA events on a GPU and ``perf_counter`` on the CPU. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls, convolutions and attention;
elementwise work and the optimizer are not counted); model-FLOPs utilisation divides them by the
step time and the device's dense bf16 peak (``PEAK_FLOPS``), null where the peak is unknown (CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from acelora.profiling import PhaseTimer, annotate_module, nvtx_enabled, phase, remove_hooks

CASES = ("reference", "default", "compile", "inference")
TRAIN_CASES = ("reference", "default", "compile")

# Dense bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name().
# MFU is always taken against this one number (whatever the case's precision), so cases compare.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}
FLOPS_NOTE = ("flops_per_step counted with torch.utils.flop_counter.FlopCounterMode over one "
              "forward+backward of the case's own step (matmul/conv/attention FLOPs; elementwise ops "
              "and the optimizer not counted); mfu = flops_per_step / median step time / the "
              "device's dense bf16 peak (null when the peak is unknown, e.g. on a CPU)")

_WORDS = ("the lungs are clear there is no focal consolidation pleural effusion or pneumothorax "
          "heart size is normal mild cardiomegaly is stable small left basilar atelectasis "
          "moderate pulmonary edema right lower lobe opacity concerning for pneumonia "
          "endotracheal tube terminates above the carina no acute cardiopulmonary process "
          "compared to prior study interval improvement of bibasilar opacities").split()


# --------------------------------------------------------------------------- environment

def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.check_output(["git", *args], cwd=root, text=True,
                                       stderr=subprocess.DEVNULL, timeout=10).strip()
    except Exception:
        return None


def env_info() -> dict:
    """Device, versions and the source commit recorded with every result."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "hostname": platform.node(), "commit": _git("rev-parse", "HEAD") or "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["dirty"] = None if status is None else bool(status)
    info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    # fp32 matmul precision decides whether the fp32 reference runs on TF32 tensor cores.
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    info["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    for name in ("acelora", "triton", "open_clip", "timm", "transformers", "nvtx"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    return info


def _loadavg() -> list[float] | None:
    # A shared CPU's load explains noisy CPU timings; record it with them.
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return peak
    return None


# --------------------------------------------------------------------------- timing

def time_steps(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Like :func:`time_steps` for several functions, timed round-robin (one call of each in
    turn) so that they see the same machine conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    marks: dict[str, list] = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                marks[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                marks[name].append((time.perf_counter() - t0) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        return {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in marks.items()}
    return marks


def _quantile(sorted_values: list[float], q: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarise(times_ms: list[float], batch: int) -> dict:
    t = sorted(times_ms)
    med, p10, p90 = statistics.median(t), _quantile(t, 0.1), _quantile(t, 0.9)
    return {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "min_ms": t[0], "max_ms": t[-1],
            "timed_steps": len(t),
            "images_per_s": batch / (med / 1e3),
            # throughput percentiles mirror the time percentiles (p90 time -> p10 images/s)
            "images_per_s_p10": batch / (p90 / 1e3), "images_per_s_p90": batch / (p10 / 1e3)}


def count_flops(fn: Callable[[], object]) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())
    except Exception:
        return None


# --------------------------------------------------------------------------- inputs

@dataclass
class Batch:
    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    texts: list[str]


def synthetic_texts(n: int, context_length: int, generator: torch.Generator) -> list[str]:
    """Report-like texts whose word counts spread over roughly 10–45 % of the context length."""
    lo = max(4, context_length // 10)
    hi = max(lo + 1, int(context_length * 0.45))
    lengths = torch.randint(lo, hi, (n,), generator=generator).tolist()
    picks = torch.randint(0, len(_WORDS), (sum(lengths),), generator=generator).tolist()
    texts, i = [], 0
    for length in lengths:
        texts.append(" ".join(_WORDS[j] for j in picks[i:i + length]) + ".")
        i += length
    return texts


def synthetic_labels(n: int, generator: torch.Generator, num_labels: int = 14) -> torch.Tensor:
    """Multi-hot CheXpert-style labels; about a third of the rows identical ("No Finding")."""
    labels = (torch.rand(n, num_labels, generator=generator) < 0.12).float()
    normal = torch.rand(n, generator=generator) < 0.35
    labels[normal] = 0.0
    labels[normal, 8] = 1.0  # CHEXPERT_FINDINGS[8] == "No Finding"
    return labels


def make_batch(model, batch_size: int, device: torch.device, fixed_length: bool, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch_size, 3, size, size, generator=g)
    texts = synthetic_texts(batch_size, model.context_length, g)
    tok = model.tokenizer(texts, context_length=model.context_length)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    if fixed_length and ids.shape[1] < model.context_length:
        # Research-code configuration: every text padded to the full context length.
        pad = model.context_length - ids.shape[1]
        ids = F.pad(ids, (0, pad), value=_pad_id(model))
        mask = F.pad(mask, (0, pad), value=0)
    return Batch(images.to(device), ids.to(device), mask.to(device),
                 synthetic_labels(batch_size, g).to(device), texts)


def _pad_id(model) -> int:
    tok = model.tokenizer
    for attr in ("pad_token_id", "pad_id"):
        value = getattr(tok, attr, None)
        if isinstance(value, int):
            return value
    inner = getattr(tok, "tokenizer", None)
    value = getattr(inner, "pad_token_id", None)
    return value if isinstance(value, int) else 0


# --------------------------------------------------------------------------- reference modules

class SplitLoRAQKV(nn.Module):
    """The research code's q/k/v LoRA: three frozen Linears, three separate LoRA branches.

    Computes the same function as the merged ``LoRAQKV`` it is built from, as three projections
    and three ``B(dropout(A x))`` branches whose outputs are concatenated.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, scale: float, dropout_p: float):
        super().__init__()
        d3, d_in = weight.shape
        d_out, r = d3 // 3, lora_A.shape[0] // 3
        self.scale = float(scale)
        self.proj = nn.ModuleList()
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.dropout = nn.ModuleList()
        for i in range(3):
            lin = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(weight[i * d_out:(i + 1) * d_out])
                if bias is not None:
                    lin.bias.copy_(bias[i * d_out:(i + 1) * d_out])
            lin.requires_grad_(False)
            self.proj.append(lin)
            self.lora_A.append(nn.Parameter(lora_A[i * r:(i + 1) * r].detach().clone()))
            self.lora_B.append(nn.Parameter(lora_B[i * d_out:(i + 1) * d_out].detach().clone()))
            self.dropout.append(nn.Dropout(dropout_p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [proj(x) + self.scale * F.linear(F.linear(drop(x), a), b)
                for proj, a, b, drop in zip(self.proj, self.lora_A, self.lora_B, self.dropout)]
        return torch.cat(outs, dim=-1)


def _lora_fields(module: nn.Module) -> tuple | None:
    """(weight, bias, lora_A, lora_B, scale, dropout_p) of a merged LoRA-QKV module, else None."""
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    w = getattr(module, "weight", None)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    if a.dim() != 2 or w.dim() != 2 or a.shape[0] % 3 or w.shape[0] % 3:
        return None
    scale = next((getattr(module, n) for n in ("scale", "scaling", "lora_scale")
                  if isinstance(getattr(module, n, None), (int, float))), None)
    p = next((getattr(module, n) for n in ("dropout_p", "lora_dropout", "dropout")
              if isinstance(getattr(module, n, None), (int, float))), None)
    if p is None and isinstance(getattr(module, "dropout", None), nn.Dropout):
        p = module.dropout.p
    if scale is None:
        return None
    return w, getattr(module, "bias", None), a, b, scale, float(p or 0.0)


def split_qkv_lora(model: nn.Module) -> int:
    """Replace every merged LoRA-QKV module by a :class:`SplitLoRAQKV`; return how many."""
    if getattr(model, "merged", False):
        raise ValueError("unmerge the adapters before splitting the LoRA-QKV modules")
    swaps = []
    for name, module in model.named_modules():
        fields = _lora_fields(module)
        if fields is not None and not isinstance(module, SplitLoRAQKV):
            swaps.append((name, fields))
    for name, fields in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        split = SplitLoRAQKV(*fields).train(getattr(parent, child).training)
        setattr(parent, child, split)
    return len(swaps)


class DenseHGNN(nn.Module):
    """Runs the wrapped ACE-HGNN on the dense path (all N tokens) and takes token 0 when the
    caller asked for the global-only output: the research code's formulation."""

    def __init__(self, hgnn: nn.Module):
        super().__init__()
        self.hgnn = hgnn

    def forward(self, tokens, cls_attn, key_padding_mask=None, global_only=False):
        out = self.hgnn(tokens, cls_attn, key_padding_mask=key_padding_mask, global_only=False)
        return out[:, 0] if global_only else out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("hgnn"), name)


def _hgnn_class():
    try:
        from acelora.nn.hgnn import ACEHGNN
        return ACEHGNN
    except Exception:
        return None


def dense_hgnn(model: nn.Module) -> int:
    """Wrap every ACE-HGNN of ``model`` in :class:`DenseHGNN`; return how many."""
    cls = _hgnn_class()
    if cls is None:
        return 0
    swaps = [name for name, m in model.named_modules()
             if isinstance(m, cls) and not name.endswith(".hgnn")]
    for name in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DenseHGNN(getattr(parent, child)))
    return len(swaps)


def _explicit_attention(q, k, v, scale: float, attn_mask, dropout: nn.Module, cls_mode):
    """softmax(q kᵀ·scale + mask) v with the full [B,H,N,N] matrix materialised (the research
    code's attention); also its CLS row (heads averaged, keys 1..) when ``cls_mode`` is set."""
    logits = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    probs = logits.softmax(-1)
    cls = None
    if cls_mode is not None:
        with phase("cls_attention"):
            if cls_mode == "probs":
                cls = probs[:, :, 0, 1:].mean(1)
            else:
                cls = logits[:, :, 0, 1:].clamp_min(torch.finfo(logits.dtype).min).mean(1)
    return torch.matmul(dropout(probs), v), cls


def _explicit_classes():
    from acelora.nn import attention as A

    class ExplicitViTAttention(A.ViTAttention):
        def forward(self, x, attn_mask=None, is_causal=False):
            if is_causal:
                raise ValueError("the explicit reference attention is bidirectional only")
            B, N, _ = x.shape
            gate = self.gate(x).sigmoid() if self.gate is not None else None
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = self.q_norm(q), self.k_norm(k)
            out, cls = _explicit_attention(q, k, v, self.scale, attn_mask, self.attn_drop,
                                           self.cls_attn_mode)
            if cls is not None:
                self.cls_attn = cls
            out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
            if gate is not None:
                out = out * gate
            return self.proj_drop(self.proj(out))

    class ExplicitBertSelfAttention(A.BertQKVSelfAttention):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None,
                    encoder_hidden_states=None, **kwargs):
            if past_key_values is not None or encoder_hidden_states is not None:
                raise ValueError("the explicit reference attention is encoder self-attention only")
            B, L, _ = hidden_states.shape
            qkv = self.qkv(hidden_states).reshape(B, L, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out, cls = _explicit_attention(q, k, v, self.scale, attention_mask, self.dropout,
                                           self.cls_attn_mode)
            if cls is not None:
                self.cls_attn = cls
            return out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim), None

    return {A.ViTAttention: ExplicitViTAttention, A.BertQKVSelfAttention: ExplicitBertSelfAttention}


def explicit_attention(model: nn.Module) -> int:
    """Run every acelora attention module of ``model`` on explicit softmax(q kᵀ) v instead of
    SDPA, with the CLS row read off the full matrix (the research code's way); also turn off
    timm's ``fused_attn`` where an untouched timm Attention is left. Returns how many changed."""
    try:
        swaps = _explicit_classes()
    except Exception:  # attention modules not available: nothing to swap
        swaps = {}
    n = 0
    for m in model.modules():
        cls = swaps.get(type(m))
        if cls is not None:
            m.__class__ = cls  # same state, different forward; only this model instance
            n += 1
        elif isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn:
            m.fused_attn = False
            n += 1
    return n


# --------------------------------------------------------------------------- model + step

def _create_model(name: str, device: torch.device, backend: str):
    import acelora

    return acelora.create_ace_lora(name, config="paper", device=device, backend=backend)


def _hgnn_modules(model: nn.Module):
    cls = _hgnn_class()
    return [(n, m) for n, m in model.named_modules()
            if (cls is not None and isinstance(m, cls)) or isinstance(m, DenseHGNN)]


def _cls_attention_modules(model: nn.Module):
    """Attention modules that compute the CLS-attention row (the last block of each tower)."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "cls_attn_mode", None)]


class _ClsRowPatch:
    """Wraps ``acelora.nn.attention.cls_attention_row`` in ``phase("cls_attention")`` while at
    least one handle is alive (reference-counted, so handles may be removed in any order)."""

    _count = 0
    _original = None

    def __init__(self, attention_module):
        cls = type(self)
        self.module = attention_module
        if cls._count == 0:
            original = attention_module.cls_attention_row
            cls._original = original

            def cls_attention_row(*args, **kwargs):
                with phase("cls_attention"):
                    return original(*args, **kwargs)

            attention_module.cls_attention_row = cls_attention_row
        cls._count += 1
        self.alive = True

    def remove(self) -> None:
        cls = type(self)
        if not self.alive:
            return
        self.alive = False
        cls._count -= 1
        if cls._count == 0:
            self.module.cls_attention_row = cls._original
            cls._original = None


def install_phase_hooks(model: nn.Module) -> list:
    """Ranges around the HGNNs ("hypergraph") and the CLS-attention row ("cls_attention"),
    added from outside the model: forward hooks, and a wrapper of
    ``acelora.nn.attention.cls_attention_row`` for as long as the handles are not removed."""
    handles = []
    wrapped = {id(m.hgnn) for _, m in _hgnn_modules(model) if isinstance(m, DenseHGNN)}
    for _, m in _hgnn_modules(model):
        if id(m) not in wrapped:
            handles += annotate_module(m, "hypergraph")
    try:
        from acelora.nn import attention as attention_module
        attention_module.cls_attention_row
    except (ImportError, AttributeError):
        for _, m in _cls_attention_modules(model):  # whole last-block attention, as a fallback
            handles += annotate_module(m, "cls_attention")
        return handles
    handles.append(_ClsRowPatch(attention_module))
    return handles


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _build_optimizer(model: nn.Module):
    try:
        from acelora.train.optim import build_optimizer
        return build_optimizer(model, lr=1e-4, weight_decay=0.1)
    except ImportError:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)


@dataclass
class TrainCase:
    name: str
    model: nn.Module
    batch: Batch
    step: Callable[[], torch.Tensor]
    forward: Callable[[], torch.Tensor]
    dtype: str
    notes: list[str]
    hooks: list


def _loss_fn(model, backend: str):
    from acelora.nn.loss import LabelGuidedInfoNCELoss
    return LabelGuidedInfoNCELoss(gather=False, backend=backend)


def build_train_case(case: str, model_name: str, batch_size: int, device: torch.device,
                     seed: int = 0, instrument: bool = True) -> TrainCase:
    """Model, inputs and a ``step()`` closure for one training-step case.

    ``instrument``: add the hypergraph / CLS-attention ranges (:func:`install_phase_hooks`;
    never for ``compile``); remove them with ``remove_hooks(case.hooks)``."""
    if case not in TRAIN_CASES:
        raise ValueError(f"unknown training case {case!r}; choose from {TRAIN_CASES}")
    reference = case == "reference"
    backend = "reference" if reference else "auto"
    torch.manual_seed(seed)
    model = _create_model(model_name, device, backend)
    notes = []
    if reference:
        notes.append(f"split q/k/v LoRA in {split_qkv_lora(model)} layers")
        notes.append(f"dense HGNN (global_only=False, token 0) in {dense_hgnn(model)} modules")
        notes.append(f"explicit (non-SDPA) attention in {explicit_attention(model)} modules")
        notes.append("reference loss, fp32, text padded to the context length")
    model.train()
    batch = make_batch(model, batch_size, device, fixed_length=reference, seed=seed)
    loss_fn = getattr(model, "loss_fn", None)  # what training uses (gathers under DDP)
    if loss_fn is None:
        loss_fn = _loss_fn(model, backend)
    use_bf16 = not reference and device.type == "cuda"
    optimizer = _build_optimizer(model)
    hooks = install_phase_hooks(model) if instrument and case != "compile" else []

    def forward() -> torch.Tensor:
        with _autocast(device, use_bf16):
            with phase("image_tower"):
                image_emb = model.encode_image(batch.images)
            with phase("text_tower"):
                text_emb = model.encode_text(batch.input_ids, batch.attention_mask)
            with phase("loss"):
                loss = loss_fn(image_emb, text_emb, model.logit_scale.exp(), batch.labels)
        return loss

    def plain_forward() -> torch.Tensor:
        # No Python-side ranges inside a compiled region (they would break the graph).
        with _autocast(device, use_bf16):
            image_emb = model.encode_image(batch.images)
            text_emb = model.encode_text(batch.input_ids, batch.attention_mask)
            return loss_fn(image_emb, text_emb, model.logit_scale.exp(), batch.labels)

    fwd = forward
    if case == "compile":
        torch._dynamo.reset()  # no guards/caches left from other cases' models
        fwd = torch.compile(plain_forward)
        notes.append("torch.compile of the forward (both towers, HGNN, loss)")

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            loss = fwd()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()
        return loss.detach()

    dtype = "bf16-autocast" if use_bf16 else "fp32"
    return TrainCase(case, model, batch, step, forward, dtype, notes, hooks)


def _peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _failed(row: dict, exc: BaseException) -> None:
    row["status"] = "failed"
    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]


def _prepare_train_row(case: str, model_name: str, batch_size: int, device: torch.device,
                       instrument: bool) -> tuple[dict, TrainCase | None]:
    """Build the case (and compile it, for ``compile``); a failure lands in the row."""
    row = {"case": case, "kind": "train_step", "model": model_name, "batch": batch_size,
           "device": str(device)}
    tc = None
    try:
        tc = build_train_case(case, model_name, batch_size, device, instrument=instrument)
        row.update(dtype=tc.dtype, text_length=int(tc.batch.input_ids.shape[1]),
                   text_tokens_mean=float(tc.batch.attention_mask.sum(1).float().mean()),
                   image_size=int(tc.batch.images.shape[-1]), notes=tc.notes)
        if case == "compile":
            # Compile (first call) outside the timing; record how often dynamo broke the graph.
            from torch._dynamo.utils import counters
            counters.clear()
            t0 = time.perf_counter()
            tc.step()
            row["compile_s"] = time.perf_counter() - t0
            breaks = dict(counters.get("graph_break", {}))
            row["graph_breaks"] = int(sum(breaks.values()))
            row["graph_break_reasons"] = [str(k)[:300] for k in list(breaks)[:10]]
        row["status"] = "ok"
    except Exception as exc:  # report, don't abort the other cases
        _failed(row, exc)
        if tc is not None:
            remove_hooks(tc.hooks)
        tc = None
    return row, tc


def _finish_train_row(row: dict, tc: TrainCase, times: list[float], device: torch.device,
                      peak: float | None) -> None:
    row.update(summarise(times, row["batch"]))
    row["peak_mem_bytes"] = _peak_memory(tc.step, device)
    # FLOPs of the eager forward+backward (for compile: the same model math, uncompiled).
    flops = count_flops(lambda: tc.forward().backward())
    row["flops_per_step"] = flops
    row["mfu"] = (flops / (row["median_ms"] / 1e3) / peak) if (flops and peak) else None


def run_train_cases(cases, model_name: str, batch_size: int, device: torch.device, steps: int,
                    warmup: int, peak: float | None, profile_dir: str | None = None,
                    interleave: bool = False) -> list[dict]:
    """Rows of the training-step cases. ``interleave``: build every case first and time them
    round-robin (robust to a shared, noisy CPU; needs all models in memory at once); otherwise
    one case after the other, each freed before the next (what a GPU at batch 256 needs)."""
    # Nsight ranges in the timed steps when NVTX is on; otherwise time bare steps. Not while a
    # compiled case shares the run (the CLS-row wrapper is global and would enter its graph).
    instrument = nvtx_enabled() and not (interleave and "compile" in cases)
    groups = [list(cases)] if interleave else [[c] for c in cases]
    rows = []
    for group in groups:
        built = [_prepare_train_row(c, model_name, batch_size, device, instrument) for c in group]
        rows += [row for row, _ in built]
        live = {row["case"]: tc for row, tc in built if tc is not None}
        try:
            times = time_interleaved({c: tc.step for c, tc in live.items()}, steps, warmup, device)
            for row, tc in built:
                if tc is not None:
                    _finish_train_row(row, tc, times[row["case"]], device, peak)
            if profile_dir is not None:
                for row, tc in built:
                    if tc is not None and row["case"] != "compile":
                        row["profile"] = profile_case(tc, device, profile_dir,
                                                      f"{row['case']}-b{batch_size}",
                                                      steps=max(1, min(3, steps)))
        except Exception as exc:
            for row, tc in built:
                if tc is not None and "median_ms" not in row:
                    _failed(row, exc)
        finally:
            for _, tc in built:
                if tc is not None:
                    remove_hooks(tc.hooks)
            built.clear()
            live.clear()
            _free(device)
    return rows


def run_train_case(case: str, model_name: str, batch_size: int, device: torch.device,
                   steps: int, warmup: int, peak: float | None, profile_dir: str | None = None) -> dict:
    """One training-step case on its own (see :func:`run_train_cases`)."""
    return run_train_cases([case], model_name, batch_size, device, steps, warmup, peak, profile_dir)[0]


# --------------------------------------------------------------------------- profiling

def profile_case(tc: TrainCase, device: torch.device, out_dir: str, tag: str, steps: int = 3) -> dict:
    """Chrome trace of a few steps (torch.profiler) and a per-phase time table of a few more."""
    os.makedirs(out_dir, exist_ok=True)
    hooks = [] if tc.hooks or tc.name == "compile" else install_phase_hooks(tc.model)
    try:
        return _profile_case(tc, device, out_dir, tag, steps)
    finally:
        remove_hooks(hooks)


def _profile_case(tc: TrainCase, device: torch.device, out_dir: str, tag: str, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            tc.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace = os.path.join(out_dir, f"trace-{tag}.json")
    prof.export_chrome_trace(trace)

    tc.step()  # the first step after the profiler is slow: not measured
    timer = PhaseTimer(device)
    with timer:
        for _ in range(steps):
            with phase("step"):
                tc.step()
            timer.step()
    rows = timer.table()
    step_ms = next((r["ms_per_step"] for r in rows if r["phase"] == "step"), None)
    for r in rows:
        r["self_pct_of_step"] = 100.0 * r["self_ms_per_step"] / step_ms if step_ms else None
    breakdown = os.path.join(out_dir, f"breakdown-{tag}.txt")
    with open(breakdown, "w") as f:
        f.write(f"# per-phase time of {steps} steps ({tag}, {device}); ms per step; 'self' excludes "
                "nested phases\n")
        f.write(format_table(rows, ["phase", "calls_per_step", "ms_per_step", "self_ms_per_step",
                                    "self_pct_of_step"]))
    return {"trace": trace, "breakdown": breakdown, "phases": rows}


# --------------------------------------------------------------------------- inference

INFERENCE_CASES = ("base", "merged", "merged-nohgnn")
ZERO_SHOT_CLASSES = ("atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion")


def build_inference_case(which: str, model_name: str, batch_size: int, device: torch.device,
                         seed: int = 0) -> Callable[[], torch.Tensor]:
    """A zero-shot ``infer()`` closure: image embeddings of a fixed batch against precomputed
    class-prompt embeddings, argmax. ``which``: "base" (the frozen base model), "merged"
    (ACE-LoRA, paper preset, adapters with nonzero B folded into W) or "merged-nohgnn" (the same
    without the HGNN: isolates the cost of the merged LoRA, which should be exactly the base's)."""
    import acelora

    if which not in INFERENCE_CASES:
        raise ValueError(f"inference case must be one of {INFERENCE_CASES}, got {which!r}")
    torch.manual_seed(seed)
    if which == "base":
        model = acelora.create_model(model_name, device=device)
    else:
        model = acelora.create_ace_lora(model_name, config="paper", device=device,
                                        hgnn=which == "merged")
        _randomise_lora_b(model)  # B = 0 at init; nonzero, as after training
        model.merge()
    model.eval()
    use_bf16 = device.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    size = model.image_size
    images = torch.randn(batch_size, 3, size, size, generator=g).to(device)
    tok = model.tokenizer([f"a chest X-ray image of {c}." for c in ZERO_SHOT_CLASSES])
    with torch.inference_mode(), _autocast(device, use_bf16):
        class_emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))

    def infer() -> torch.Tensor:
        with torch.inference_mode(), _autocast(device, use_bf16):
            with phase("image_tower"):
                emb = model.encode_image(images)
            return (emb @ class_emb.T).argmax(-1)

    infer.model = model
    return infer


def run_inference_cases(model_name: str, batch_size: int, device: torch.device, steps: int,
                        warmup: int, peak: float | None) -> list[dict]:
    """Zero-shot images/s of the base model and of ACE-LoRA with merged adapters (same inputs).

    The cases are timed round-robin (one step of each in turn), so a change in machine load
    during the run hits all of them alike and their ratio stays meaningful."""
    rows, fns = [], {}
    for which in INFERENCE_CASES:
        row = {"case": f"inference-{which}", "kind": "zero_shot_inference", "model": model_name,
               "batch": batch_size, "device": str(device),
               "dtype": "bf16-autocast" if device.type == "cuda" else "fp32",
               "timing": "interleaved with the other inference cases"}
        try:
            fns[which] = build_inference_case(which, model_name, batch_size, device)
            row["status"] = "ok"
        except Exception as exc:
            row["status"] = "failed"
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        rows.append(row)
    try:
        times = time_interleaved(fns, steps, warmup, device)
        for row, which in zip(rows, INFERENCE_CASES):
            if which not in fns:
                continue
            row.update(summarise(times[which], batch_size))
            row["peak_mem_bytes"] = _peak_memory(fns[which], device)
            flops = count_flops(fns[which])
            row["flops_per_step"] = flops
            row["mfu"] = (flops / (row["median_ms"] / 1e3) / peak) if (flops and peak) else None
    except Exception as exc:
        for row in rows:
            if row["status"] == "ok":
                row["status"] = "failed"
                row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        fns.clear()
        _free(device)
    base = rows[0]
    for row in rows[1:]:
        if base["status"] == row["status"] == "ok":
            row["latency_vs_base"] = row["median_ms"] / base["median_ms"]
    return rows


def _randomise_lora_b(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)


# --------------------------------------------------------------------------- driver

def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines) + "\n"


TABLE_COLUMNS = ["case", "batch", "device", "dtype", "status", "images_per_s", "images_per_s_p10",
                 "images_per_s_p90", "median_ms", "p10_ms", "p90_ms", "min_ms", "peak_mem_bytes", "mfu"]


def _speedups(rows: list[dict]) -> dict:
    out = {}
    ok = {(r["case"], r["batch"], r["device"]): r for r in rows if r.get("status") == "ok"}
    for (case, batch, dev), r in ok.items():
        ref = ok.get(("reference", batch, dev))
        if case in ("default", "compile") and ref is not None:
            out[f"{case}_vs_reference/b{batch}/{dev}"] = r["images_per_s"] / ref["images_per_s"]
        base = ok.get(("inference-base", batch, dev))
        if case.startswith("inference-merged") and base is not None:
            out[f"{case[len('inference-'):]}_latency_vs_base/b{batch}/{dev}"] = \
                r["median_ms"] / base["median_ms"]
    return out


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).lower().replace(" ", "-")
    return "cpu"


def _resolve_devices(names: list[str]) -> list[torch.device]:
    devices = []
    for name in names:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("acelora bench: --device cuda asked for, but no CUDA device is available")
        if dev.type not in ("cpu", "cuda"):
            raise SystemExit(f"acelora bench: unsupported device {name!r} (cpu or cuda)")
        devices.append(dev)
    return devices


def _parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or not cases:
        raise SystemExit(f"acelora bench: unknown case(s) {bad}; choose from {','.join(CASES)}")
    return cases


def run(model: str = "tiny", batches=(64, 256), devices=("auto",), cases=CASES, steps: int = 20,
        warmup: int = 5, profile: str | None = None, out: str | None = "bench/results",
        threads: int | None = None, verbose: bool = True, name: str = "bench",
        interleave: bool | None = None) -> dict:
    """Run the benchmark; return the results dict (also written to ``out`` as JSON).

    ``interleave``: time the training cases round-robin (default: on the CPU, where load from
    other processes drifts; on a GPU the cases run one after the other to fit in memory)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    if threads:
        torch.set_num_threads(threads)
    devs = _resolve_devices(list(devices))
    load_start = _loadavg()
    rows: list[dict] = []
    for dev in devs:
        peak = device_peak_flops(dev)
        mixed = interleave if interleave is not None else dev.type == "cpu"
        for batch in batches:
            new = []
            train = [c for c in cases if c in TRAIN_CASES]
            if train:
                new += run_train_cases(train, model, batch, dev, steps, warmup, peak, profile,
                                       interleave=mixed)
            if "inference" in cases:
                new += run_inference_cases(model, batch, dev, steps, warmup, peak)
            for r in new:
                r["peak_flops"] = peak
                if verbose:
                    msg = (f"{r['case']:<23} b={batch:<4} {dev}: {r['images_per_s']:.1f} images/s"
                           if r["status"] == "ok" else
                           f"{r['case']:<23} b={batch:<4} {dev}: FAILED {r['error'][:200]}")
                    print(msg, flush=True)
            rows += new
    results = {"benchmark": name, "env": env_info(),
               "settings": {"model": model, "batches": list(batches), "devices": [str(d) for d in devs],
                            "cases": list(cases), "steps": steps, "warmup": warmup,
                            "profile": profile, "preset": "paper",
                            "loadavg_start": load_start, "loadavg_end": _loadavg(),
                            "interleaved_training_cases": {str(d): (interleave if interleave is not None
                                                                    else d.type == "cpu") for d in devs}},
               "flops_note": FLOPS_NOTE, "peak_flops_table": PEAK_FLOPS,
               "timing_note": ("median/p10/p90 over the timed steps after warm-up; CUDA events on a "
                               "GPU, perf_counter on the CPU; images_per_s = batch / median step time; "
                               "images_per_s_p10/_p90 = batch / p90/p10 step time; peak_mem_bytes = "
                               "max CUDA memory allocated during one step (model included), null on "
                               "the CPU"),
               "rows": rows, "speedups": _speedups(rows)}
    if verbose:
        print()
        print(format_table(rows, TABLE_COLUMNS), end="")
        for k, v in results["speedups"].items():
            print(f"{k}: {v:.3f}")
        for r in rows:
            for p in ([r["profile"]] if "profile" in r else []):
                print(f"\nphases of {r['case']} b={r['batch']} ({r['device']}), trace {p['trace']}")
                print(format_table(p["phases"], ["phase", "calls_per_step", "ms_per_step",
                                                 "self_ms_per_step", "self_pct_of_step"]), end="")
    if out:
        os.makedirs(out, exist_ok=True)
        tag = "-".join(dict.fromkeys(_device_tag(d) for d in devs))
        path = os.path.join(out, f"{name}-{Path(model).name}-{tag}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        results["path"] = path
        if verbose:
            print(f"\nwrote {path}")
    return results


def add_arguments(p: argparse.ArgumentParser, cases: str = ",".join(CASES),
                  out: str = "bench/results") -> argparse.ArgumentParser:
    p.add_argument("--model", default="tiny",
                   help="tiny | biomedclip | a local model folder (random weights are fine)")
    p.add_argument("--batch", type=int, nargs="+", default=[64, 256], help="batch sizes")
    p.add_argument("--device", nargs="+", default=["auto"], help="cpu and/or cuda (auto: cuda if present)")
    p.add_argument("--cases", default=cases, help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps per case")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a torch.profiler chrome trace and a per-phase breakdown per case")
    p.add_argument("--out", default=out, help="folder for the JSON results ('' to skip)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def main_from_args(args: argparse.Namespace, name: str = "bench") -> dict:
    return run(model=args.model, batches=args.batch, devices=args.device,
               cases=_parse_cases(args.cases), steps=args.steps, warmup=args.warmup,
               profile=args.profile, out=args.out or None, threads=args.threads, name=name)


def _cmd_bench(args: argparse.Namespace) -> int:
    results = main_from_args(args)
    return 0 if any(r["status"] == "ok" for r in results["rows"]) else 1


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="images/s of a training step and of zero-shot inference",
        description="Images/s of a full ACE-LoRA training step and of zero-shot inference. "
        "Cases: reference (eager fp32 research-code path), default (library defaults), compile (default + torch.compile), inference (zero-shot, "
        "merged adapters vs the base model).")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)
