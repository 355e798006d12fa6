"""Opening what a directory claims is a file: regular files only, never blocking, size known first.

A run or lca dir comes from anywhere. A FIFO named like a chunk blocks a plain `open()` for
ever, a symlink to /dev/zero reads without end, a dangling link or a directory raises in the
middle of a listing, and a sparse 40 GB file read whole exhausts memory. Every reader of this
package opens through `open_regular` (non-blocking, then `fstat`: a regular file or one line
saying what it is instead) and checks the size against what a valid file can have before
reading, and checksums are streamed in fixed blocks (`store.checksum`), so memory never follows
what a file claims.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

BLOCK = 8 << 20  # streamed checksums read this much at a time: memory does not follow the file


class NotRegular(OSError):
    """The path is not a regular file (a FIFO, a device, a directory, a dangling link)."""


def _what(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path) -> BinaryIO:
    """Open `path` for reading if it is a regular file (symlinks followed); else raise NotRegular saying what it is.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer); the
    flag is cleared again for a regular file, where it means nothing anyway.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise NotRegular(errno.ENOENT, "a dangling symbolic link", str(path)) from None
        raise
    except IsADirectoryError:
        raise NotRegular(errno.EISDIR, "a directory", str(path)) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(errno.EINVAL, _what(mode), str(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def why_unreadable(e: OSError) -> str:
    """Words for an error of `open_regular` or a read: what the path is, or the OS's reason."""
    if isinstance(e, NotRegular):
        return f"it is {e.strerror}, not a regular file"
    return f"unreadable ({e.strerror or e})"


def size_of(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def read_exactly(f: BinaryIO, n: int) -> bytes:
    """n bytes from the current position, or fewer at the end of the file."""
    chunks, left = [], n
    while left > 0:
        b = f.read(min(left, BLOCK))
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def regular_size(path: Path) -> int | None:
    """The size of a regular file, or None for anything else (missing, a link to nowhere, a FIFO...)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def holds_replay_files(d: Path) -> bool:
    """Whether `d` holds a run's or an lca dir's own files (manifest.json, meta.json, progress.json): nothing
    else may be written there."""
    return any((d / n).exists() for n in ("manifest.json", "meta.json", "progress.json"))
