"""Atomic file writes: a crash, a kill or a full disk mid-write never leaves half a file.

    atomic_write(path, lambda f: torch.save(obj, f))      # checkpoint.atomic_save
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))

A write goes to `.<name>.<random>.tmp` beside the target, then is renamed over it. A process
killed with SIGKILL (or a power cut) leaves that temporary file behind: the next atomic_write
of the same target removes such leftovers, and clean_stale_temporaries(folder) removes every
one in a folder (train.py at start). Only files older than STALE_SECONDS go, so a writer still
busy in another process keeps its own.

Imports nothing heavy (the torch-free serving path may use it).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("fileio")

STALE_SECONDS = 60  # a temporary file untouched this long belongs to no running writer


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file in the target's folder, flush it to disk, then
    rename it over `path` (atomic on one filesystem). On any failure the temporary file is
    removed and `path` is left as it was. The file gets the usual mode (umask), not
    mkstemp's private 0600, so that e.g. a container's non-root user can read a model
    copied in by root. Stale temporaries of earlier, killed writes of `path` go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path.parent, name=path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def clean_stale_temporaries(
    folder: str | Path, name: str | None = None, older_than: float = STALE_SECONDS
) -> list[Path]:
    """Remove the temporary files atomic_write left in `folder` (`.<name>.*.tmp`, of any
    target or only of `name`) that were last modified more than `older_than` seconds ago;
    returns what was removed. A missing folder or a file gone meanwhile is not an error."""
    # mkstemp's random part: 8 of [a-z0-9_]
    pattern = re.compile(rf"\.{re.escape(name) if name else '.+'}\.[a-z0-9_]{{8}}\.tmp")
    cutoff, removed = time.time() - older_than, []
    try:
        candidates = [p for p in Path(folder).iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return removed
    for tmp in candidates:
        try:
            if tmp.is_file() and not tmp.is_symlink() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # removed by another process, or not ours to remove
            continue
    if removed:
        log.info("removed %d stale temporary file(s) of interrupted writes in %s: %s",
                 len(removed), folder, ", ".join(p.name for p in removed[:5]))  # fmt: skip
    return removed
