"""Whole files or nothing, and checksums that cover every byte a reader trusts.

`write_atomic` is the one way this package writes a file that others read (manifest,
chunks, frames, resume state): a hidden temp name, then a rename, so a reader (or a run
killed mid-write) never sees a partial file. `sync=True` also fsyncs the file and its
directory (durable across a power loss); chunks skip it and are synced in batches on the
recorder's `flush_secs` clock, because a killed *process* already gets whole files from
the rename alone.

A sealed JSON document carries its own checksum in its last field (`store.checksum`: the
xxHash3 of every byte but its own 16 digits); `check_seal` checks one in memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from replay.store.checksum import digest_without, mismatch


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def is_tmp(name: str) -> bool:
    """A temp file left by an interrupted `write_atomic` (never part of what readers see)."""
    return name.startswith(".") and name.endswith(".tmp")


def write_atomic(path: Path, *parts: bytes | memoryview, sync: bool = True) -> None:
    """Write `parts` to `path` through a hidden temp name and a rename."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            for p in parts:
                f.write(p)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file (its data), or a directory (the renames inside it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_seal(doc: bytes | memoryview, field: re.Pattern, limit: int | None = None) -> str | None:
    """None if the checksum field of `doc[:limit]` matches every other byte of `doc`, else what is wrong."""
    head = bytes(doc[:limit]) if limit is not None else bytes(doc)
    m = field.search(head)
    if m is None:
        return "no checksum field"
    a, b = m.span(1)
    got = digest_without([doc], (a, b))
    if got != m.group(1).decode():
        return mismatch(got, m.group(1))
    return None
