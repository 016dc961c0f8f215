"""What produced a result, recorded in every report (eval JSON, ``predict --json``, a training
run's ``config.json``): the model source, a hash of the base weights, the adapters and their hash,
the preset, the acelora version and the git commit.

Hashes are SHA-256 over tensors (name, dtype, shape, bytes) in sorted key order, not over files:
the same weights saved as ``.bin`` or ``.safetensors`` hash alike. The base hash leaves out the
adapters (LoRA A/B, HGNNs) and the logit scale (ACE-LoRA trains it), and sees an ACE-LoRA model's
merged q/k/v projection of the text tower as BERT's separate query/key/value, so a base model and
the same base under adapters hash alike.

Also here: the rule that a built-in architecture without weights is used only on request
(``--random-weights``; the Python API warns once per process).
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import warnings
from typing import Any, Iterable

import torch

RANDOM_WEIGHTS_HINT = ("pass --random-weights (in a training config: random_weights: true) to use "
                       "randomly initialised weights on purpose "
                       "(tests, benchmarks), or give a weights folder (--model /path/to/folder or "
                       "hf-hub:<name> from the local Hugging Face cache)")
_warned_random: set[str] = set()


# --- random weights only on request -----------------------------------------------------------

def builtin_model_names() -> tuple[str, ...]:
    """The built-in architectures (names that build a model without any weights file)."""
    from acelora.models.factory import builtin_model_names as names

    return tuple(names())


def is_random_init(name, pretrained=None) -> bool:
    """True when ``name`` is a built-in architecture and no ``pretrained`` weights are given."""
    from acelora.models.factory import is_builtin

    return pretrained is None and isinstance(name, str) and is_builtin(name)


def check_random_weights(name, pretrained=None, random_weights: bool | None = None,
                         flag: str = "--model") -> bool:
    """Whether the model will have random weights; refuses that unless asked for.

    ``random_weights``: True (asked for: fine), False (the command line without
    ``--random-weights``: a :class:`~acelora.errors.UserError`) or None (the Python API: a
    warning, once per process).
    """
    if not is_random_init(name, pretrained):
        return False
    if random_weights:
        return True
    what = f"{flag} {name}: a built-in architecture without weights would be randomly initialised"
    if random_weights is False:
        from acelora.errors import UserError
        raise UserError(f"{what}; {RANDOM_WEIGHTS_HINT}")
    if name not in _warned_random:
        _warned_random.add(name)
        warnings.warn(f"model {name!r} has no weights: it is randomly initialised (seeded), so its "
                      "outputs mean nothing. Give a weights folder for real use.", UserWarning,
                      stacklevel=3)
    return True


# --- hashes -----------------------------------------------------------------------------------

def tensors_sha256(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over ``(name, tensor)`` pairs in sorted name order (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        data = t.to("cpu").contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_ADAPTER_SUFFIXES = ("lora_A", "lora_B")
_NOT_BASE = ("logit_scale", "logit_bias")


def _canonical_base_tensors(base: torch.nn.Module):
    """The frozen base tensors by their plain open_clip names (see the module docstring)."""
    for name, t in base.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _ADAPTER_SUFFIXES or name in _NOT_BASE or name.startswith(("image_hgnn.", "text_hgnn.")):
            continue
        if ".attention.self.qkv." in name and t.shape[0] % 3 == 0:
            # ACE-LoRA's merged text q/k/v = BERT's query, key, value stacked along the rows.
            prefix = name.split(".qkv.")[0]
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                yield f"{prefix}.{part}.{leaf}", chunk
            continue
        yield name, t


def base_weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the frozen base weights of a base or ACE-LoRA model (LoRA must not be merged)."""
    if getattr(model, "merged", False) is True:
        raise ValueError("hash the base weights before merging LoRA into them")
    base = getattr(model, "base", model)
    return tensors_sha256(_canonical_base_tensors(base))


def adapters_sha256(model: torch.nn.Module) -> str | None:
    """Hash of the adapter tensors of an ACE-LoRA model (None for a model without adapters)."""
    state = getattr(model, "adapter_state_dict", None)
    if not callable(state):
        return None
    return tensors_sha256(state().items())


# --- the record -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source checkout acelora runs from (None when it is not a checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def model_source(name, pretrained=None, random_weights: bool = False) -> str:
    """Where the base weights came from, in words."""
    name = os.fspath(name)
    if random_weights:
        return f"built-in architecture {name!r}, random weights (seeded initialisation)"
    if pretrained is not None:
        return f"built-in architecture {name!r}, weights {os.path.abspath(os.fspath(pretrained))}"
    if name.startswith("hf-hub:"):
        return f"{name} (local Hugging Face cache)"
    path = name[len("local-dir:"):] if name.startswith("local-dir:") else name
    return f"local folder {os.path.abspath(path)}"


def collect(model: torch.nn.Module, name, *, adapters: str | None = None,
            official: str | None = None, preset: str | None = None, random_weights: bool = False,
            pretrained=None) -> dict[str, Any]:
    """The provenance record of ``model`` (built from ``name``; call before merging LoRA)."""
    from acelora import __version__

    record: dict[str, Any] = {
        "model": os.fspath(name),
        "model_source": model_source(name, pretrained, random_weights),
        "random_weights": bool(random_weights),
        "base_weights_sha256": base_weights_sha256(model),
        "adapters": None,
        "preset": preset or getattr(getattr(model, "config", None), "preset", None),
        "acelora_version": __version__,
        "git_commit": git_commit(),
    }
    digest = adapters_sha256(model)
    if adapters or official or digest:
        source = adapters or official
        record["adapters"] = {
            "path": os.path.abspath(os.fspath(source)) if source else None,
            "kind": "official checkpoint" if official else ("folder" if adapters else "fresh (untrained)"),
            "sha256": digest,
        }
    return record


def add_to_report(json_path: str, record: dict[str, Any]) -> str:
    """Put ``record`` under ``"provenance"`` in the JSON report at ``json_path`` (atomically)."""
    import json

    from acelora.outputs import atomic_write_json

    with open(json_path) as f:
        report = json.load(f)
    report["provenance"] = record
    return atomic_write_json(json_path, report)
