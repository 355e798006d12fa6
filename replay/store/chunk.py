"""Chunk files: a keyframe and the following states as XOR deltas, in safetensors.

A chunk `chunk-{first:010d}-{last:010d}.safetensors` holds states first..last (every
`every`-th). Its first state is stored as-is, each later state as the XOR of its bit
pattern with the previous state's; XOR is exactly invertible, so decoding gives the
recorded bits back. A state whose delta is all zeros (an optimizer step that changed
nothing) stores no bytes and is listed only in the metadata (`steps` all, `stored` those
with bytes). The data section is always the stored flat states back to back (see
`store.layout`), whatever the encoding, which only changes how the header names them:

- `xor`: one tensor per state and parameter, key `"{t}/{name}"`, the keyframe in the
  tensor's own dtype and the deltas as signed integers of its width; plain safetensors
  tools read it by name.
- `xor-flat`: one U8 tensor `"{t}"` per state. For models of many small tensors, whose
  per-tensor header would be larger than their data (5,000 scalars: 300 KB of header for
  20 KB of state) and would make every read O(tensors × states) in Python.
- `xor-planes-zstd`: one U8 tensor `z`, the deltas grouped by byte plane and zstd-compressed
  (see `store.compress`).

A writer never writes what the reader refuses: a chunk holds at most `chunk_capacity` states
(what its buffer fits, MAX_CHUNK_STATES, and what keeps its header under HEADER_CAP).

What a reader trusts is checked before any state is returned (`Chunk.verify`), cheap
facts first so that nothing a damaged file claims sizes the work: a regular file
(`store.files`), its name's step count, the length prefix against the size, the size the
header implies against the real one; then the xxHash3 checksum over every other byte of
the file (streamed), the run id, and last the header byte for byte as this manifest's
layout gives it for the chunk's steps (names, dtypes, shapes, offsets).
"""

from __future__ import annotations

import json
import re
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from replay.errors import ChunkDamaged
from replay.store.checksum import PLACEHOLDER
from replay.store.files import open_regular, size_of, why_unreadable
from replay.store.layout import StateLayout
from replay.store.sealed import Unsealed, check_seal, encode_header, read_header, write_sealed

CHUNK_FORMAT = {1: "replay-chunk/1", 2: "replay-chunk/2"}
CHUNK_RE = re.compile(r"^chunk-(\d{10})-(\d{10})\.safetensors$")
ENCODINGS = ("xor", "xor-flat", "xor-planes-zstd")
MAX_CHUNK_STATES = 1024  # so that a tiny model does not keep thousands of steps in one file
HEADER_CAP = 16 << 20  # a writer closes a chunk before its header passes this (readers accept up to 100 MB)
# per-tensor headers are kept unless one state's entries pass both FLAT_HEADER (~1,000 tensors) and this share
# of the state's bytes: then writing and verifying them (O(tensors) JSON per state) would cost more than the data
FLAT_HEADER, FLAT_SHARE = 64 << 10, 1 / 16


def chunk_name(first: int, last: int) -> str:
    return f"chunk-{first:010d}-{last:010d}.safetensors"


def pad_key(t: int, version: int) -> str:
    """The padding tensor's key. Format 2 uses an empty name, which no parameter can have
    (`register_parameter` refuses it); format 1 used `__pad__`, which one could."""
    return f"{t}/" if version >= 2 else f"{t}/__pad__"


def _entries_xor(layout: StateLayout, stored: list[int], version: int) -> dict:
    entries: dict = {}
    for i, t in enumerate(stored):
        base = i * layout.nbytes
        for s in layout.packed:
            o = base + layout.offsets[s.name]
            dtype = s.dtype if i == 0 else s.delta_dtype
            entries[f"{t}/{s.name}"] = {"dtype": dtype, "shape": list(s.shape), "data_offsets": [o, o + s.nbytes]}
        if layout.pad:
            o = base + layout.data_bytes
            entries[pad_key(t, version)] = {"dtype": "U8", "shape": [layout.pad], "data_offsets": [o, o + layout.pad]}
    return entries


def chunk_header(layout: StateLayout, steps: list[int], stored: list[int], run_id: str, digest: str,
                 version: int = 2, zlen: int | None = None, encoding: str | None = None) -> bytes:
    """The exact header bytes (8-byte length prefix + JSON) of a chunk: the writer's and the verifier's.

    `encoding` None: the layout's own (`default_encoding`), or the compressed one when `zlen`
    (the length of the compressed data, one U8 tensor `z`) is given.
    """
    encoding = encoding or ("xor-planes-zstd" if zlen is not None else default_encoding(layout))
    nb = layout.nbytes
    if encoding == "xor-planes-zstd":
        entries = {"z": {"dtype": "U8", "shape": [zlen], "data_offsets": [0, zlen]}}
    elif encoding == "xor-flat":
        entries = {str(t): {"dtype": "U8", "shape": [nb], "data_offsets": [i * nb, (i + 1) * nb]}
                   for i, t in enumerate(stored)}
    else:
        entries = _entries_xor(layout, stored, version)
    meta = {"format": CHUNK_FORMAT[version], "encoding": encoding}
    if version >= 2:
        meta["run"] = run_id
    # the checksum last (store.sealed; format 1: CRC-32 of the data only; 2: xxHash3 of every other byte)
    meta.update({"steps": json.dumps(steps), "stored": json.dumps(stored), "crc32" if version == 1 else "xxh3": digest})
    return encode_header(entries, meta)


def _state_header_bytes(layout: StateLayout) -> int:
    """An upper bound of the bytes one stored state adds to a per-tensor header (10-digit step, 19-digit offsets)."""
    one = len(json.dumps(_entries_xor(layout, [0], 2), separators=(",", ":")))
    digits = 9 + 2 * 18  # the step's 10 digits (one counted) and two offsets of up to 19 digits (one each counted)
    return one + (len(layout.packed) + 1) * digits + 1


def default_encoding(layout: StateLayout) -> str:
    """Per-tensor keys, unless their header would outweigh the data (thousands of tiny tensors)."""
    per_state = _header_bytes_cache(layout)
    return "xor-flat" if per_state > max(FLAT_HEADER, FLAT_SHARE * layout.nbytes) else "xor"


_HEADER_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layout -> header bytes per state


def _header_bytes_cache(layout: StateLayout) -> int:
    """Computed once per layout (a model of a million tensors takes seconds), kept while the layout lives."""
    if (cached := _HEADER_BYTES.get(layout)) is None:
        cached = _HEADER_BYTES[layout] = _state_header_bytes(layout)
    return cached


def write_chunk(run_dir: Path, layout: StateLayout, steps: list[int], stored: list[int],
                data: np.ndarray | bytes | list, run_id: str, sync: bool = False, compressed: bool = False) -> Path:
    """Write one chunk. `data` holds len(stored) flat states (keyframe, then deltas; one buffer, or a list of
    them, one per state), or (`compressed`) their `store.compress.compress` bytes."""
    parts = [memoryview(d).cast("B") for d in (data if isinstance(data, list) else [data])]
    size = sum(p.nbytes for p in parts)
    assert stored and stored[0] == steps[0] and (compressed or size == len(stored) * layout.nbytes)
    head = chunk_header(layout, steps, stored, run_id, PLACEHOLDER.decode(), zlen=size if compressed else None)
    return write_sealed(run_dir / chunk_name(steps[0], steps[-1]), head, *parts, sync=sync)


def _data_end(header: dict) -> int:
    """The end of the data section as the header's own offsets give it (the file's size must follow)."""
    end = 0
    for k, e in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = e["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise Unsealed(f"unreadable header (entry {k[:40]!r}: {type(err).__name__})") from None
        if type(b) is not int or type(a) is not int or not 0 <= a <= b:
            raise Unsealed(f"unreadable header (entry {k[:40]!r} has bad offsets)")
        end = max(end, b)
    return end


def chunk_capacity(layout: StateLayout, buf_bytes: int) -> int:
    """The most states one chunk of a recorder holds: what its buffer fits, MAX_CHUNK_STATES, and what keeps
    its header under HEADER_CAP (every state may be stored; each lists its step twice in the metadata)."""
    per_state = (_header_bytes_cache(layout) if default_encoding(layout) == "xor" else 48) + 2 * 12
    return max(1, min(buf_bytes // layout.nbytes, MAX_CHUNK_STATES, (HEADER_CAP - 4096) // per_state))


class Chunk:
    """One chunk file on disk, verified once (on first use) against the run's manifest.

    A name that claims more than MAX_CHUNK_STATES states is damaged on its face (no writer
    makes one): `steps` is then empty and `verify` names it, without building the claim.
    """

    def __init__(self, path: Path, every: int, layout: StateLayout, run_id: str, version: int):
        self.path, self.layout, self.run_id, self.version = path, layout, run_id, version
        m = CHUNK_RE.match(path.name)
        assert m, path
        self.first, self.last = int(m.group(1)), int(m.group(2))
        count = (self.last - self.first) // every + 1 if self.last >= self.first else 0
        self.claim_ok = 0 < count <= MAX_CHUNK_STATES and (self.last - self.first) % every == 0
        self.steps = list(range(self.first, self.last + 1, every)) if self.claim_ok else []
        self.stored: list[int] | None = None  # set by verify()
        self.zlen: int | None = None  # compressed chunks: the length of their data (set by verify())
        self.data_start = 0  # offset of the data section (set by verify())

    def says_compressed(self) -> bool:
        """What the header claims, read without verifying (for `replay info`; readers verify first)."""
        try:
            with open_regular(self.path) as f:
                head, _ = read_header(f, size_of(f))
                return b'"encoding":"xor-planes-zstd"' in head
        except (OSError, Unsealed):
            return False

    def _damaged(self, why: str, hint: bool = True) -> ChunkDamaged:
        more = f"; `replay verify {self.path.parent}` lists every damaged chunk" if hint else ""
        return ChunkDamaged(f"{self.path}: {why} — the chunk is damaged (steps {self.first}..{self.last}); the other "
                            f"chunks are unaffected{more}")

    def verify(self, hint: bool = True) -> None:
        """Check cheap facts, size, checksum, identity and header; raises ChunkDamaged naming the file
        (and, with `hint`, how to list the others: verify itself passes False)."""
        if self.stored is not None:
            return
        if not self.claim_ok:
            raise self._damaged(f"its name claims states {self.first}..{self.last}, which no chunk of this run can "
                                f"hold (at most {MAX_CHUNK_STATES} states)", hint)
        try:
            with open_regular(self.path) as f:
                size = size_of(f)
                result = self._check(f, size)
        except OSError as e:
            raise self._damaged(why_unreadable(e), hint) from None
        except Unsealed as e:
            raise self._damaged(str(e), hint) from None
        self.stored, self.zlen, self.data_start = result

    def _check(self, f: object, size: int) -> tuple[list[int], int | None, int]:
        """(the stored states, the compressed data's length or None, the data offset); Unsealed if damaged."""
        head, header = read_header(f, size)
        meta = header["__metadata__"]
        try:
            steps, stored = json.loads(meta["steps"]), json.loads(meta["stored"])
            digest = meta["crc32" if self.version == 1 else "xxh3"]
            encoding = meta.get("encoding", "xor")
            zlen = header["z"]["shape"][0] if self.version >= 2 and "z" in header else None
        except (ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
            raise Unsealed(f"unreadable header ({type(e).__name__}: {e})") from None
        if steps != self.steps:
            raise Unsealed("its steps do not match its file name")
        if not (isinstance(stored, list) and stored and stored[0] == self.first
                and all(type(t) is int for t in stored) and stored == sorted(set(stored))
                and set(stored) <= set(steps)):
            raise Unsealed("its list of stored states is inconsistent")
        if zlen is not None and type(zlen) is not int or (zlen or 0) < 0 or encoding not in ENCODINGS:
            raise Unsealed("its encoding or compressed data length is not one replay writes")
        expected = len(head) + _data_end(header)
        if size != expected:  # before the checksum reads every byte: a sparse 16 GB file costs nothing
            raise Unsealed(f"size {size:,} bytes, but its header describes {expected:,} (truncated, or a damaged "
                           f"header)")
        if self.version >= 2:
            check_seal(f, head, size)
            if meta.get("run") != self.run_id:
                raise Unsealed(f"it belongs to another run (run id {meta.get('run')!r}, this run is {self.run_id})")
        per_state = len(self.layout.packed) + (1 if self.layout.pad else 0)
        entries = {"xor": len(stored) * per_state, "xor-flat": len(stored), "xor-planes-zstd": 1}[encoding]
        if not isinstance(digest, str) or len(header) - 1 != entries or head != chunk_header(
                self.layout, steps, stored, self.run_id, digest, self.version, zlen, encoding):  # count first: cheap
            raise Unsealed("its header does not match the run's manifest (tensor names, dtypes, shapes or offsets "
                           "differ)")
        if self.version == 1:  # format 1: the CRC-32 covered the data section only
            f.seek(len(head))
            crc = 0
            while block := f.read(8 << 20):
                crc = zlib.crc32(block, crc)
            if f"{crc:08x}" != digest:
                raise Unsealed(f"checksum mismatch (crc32 {crc:08x}, header says {digest})")
        return stored, zlen, len(head)

    def flat_states(self, start: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (t, flat uint8 state [nbytes]) for every state from `start` on: one read and one XOR per stored
        state, whatever the number of tensors.

        The yielded tensor is the decoder's working buffer, overwritten by the next iteration:
        copy what you keep. Memory: two states (compressed chunks: the chunk's states).
        """
        self.verify()
        nb = self.layout.nbytes
        data = self._decompressed() if self.zlen is not None else None
        slot = {t: i for i, t in enumerate(self.stored)}
        cur, delta = np.empty(nb, dtype=np.uint8), np.empty(nb, dtype=np.uint8)
        out = torch.from_numpy(cur)
        with open_regular(self.path) as f:
            for t in self.steps:
                i = slot.get(t)
                if i is not None:
                    if data is not None:
                        block = data[i * nb:(i + 1) * nb]
                    else:
                        f.seek(self.data_start + i * nb)
                        if f.readinto(memoryview(delta)) != nb:
                            raise self._damaged("it ended early while it was read (changed since it was verified?)")
                        block = delta
                    if i == 0:  # keyframe
                        np.copyto(cur, block)
                    else:
                        np.bitwise_xor(cur.view(np.uint64), block.view(np.uint64), out=cur.view(np.uint64))
                if start is None or t >= start:
                    yield t, out

    def _decompressed(self) -> np.ndarray:
        from replay.store.compress import decompress

        with open_regular(self.path) as f:
            f.seek(self.data_start)
            z = f.read(self.zlen)
        flat = decompress(z, self.layout, len(self.stored))
        if flat is None:  # the checksum held: written so, by a bug or by hand
            raise self._damaged("its compressed data does not decompress to its states")
        return flat
