"""The one checksum rule of every file replay writes: xxHash3-64 of every byte but its own 16 digits.

A sealed file (a chunk's or a batches file's safetensors header, a manifest, an lca dir's meta and
progress) carries, as 16 hex digits in a field of its own, the xxHash3 of every other byte of the
file. So a flipped bit anywhere, the length prefix and the checksum field included, is detected.
`seal` fills the digits (written as PLACEHOLDER first), `digest_without` computes them over bytes
in memory or streamed from a file in fixed blocks (memory never follows a file's size), and
`mismatch` is the line when they disagree. xxHash3 rather than CRC-32: ~45 GB/s on one core here
against zlib's CRC-32 at ~5 GB/s, and the recorder checksums every state it writes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import BinaryIO

import xxhash

PLACEHOLDER = b"0" * 16
BLOCK = 8 << 20  # bytes per read when a file is checksummed: memory does not follow the file


def digest_without(parts: Iterable[bytes | memoryview], skip: tuple[int, int]) -> str:
    """xxHash3-64 (hex) of the concatenated `parts` without the bytes skip[0]..skip[1] (the digits)."""
    h = xxhash.xxh3_64()
    pos = 0
    for part in parts:
        view = memoryview(part)
        n = len(view)
        a, b = max(skip[0] - pos, 0), min(skip[1] - pos, n)
        if a < b:  # the checksum's own digits fall in this part
            h.update(view[:a])
            h.update(view[b:])
        else:
            h.update(view)
        pos += n
    return h.hexdigest()


def blocks(f: BinaryIO, size: int) -> Iterable[memoryview]:
    """The first `size` bytes of `f` in BLOCK-sized reads into one reused buffer."""
    f.seek(0)
    view = memoryview(bytearray(min(BLOCK, max(size, 1))))  # (a small file: a small buffer; 8 MiB zeroed cost ~1 ms)
    pos = 0
    while pos < size:
        n = f.readinto(view[:min(BLOCK, size - pos)])
        if not n:
            return
        yield view[:n]
        pos += n


def seal(doc: bytes, field: re.Pattern, *more: bytes | memoryview, pos: int = 0) -> bytes:
    """`doc` with the 16 placeholder digits that `field` (group 1) finds from `pos` filled in: the checksum of
    doc and `more` (the bytes that follow it in the file) but those digits."""
    m = field.search(doc, pos)
    assert m is not None and m.group(1) == PLACEHOLDER, "document has no checksum placeholder"
    a, b = m.span(1)
    return doc[:a] + digest_without([doc, *more], (a, b)).encode() + doc[b:]


def mismatch(got: str, said: bytes) -> str:
    return f"checksum mismatch (xxh3 {got}, file says {said.decode()})"
