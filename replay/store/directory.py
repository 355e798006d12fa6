"""The chunks of one run directory: which states it holds, and their flat bytes in order.

A whole-state run is one such directory; a sharded run is N of them side by side
(`store.sharded`). Both give `store.run.Run` the same reader: `steps`, `chunks`, `orphans`
(chunks after a gap), `invalid` (names no writer makes), `leftovers` (temp files),
`flat_state`, `flat_states`, `verify`, `live`, `missing`, `batches` and `manifest_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import torch

from replay.errors import ChunkDamaged, RunError
from replay.store.atomic import is_tmp
from replay.store.batches import batch_files, check_batches, read_batches
from replay.store.chunk import CHUNK_RE, Chunk
from replay.store.claim import is_locked
from replay.store.files import regular_size
from replay.store.layout import StateLayout
from replay.store.manifest import MANIFEST, Manifest


def not_recorded(path: Path, steps: list[int], every: int, t: int) -> RunError:
    have = f"{steps[0]}..{steps[-1]} every {every}" if steps else "none"
    return RunError(f"{path}: state {t} was not recorded (recorded: {have})")


class ChunkDir:
    """The contiguous prefix of a directory's chunks (a lost chunk ends it; what follows is an orphan)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest = Path(path), manifest
        self.layout = StateLayout(manifest.tensors)
        every = manifest.every
        self.chunks: list[Chunk] = []
        self.orphans: list[Chunk] = []  # chunks after a gap (a lost chunk): not part of the run
        self.invalid: list[Chunk] = []  # names no writer makes (more states than a chunk holds): damaged
        self.leftovers: list[str] = []  # temp files of writes a kill interrupted (or being written now): ignored
        found = []
        for p in self.path.iterdir():
            if CHUNK_RE.match(p.name):
                c = Chunk(p, every, self.layout, manifest.run_id, manifest.version)
                (found if c.claim_ok else self.invalid).append(c)
            elif is_tmp(p.name):
                self.leftovers.append(p.name)
        expected = 0
        for c in sorted(found, key=lambda c: c.first):
            if c.first == expected and not self.orphans:
                self.chunks.append(c)
                expected = c.last + every
            else:
                self.orphans.append(c)
        self.steps: list[int] = [t for c in self.chunks for t in c.steps]

    @property
    def live(self) -> bool | None:
        return is_locked(self.path)

    @property
    def missing(self) -> tuple[int, int] | None:
        if not self.orphans:
            return None
        return (self.steps[-1] + self.manifest.every if self.steps else 0), self.orphans[-1].last

    @property
    def batches(self) -> pl.DataFrame:
        return read_batches(self.path, self.manifest.run_id)

    def manifest_bytes(self) -> int:
        return regular_size(self.path / MANIFEST) or 0

    def chunk_of(self, t: int) -> Chunk:
        for c in self.chunks:
            if c.first <= t <= c.last and (t - c.first) % self.manifest.every == 0:
                return c
        raise not_recorded(self.path, self.steps, self.manifest.every, t)

    def flat_state(self, t: int) -> torch.Tensor:
        for _, flat in self.chunk_of(t).flat_states(start=t):
            return flat.clone()
        raise AssertionError("unreachable")

    def flat_states(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        stop = self.steps[-1] + 1 if stop is None and self.steps else (stop or 0)
        for c in self.chunks:
            if c.last < start or c.first >= stop:
                continue
            for t, flat in c.flat_states(start=start):
                if t >= stop:
                    return
                yield t, flat

    def verify(self) -> list[str]:
        problems = []
        if not self.chunks and not self.orphans:
            problems.append(f"{self.path}: nothing was recorded (no chunk); a recorder killed before its first "
                            f"flush leaves only the manifest")
        for c in self.invalid + self.chunks + self.orphans:
            try:
                c.verify(hint=False)
            except ChunkDamaged as e:
                problems.append(str(e))
        for p in batch_files(self.path):
            if why := check_batches(p, self.manifest.run_id):
                problems.append(f"{p}: {why} — the batches file is damaged; the states are unaffected")
        if self.orphans:
            a, b = self.missing
            problems.append(f"{self.path}: states from {a} are missing (a chunk is lost) but {len(self.orphans)} "
                            f"chunk(s) up to state {b} follow the gap; the run is readable up to state "
                            f"{self.steps[-1] if self.steps else 'none'}")
        return problems
