"""Whole files or nothing, and checksums that cover every byte a reader trusts.

`write_atomic` is the one way this package writes a file that others read (manifest,
chunks, frames, resume state): a hidden temp name, then a rename, so a reader (or a run
killed mid-write) never sees a partial file. `sync=True` also fsyncs the file and its
directory (durable across a power loss); chunks skip it and are synced in batches on the
recorder's `flush_secs` clock, because a killed *process* already gets whole files from
the rename alone.

A sealed JSON document carries its own CRC-32 as 8 hex digits in its last field; the
checksum is taken over every byte of the file except those 8 digits. So a flipped bit
anywhere, the length prefix and the checksum field included, is detected.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

PLACEHOLDER = b"00000000"


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
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crc_skipping(buf: bytes | memoryview, start: int, stop: int, crc: int = 0) -> int:
    """CRC-32 of `buf` without the bytes start..stop (where the checksum itself is written)."""
    view = memoryview(buf)
    return zlib.crc32(view[stop:], zlib.crc32(view[:start], crc))


def seal(doc: bytes, field: re.Pattern) -> bytes:
    """Fill the 8 placeholder digits that `field` (a pattern whose group 1 is them) finds in `doc`."""
    m = field.search(doc)
    assert m is not None and m.group(1) == PLACEHOLDER, "document has no checksum placeholder"
    a, b = m.span(1)
    return doc[:a] + f"{crc_skipping(doc, a, b):08x}".encode() + doc[b:]


def check_seal(doc: bytes | memoryview, field: re.Pattern, limit: int | None = None) -> str | None:
    """None if the checksum field of `doc[:limit]` matches every other byte of `doc`, else what is wrong."""
    head = bytes(doc[:limit]) if limit is not None else bytes(doc)
    m = field.search(head)
    if m is None:
        return "no checksum field"
    a, b = m.span(1)
    got = crc_skipping(doc, a, b)
    if f"{got:08x}" != m.group(1).decode():
        return f"checksum mismatch (crc32 {got:08x}, file says {m.group(1).decode()})"
    return None
