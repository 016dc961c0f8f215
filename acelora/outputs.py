"""Writing outputs safely: atomic files, a writability check before any work, OS errors that
name the path, and an advisory lock per run folder.

* Every report, config and checkpoint is written to a temporary file beside its final name,
  flushed to disk, given mode 0644 and moved into place with ``os.replace``: a crash or a full
  disk never leaves a half-written file under the final name.
* ``check_writable`` creates and removes a probe file, so a read-only or missing output folder is
  reported before minutes of training or evaluation, not after.
* ``RunFolderLock`` holds ``fcntl.flock`` on ``<folder>/.acelora.lock`` (which records the holder's
  PID) for as long as a run writes there; a second live run into the same folder is refused with
  the other PID. The kernel drops the lock when its process dies, so a killed run never leaves a
  stale lock behind.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import IO, Any, Callable

from acelora.errors import UserError, os_error_message

FILE_MODE = 0o644
DIR_MODE = 0o755
LOCK_FILE = ".acelora.lock"


def _raise_named(exc: OSError, path: str) -> None:
    """Re-raise an OS error with the path (and advice for a full disk)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        raise UserError(os_error_message(exc, path)) from exc
    raise exc


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> str:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, chmod 0644, then
    ``os.replace`` it onto ``path``. On any error the temporary file is removed and ``path`` is
    untouched; a full disk raises :class:`UserError` naming ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as exc:
        _raise_named(exc, path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            _raise_named(exc, path)
        if isinstance(exc, RuntimeError) and any(k in str(exc) for k in (
                "inline_container", "PytorchStreamWriter", "file write failed")):
            # torch.save reports a full disk as "PytorchStreamWriter failed writing file ..." /
            # "enforce fail at inline_container.cc": name the file and the likely cause.
            raise UserError(f"cannot write {path!r}: {str(exc).splitlines()[0]} (is the disk "
                            "full? free space or choose another output folder)") from exc
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> str:
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def check_writable(folder: str | os.PathLike, flag: str = "--output-dir") -> str:
    """Create ``folder`` if needed and write + remove a probe file in it; a :class:`UserError`
    naming the folder and ``flag`` otherwise. Run it before any long work."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".acelora-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"{flag} {folder!r} is not writable: {exc.strerror or exc}; choose a "
                        "folder you can write to") from exc
    return folder


class RunFolderLock:
    """Advisory exclusive lock on a run folder (``fcntl.flock`` on ``<folder>/.acelora.lock``).

    Re-entrant within one process (the training command and the trainer it drives share it).
    ``acquire`` raises :class:`UserError` naming the PID of the live run that holds it.
    """

    _held: dict[str, list] = {}   # real path of the lock file -> [file object, depth]

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._key: str | None = None

    def acquire(self) -> "RunFolderLock":
        import fcntl

        if self._key is not None:
            return self
        check_writable(self.folder)
        key = os.path.realpath(self.path)
        held = RunFolderLock._held.get(key)
        if held is not None:
            held[1] += 1
            self._key = key
            return self
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            other = f.read().strip() or "unknown"
            f.close()
            raise UserError(f"output folder {self.folder!r} is in use by another acelora run (PID "
                            f"{other}); wait for it to finish or choose another --output-dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        RunFolderLock._held[key] = [f, 1]
        self._key = key
        return self

    def release(self) -> None:
        import fcntl

        if self._key is None:
            return
        key, self._key = self._key, None
        held = RunFolderLock._held.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del RunFolderLock._held[key]
            f = held[0]
            try:
                f.seek(0)
                f.truncate()
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                f.close()

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
