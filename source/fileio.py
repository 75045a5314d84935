"""Atomic file writes: a crash, a kill or a full disk mid-write never leaves half a file.

    atomic_write(path, lambda f: torch.save(obj, f))      # checkpoint.atomic_save
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))

Imports nothing heavy (the torch-free serving path may use it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temporary file in the target's folder, flush it to disk, then
    rename it over `path` (atomic on one filesystem). On any failure the temporary file is
    removed and `path` is left as it was. The file gets the usual mode (umask), not
    mkstemp's private 0600, so that e.g. a container's non-root user can read a model
    copied in by root."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
