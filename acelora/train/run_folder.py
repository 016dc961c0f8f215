"""A training run's folder: who may write it, whether an earlier run in it may be replaced, and
its record ``config.json``.

    output_dir/config.json      the run's settings (flat, loadable with --config), plus
                                "provenance" (model source, base/adapters hashes, version, commit)
                                and "history" (starts, resumes, settings changed on resume)
    output_dir/checkpoints/     last.pt (resumable)
    output_dir/adapters/        the final adapters;   best/: the best epoch's
    output_dir/logs/            steps.csv, epochs.csv, TensorBoard, training.png
    output_dir/.acelora.lock    held (flock) by the live run's main process
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

from acelora.errors import UserError
from acelora.outputs import RunFolderLock, atomic_write_json

log = logging.getLogger("acelora.train")

CONFIG_FILE = "config.json"
# What a run leaves in its folder; any of them means the folder holds a run.
RUN_ENTRIES = (CONFIG_FILE, "checkpoints", "adapters", "best", "logs")
# Keys of config.json that record the run rather than configure it (ignored by --config).
RECORD_KEYS = ("provenance", "history")


def previous_run_entries(folder: str) -> list[str]:
    """The entries of an earlier run present in ``folder``."""
    return [e for e in RUN_ENTRIES if os.path.lexists(os.path.join(folder, e))]


def claim_run_folder(folder: str, resume: str | None = None, overwrite: bool = False) -> RunFolderLock:
    """Lock ``folder`` for this run (main process only) and settle an earlier run in it.

    An earlier run is continued (``resume``), replaced (``overwrite``: its adapters, best/,
    checkpoints, logs and config are removed first, so no stale best/ survives) or, by default,
    refused. Checks that the folder is writable before anything else is done.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: resume continues the run in "
                        "--output-dir, overwrite replaces it")
    lock = RunFolderLock(folder).acquire()
    try:
        entries = previous_run_entries(folder)
        if entries and overwrite:
            for entry in entries:
                path = os.path.join(folder, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            log.info("--overwrite: removed the earlier run in %s (%s)", folder, ", ".join(entries))
        elif entries and not resume:
            shown = ", ".join(e + ("/" if os.path.isdir(os.path.join(folder, e)) else "") for e in entries)
            raise UserError(f"output folder {folder!r} already holds a run ({shown}); continue it "
                            "with --resume auto, replace it with --overwrite, or choose another "
                            "--output-dir")
    except BaseException:
        lock.release()
        raise
    return lock


def read_run_record(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_run_record(folder: str, config: dict[str, Any], provenance: dict[str, Any] | None,
                     event: dict[str, Any]) -> str:
    """Write ``config.json``: ``config`` (flat), ``provenance`` and the history with ``event``
    appended (a fresh start, or a resume and what it changed)."""
    previous = read_run_record(folder)
    history = list(previous.get("history") or []) if event.get("event") != "start" else []
    history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event})
    record = {**config, "provenance": provenance or previous.get("provenance"), "history": history}
    return atomic_write_json(os.path.join(folder, CONFIG_FILE), record, indent=2, sort_keys=True)
