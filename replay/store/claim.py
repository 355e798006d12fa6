"""Claiming a directory for one writer: a run for one Recorder (an lca dir's claim is `lcadir.claim_lca_dir`).

The lock (`filelock`: `flock` on POSIX, a locked byte on Windows) is released by the kernel
when the process dies, so a killed writer never leaves a stale lock; two writers started at
once on one directory get one clear line instead of racing on the same temp names. Readers
ask `is_locked` to tell a live directory (its newest temp file is being written) from one a
crash left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from replay.errors import RecordError
from replay.store.manifest import MANIFEST

LOCK = ".replay.lock"


class Claim:
    """A held directory lock (release it with `release()`; the kernel does on exit)."""

    def __init__(self, lock: filelock.FileLock):
        self._lock = lock

    def release(self) -> None:
        self._lock.release()
        try:
            Path(self._lock.lock_file).unlink(missing_ok=True)
        except OSError:
            pass


def lock(path: Path, name: str = LOCK) -> filelock.FileLock | None:
    """The lock file `name` of `path`, acquired now, or None when another process holds it."""
    held = filelock.FileLock(str(path / name), timeout=0)
    try:
        held.acquire()
    except filelock.Timeout:
        return None
    return held


def claim(path: Path) -> tuple[Claim, bool]:
    """Create (if needed) and lock the run directory; refuse one that holds anything. → (claim, created)."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        held = lock(path)
    except OSError as e:
        raise RecordError(f"{path}: cannot create the run directory ({e.strerror or e}); "
                          f"pass a path to a new directory you can write") from None
    if held is None:
        raise RecordError(f"{path}: another Recorder is recording into it right now; record into a new directory")
    if any(p.name != LOCK for p in path.iterdir()):
        held.release()
        what = "already holds a run" if (path / MANIFEST).exists() else "is not an empty directory"
        raise RecordError(f"{path}: {what}; record into a new directory (runs are never overwritten)")
    return Claim(held), created


def is_locked(path: Path) -> bool | None:
    """Whether a live writer holds the directory (True/False), or None when it cannot be told (read-only)."""
    if not (path / LOCK).exists():
        return False
    if not os.access(path / LOCK, os.W_OK):
        return None
    try:
        held = lock(path)
    except OSError:
        return None
    if held is None:
        return True
    held.release()  # held for an instant: a writer starting now finds the directory not empty anyway
    return False
