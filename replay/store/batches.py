"""The training batch of every step: which examples each update learned from (`Recorder.log_batch`).

A file `batches-{first:010d}-{last:010d}.safetensors` holds the updates first..last that logged
ids (step t is the update from state t to t+1, the numbering of the LCA frames): int64 tensors
`steps` [k], `counts` [k] (ids per step) and `ids` [Σ counts]. Like a chunk it is plain
safetensors, carries the run's id, and is sealed by an xxHash3 of every other byte
(`store.sealed`); its header must be exactly the one its sizes give. It is written right
after the chunk that holds the updates' end states, so a crash keeps the batches of every
flushed step. A reader checks the size the header implies before it reads (or checksums)
anything else, so a sparse or endless file costs nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl

from replay.errors import ChunkDamaged
from replay.store.checksum import PLACEHOLDER
from replay.store.files import open_regular, read_exactly, size_of, why_unreadable
from replay.store.sealed import Unsealed, check_seal, encode_header, read_header, write_sealed

BATCHES_FORMAT = "replay-batches/1"
BATCHES_RE = re.compile(r"^batches-(\d{10})-(\d{10})\.safetensors$")
NAMES = ("steps", "counts", "ids")


def _header(k: int, m: int, run_id: str, digest: str) -> bytes:
    entries, offset = {}, 0
    for name, n in zip(NAMES, (k, k, m), strict=True):
        entries[name] = {"dtype": "I64", "shape": [n], "data_offsets": [offset, offset + 8 * n]}
        offset += 8 * n
    return encode_header(entries, {"format": BATCHES_FORMAT, "run": run_id, "xxh3": digest})


def write_batches(run_dir: Path, rows: list[tuple[int, np.ndarray]], run_id: str, sync: bool = False) -> Path:
    """Write the (step, ids) rows (steps increasing) as one sealed file."""
    steps = np.array([t for t, _ in rows], dtype=np.int64)
    counts = np.array([len(ids) for _, ids in rows], dtype=np.int64)
    ids = np.concatenate([i for _, i in rows]).astype(np.int64, copy=False) if rows else np.zeros(0, np.int64)
    data = b"".join(a.tobytes() for a in (steps, counts, ids))
    path = run_dir / f"batches-{int(steps[0]):010d}-{int(steps[-1]):010d}.safetensors"
    return write_sealed(path, _header(len(steps), len(ids), run_id, PLACEHOLDER.decode()), data, sync=sync)


def _read(path: Path, run_id: str) -> list[np.ndarray]:
    """(steps, counts, ids) of a batches file, verified; Unsealed or OSError if it is not one."""
    first, last = (int(g) for g in BATCHES_RE.match(path.name).groups())
    with open_regular(path) as f:
        size = size_of(f)
        head, header = read_header(f, size, max_header=1 << 16)  # three entries: a few hundred bytes
        meta = header["__metadata__"]
        try:
            k, m = header["steps"]["shape"][0], header["ids"]["shape"][0]
        except (KeyError, TypeError, IndexError) as e:
            raise Unsealed(f"unreadable header ({type(e).__name__}: {e})") from None
        if not (type(k) is int and type(m) is int and 0 < k <= last - first + 1 and m >= 0):
            raise Unsealed("its sizes are inconsistent with its name")
        if size != len(head) + 8 * (2 * k + m):  # before reading or checksumming the data
            raise Unsealed(f"size {size:,} bytes, but its header describes {len(head) + 8 * (2 * k + m):,} "
                           f"(truncated, or a damaged header)")
        check_seal(f, head, size)
        if meta.get("run") != run_id:
            raise Unsealed(f"it belongs to another run (run id {meta.get('run')!r}, this run is {run_id})")
        if head != _header(k, m, run_id, str(meta.get("xxh3"))):
            raise Unsealed("its header is not a batches header")
        f.seek(len(head))
        arrays = np.frombuffer(read_exactly(f, 8 * (2 * k + m)), dtype=np.int64)
    steps, counts, ids = arrays[:k], arrays[k:2 * k], arrays[2 * k:]
    if steps[0] != first or steps[-1] != last or (np.diff(steps) <= 0).any() or counts.sum() != m \
            or (counts < 0).any():
        raise Unsealed("its steps and counts are inconsistent with its name and sizes")
    return [steps, counts, ids]


def check_batches(path: Path, run_id: str) -> str | None:
    """None if the batches file is sound, else what is wrong with it."""
    try:
        _read(path, run_id)
    except OSError as e:
        return why_unreadable(e)
    except Unsealed as e:
        return str(e)
    return None


def read_batches(run_dir: Path, run_id: str) -> pl.DataFrame:
    """Every logged batch of the run as a frame `step, example` (one row per example id), verified."""
    parts = []
    for path in batch_files(run_dir):
        try:
            steps, counts, ids = _read(path, run_id)
        except (OSError, Unsealed) as e:
            why = why_unreadable(e) if isinstance(e, OSError) else str(e)
            raise ChunkDamaged(f"{path}: {why} — the batches file is damaged; the states are unaffected") from None
        parts.append(pl.DataFrame({"step": np.repeat(steps, counts), "example": ids}))
    if not parts:
        return pl.DataFrame(schema={"step": pl.Int64, "example": pl.Int64})
    return pl.concat(parts).sort("step", maintain_order=True)


def batch_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.iterdir() if BATCHES_RE.match(p.name))
