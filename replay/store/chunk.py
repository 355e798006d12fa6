"""Chunk files: a keyframe and the following states as XOR deltas, in safetensors.

A chunk `chunk-{first:010d}-{last:010d}.safetensors` holds states first..last (every
`every`-th). Its first state is stored as-is (key `"{t}/{name}"`, the tensor's own dtype),
each later state as the XOR of its bit pattern with the previous state's (same key, a
signed integer dtype of the same width). XOR is exactly invertible, so decoding gives
the recorded bits back; a state whose delta is all zeros (an optimizer step that changed
nothing) stores no tensors at all and is listed only in the metadata. A CRC-32 of the
data section sits in the metadata; the file is written whole under a temp name and
renamed, so a visible chunk is always complete.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from replay.errors import ChunkDamaged
from replay.store.layout import StateLayout
from replay.store.manifest import write_atomic

CHUNK_FORMAT = "replay-chunk/1"
CHUNK_RE = re.compile(r"^chunk-(\d{10})-(\d{10})\.safetensors$")


def chunk_name(first: int, last: int) -> str:
    return f"chunk-{first:010d}-{last:010d}.safetensors"


def write_chunk(run_dir: Path, layout: StateLayout, steps: list[int], stored: list[int], data: np.ndarray) -> Path:
    """Write one chunk. `data` holds len(stored) flat states (keyframe, then deltas)."""
    assert stored and stored[0] == steps[0] and data.nbytes == len(stored) * layout.nbytes
    header: dict = {}
    for i, t in enumerate(stored):
        base = i * layout.nbytes
        for s in layout.packed:
            o = base + layout.offsets[s.name]
            dtype = s.dtype if i == 0 else s.delta_dtype
            header[f"{t}/{s.name}"] = {"dtype": dtype, "shape": list(s.shape), "data_offsets": [o, o + s.nbytes]}
        if layout.pad:
            o = base + layout.data_bytes
            header[f"{t}/__pad__"] = {"dtype": "U8", "shape": [layout.pad], "data_offsets": [o, o + layout.pad]}
    header["__metadata__"] = {
        "format": CHUNK_FORMAT,
        "encoding": "xor",
        "steps": json.dumps(steps),
        "stored": json.dumps(stored),
        "crc32": f"{zlib.crc32(data):08x}",
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)  # safetensors pads its header to 8 bytes with spaces
    path = run_dir / chunk_name(steps[0], steps[-1])
    write_atomic(path, struct.pack("<Q", len(raw)) + raw, memoryview(data).cast("B"))
    return path


class Chunk:
    """One chunk file on disk; headers and checksums are read lazily and cached."""

    def __init__(self, path: Path, every: int):
        self.path = path
        m = CHUNK_RE.match(path.name)
        assert m, path
        self.first, self.last = int(m.group(1)), int(m.group(2))
        self.steps = list(range(self.first, self.last + 1, every))
        self._meta: dict | None = None
        self._verified = False

    def _damaged(self, why: str) -> ChunkDamaged:
        run = self.path.parent
        return ChunkDamaged(f"{self.path}: {why} — the chunk is damaged (steps {self.first}..{self.last}); "
                            f"run `replay verify {run}`; other chunks are unaffected")

    def metadata(self) -> dict:
        """Parse the safetensors header ourselves: cheap, and a bad one gets a clear error."""
        if self._meta is None:
            try:
                with open(self.path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    if n > 100_000_000:
                        raise ValueError("header length out of range")
                    header = json.loads(f.read(n))
                meta = header["__metadata__"]
                steps, stored = json.loads(meta["steps"]), json.loads(meta["stored"])
            except (OSError, ValueError, KeyError, struct.error) as e:
                raise self._damaged(f"unreadable header ({e})") from None
            if meta.get("format") != CHUNK_FORMAT or steps != self.steps:
                raise self._damaged("header does not match its file name")
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            self._meta = {"steps": steps, "stored": stored, "crc32": meta["crc32"],
                          "header_bytes": 8 + n, "data_bytes": max(ends, default=0)}
        return self._meta

    def verify(self) -> None:
        """Check size and CRC-32 of the data section; raises ChunkDamaged naming the file."""
        if self._verified:
            return
        meta = self.metadata()
        size = self.path.stat().st_size
        expected = meta["header_bytes"] + meta["data_bytes"]
        if size != expected:
            raise self._damaged(f"size {size} bytes, expected {expected} (truncated?)")
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            crc = zlib.crc32(memoryview(mm)[meta["header_bytes"]:])
        if f"{crc:08x}" != meta["crc32"]:
            raise self._damaged(f"checksum mismatch (crc32 {crc:08x}, header says {meta['crc32']})")
        self._verified = True

    def states(self, layout: StateLayout, start: int | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (t, {name: int-view tensor}) for every state from `start` on.

        The yielded tensors are the decoder's working buffers (bit patterns as integers),
        overwritten by the next iteration: copy what you keep.
        """
        self.verify()
        meta = self.metadata()
        stored = set(meta["stored"])
        names = [s.name for s in layout.specs]
        with safe_open(self.path, framework="pt") as f:
            cur: dict[str, torch.Tensor] = {}
            for i, t in enumerate(self.steps):
                if i == 0:  # keyframe: own dtype, reinterpreted as integers for XOR
                    for s in layout.specs:
                        cur[s.name] = f.get_tensor(f"{t}/{s.name}").view(getattr(torch, _int_name(s.itemsize)))
                elif t in stored:
                    for n in names:
                        cur[n].bitwise_xor_(f.get_tensor(f"{t}/{n}"))
                if start is None or t >= start:
                    yield t, cur


def _int_name(itemsize: int) -> str:
    return {8: "int64", 4: "int32", 2: "int16", 1: "int8"}[itemsize]


def list_chunks(run_dir: Path, every: int) -> list[Chunk]:
    return sorted((Chunk(p, every) for p in run_dir.iterdir() if CHUNK_RE.match(p.name)), key=lambda c: c.first)
