"""Claiming a directory for one writer: a run for one Recorder, an lca dir for one compute.

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

from replay.errors import RecordError, ReplayError
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


def _lock(path: Path, name: str = LOCK) -> filelock.FileLock | None:
    lock = filelock.FileLock(str(path / name), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        return None
    return lock


def claim(path: Path) -> tuple[Claim, bool]:
    """Create (if needed) and lock the run directory; refuse one that holds anything. → (claim, created)."""
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = _lock(path)
    except OSError as e:
        raise RecordError(f"{path}: cannot create the run directory ({e.strerror or e}); "
                          f"pass a path to a new directory you can write") from None
    if lock is None:
        raise RecordError(f"{path}: another Recorder is recording into it right now; record into a new directory")
    if any(p.name != LOCK for p in path.iterdir()):
        lock.release()
        what = "already holds a run" if (path / MANIFEST).exists() else "is not an empty directory"
        raise RecordError(f"{path}: {what}; record into a new directory (runs are never overwritten)")
    return Claim(lock), created


def claim_lca_dir(out: Path, tag: str = "") -> Claim:
    """Lock an lca dir for one compute process (created if needed): a second compute into it gets one line.

    Under torchrun each rank holds its own lock (`tag`, as its files): a second job's rank collides with ours.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock(out, LOCK + tag)
    except OSError as e:
        raise ReplayError(f"{out}: cannot create or lock the lca dir ({e.strerror or e}); pass another --out") from None
    if lock is None:
        raise ReplayError(f"{out}: another `replay compute` is writing into it right now; wait for it to finish, "
                          f"or pass another --out")
    return Claim(lock)


def is_locked(path: Path) -> bool | None:
    """Whether a live writer holds the directory (True/False), or None when it cannot be told (read-only)."""
    if not (path / LOCK).exists():
        return False
    if not os.access(path / LOCK, os.W_OK):
        return None
    try:
        lock = _lock(path)
    except OSError:
        return None
    if lock is None:
        return True
    lock.release()  # held for an instant: a writer starting now finds the directory not empty anyway
    return False
