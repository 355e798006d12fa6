"""Claiming a run directory for one Recorder: created if needed, locked, and empty.

The lock (`fcntl.flock` on a hidden file) is released by the kernel when the process dies,
so a killed recorder never leaves a stale lock; two Recorders started at once on one
directory get one clear line instead of racing on the same temp names.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from replay.errors import RecordError
from replay.store.manifest import MANIFEST
from replay.store.run import LOCK


def claim(path: Path) -> tuple[int, bool]:
    """Create (if needed) and lock the run directory; refuse one that holds anything. → (lock fd, created)."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as e:
        raise RecordError(f"{path}: cannot create the run directory ({e.strerror or e}); "
                          f"pass a path to a new directory you can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecordError(f"{path}: another Recorder is recording into it right now; "
                          f"record into a new directory") from None
    if any(p.name != LOCK for p in path.iterdir()):
        os.close(fd)
        what = "already holds a run" if (path / MANIFEST).exists() else "is not an empty directory"
        raise RecordError(f"{path}: {what}; record into a new directory (runs are never overwritten)")
    return fd, created
