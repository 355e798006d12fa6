"""The training batch of every step: which examples each update learned from (`Recorder.log_batch`).

A file `batches-{first:010d}-{last:010d}.safetensors` holds the updates first..last that logged
ids (step t is the update from state t to t+1, the numbering of the LCA frames): int64 tensors
`steps` [k], `counts` [k] (ids per step) and `ids` [Σ counts]. Like a chunk it is plain
safetensors, carries the run's id, and is sealed by an xxHash3 of every other byte; its header
must be exactly the one its sizes give. It is written right after the chunk that holds the
updates' end states, so a crash keeps the batches of every flushed step.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import polars as pl

from replay.errors import ChunkDamaged
from replay.store.atomic import PLACEHOLDER, check_seal, digest_skipping, write_atomic

BATCHES_FORMAT = "replay-batches/1"
BATCHES_RE = re.compile(r"^batches-(\d{10})-(\d{10})\.safetensors$")
_SEAL = re.compile(rb'"xxh3":"([0-9a-f]{16})"\}\} *\Z')
NAMES = ("steps", "counts", "ids")


def _header(k: int, m: int, run_id: str, digest: str) -> bytes:
    header, offset = {}, 0
    for name, n in zip(NAMES, (k, k, m), strict=True):
        header[name] = {"dtype": "I64", "shape": [n], "data_offsets": [offset, offset + 8 * n]}
        offset += 8 * n
    header["__metadata__"] = {"format": BATCHES_FORMAT, "run": run_id, "xxh3": digest}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_batches(run_dir: Path, rows: list[tuple[int, np.ndarray]], run_id: str, sync: bool = False) -> Path:
    """Write the (step, ids) rows (steps increasing) as one sealed file."""
    steps = np.array([t for t, _ in rows], dtype=np.int64)
    counts = np.array([len(ids) for _, ids in rows], dtype=np.int64)
    ids = np.concatenate([i for _, i in rows]).astype(np.int64, copy=False) if rows else np.zeros(0, np.int64)
    data = b"".join(a.tobytes() for a in (steps, counts, ids))
    head = _header(len(steps), len(ids), run_id, PLACEHOLDER.decode())
    a, b = _SEAL.search(head, 8).span(1)
    head = head[:a] + digest_skipping(head, a, b, data).encode() + head[b:]
    path = run_dir / f"batches-{int(steps[0]):010d}-{int(steps[-1]):010d}.safetensors"
    write_atomic(path, head, data, sync=sync)
    return path


def _check(path: Path, raw: bytes, run_id: str) -> list[np.ndarray] | str:
    """(steps, counts, ids), or what is wrong with the file."""
    if len(raw) < 16:
        return f"{len(raw)} bytes, too short"
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        return f"header length {n} exceeds the file ({len(raw)} bytes; truncated?)"
    if why := check_seal(raw, _SEAL, 8 + n):
        return why
    try:
        header = json.loads(raw[8:8 + n])
        meta = header["__metadata__"]
        k, m = header["steps"]["shape"][0], header["ids"]["shape"][0]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({type(e).__name__}: {e})"
    if meta.get("run") != run_id:
        return f"it belongs to another run (run id {meta.get('run')!r}, this run is {run_id})"
    if not (isinstance(k, int) and isinstance(m, int)) or raw[:8 + n] != _header(k, m, run_id, meta["xxh3"]):
        return "its header is not a batches header"
    if len(raw) != 8 + n + 8 * (2 * k + m):
        return f"size {len(raw)} bytes, expected {8 + n + 8 * (2 * k + m)} (truncated?)"
    arrays = np.frombuffer(raw, dtype=np.int64, offset=8 + n)
    steps, counts, ids = arrays[:k], arrays[k:2 * k], arrays[2 * k:]
    first, last = (int(g) for g in BATCHES_RE.match(path.name).groups())
    if k == 0 or steps[0] != first or steps[-1] != last or (np.diff(steps) <= 0).any() or counts.sum() != m \
            or (counts < 0).any():
        return "its steps and counts are inconsistent with its name and sizes"
    return [steps, counts, ids]


def read_batches(run_dir: Path, run_id: str) -> pl.DataFrame:
    """Every logged batch of the run as a frame `step, example` (one row per example id), verified."""
    parts = []
    for path in sorted(p for p in run_dir.iterdir() if BATCHES_RE.match(p.name)):
        got = _check(path, path.read_bytes(), run_id)
        if isinstance(got, str):
            raise ChunkDamaged(f"{path}: {got} — the batches file is damaged; the states are unaffected")
        steps, counts, ids = got
        parts.append(pl.DataFrame({"step": np.repeat(steps, counts), "example": ids}))
    if not parts:
        return pl.DataFrame(schema={"step": pl.Int64, "example": pl.Int64})
    return pl.concat(parts).sort("step", maintain_order=True)


def batch_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if BATCHES_RE.match(p.name))
