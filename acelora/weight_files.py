"""Weights files checked before loading: a truncated or damaged file is an error that names it
(the loaders' own errors, e.g. safetensors' or torch's zip reader, do not)."""
from __future__ import annotations

import os


def check_weight_file(path: str) -> str:
    """A :class:`~acelora.errors.UserError` naming ``path`` when a weights file is truncated or
    damaged (a .safetensors header/size check; a torch zip's central directory), before loading
    it gives an error that does not name the file."""
    from acelora.errors import UserError

    size = os.path.getsize(path)
    if path.endswith(".safetensors"):
        import json
        import struct

        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if 8 + header_len > size:
                    raise ValueError(f"its header says {header_len} bytes, the file has {size}")
                header = json.loads(f.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                      default=0)
            if 8 + header_len + end > size:
                raise ValueError(f"the tensors need {8 + header_len + end} bytes, the file has {size}")
        except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
            raise UserError(f"{path!r} is truncated or damaged ({exc}); copy it again") from None
        return path
    import zipfile

    with open(path, "rb") as f:
        is_zip_start = f.read(4) == b"PK\x03\x04"
    if is_zip_start:  # torch.save's format; a truncated one has lost its central directory
        try:
            zipfile.ZipFile(path).close()
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"{path!r} is truncated or damaged ({exc}); copy it again") from None
    return path


def check_model_files(model, adapters: str | None = None, official: str | None = None,
                      pretrained: str | None = None) -> None:
    """:func:`check_weight_file` on every weights file a model, adapter folder or checkpoint
    brings (a missing one is left to the loaders, which name it)."""
    files = []
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
    if name is not None:
        folder = name[len("local-dir:"):] if name.startswith("local-dir:") else name
        if os.path.isdir(folder):
            files += [os.path.join(folder, n) for n in ("open_clip_model.safetensors",
                                                         "open_clip_pytorch_model.bin")]
    if adapters:
        files.append(os.path.join(os.fspath(adapters), "adapter_model.safetensors"))
    files += [os.fspath(p) for p in (official, pretrained) if p]
    for path in files:
        if os.path.isfile(path):
            check_weight_file(path)
