"""Errors a user caused and can fix, and how the ``acelora`` command reports any error.

A user error (a missing file, a bad field, a busy or read-only output folder, a full disk, a model
without weights, ...) is printed as one line, ``acelora: error: <what, where, what to do>``, with
exit status 2; ``--debug`` shows the traceback instead. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import errno

# Exit statuses of the command.
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1          # the input was fine but the run could not finish (divergence, OOM)
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Bad input the user can fix; the message names the file/field and what to do."""


class RunFailed(Exception):
    """The run stopped for a reason that is not a bug (divergence, out of memory)."""


# OS errors about the user's files and disks, not about the program.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def os_error_message(exc: OSError, path: str | None = None, action: str = "write") -> str:
    """One sentence for an OS error on ``path``: what happened to which file and what to do."""
    path = path or exc.filename
    where = f" {str(path)!r}" if path else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing{where}: free space or choose another "
                "output folder")
    if exc.errno == errno.EROFS:
        return f"cannot {action}{where}: the file system is read-only; choose another output folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot {action}{where}: permission denied; choose a folder you can write to"
    reason = exc.strerror or str(exc)
    return f"cannot {action}{where}: {reason}"


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of ``exc`` when it is a user error, else None (a bug: traceback)."""
    from acelora.data._common import DataError  # a ValueError, listed for clarity

    if isinstance(exc, (UserError, DataError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        text = str(exc)
        # FileNotFoundError("... 'x' does not exist") from our own checks already reads well;
        # a bare OS error ("[Errno 28] No space left on device") gets the path and the advice.
        if exc.errno is not None and text.startswith("[Errno"):
            return os_error_message(exc, action="open" if exc.errno == errno.ENOENT else "write")
        return text
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return str(exc)
    if isinstance(exc, ValueError):
        return str(exc)
    if type(exc).__name__ == "SafetensorError":  # a truncated or foreign .safetensors file
        return f"cannot read a .safetensors file: {exc} (the file is damaged or truncated)"
    return None


def run_failure_message(exc: BaseException) -> str | None:
    """The one-line message of a run that failed without a bug, else None."""
    if isinstance(exc, (RunFailed, FloatingPointError)):
        return str(exc)
    if type(exc).__name__ == "OutOfMemoryError":
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        return f"{first}. Lower --batch-size (or raise --grad-accum), or use --precision bf16"
    return None


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """``device`` checked before any work: a valid torch device that exists on this machine."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{flag} {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {device}: no CUDA device is available on this machine "
                            "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif parsed.type not in ("cpu", "mps", "xpu", "meta"):
        raise UserError(f"{flag} {device!r}: unsupported device type; use cpu or cuda")
    return device
