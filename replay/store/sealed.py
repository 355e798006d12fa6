"""Sealed safetensors files: a plain safetensors file whose last metadata field is a checksum of every other byte.

Chunks and batches files are written and checked the same way, here:

- `encode_header(entries, meta)`: the 8-byte length prefix and the JSON header, padded with
  spaces to 8 bytes as safetensors does; `meta["xxh3"]` must be the last field.
- `write_sealed(path, head, body)`: the checksum (xxHash3-64 of prefix, header and body, its
  own 16 digits left out) filled in, then written whole through a temp name.
- `read_header(f, ...)`: only cheap, bounded facts first (the length prefix against the file's
  size and a cap), the JSON parsed defensively (a 100k-deep document is "unreadable", not a
  RecursionError), so that a caller can compare the size the header implies with the real one
  before the (streamed) checksum reads the whole file.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import BinaryIO

from replay.store.atomic import write_atomic
from replay.store.checksum import PLACEHOLDER, blocks, digest_without, mismatch
from replay.store.checksum import seal as seal_digits
from replay.store.files import read_exactly

SEAL_FIELD = re.compile(rb'"xxh3":"([0-9a-f]{16})"\}\} *\Z')  # the seal: last field of the last object
MAX_HEADER = 100_000_000  # safetensors' own limit for a header


def why_not_json(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply for a replay file"
    return "not JSON" if not isinstance(e, UnicodeDecodeError) else "not text"


class Unsealed(Exception):
    """What is wrong with a sealed file, in words (the caller names the file and the remedy)."""


def encode_header(entries: dict, meta: dict) -> bytes:
    """Length prefix + JSON header {entries..., "__metadata__": meta}, padded to 8 bytes."""
    raw = json.dumps({**entries, "__metadata__": meta}, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def seal(head: bytes, *body: bytes | memoryview) -> bytes:
    """The header with its checksum digits filled in: xxHash3 of every byte of head and body but those 16."""
    return seal_digits(head, SEAL_FIELD, *body, pos=8)


def write_sealed(path: Path, head: bytes, *body: bytes | memoryview, sync: bool = False) -> Path:
    """Write head (sealed over head and body) then the body parts, whole or not at all."""
    write_atomic(path, seal(head, *body), *body, sync=sync)
    return path


def read_header(f: BinaryIO, size: int, max_header: int = MAX_HEADER) -> tuple[bytes, dict]:
    """(the header bytes with their length prefix, the parsed header), or Unsealed saying what is wrong."""
    if size < 16:
        raise Unsealed(f"{size} bytes, too short for a safetensors file (truncated?)")
    f.seek(0)
    (n,) = struct.unpack("<Q", read_exactly(f, 8))
    if n > max_header:
        raise Unsealed(f"its length prefix claims a header of {n:,} bytes, over the {max_header:,} any valid file "
                       f"has (a damaged prefix)")
    if n > size - 8:
        raise Unsealed(f"its length prefix claims a header of {n:,} bytes but the file has {size:,} (a damaged "
                       f"prefix, or the file was truncated)")
    raw = read_exactly(f, n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise Unsealed(f"unreadable header ({why_not_json(e)})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise Unsealed("its header is not a safetensors header with metadata")
    return struct.pack("<Q", n) + raw, header


def check_seal(f: BinaryIO, head: bytes, size: int) -> None:
    """Unsealed unless the checksum digits in `head` match every other byte of the file (streamed)."""
    m = SEAL_FIELD.search(head, 8)
    if m is None:
        raise Unsealed("no checksum field")
    a, b = m.span(1)
    got = digest_without(blocks(f, size), (a, b))
    if got != m.group(1).decode():
        raise Unsealed(mismatch(got, m.group(1)))


# ---- sealed JSON documents (a run's manifest, an lca dir's meta and progress) ------------------------

JSON_SEAL = re.compile(rb'"xxh3": "([0-9a-f]{16})"\n\}\n\Z')


def encode_json(doc: dict) -> bytes:
    """`doc` as indented JSON whose last field is the xxHash3 of every other byte (16 hex digits)."""

    body = json.dumps(doc, indent=1)
    assert body.endswith("\n}") and "xxh3" not in doc
    return seal_digits(f'{body[:-2]},\n "xxh3": "{PLACEHOLDER.decode()}"\n}}\n'.encode(), JSON_SEAL)


def read_json(path: Path, max_bytes: int, sealed: bool = True) -> dict:
    """A JSON object from a regular file of at most `max_bytes`, its seal checked; Unsealed (or OSError) if not."""
    from replay.store.atomic import check_seal as check_doc
    from replay.store.files import open_regular, size_of

    with open_regular(path) as f:
        size = size_of(f)
        if size > max_bytes:
            raise Unsealed(f"{size:,} bytes, more than any such file ({max_bytes:,})")
        raw = read_exactly(f, size)
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise Unsealed(why_not_json(e)) from None
    if not isinstance(d, dict):
        raise Unsealed(f"expected a JSON object, got {type(d).__name__}")
    if sealed and (why := check_doc(raw, JSON_SEAL)):
        raise Unsealed(why)
    return d
