"""Chunk files: a keyframe and the following states as XOR deltas, in safetensors.

A chunk `chunk-{first:010d}-{last:010d}.safetensors` holds states first..last (every
`every`-th). Its first state is stored as-is (key `"{t}/{name}"`, the tensor's own dtype),
each later state as the XOR of its bit pattern with the previous state's (same key, a
signed integer dtype of the same width). XOR is exactly invertible, so decoding gives
the recorded bits back; a state whose delta is all zeros (an optimizer step that changed
nothing) stores no tensors at all and is listed only in the metadata.

What a reader trusts is checked before any state is returned (`Chunk.verify`):
- an xxHash3 checksum over every byte of the file but its own 16 digits (header, length prefix, data);
- the metadata's run id equals the manifest's (a chunk from another run is refused);
- the header is byte-for-byte the one this manifest's layout gives for the chunk's steps
  (names, dtypes, shapes, offsets): a manifest that lies about a dtype cannot decode;
- the file's size is exactly header + data.
The file is written whole under a temp name and renamed, so a visible chunk is complete.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from replay.errors import ChunkDamaged
from replay.store.atomic import PLACEHOLDER, check_seal, digest_skipping, write_atomic
from replay.store.layout import StateLayout

CHUNK_FORMAT = {1: "replay-chunk/1", 2: "replay-chunk/2"}
CHUNK_RE = re.compile(r"^chunk-(\d{10})-(\d{10})\.safetensors$")
_CRC_FIELD = re.compile(rb'"xxh3":"([0-9a-f]{16})"\}\} *\Z')
MAX_HEADER = 100_000_000  # safetensors' own limit
MAX_CHUNK_STATES = 1024  # so that a tiny model does not keep thousands of steps in one file


def chunk_name(first: int, last: int) -> str:
    return f"chunk-{first:010d}-{last:010d}.safetensors"


def pad_key(t: int, version: int) -> str:
    """The padding tensor's key. Format 2 uses an empty name, which no parameter can have
    (`register_parameter` refuses it); format 1 used `__pad__`, which one could."""
    return f"{t}/" if version >= 2 else f"{t}/__pad__"


def chunk_header(layout: StateLayout, steps: list[int], stored: list[int], run_id: str, crc: str,
                 version: int = 2, zlen: int | None = None) -> bytes:
    """The exact header bytes (8-byte length prefix + JSON) of a chunk: the writer's and the verifier's.

    `zlen`: a compressed chunk, whose data is one U8 tensor `z` of zlen bytes (see store.compress).
    """
    header: dict = {}
    if zlen is not None:
        header["z"] = {"dtype": "U8", "shape": [zlen], "data_offsets": [0, zlen]}
    for i, t in enumerate(stored if zlen is None else []):
        base = i * layout.nbytes
        for s in layout.packed:
            o = base + layout.offsets[s.name]
            dtype = s.dtype if i == 0 else s.delta_dtype
            header[f"{t}/{s.name}"] = {"dtype": dtype, "shape": list(s.shape), "data_offsets": [o, o + s.nbytes]}
        if layout.pad:
            o = base + layout.data_bytes
            header[pad_key(t, version)] = {"dtype": "U8", "shape": [layout.pad], "data_offsets": [o, o + layout.pad]}
    meta = {"format": CHUNK_FORMAT[version], "encoding": "xor" if zlen is None else "xor-planes-zstd"}
    if version >= 2:
        meta["run"] = run_id
    # the checksum last: see _CRC_FIELD (format 1: CRC-32 of the data only; 2: xxHash3 of every other byte)
    meta.update({"steps": json.dumps(steps), "stored": json.dumps(stored), "crc32" if version == 1 else "xxh3": crc})
    header["__metadata__"] = meta
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # safetensors pads its header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw


def write_chunk(run_dir: Path, layout: StateLayout, steps: list[int], stored: list[int], data: np.ndarray | bytes,
                run_id: str, sync: bool = False, compressed: bool = False) -> Path:
    """Write one chunk. `data` holds len(stored) flat states (keyframe, then deltas), or (`compressed`)
    their `store.compress.compress` bytes."""
    body = memoryview(data).cast("B")
    assert stored and stored[0] == steps[0] and (compressed or body.nbytes == len(stored) * layout.nbytes)
    head = chunk_header(layout, steps, stored, run_id, PLACEHOLDER.decode(), zlen=body.nbytes if compressed else None)
    m = _CRC_FIELD.search(head, 8)
    a, b = m.span(1)
    head = head[:a] + digest_skipping(head, a, b, body).encode() + head[b:]
    path = run_dir / chunk_name(steps[0], steps[-1])
    write_atomic(path, head, body, sync=sync)
    return path


class ChunkBuilder:
    """The open chunk of a recorder: states appended as a keyframe then XOR deltas, in `buf`.

    The encoder side of the format (`Chunk.states` is the decoder): a state whose delta is
    all zeros is listed in `steps` but stores no bytes.
    """

    def __init__(self, layout: StateLayout, buf: np.ndarray):
        self.nbytes, self.buf = layout.nbytes, buf
        self.steps: list[int] = []
        self.stored: list[int] = []
        self.since = time.monotonic()  # when the oldest state arrived (the flush_secs clock)

    def add(self, t: int, cur: np.ndarray, prev: np.ndarray | None) -> None:
        """Append state t (flat bytes `cur`); `prev` is the previous state's bytes (None for a keyframe)."""
        i = len(self.stored)
        slot = self.buf[i * self.nbytes:(i + 1) * self.nbytes]
        if not self.steps:
            np.copyto(slot, cur)
            self.stored.append(t)
            self.since = time.monotonic()
        else:
            np.bitwise_xor(cur, prev, out=slot)
            words = slot.view(np.uint64)
            if words[:8192].any() or words.any():  # a changed state shows it in its first 64 KiB: one short pass
                self.stored.append(t)
        self.steps.append(t)

    def full(self) -> bool:
        return (len(self.stored) + 1) * self.nbytes > self.buf.nbytes or len(self.steps) >= MAX_CHUNK_STATES

    @property
    def data(self) -> np.ndarray:
        return self.buf[: len(self.stored) * self.nbytes]


class Chunk:
    """One chunk file on disk, verified once (on first use) against the run's manifest."""

    def __init__(self, path: Path, every: int, layout: StateLayout, run_id: str, version: int):
        self.path, self.layout, self.run_id, self.version = path, layout, run_id, version
        m = CHUNK_RE.match(path.name)
        assert m, path
        self.first, self.last = int(m.group(1)), int(m.group(2))
        self.steps = list(range(self.first, self.last + 1, every))
        self.stored: list[int] | None = None  # set by verify()
        self.zlen: int | None = None  # compressed chunks: the length of their data (set by verify())

    def says_compressed(self) -> bool:
        """What the header claims, read without verifying (for `replay info`; readers verify first)."""
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                return b'"encoding":"xor-planes-zstd"' in f.read(min(n, MAX_HEADER))
        except (OSError, struct.error):
            return False

    def _damaged(self, why: str) -> ChunkDamaged:
        run = self.path.parent
        return ChunkDamaged(f"{self.path}: {why} — the chunk is damaged (steps {self.first}..{self.last}); "
                            f"run `replay verify {run}`; other chunks are unaffected")

    def verify(self) -> None:
        """Check checksum, identity, header and size; raises ChunkDamaged naming the file."""
        if self.stored is not None:
            return
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 16:
                    raise self._damaged(f"{size} bytes, too short for a chunk (truncated?)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    stored = self._check(mm, size)  # returns, never raises: no view of mm may outlive this
        except OSError as e:
            raise self._damaged(f"unreadable ({e.strerror or e})") from None
        if isinstance(stored, str):
            raise self._damaged(stored)
        self.stored, self.zlen = stored

    def _check(self, buf: mmap.mmap, size: int) -> tuple[list[int], int | None] | str:
        """(the stored states, the compressed data's length or None), or what is wrong with the chunk."""
        (n,) = struct.unpack("<Q", buf[:8])
        if n > min(MAX_HEADER, size - 8):
            return f"header length {n} exceeds the file ({size} bytes; truncated?)"
        if self.version >= 2 and (why := check_seal(buf, _CRC_FIELD, 8 + n)):
            return why
        raw = buf[:8 + n]
        try:
            header = json.loads(raw[8:])
            meta = header["__metadata__"]
            steps, stored = json.loads(meta["steps"]), json.loads(meta["stored"])
            crc = meta["crc32" if self.version == 1 else "xxh3"]
            zlen = header["z"]["shape"][0] if self.version >= 2 and "z" in header else None
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            return f"unreadable header ({type(e).__name__}: {e})"
        if self.version >= 2 and meta.get("run") != self.run_id:
            return f"it belongs to another run (run id {meta.get('run')!r}, this run is {self.run_id})"
        if steps != self.steps:
            return "its steps do not match its file name"
        if not (isinstance(stored, list) and stored and stored[0] == self.first
                and all(isinstance(t, int) for t in stored) and stored == sorted(set(stored))
                and set(stored) <= set(steps)):
            return "its list of stored states is inconsistent"
        if zlen is not None and (not isinstance(zlen, int) or isinstance(zlen, bool) or zlen < 0):
            return "its compressed data length is not a byte count"
        if not isinstance(crc, str) or raw != chunk_header(self.layout, steps, stored, self.run_id, crc, self.version,
                                                           zlen):
            return ("its header does not match the run's manifest (tensor names, dtypes, shapes or offsets differ)")
        expected = 8 + n + (len(stored) * self.layout.nbytes if zlen is None else zlen)
        if size != expected:
            return f"size {size} bytes, expected {expected} (truncated?)"
        if self.version == 1:  # format 1: the CRC-32 covered the data section only
            got = f"{zlib.crc32(memoryview(buf)[8 + n:]):08x}"
            if got != crc:
                return f"checksum mismatch (crc32 {got}, header says {crc})"
        return stored, zlen

    def states(self, start: int | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (t, {name: int-view tensor}) for every state from `start` on.

        The yielded tensors are the decoder's working buffers (bit patterns as integers),
        overwritten by the next iteration: copy what you keep.
        """
        self.verify()
        if self.zlen is not None:
            yield from self._compressed_states(start)
            return
        stored = set(self.stored)
        specs = self.layout.specs
        with safe_open(self.path, framework="pt") as f:
            cur: dict[str, torch.Tensor] = {}
            for i, t in enumerate(self.steps):
                if i == 0:  # keyframe: own dtype, reinterpreted as integers for XOR
                    for s in specs:
                        cur[s.name] = f.get_tensor(f"{t}/{s.name}").view(getattr(torch, _int_name(s.itemsize)))
                elif t in stored:
                    for s in specs:
                        cur[s.name].bitwise_xor_(f.get_tensor(f"{t}/{s.name}"))
                if start is None or t >= start:
                    yield t, cur

    def _compressed_states(self, start: int | None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        from replay.store.compress import decompress

        with open(self.path, "rb") as f:
            f.seek(8 + struct.unpack("<Q", f.read(8))[0])
            z = f.read(self.zlen)
        flat = decompress(z, self.layout, len(self.stored))
        if flat is None:  # the checksum held: written so, by a bug or by hand
            raise self._damaged("its compressed data does not decompress to its states")
        flat, nb, slot = torch.from_numpy(flat), self.layout.nbytes, {t: i for i, t in enumerate(self.stored)}
        cur: dict[str, torch.Tensor] = {}
        for t in self.steps:
            if t in slot:
                views = self.layout.views(flat[slot[t] * nb:(slot[t] + 1) * nb])
                for s in self.layout.specs:
                    bits = views[s.name].view(getattr(torch, _int_name(s.itemsize)))
                    if t == self.first:  # keyframe
                        cur[s.name] = bits.clone()
                    else:
                        cur[s.name].bitwise_xor_(bits)
            if start is None or t >= start:
                yield t, cur


def _int_name(itemsize: int) -> str:
    return {8: "int64", 4: "int32", 2: "int16", 1: "int8"}[itemsize]
